package router

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/lag"
)

// Mode says how a request reaches the primary region.
type Mode string

// Replay modes.
const (
	// ModeFly answers with a fly-replay header; Fly's edge proxy (or `pgfly edge`) sends the
	// request again to the primary region.
	ModeFly Mode = "fly"
	// ModeProxy sends the request to the primary region's pgfly itself and returns that
	// answer, for platforms without Fly's edge.
	ModeProxy Mode = "proxy"
)

// Defaults for Config.
const (
	DefaultMaxReplayBody = 1 << 20 // Fly's own limit for replayable bodies
	// StatePrefix starts every fly-replay state pgfly writes; a request that arrives with it in
	// fly-replay-src has been replayed by pgfly already.
	StatePrefix = "pgfly"
)

// Consistency is the read-your-writes guarantee the shim gives.
type Consistency string

// Consistency levels.
const (
	// ConsistencySession hands out bookmarks after writes and makes reads wait for them.
	ConsistencySession Consistency = "session"
	// ConsistencyEventual hands out no bookmarks: reads may miss the client's own writes.
	ConsistencyEventual Consistency = "eventual"
)

// Replica is what the shim needs from the lag monitor for read-your-writes.
type Replica interface {
	// PrimaryPosition is the primary's current WAL position, with its timeline and system.
	PrimaryPosition(ctx context.Context) (lag.Position, error)
	// WaitForPosition returns once the nearby database has replayed p, ctx's error,
	// lag.ErrUnreachable as soon as it knows it cannot replay p before ctx's deadline, or
	// lag.ErrOtherHistory at once when p is not on its timeline of its system.
	WaitForPosition(ctx context.Context, p lag.Position) error
}

// Config describes the shim's place: where the app is, which region this is, and how to
// reach the primary region.
type Config struct {
	// Listen is where the edge sends HTTP, e.g. ":8080".
	Listen string
	// App is the app behind the shim, e.g. http://127.0.0.1:3000.
	App *url.URL
	// Region is this instance's region; PrimaryRegion the primary's.
	Region, PrimaryRegion string
	// Instance names this instance in fly-replay-src in proxy mode (FLY_MACHINE_ID).
	Instance string
	// Mode is ModeFly (the default) or ModeProxy.
	Mode Mode
	// PrimaryHTTP is the primary region's pgfly shim, for ModeProxy.
	PrimaryHTTP *url.URL
	// MaxReplayBody bounds the request bodies buffered for a replay in ModeProxy.
	MaxReplayBody int64
	// InjectTraceparent adds a fresh W3C traceparent to requests that lack one, so that an
	// app that propagates it into sqlcommenter comments gets precise matching.
	InjectTraceparent bool
	// IsPrimary reports whether the upstream database is the primary (not in recovery). With
	// it true, or Region equal to PrimaryRegion, nothing is replayed. May be nil.
	IsPrimary func() bool
	// Consistency is ConsistencySession (the default) or ConsistencyEventual.
	Consistency Consistency
	// ConsistencyWait bounds how long a request waits for the replica to reach its bookmark
	// before it is replayed in the primary region.
	ConsistencyWait time.Duration
	// Replica gives bookmarks and waits for them; nil turns bookmarks off.
	Replica Replica
	// UpstreamDown reports whether the monitor sees the nearby database down; while it
	// does, a replica region sends requests to the primary region before the app runs them
	// (except LocalRoutes). May be nil.
	UpstreamDown func() bool

	// ReplayRoutes are always sent to the primary region before the app runs them;
	// LocalRoutes are never learned nor sent up front (a refusal or an unreached bookmark is
	// still replayed). LocalRoutes wins where both match.
	ReplayRoutes, LocalRoutes RoutePatterns
	// DisableLearning turns off learned write routes.
	DisableLearning bool
	// MaxRoutes bounds the route keys the shim remembers (DefaultMaxRoutes); the least
	// recently used is forgotten first.
	MaxRoutes int

	// Observe, when set, is told every decision. It must be quick.
	Observe func(Decision)
	// ObserveWait, when set, is told every bookmark wait.
	ObserveWait func(Wait)
	// ObserveRefusal, when set, is told how many requests in flight each standby refusal
	// tainted.
	ObserveRefusal func(tainted int)
	// ObserveTimeout, when set, is told every request answered 408 or 504 for a timeout.
	ObserveTimeout func(Timeout)

	// IdleTimeout closes a keep-alive connection that waits this long for its next request
	// (DefaultIdleTimeout when zero; NoTimeout for none).
	IdleTimeout time.Duration
	// BodyTimeout bounds how long a request's whole body may take to arrive, from when the
	// shim starts serving it (DefaultBodyTimeout when zero; NoTimeout for none).
	BodyTimeout time.Duration
	// AppTimeout bounds the wait for the app's response headers once the request has been
	// sent to it in full (DefaultAppTimeout when zero; NoTimeout for none).
	AppTimeout time.Duration
}

