package router

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/lag"
)

// Mode says how a tainted request reaches the primary region.
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
	// maxDrain bounds how much of a discarded app response is read before its connection is
	// dropped.
	maxDrain = 256 << 10
)

// Replay reasons, written into fly-replay's state and the logs.
const (
	ReasonReadOnly = "read_only" // the replica refused a write
	ReasonLag      = "lag"       // the replica has not replayed the client's bookmark in time
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

// Bookmark defaults.
const (
	DefaultConsistencyWait = 500 * time.Millisecond
	// BookmarkCookie holds the primary's WAL position after the client's last write.
	BookmarkCookie = "pgfly_lsn"
	// BookmarkMaxAge is how long a bookmark matters: replicas are far less behind than this.
	BookmarkMaxAge = 5 * time.Minute
)

// Replica is what the shim needs from the lag monitor for read-your-writes.
type Replica interface {
	// PrimaryLSN is the primary's current WAL position.
	PrimaryLSN(ctx context.Context) (lag.LSN, error)
	// WaitFor returns once the nearby database has replayed lsn, or ctx's error.
	WaitFor(ctx context.Context, lsn lag.LSN) error
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
	// Observe, when set, is told every decision, for metrics. It must be quick.
	Observe func(Decision)
	// ObserveWait, when set, is told every bookmark wait: how long, and "caught_up",
	// "timeout" or "cancelled".
	ObserveWait func(wait time.Duration, outcome string)
}

// Violation is a read-only violation reported by the Postgres relay.
type Violation struct {
	SessionID uint64
	Time      time.Time
	Code      string
	Message   string
	TraceID   string // W3C trace id from the failing statement's comment, or ""
}

// Decision is what the shim did about one request or violation, for metrics.
type Decision struct {
	Outcome string // "replayed", "not_replayed", "loop_blocked", "too_large", "started", "no_request", "primary"
	Reason  string // ReasonReadOnly, ...
	Match   string // "precise", "overlap" or ""
}

// Shim is the HTTP shim. Create it with New, then Listen and Serve.
type Shim struct {
	cfg          Config
	log          *zap.Logger
	proxy        *httputil.ReverseProxy
	transport    *http.Transport        // to the app and the primary region
	client       *http.Client           // to the primary region, in ModeProxy
	primaryProxy *httputil.ReverseProxy // to the primary region, in ModeProxy

	mu       sync.Mutex
	inflight map[*request]struct{}

	ln     net.Listener
	srv    *http.Server
	closed bool // Shutdown or Close was called: Serve must not start
}

// request is one request in flight through the shim.
type request struct {
	method, path string
	url          *url.URL // as the client sent it
	start        time.Time
	traceID      string
	replayed     bool   // it came from a pgfly replay already: never replay it again
	upgrade      bool   // a protocol upgrade (WebSocket): never replayed
	secure       bool   // the client's request was HTTPS
	body         []byte // the buffered body, in ModeProxy
	bodyTooLarge bool   // the body exceeded MaxReplayBody and was streamed

	mu      sync.Mutex
	started bool       // the response has been decided and may be on its way
	taint   *Violation // the violation that tainted it, if any
	match   string
}

type ctxKey struct{}

// New checks cfg and returns a Shim that is not yet listening.
func New(cfg Config, log *zap.Logger) (*Shim, error) {
	if cfg.App == nil || cfg.App.Host == "" {
		return nil, errors.New("app URL is required")
	}
	if cfg.Mode == "" {
		cfg.Mode = ModeFly
	}
	switch cfg.Mode {
	case ModeFly:
	case ModeProxy:
		if cfg.PrimaryHTTP == nil || cfg.PrimaryHTTP.Host == "" {
			return nil, errors.New("replay mode proxy needs the primary region's HTTP URL")
		}
	default:
		return nil, fmt.Errorf("unknown replay mode %q: want fly or proxy", cfg.Mode)
	}
	if cfg.PrimaryRegion == "" {
		return nil, errors.New("primary region is required")
	}
	if cfg.MaxReplayBody == 0 {
		cfg.MaxReplayBody = DefaultMaxReplayBody
	}
	switch cfg.Consistency {
	case "":
		cfg.Consistency = ConsistencySession
	case ConsistencySession, ConsistencyEventual:
	default:
		return nil, fmt.Errorf("unknown consistency %q: want session or eventual", cfg.Consistency)
	}
	if cfg.ConsistencyWait == 0 {
		cfg.ConsistencyWait = DefaultConsistencyWait
	}
	if log == nil {
		log = zap.NewNop()
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.DisableCompression = true // pass bodies through byte for byte
	transport.MaxIdleConnsPerHost = 64
	s := &Shim{cfg: cfg, log: log, inflight: make(map[*request]struct{}), transport: transport}
	s.proxy = &httputil.ReverseProxy{
		Rewrite:        s.rewrite,
		Transport:      transport,
		FlushInterval:  -1,
		BufferPool:     copyBuffers{},
		ModifyResponse: s.modifyResponse,
		ErrorHandler:   s.errorHandler,
	}
	if cfg.Mode == ModeProxy {
		s.client = &http.Client{
			Transport:     transport,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		s.primaryProxy = &httputil.ReverseProxy{
			Rewrite:       s.rewriteToPrimary,
			Transport:     transport,
			FlushInterval: -1,
			BufferPool:    copyBuffers{},
			ErrorHandler:  s.errorHandler,
		}
	}
	return s, nil
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
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 30 * time.Second}
	srv := s.srv
	s.mu.Unlock()
	s.log.Info("listening", zap.String("addr", s.ln.Addr().String()), zap.String("app", s.cfg.App.String()),
		zap.String("region", s.cfg.Region), zap.String("primary_region", s.cfg.PrimaryRegion), zap.String("mode", string(s.cfg.Mode)))
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
	defer s.transport.CloseIdleConnections()
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
	defer s.transport.CloseIdleConnections()
	if srv == nil {
		return s.closeListener()
	}
	return srv.Close()
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

// InFlight is the number of requests being served.
func (s *Shim) InFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.inflight)
}

// ServeHTTP proxies one request to the app, tracking it while it is in flight.
func (s *Shim) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	req := &request{
		method:   r.Method,
		path:     r.URL.Path,
		url:      r.URL,
		start:    time.Now(),
		traceID:  traceIDOf(r.Header.Get("traceparent")),
		replayed: replayedByPgfly(r.Header),
		upgrade:  r.Header.Get("Upgrade") != "",
		secure:   r.TLS != nil || r.Header.Get("Fly-Forwarded-Proto") == "https" || r.Header.Get("X-Forwarded-Proto") == "https",
	}
	if s.cfg.InjectTraceparent && req.traceID == "" && r.Header.Get("traceparent") == "" {
		tp := newTraceparent()
		r.Header.Set("traceparent", tp)
		req.traceID = traceIDOf(tp)
	}
	if s.cfg.Mode == ModeProxy && !req.upgrade && r.Body != nil && r.Body != http.NoBody {
		if err := s.bufferBody(r, req); err != nil {
			http.Error(w, "pgfly: reading request body: "+err.Error(), http.StatusBadRequest)
			return
		}
	}
	r = r.WithContext(context.WithValue(r.Context(), ctxKey{}, req))
	if lsn, ok := s.bookmark(r, req); ok && !s.caughtUp(r.Context(), req, lsn) {
		if r.Context().Err() == nil {
			s.replayNow(w, r, req, ReasonLag)
		}
		return
	}
	s.track(req)
	defer s.untrack(req)
	s.proxy.ServeHTTP(w, r)
}

