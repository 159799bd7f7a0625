package wire

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// Defaults for Config.
const (
	DefaultMaxMessageSize = 1<<30 - 1 // the server's own limit for a message (MaxAllocSize)
	DefaultConnectTimeout = 5 * time.Second
	// DefaultStartupTimeout is shorter than the server's authentication_timeout (60 s): a
	// client that has connected sends its startup packet at once, and a connection that
	// says nothing holds a goroutine and a slot under MaxClientConn until then.
	DefaultStartupTimeout = 10 * time.Second
	// DefaultTCPUserTimeout frees a session whose upstream link went dead in tens of
	// seconds rather than the kernel's 15 minutes of retransmissions.
	DefaultTCPUserTimeout = 30 * time.Second
	// DefaultMaxClientConn bounds the connections a relay holds at once, PgBouncer's
	// max_client_conn. Each session is one upstream backend too, so the upstream's
	// max_connections is usually the tighter bound.
	DefaultMaxClientConn = 1000
	// DefaultUnixPort is the port in a Unix socket's name, as Postgres's default.
	DefaultUnixPort = 5432
	// DefaultMaxForwarded bounds the sessions a relay keeps on the primary at once: each is a
	// backend there, beside its replica's.
	DefaultMaxForwarded = 100
)

// MinMaxMessageSize is the smallest Config.MaxMessageSize NewServer accepts.
const MinMaxMessageSize = 1024

// Config tells a Server where to listen and where to relay.
type Config struct {
	// Listen is the address clients connect to: host:port, e.g. "127.0.0.1:5432", or an
	// absolute directory, e.g. "/tmp/pgfly", for a Unix socket there named as Postgres names
	// its own, .s.PGSQL.<UnixPort>, since libpq, pgx, node-postgres and psycopg take the
	// directory as the host and dial that file.
	Listen string
	// UnixPort is the port in the Unix socket's name; DefaultUnixPort when zero.
	UnixPort int
	// Upstream is the Postgres URL (or keyword/value string) sessions are relayed to. Only
	// its hosts, ports and TLS settings (sslmode, sslrootcert, ...) are used.
	Upstream string
	// TLS, when set, lets clients upgrade with SSLRequest; otherwise they are answered 'N'.
	TLS *tls.Config
	// MaxMessageSize bounds the length field of any message, in either direction.
	MaxMessageSize int
	// ConnectTimeout bounds the upstream's silence while a session logs in: connecting,
	// TLS, and each wait for the server's next message until the first ReadyForQuery. The
	// time the client takes to answer an authentication request (a person typing a
	// password) is not counted. The upstream URL's connect_timeout, when set, wins.
	ConnectTimeout time.Duration
	// StartupTimeout bounds how long a client may take to send its startup packet.
	StartupTimeout time.Duration
	// TCPUserTimeout bounds how long an upstream link may acknowledge nothing: a dead link
	// (a black hole) ends its sessions after about this long, an idle one through TCP
	// keepalive probes, a busy one through the relay's watch on unacknowledged data (see
	// watchLinks). It never ends a running query on a live link, however long the server
	// takes or stops reading: its kernel still acknowledges. (The kernel's TCP_USER_TIMEOUT
	// is not used: it ends a connection whose server stops reading, such as a COPY waiting
	// on a lock, as if the link were dead.) Negative: Go's keepalive defaults, no watch.
	TCPUserTimeout time.Duration
	// MaxClientConn bounds the client connections held at once, in their startup or
	// relaying; past it a client is answered FATAL 53300 after its startup packet.
	// Cancel requests are still forwarded. Negative: no bound.
	MaxClientConn int
	// Fence, when set and true at a session's start, starts the session with
	// default_transaction_read_only=on, whatever the client asked: its writes are then
	// refused with 25006 like a standby's. For an upstream that should be a standby but is a
	// primary beside the real one (two primaries), so that writes are replayed to the real
	// primary instead of splitting the data. A client can still lift it with SET or BEGIN
	// READ WRITE; it fences apps, not adversaries.
	Fence func() bool
	// Primary, when set, makes this a forwarding relay (see forward.go), for sessions that no
	// HTTP request can replay (job workers, consoles, cron): a session the upstream refuses for
	// being a hot standby moves to this Postgres URL's server at a safe point, transparently
	// or with a retryable 40001, and a session whose upstream is unreachable is relayed to it
	// from its start. A moved session logs in to the primary as its own user, after the
	// upstream accepted its login, with the URL's password when the URL's user is the
	// session's; other users get the password-less login the primary's pg_hba.conf allows, if
	// any. Never set it on a relay behind the HTTP shim: a write forwarded inside a request
	// that is later replayed would run twice.
	Primary string
	// MaxForwarded bounds the sessions holding a backend on the primary at once (a session
	// moved back to the upstream keeps its primary backend idle, until a session's move at the
	// bound closes it: reclaim); past it a refused session's
	// client is answered 53300. DefaultMaxForwarded when zero; negative: no bound.
	MaxForwarded int
}