// Violation is a standby refusal reported by the Postgres relay.
type Violation struct {
	SessionID uint64
	Time      time.Time
	// SentAt is no earlier than when the refused statement was sent; a request that started
	// after it cannot have caused the refusal. Zero when unknown.
	SentAt  time.Time
	Code    string
	Message string
	TraceID string // W3C trace id of the failing statement's comment, or ""
	// Down: not a refusal but pgfly failing to reach the upstream, or losing it, while the
	// session had written nothing (see UpstreamFailed).
	Down bool
}

// Shim is the HTTP shim. Create it with New, then Listen and Serve.
type Shim struct {
	cfg          Config
	log          *zap.Logger
	proxy        *httputil.ReverseProxy // to the app
	primaryProxy *httputil.ReverseProxy // to the primary region, in ModeProxy
	transports   []*http.Transport      // under them: the app's, and the primary region's in ModeProxy
	timeouts     timeouts               // cfg's, resolved
	routes       *routes                // learned write routes; nil when learning is off
	replayRoutes *patternCounts         // cfg.ReplayRoutes
	localRoutes  *patternCounts         // cfg.LocalRoutes

	servedHere atomic.Uint64 // requests the app here answered, not replayed

	mu       sync.Mutex
	inflight map[*request]struct{}

	ln     net.Listener
	srv    *http.Server
	closed bool // Shutdown or Close was called: Serve must not start
}

// ConfigError is a Config field that New cannot take, named as in Config, so that the caller
// can name its own setting (a flag) for it.
type ConfigError struct {
	Field string // e.g. "Consistency"
	Err   error
}