// bookmark returns the WAL position a request must see, when this is a replica region that
// honours bookmarks and the request carries a valid one.
func (s *Shim) bookmark(r *http.Request, req *request) (lag.LSN, bool) {
	if s.cfg.Consistency != ConsistencySession || s.cfg.Replica == nil || req.upgrade || req.replayed {
		return 0, false
	}
	c, err := r.Cookie(BookmarkCookie)
	if err != nil {
		return 0, false
	}
	lsn, err := lag.ParseLSN(c.Value)
	if err != nil {
		s.log.Debug("malformed bookmark ignored", zap.String("path", req.path), zap.Error(err))
		return 0, false
	}
	if s.primary() {
		return 0, false
	}
	return lsn, true
}

// caughtUp waits, up to ConsistencyWait, for the replica to replay lsn.
func (s *Shim) caughtUp(ctx context.Context, req *request, lsn lag.LSN) bool {
	start := time.Now()
	wctx, cancel := context.WithTimeout(ctx, s.cfg.ConsistencyWait)
	defer cancel()
	err := s.cfg.Replica.WaitFor(wctx, lsn)
	waited := time.Since(start)
	outcome := "caught_up"
	switch {
	case err == nil:
	case ctx.Err() != nil:
		outcome = "cancelled"
	default:
		outcome = "timeout"
	}
	if s.cfg.ObserveWait != nil {
		s.cfg.ObserveWait(waited, outcome)
	}
	s.log.Debug("bookmark wait", zap.String("path", req.path), zap.Stringer("lsn", lsn),
		zap.Duration("waited", waited), zap.String("outcome", outcome))
	return err == nil
}