// Server relays Postgres sessions. Create it with NewServer, then Listen and Serve.
type Server struct {
	cfg      Config
	upstream *upstream
	obs      Observer
	log      *zap.Logger
	watchIn  [256]bool // client message types the relay acts on
	watchOut [256]bool // server message types the relay acts on

	ln     net.Listener
	nextID atomic.Uint64
	stats  stats
	keys   cancelKeys
	// Forwarding (Config.Primary); primaryUp is nil when it is off.
	primaryUp   *upstream
	primaryCfg  *pgconn.Config
	forwarded   atomic.Int64 // sessions holding a primary backend (on it, or kept idle), under MaxForwarded
	keptMu      sync.Mutex
	kept        map[*forwarder]time.Time // sessions back on the upstream, and since when their primary backend is idle
	loginWarned sync.Map                 // users pgfly could not log in to the primary as, warned once
	wg          sync.WaitGroup           // one per live session and per cancel forward

	mu       sync.Mutex
	starting map[net.Conn]struct{} // accepted connections not yet relaying
	sessions map[*session]struct{}
	closing  bool
	closed   chan struct{} // closed by Shutdown and Close
}

// ConfigError is a Config field that NewServer cannot take, named as in Config, so that the
// caller can name its own setting (a flag) for it.
type ConfigError struct {
	Field string // e.g. "MaxMessageSize"
	Err   error
}