func (e *ConfigError) Error() string { return "router: " + e.Field + ": " + e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

// New checks cfg and returns a Shim that is not yet listening. A field it cannot take is
// reported as a *ConfigError.
func New(cfg Config, log *zap.Logger) (*Shim, error) {
	if cfg.App == nil || cfg.App.Host == "" {
		return nil, &ConfigError{"App", errors.New("an http:// or https:// URL is required")}
	}
	if cfg.Mode == "" {
		cfg.Mode = ModeFly
	}
	switch cfg.Mode {
	case ModeFly:
	case ModeProxy:
		if cfg.PrimaryHTTP == nil || cfg.PrimaryHTTP.Host == "" {
			return nil, &ConfigError{"PrimaryHTTP", errors.New("is required in replay mode proxy")}
		}
	default:
		return nil, &ConfigError{"Mode", fmt.Errorf("%q: want fly or proxy", cfg.Mode)}
	}
	if cfg.PrimaryRegion == "" {
		return nil, &ConfigError{"PrimaryRegion", errors.New("is required")}
	}
	for _, d := range []struct {
		field string
		v     time.Duration
	}{{"ConsistencyWait", cfg.ConsistencyWait}, {"IdleTimeout", cfg.IdleTimeout}, {"BodyTimeout", cfg.BodyTimeout},
		{"AppTimeout", cfg.AppTimeout}} {
		if d.v < 0 && (d.field == "ConsistencyWait" || d.v != NoTimeout) {
			return nil, &ConfigError{d.field, fmt.Errorf("%v is negative", d.v)}
		}
	}
	if cfg.MaxReplayBody == 0 {
		cfg.MaxReplayBody = DefaultMaxReplayBody
	}
	switch cfg.Consistency {
	case "":
		cfg.Consistency = ConsistencySession
	case ConsistencySession, ConsistencyEventual:
	default:
		return nil, &ConfigError{"Consistency", fmt.Errorf("%q: want session or eventual", cfg.Consistency)}
	}
	if cfg.ConsistencyWait == 0 {
		cfg.ConsistencyWait = DefaultConsistencyWait
	}
	if cfg.MaxRoutes == 0 {
		cfg.MaxRoutes = DefaultMaxRoutes
	}
	if log == nil {
		log = zap.NewNop()
	}
	s := &Shim{cfg: cfg, log: log, inflight: make(map[*request]struct{}), timeouts: resolveTimeouts(cfg),
		replayRoutes: newPatternCounts(cfg.ReplayRoutes), localRoutes: newPatternCounts(cfg.LocalRoutes)}
	if !cfg.DisableLearning {
		s.routes = newRoutes(cfg.MaxRoutes)
	}
	appTransport := newTransport()
	appTransport.ResponseHeaderTimeout = s.timeouts.app
	s.transports = append(s.transports, appTransport)
	s.proxy = &httputil.ReverseProxy{
		Rewrite:        s.rewrite,
		Transport:      appTransport,
		FlushInterval:  flushInterval,
		BufferPool:     copyBuffers{},
		ModifyResponse: s.modifyResponse,
		ErrorHandler:   s.appFailed,
	}
	if cfg.Mode == ModeProxy {
		// No response-header timeout toward the primary region: its pgfly bounds its own app,
		// and answers 504 itself.
		primaryTransport := newTransport()
		s.transports = append(s.transports, primaryTransport)
		s.primaryProxy = &httputil.ReverseProxy{
			Rewrite:       s.rewriteToPrimary,
			Transport:     primaryTransport,
			FlushInterval: flushInterval,
			BufferPool:    copyBuffers{},
			ErrorHandler:  s.primaryFailed,
		}
	}
	return s, nil
}

// flushInterval bounds how long bytes the app has sent may wait in the shim's write buffer.
// ReverseProxy flushes every write of a streamed response (no Content-Length, or server-sent
// events) by itself; a response of known length whose app stalls mid-body (a long poll, a
// progress download) reaches the client within this. -1, a flush per write, cost a goroutine
// and a write of its own for the headers of every response; this costs a timer (5
// allocations), and a response written at once within the interval no flush of its own.
const flushInterval = 10 * time.Millisecond

func newTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.DisableCompression = true // pass bodies through byte for byte
	t.MaxIdleConnsPerHost = 64
	return t
}

// Listen binds the HTTP listener, so that Addr reports the port when Listen is ":0".
func (s *Shim) Listen() error {
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", s.cfg.Listen, err)
	}
	s.ln = ln
	return nil
}