// replayNow sends a request to the primary region before the app has seen it.
func (s *Shim) replayNow(w http.ResponseWriter, r *http.Request, req *request, reason string) {
	log := s.log.With(zap.String("method", req.method), zap.String("path", req.path),
		zap.String("region", s.cfg.Region), zap.String("target_region", s.cfg.PrimaryRegion),
		zap.String("reason", reason), zap.String("mode", string(s.cfg.Mode)),
		zap.Duration("duration", time.Since(req.start)))
	switch {
	case s.cfg.Mode == ModeFly:
		log.Info("replaying in the primary region")
		s.observe(Decision{Outcome: "replayed", Reason: reason})
		w.Header().Set("Fly-Replay", fmt.Sprintf("region=%s;state=%s_%s", s.cfg.PrimaryRegion, StatePrefix, reason))
		w.Header().Set("Cache-Control", "no-store")
		http.Error(w, fmt.Sprintf("pgfly: retry in region %s: the database here has not caught up with your last write", s.cfg.PrimaryRegion), http.StatusConflict)
	case req.bodyTooLarge:
		log.Error("cannot replay: request body over the replay limit", zap.Int64("limit", s.cfg.MaxReplayBody))
		s.observe(Decision{Outcome: "too_large", Reason: reason})
		http.Error(w, fmt.Sprintf("pgfly: this request must go to region %s and its body is over the %d-byte replay limit (--max-replay-body)",
			s.cfg.PrimaryRegion, s.cfg.MaxReplayBody), http.StatusServiceUnavailable)
	default:
		log.Info("replaying in the primary region")
		s.observe(Decision{Outcome: "replayed", Reason: reason})
		s.primaryProxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), reasonKey{}, reason)))
	}
}

type reasonKey struct{}

// rewriteToPrimary points a request at the primary region's pgfly, marked as Fly marks a replay.
func (s *Shim) rewriteToPrimary(pr *httputil.ProxyRequest) {
	pr.SetURL(s.cfg.PrimaryHTTP)
	pr.Out.Host = pr.In.Host
	for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		if v, ok := pr.In.Header[h]; ok {
			pr.Out.Header[h] = v
		}
	}
	reason, _ := pr.In.Context().Value(reasonKey{}).(string)
	pr.Out.Header.Set("Fly-Replay-Src", s.replaySrc(reason))
}

func (s *Shim) replaySrc(reason string) string {
	instance := s.cfg.Instance
	if instance == "" {
		instance = "pgfly"
	}
	return fmt.Sprintf("instance=%s;region=%s;t=%d;state=%s_%s", instance, s.cfg.Region, time.Now().UnixMicro(), StatePrefix, reason)
}

// setBookmark gives the client the primary's WAL position after its write, so that its next
// request, wherever it lands, sees that write.
func (s *Shim) setBookmark(resp *http.Response, req *request) {
	ctx, cancel := context.WithTimeout(resp.Request.Context(), time.Second)
	defer cancel()
	lsn, err := s.cfg.Replica.PrimaryLSN(ctx)
	if err != nil {
		s.log.Warn("no bookmark: cannot read the primary's WAL position", zap.String("path", req.path), zap.Error(err))
		return
	}
	c := http.Cookie{
		Name:     BookmarkCookie,
		Value:    lsn.String(),
		Path:     "/",
		MaxAge:   int(BookmarkMaxAge / time.Second),
		HttpOnly: true,
		SameSite: http.SameSiteLaxMode,
		Secure:   req.secure,
	}
	resp.Header.Add("Set-Cookie", c.String())
}