func (e *ConfigError) Error() string { return "wire: " + e.Field + ": " + e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

// NewServer checks cfg and returns a Server that is not yet listening. A field it cannot take
// is reported as a *ConfigError.
func NewServer(cfg Config, obs Observer, log *zap.Logger) (*Server, error) {
	if cfg.MaxMessageSize == 0 {
		cfg.MaxMessageSize = DefaultMaxMessageSize
	}
	if cfg.MaxMessageSize < MinMaxMessageSize {
		return nil, &ConfigError{"MaxMessageSize", fmt.Errorf("%d is below the minimum, %d", cfg.MaxMessageSize, MinMaxMessageSize)}
	}
	for _, d := range []struct {
		field string
		v     time.Duration
	}{{"ConnectTimeout", cfg.ConnectTimeout}, {"StartupTimeout", cfg.StartupTimeout}} {
		if d.v < 0 {
			return nil, &ConfigError{d.field, fmt.Errorf("%v is negative: a wait without a bound is what it prevents", d.v)}
		}
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if cfg.TCPUserTimeout == 0 {
		cfg.TCPUserTimeout = DefaultTCPUserTimeout
	}
	if cfg.MaxClientConn == 0 {
		cfg.MaxClientConn = DefaultMaxClientConn
	}
	if cfg.StartupTimeout == 0 {
		cfg.StartupTimeout = DefaultStartupTimeout
	}
	if cfg.UnixPort == 0 {
		cfg.UnixPort = DefaultUnixPort
	}
	if cfg.MaxForwarded == 0 {
		cfg.MaxForwarded = DefaultMaxForwarded
	}
	if cfg.UnixPort < 0 || cfg.UnixPort > 65535 {
		return nil, &ConfigError{"UnixPort", fmt.Errorf("%d is not a port (1 to 65535)", cfg.UnixPort)}
	}
	switch {
	case isDir(cfg.Listen):
		if fi, err := os.Stat(cfg.Listen); err != nil || !fi.IsDir() {
			return nil, &ConfigError{"Listen", fmt.Errorf("%s is not a directory: a Unix socket goes in an existing directory (or give host:port)", cfg.Listen)}
		}
		if p := UnixSocket(cfg.Listen, cfg.UnixPort); len(p) > maxUnixPath {
			return nil, &ConfigError{"Listen", fmt.Errorf("the socket's path %s is %d bytes, over the %d a Unix socket's name can hold: use a shorter directory", p, len(p), maxUnixPath)}
		}
	case strings.ContainsRune(cfg.Listen, '/'):
		return nil, &ConfigError{"Listen", fmt.Errorf("%s: a Unix socket's directory must be an absolute path (or give host:port)", cfg.Listen)}
	}
	if cfg.Upstream == "" {
		return nil, &ConfigError{"Upstream", errors.New("is required")}
	}
	up, err := parseUpstream(cfg.Upstream, cfg.ConnectTimeout, cfg.TCPUserTimeout)
	if err != nil {
		return nil, &ConfigError{"Upstream", err}
	}
	var primaryUp *upstream
	var primaryCfg *pgconn.Config
	if cfg.Primary != "" {
		if primaryUp, err = parseUpstream(cfg.Primary, cfg.ConnectTimeout, cfg.TCPUserTimeout); err != nil {
			return nil, &ConfigError{"Primary", err}
		}
		if primaryCfg, err = pgconn.ParseConfig(cfg.Primary); err != nil {
			return nil, &ConfigError{"Primary", err}
		}
	}
	if obs == nil {
		obs = NopObserver{}
	}
	if log == nil {
		log = zap.NewNop()
	}
	s := &Server{
		cfg:        cfg,
		upstream:   up,
		primaryUp:  primaryUp,
		primaryCfg: primaryCfg,
		obs:        obs,
		log:        log,
		starting:   make(map[net.Conn]struct{}),
		sessions:   make(map[*session]struct{}),
		closed:     make(chan struct{}),
	}
	for _, t := range []byte{'Q', 'P', 'B', 'C', 'S', 'F', 'E', 'X', 'c', 'f', 'p'} {
		s.watchIn[t] = true
	}
	for _, t := range []byte{'R', 'K', 'E', 'C', 'Z', 'G', 'H', 'S'} {
		s.watchOut[t] = true
	}
	return s, nil
}

// Listen binds the listening socket, so that Addr reports the port when Listen is ":0".
func (s *Server) Listen() error {
	if isDir(s.cfg.Listen) {
		ln, err := listenUnix(UnixSocket(s.cfg.Listen, s.cfg.UnixPort))
		if err != nil {
			return err
		}
		s.ln = ln
		return nil
	}
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", s.cfg.Listen, err)
	}
	s.ln = ln
	return nil
}

// unixLockSuffix names the lock file beside a Unix socket.
const unixLockSuffix = ".pgfly-lock"

// maxUnixPath is the longest path a Unix socket's address holds on Linux (sun_path is 108
// bytes, with its terminating NUL).
const maxUnixPath = 107

// isDir reports whether a Listen value names a directory (a Unix socket) rather than host:port.
func isDir(listen string) bool { return filepath.IsAbs(listen) }

// UnixSocket is the path of the socket a Listen directory gets: <dir>/.s.PGSQL.<port>.
func UnixSocket(dir string, port int) string {
	return filepath.Join(dir, ".s.PGSQL."+strconv.Itoa(port))
}

// listenUnix listens on a Unix socket at path, as Postgres does: it first takes an exclusive
// lock on <path>.pgfly-lock (not Postgres's own <path>.lock, whose empty leftover would stop a
// Postgres from starting), held for the listener's life and never removed, so that two
// servers starting at once, or one starting as another stops, cannot both take the path. A socket file whose listener refuses a connection (ECONNREFUSED:
// its process died) is removed; one that answers, or fails otherwise (a full backlog is
// EAGAIN), is in use. The socket is made 0777, as Postgres's unix_socket_permissions default,
// leaving access to the directory's permissions. Closing the listener removes the socket, if
// it is still the one this listener made, and releases the lock.
func listenUnix(path string) (net.Listener, error) {
	lock, err := os.OpenFile(path+unixLockSuffix, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("listen %s: %w (another pgfly listens there: it holds %s%s)", path, syscall.EADDRINUSE, path, unixLockSuffix)
		}
		return nil, fmt.Errorf("listen %s: lock %s%s: %w", path, path, unixLockSuffix, err)
	}
	ln, err := bindUnix(path)
	if err != nil {
		lock.Close()
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		ln.Close()
		lock.Close()
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	return &unixListener{UnixListener: ln, path: path, file: fi, lock: lock}, nil
}

// bindUnix binds path, replacing a stale socket left there.
func bindUnix(path string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen %s: a file that is not a socket is in the way", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("listen %s: %w (a server listens there)", path, syscall.EADDRINUSE)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("listen %s: remove the stale socket: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false) // Close removes the file only if it is still ours
	if err := os.Chmod(path, 0o777); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	return ln, nil
}