// Addr is the address the shim listens on; nil before Listen.
func (s *Shim) Addr() net.Addr {
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Serve answers HTTP until Shutdown or Close; it then returns nil.
func (s *Shim) Serve() error {
	if s.ln == nil {
		if err := s.Listen(); err != nil {
			return err
		}
	}
	s.mu.Lock()
	if s.closed { // stopped before it started; the listener is closed already
		s.mu.Unlock()
		return nil
	}
	// No ReadTimeout or WriteTimeout: each bounds a whole exchange, and would cut server-sent
	// events, long downloads and upgraded connections. A body has a deadline of its own.
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: readHeaderTimeout, IdleTimeout: s.timeouts.idle}
	srv := s.srv
	s.mu.Unlock()
	s.log.Info("listening", zap.String("addr", s.ln.Addr().String()), zap.String("app", s.cfg.App.String()),
		zap.Duration("idle_timeout", s.timeouts.idle), zap.Duration("body_timeout", s.timeouts.body), zap.Duration("app_timeout", s.timeouts.app),
		zap.String("region", s.cfg.Region), zap.String("primary_region", s.cfg.PrimaryRegion), zap.String("mode", string(s.cfg.Mode)),
		zap.Bool("learn_routes", s.routes != nil), zap.Stringer("replay_routes", s.cfg.ReplayRoutes), zap.Stringer("local_routes", s.cfg.LocalRoutes))
	if err := srv.Serve(s.ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Shutdown stops accepting requests and waits for those in flight, until ctx is done.
func (s *Shim) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	srv := s.srv
	s.mu.Unlock()
	defer s.closeIdleConnections()
	if srv == nil {
		return s.closeListener()
	}
	return srv.Shutdown(ctx)
}

// Close stops the shim at once. It is idempotent.
func (s *Shim) Close() error {
	s.mu.Lock()
	s.closed = true
	srv := s.srv
	s.mu.Unlock()
	defer s.closeIdleConnections()
	if srv == nil {
		return s.closeListener()
	}
	return srv.Close()
}

func (s *Shim) closeIdleConnections() {
	for _, t := range s.transports {
		t.CloseIdleConnections()
	}
}

func (s *Shim) closeListener() error {
	if s.ln == nil {
		return nil
	}
	if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}

// Routes reports the learned and configured routes, for GET /routes.
func (s *Shim) Routes() RoutesReport {
	rep := RoutesReport{Learned: []RouteStats{}, Configured: s.replayRoutes.stats(), Local: s.localRoutes.stats()}
	if s.routes != nil {
		if learned, tracked := s.routes.learned(); learned != nil {
			rep.Learned, rep.Tracked = learned, tracked
		} else {
			rep.Tracked = tracked
		}
	}
	var all []string
	for _, p := range rep.Configured {
		all = append(all, p.Pattern)
	}
	for _, r := range rep.Learned {
		all = append(all, r.Route)
	}
	rep.ReplayRoutes = strings.Join(all, ",")
	return rep
}

// ServeHTTP serves one request: in a replica region it may send it to the primary region
// before the app runs it (a learned or configured write route, or a bookmark the replica has
// not reached); otherwise it proxies it to the app, tracking it while it is in flight.
func (s *Shim) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	req := s.newRequest(r)
	if s.cfg.InjectTraceparent && req.traceID == "" && r.Header.Get(traceparentHeader) == "" {
		tp := newTraceparent()
		r.Header.Set(traceparentHeader, tp)
		req.traceID = traceIDOf(tp)
	}
	hasBody := !req.upgrade && r.Body != nil && r.Body != http.NoBody
	if hasBody && s.timeouts.body > 0 {
		defer s.limitBody(w, r, req)()
	}
	if hasBody && s.cfg.Mode == ModeProxy {
		if err := s.bufferBody(r, req); err != nil {
			if req.bodyLate() {
				s.bodyTimedOut(w, req)
				return
			}
			http.Error(w, "pgfly: reading request body: "+err.Error(), http.StatusBadRequest)
			return
		}
	}
	r = r.WithContext(context.WithValue(r.Context(), ctxKey{}, req))
	req.in = r
	if !s.primary() && !req.upgrade && !req.replayed {
		c, gone := s.upFront(r.Context(), req)
		if gone {
			return // the client went away while its bookmark was waited for
		}
		if c.reason != "" {
			s.replay(w, req, c)
			return
		}
	}
	s.track(req)
	defer s.untrack(req)
	s.proxy.ServeHTTP(w, r)
}

// upFront decides, in a replica region, whether a request goes to the primary region before
// the app runs it: the nearby database is down, a configured or learned write route, else a
// bookmark that the replica does not reach in time. gone reports a client that went away while it waited.
func (s *Shim) upFront(ctx context.Context, req *request) (c cause, gone bool) {
	switch {
	case s.localRoutes.match(req.method, req.path):
		req.configured = true // an operator's word: nothing to learn here
	case s.cfg.UpstreamDown != nil && s.cfg.UpstreamDown():
		return cause{reason: ReasonReplicaDown}, false
	case s.replayRoutes.match(req.method, req.path):
		req.configured = true
		return cause{reason: ReasonRoute, route: "configured"}, false
	case s.routes != nil && req.key != "":
		upFront, probe := s.routes.admit(req.key)
		req.probe = probe
		if upFront {
			return cause{reason: ReasonRoute, route: "learned"}, false
		}
	}
	pos, ok := s.bookmark(req)
	if !ok {
		return cause{}, false
	}
	switch s.waitFor(ctx, req, pos) {
	case WaitCaughtUp:
		return cause{}, false
	case WaitCancelled:
		return cause{}, true
	default:
		return cause{reason: ReasonLag}, false
	}
}

func (s *Shim) rewrite(pr *httputil.ProxyRequest) {
	pr.SetURL(s.cfg.App)
	pr.Out.Host = pr.In.Host
	keepForwarded(pr)
}

// primary reports whether this instance fronts the primary database.
func (s *Shim) primary() bool {
	return s.cfg.Region == s.cfg.PrimaryRegion || s.cfg.IsPrimary != nil && s.cfg.IsPrimary()
}

func (s *Shim) observe(d Decision) {
	if s.cfg.Observe != nil {
		s.cfg.Observe(d)
	}
}