// wantsBookmark: in the primary region, a request replayed here or one that may have written.
func (s *Shim) wantsBookmark(req *request) bool {
	return s.cfg.Consistency == ConsistencySession && s.cfg.Replica != nil && s.primary() &&
		(req.replayed || req.method != http.MethodGet && req.method != http.MethodHead)
}

// bufferBody keeps up to MaxReplayBody bytes of the body so the request can be sent again;
// a larger body is streamed to the app, and the request cannot be replayed.
func (s *Shim) bufferBody(r *http.Request, req *request) error {
	limit := s.cfg.MaxReplayBody
	if r.ContentLength > limit {
		req.bodyTooLarge = true
		return nil
	}
	buf, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return err
	}
	if int64(len(buf)) > limit {
		req.bodyTooLarge = true
		r.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(buf), r.Body), r.Body}
		return nil
	}
	req.body = buf
	r.Body = io.NopCloser(bytes.NewReader(buf))
	return nil
}

func (s *Shim) track(req *request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inflight[req] = struct{}{}
}

func (s *Shim) untrack(req *request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.inflight, req)
}

func (s *Shim) rewrite(pr *httputil.ProxyRequest) {
	pr.SetURL(s.cfg.App)
	pr.Out.Host = pr.In.Host
	// Rewrite drops these; the edge set them, and the app should see them as sent.
	for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		if v, ok := pr.In.Header[h]; ok {
			pr.Out.Header[h] = v
		}
	}
}

// primary reports whether this instance fronts the primary database.
func (s *Shim) primary() bool {
	return s.cfg.Region == s.cfg.PrimaryRegion || s.cfg.IsPrimary != nil && s.cfg.IsPrimary()
}