// unixListener is a Unix-socket listener with the lock that reserves its path.
type unixListener struct {
	*net.UnixListener
	path string
	file os.FileInfo // the socket as bound, to tell it from one another server put there since
	lock *os.File
	once sync.Once
}

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() {
		if fi, serr := os.Stat(l.path); serr == nil && os.SameFile(fi, l.file) {
			os.Remove(l.path)
		}
		l.lock.Close() // the file stays: removing it would let two starters lock two files

	})
	return err
}

// Addr is the address the server listens on; nil before Listen.
func (s *Server) Addr() net.Addr {
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Serve accepts connections until Shutdown or Close; it then returns nil.
func (s *Server) Serve() error {
	if s.ln == nil {
		if err := s.Listen(); err != nil {
			return err
		}
	}
	if s.cfg.TCPUserTimeout > 0 {
		go s.watchLinks()
	}
	s.log.Info("listening", zap.String("addr", s.ln.Addr().String()), zap.String("upstream", s.upstream.name))
	var backoff time.Duration
	for {
		c, err := s.ln.Accept()
		if err != nil {
			select {
			case <-s.closed:
				return nil
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, errTooManyFiles) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed, retrying", zap.Error(err), zap.Duration("backoff", backoff))
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		backoff = 0
		// Under mu, so that no Add follows the Wait of a Shutdown or Close.
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			c.Close()
			continue
		}
		full := s.cfg.MaxClientConn > 0 && len(s.starting)+len(s.sessions) >= s.cfg.MaxClientConn
		s.starting[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.handle(c, full)
		}()
	}
}

// Shutdown stops accepting connections and waits for open sessions to end on their own.
// When ctx is done first, it closes the remaining sessions (each client that is between
// messages gets a FATAL 57P01) and returns ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopAccepting()
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.closeSessions()
		<-done
		return ctx.Err()
	}
}

// Close stops accepting and closes every session at once. It is idempotent.
func (s *Server) Close() error {
	err := s.stopAccepting()
	s.closeSessions()
	s.wg.Wait()
	return err
}