// ReadOnly taints the requests a read-only violation may belong to. It is called by the
// relay before the error reaches the app, so the taint is in place before the app answers.
func (s *Shim) ReadOnly(v Violation) {
	log := s.log.With(zap.Uint64("session", v.SessionID), zap.String("sqlstate", v.Code), zap.String("error", v.Message))
	if s.primary() {
		log.Error("read-only violation in the primary region: not replaying; is the primary read-only (disk full, default_transaction_read_only)?",
			zap.String("region", s.cfg.Region))
		s.observe(Decision{Outcome: "primary", Reason: ReasonReadOnly})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if v.TraceID != "" {
		var only *request
		n := 0
		for r := range s.inflight {
			if r.traceID == v.TraceID && !r.upgrade {
				only, n = r, n+1
			}
		}
		if n == 1 {
			if !only.taintWith(&v, "precise") {
				log.Warn("read-only violation matched a request whose response has started: cannot replay it",
					zap.String("method", only.method), zap.String("path", only.path), zap.String("trace_id", v.TraceID))
				s.observe(Decision{Outcome: "started", Reason: ReasonReadOnly, Match: "precise"})
			}
			return
		}
	}
	tainted, started := 0, 0
	for r := range s.inflight {
		if r.upgrade {
			continue
		}
		if r.taintWith(&v, "overlap") {
			tainted++
		} else {
			started++
		}
	}
	switch {
	case tainted > 0:
		log.Debug("read-only violation tainted requests", zap.Int("requests", tainted))
	case started > 0:
		log.Warn("read-only violation while only started responses are in flight: cannot replay them",
			zap.Int("started", started))
		s.observe(Decision{Outcome: "started", Reason: ReasonReadOnly, Match: "overlap"})
	default:
		log.Warn("read-only violation with no HTTP request in flight (a background job or console?): the error reaches its client as it is")
		s.observe(Decision{Outcome: "no_request", Reason: ReasonReadOnly})
	}
}

// taintWith marks the request for replay unless its response has started. The first
// violation wins.
func (r *request) taintWith(v *Violation, match string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started {
		return false
	}
	if r.taint == nil {
		r.taint, r.match = v, match
	}
	return true
}

// begin marks the response as started and returns the violation that tainted it, if any.
func (r *request) begin() (*Violation, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.started = true
	return r.taint, r.match
}

// modifyResponse replaces a tainted request's response with a replay.
func (s *Shim) modifyResponse(resp *http.Response) error {
	req, _ := resp.Request.Context().Value(ctxKey{}).(*request)
	if req == nil {
		return nil
	}
	v, match := req.begin()
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return nil
	}
	if v == nil {
		if s.wantsBookmark(req) {
			s.setBookmark(resp, req)
		}
		return nil
	}
	log := s.log.With(zap.String("method", req.method), zap.String("path", req.path),
		zap.String("region", s.cfg.Region), zap.String("target_region", s.cfg.PrimaryRegion),
		zap.String("reason", ReasonReadOnly), zap.Uint64("session", v.SessionID),
		zap.String("sqlstate", v.Code), zap.String("match", match), zap.String("mode", string(s.cfg.Mode)))
	appStatus := resp.StatusCode
	go discard(resp.Body)
	switch {
	case req.replayed:
		log.Error("replayed request hit a read-only database again: not replaying twice",
			zap.Int("app_status", appStatus), zap.Duration("duration", time.Since(req.start)))
		s.observe(Decision{Outcome: "loop_blocked", Reason: ReasonReadOnly, Match: match})
		setText(resp, http.StatusServiceUnavailable,
			"pgfly: this request was already replayed to the primary region and still hit a read-only database; not replaying it again\n")
	case s.cfg.Mode == ModeFly:
		setText(resp, http.StatusConflict, fmt.Sprintf("pgfly: retry in region %s: the database here refused a write\n", s.cfg.PrimaryRegion))
		resp.Header.Set("Fly-Replay", fmt.Sprintf("region=%s;state=%s_%s", s.cfg.PrimaryRegion, StatePrefix, ReasonReadOnly))
		log.Info("replaying in the primary region", zap.Int("app_status", appStatus), zap.Duration("duration", time.Since(req.start)))
		s.observe(Decision{Outcome: "replayed", Reason: ReasonReadOnly, Match: match})
	case req.bodyTooLarge:
		log.Error("cannot replay: request body over the replay limit", zap.Int64("limit", s.cfg.MaxReplayBody))
		s.observe(Decision{Outcome: "too_large", Reason: ReasonReadOnly, Match: match})
		setText(resp, http.StatusServiceUnavailable, fmt.Sprintf(
			"pgfly: this request wrote to a read-only replica and its body is over the %d-byte replay limit (--max-replay-body); send it to region %s\n",
			s.cfg.MaxReplayBody, s.cfg.PrimaryRegion))
	default:
		start := time.Now()
		primary, err := s.replay(resp.Request, req, ReasonReadOnly)
		if err != nil {
			log.Error("replay to the primary region failed", zap.Error(err))
			s.observe(Decision{Outcome: "not_replayed", Reason: ReasonReadOnly, Match: match})
			setText(resp, http.StatusBadGateway, "pgfly: could not replay this request in the primary region: "+err.Error()+"\n")
			return nil
		}
		log.Info("replayed in the primary region", zap.Int("primary_status", primary.StatusCode),
			zap.Duration("replay_duration", time.Since(start)), zap.Duration("duration", time.Since(req.start)))
		s.observe(Decision{Outcome: "replayed", Reason: ReasonReadOnly, Match: match})
		resp.StatusCode, resp.Status = primary.StatusCode, primary.Status
		removeHopByHop(primary.Header) // ReverseProxy filtered the app's headers, not these
		resp.Header, resp.Trailer = primary.Header, primary.Trailer
		resp.Body, resp.ContentLength = primary.Body, primary.ContentLength
		resp.TransferEncoding = primary.TransferEncoding
	}
	return nil
}

// replay sends the request to the primary region's pgfly, marked as Fly marks a replay.
func (s *Shim) replay(out *http.Request, req *request, reason string) (*http.Response, error) {
	u := *s.cfg.PrimaryHTTP
	// The client's path and query, escaped as sent: out's carry the app's base URL.
	u.RawPath = strings.TrimSuffix(u.EscapedPath(), "/") + req.url.EscapedPath()
	u.Path = strings.TrimSuffix(u.Path, "/") + req.url.Path
	u.RawQuery = req.url.RawQuery
	r, err := http.NewRequestWithContext(out.Context(), req.method, u.String(), bytes.NewReader(req.body))
	if err != nil {
		return nil, err
	}
	r.Header = out.Header.Clone()
	r.Host = out.Host
	if len(req.body) == 0 {
		r.Body, r.ContentLength = http.NoBody, 0
	}
	r.Header.Set("Fly-Replay-Src", s.replaySrc(reason))
	return s.client.Do(r)
}

func (s *Shim) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, context.Canceled) {
		return // the client went away
	}
	s.log.Warn("app unreachable", zap.String("app", s.cfg.App.String()), zap.String("method", r.Method),
		zap.String("path", r.URL.Path), zap.Error(err))
	http.Error(w, "pgfly: the app did not answer: "+err.Error(), http.StatusBadGateway)
}

func (s *Shim) observe(d Decision) {
	if s.cfg.Observe != nil {
		s.cfg.Observe(d)
	}
}

// discard drains a little of a response body that will never be sent, then closes it. It runs
// on its own goroutine, so that an app still writing cannot hold up the replay; the read ends
// at the latest when the shim has answered, which cancels the request to the app.
func discard(body io.ReadCloser) {
	io.Copy(io.Discard, io.LimitReader(body, maxDrain))
	body.Close()
}

// setText replaces a response with a short text one.
func setText(resp *http.Response, status int, body string) {
	resp.StatusCode = status
	resp.Status = strconv.Itoa(status) + " " + http.StatusText(status)
	resp.Header = http.Header{
		"Content-Type":   {"text/plain; charset=utf-8"},
		"Content-Length": {strconv.Itoa(len(body))},
		"Cache-Control":  {"no-store"},
	}
	resp.Trailer = nil
	resp.TransferEncoding = nil
	resp.ContentLength = int64(len(body))
	resp.Body = io.NopCloser(strings.NewReader(body))
}

// replayedByPgfly reports whether a request is a replay pgfly asked for (the loop guard), or
// one Fly could not deliver and so cannot replay again.
func replayedByPgfly(h http.Header) bool {
	if h.Get("Fly-Replay-Failed") != "" {
		return true
	}
	for _, src := range h.Values("Fly-Replay-Src") {
		// Fields are split by ';', and a proxy may join several values into one with ','.
		for _, field := range strings.FieldsFunc(src, func(c rune) bool { return c == ';' || c == ',' }) {
			k, v, _ := strings.Cut(strings.TrimSpace(field), "=")
			if k == "state" && strings.HasPrefix(strings.Trim(v, `"`), StatePrefix) {
				return true
			}
		}
	}
	return false
}

// traceIDOf returns the trace id of a W3C traceparent header ("00-<32 hex>-<16 hex>-<2 hex>"),
// or "" when it is not one.
func traceIDOf(tp string) string {
	parts := strings.Split(strings.TrimSpace(tp), "-")
	if len(parts) < 4 || len(parts[0]) != 2 || len(parts[1]) != 32 || len(parts[2]) != 16 {
		return ""
	}
	id := strings.ToLower(parts[1])
	if _, err := hex.DecodeString(id); err != nil || id == strings.Repeat("0", 32) {
		return ""
	}
	return id
}

func newTraceparent() string {
	var b [24]byte
	rand.Read(b[:])
	return "00-" + hex.EncodeToString(b[:16]) + "-" + hex.EncodeToString(b[16:]) + "-01"
}

// copyBuffers lends ReverseProxy its body copy buffers, which it would otherwise allocate
// (32 KiB) for every request. Put boxes a slice header: far cheaper than the buffer.
type copyBuffers struct{}

var copyBufferPool = sync.Pool{New: func() any { return make([]byte, 32<<10) }}

func (copyBuffers) Get() []byte  { return copyBufferPool.Get().([]byte) }
func (copyBuffers) Put(b []byte) { copyBufferPool.Put(b) }

// hopByHop are the headers of one connection (RFC 9110, section 7.6.1), never forwarded.
var hopByHop = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// removeHopByHop deletes the hop-by-hop headers, and those Connection names, from h.
func removeHopByHop(h http.Header) {
	for _, v := range h.Values("Connection") {
		for name := range strings.SplitSeq(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopByHop {
		h.Del(name)
	}
}