// Stats are a relay's running totals, for metrics.
type Stats struct {
	Sessions      uint64 // sessions relayed since start
	BytesIn       uint64 // bytes from clients to the upstream
	BytesOut      uint64 // bytes from the upstream to clients
	ConnectErrors uint64 // failed attempts to connect to the upstream, login timeouts included
	Refused       uint64 // clients answered 53300 because MaxClientConn were open
}

type stats struct {
	sessions, bytesIn, bytesOut, connectErrors, refused atomic.Uint64
}

// Stats returns the running totals.
func (s *Server) Stats() Stats {
	return Stats{
		Sessions:      s.stats.sessions.Load(),
		BytesIn:       s.stats.bytesIn.Load(),
		BytesOut:      s.stats.bytesOut.Load(),
		ConnectErrors: s.stats.connectErrors.Load(),
		Refused:       s.stats.refused.Load(),
	}
}

// ForwardedSessions is the number of sessions holding a backend on the primary (Config.Primary):
// on it, or moved back with that backend kept idle.
func (s *Server) ForwardedSessions() int { return int(s.forwarded.Load()) }

// OpenSessions is the number of sessions being relayed.
func (s *Server) OpenSessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

func (s *Server) stopAccepting() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return nil
	}
	s.closing = true
	close(s.closed)
	if s.ln == nil {
		return nil
	}
	if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}

// Fenced ends every open session, for Config.Fence turning true: each client is told FATAL
// 57P01 and reconnects to a fenced session, and each session is reported as an
// UpstreamFailure (cause "fenced") with whether it wrote, so that the requests of those that
// did not may be replayed. A session running a statement ends at its next ReadyForQuery: cut
// off, the statement could commit on the fenced primary unseen. Sessions that are starting
// are fenced by Config.Fence.
func (s *Server) Fenced() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ss := range s.sessions {
		if ss.onPrimary.Load() { // relayed to the real primary, not the fenced upstream
			continue
		}
		if ss.proto.busy() {
			ss.fenceAtIdle.Store(true)
			if ss.proto.busy() {
				continue
			}
		}
		ss.stop(errFenced)
	}
	if n := len(s.sessions); n > 0 {
		s.log.Warn("ended the open sessions of a fenced upstream", zap.Int("sessions", n), zap.String("upstream", s.upstream.name))
	}
}

// watchLinks ends, until the server closes, the sessions whose upstream has left data
// unacknowledged for TCPUserTimeout: a busy session on a dead link, which keepalive does not
// probe (the kernel would retransmit for about 15 minutes). It looks ten times per timeout,
// one getsockopt per session.
func (s *Server) watchLinks() {
	t := time.NewTicker(max(s.cfg.TCPUserTimeout/10, 100*time.Millisecond))
	defer t.Stop()
	var open []*session
	for {
		select {
		case <-s.closed:
			return
		case <-t.C:
		}
		s.mu.Lock()
		open = open[:0]
		for ss := range s.sessions {
			open = append(open, ss)
		}
		s.mu.Unlock()
		for _, ss := range open {
			if silence, ok := unackedSilence(ss.upstreamConn()); ok && silence >= s.cfg.TCPUserTimeout {
				s.log.Warn("upstream link dead: nothing acknowledged", zap.Uint64("session", ss.info.ID),
					zap.String("upstream", s.upstream.name), zap.Duration("silence", silence))
				ss.stop(errLinkDead)
			}
		}
	}
}

func (s *Server) closeSessions() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.starting { // a client still in its startup could hold Shutdown for long
		c.SetDeadline(time.Unix(1, 0))
	}
	for ss := range s.sessions {
		ss.stop(errShutdown)
	}
}

// register adds a session that has connected upstream; it fails once the server is closing.
// c is the accepted connection under ss.client.
func (s *Server) register(ss *session, c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.starting, c)
	if s.closing {
		return false
	}
	s.sessions[ss] = struct{}{}
	return true
}

// started forgets an accepted connection that ends before it is registered.
func (s *Server) started(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.starting, c)
}

func (s *Server) unregister(ss *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.sessions, ss)
	s.keys.forget(ss)
}
