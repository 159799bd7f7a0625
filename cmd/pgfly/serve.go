package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/sidecar"
	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// DefaultShutdownTimeout is how long SIGTERM waits for open sessions to end on their own.
const DefaultShutdownTimeout = 30 * time.Second

// serveConfig is the sidecar's configuration, from flags and the environment.
type serveConfig struct {
	listen            string
	jobsListen        string
	unixPort          int
	upstream          string
	primary           string
	httpListen        string
	app               string
	region            string
	primaryRegion     string
	instance          string
	replayMode        string
	primaryHTTP       string
	maxReplayBody     byteSize
	injectTraceparent bool
	consistency       string
	consistencyWait   time.Duration
	replayRoutes      string
	localRoutes       string
	learnRoutes       bool
	httpIdleTimeout   time.Duration
	httpBodyTimeout   time.Duration
	appTimeout        time.Duration
	adminListen       string
	maxLag            time.Duration
	logLevel          string
	tlsCert, tlsKey   string
	maxMessageSize    byteSize
	connectTimeout    time.Duration
	startupTimeout    time.Duration
	tcpUserTimeout    time.Duration
	maxClientConn     int
	forward           bool
	maxForwarded      int
	shutdownTimeout   time.Duration
}

func (c *serveConfig) register(fs *flagSet) {
	fs.StringVar(&c.listen, "listen", "127.0.0.1:5432", "Postgres address the app connects to: host:port, or a directory (e.g. /tmp/pgfly) for a Unix socket there, <dir>/.s.PGSQL.<--unix-port>")
	fs.bindEnv("listen", "PGFLY_LISTEN")
	fs.StringVar(&c.jobsListen, "jobs-listen", "", "a second Postgres address, for job runners inside the web process (its sessions belong to no HTTP request, and their writes are forwarded to --primary): host:port, or a directory other than --listen's for a Unix socket; empty for none")
	fs.bindEnv("jobs-listen", "PGFLY_JOBS_LISTEN")
	fs.IntVar(&c.unixPort, "unix-port", wire.DefaultUnixPort, "the port in the Unix socket's name when --listen is a directory, as clients give it with the directory as the host")
	fs.bindEnv("unix-port", "PGFLY_UNIX_PORT")
	fs.StringVar(&c.upstream, "upstream", "", "nearby Postgres URL sessions are relayed to (required; its sslmode is honoured)")
	fs.bindEnv("upstream", "PGFLY_UPSTREAM")
	fs.StringVar(&c.primary, "primary", "", "primary Postgres URL, for bookmarks and lag, and for forwarded sessions (see --forward) of its user, after the replica accepted their own login")
	fs.bindEnv("primary", "PGFLY_PRIMARY")
	fs.StringVar(&c.httpListen, "http-listen", ":8080", "where the edge sends HTTP; empty disables the HTTP shim")
	fs.bindEnv("http-listen", "PGFLY_HTTP_LISTEN")
	fs.StringVar(&c.app, "app", "http://127.0.0.1:3000", "the app behind the HTTP shim")
	fs.bindEnv("app", "PGFLY_APP")
	fs.StringVar(&c.region, "region", "", "this instance's region")
	fs.bindEnv("region", "FLY_REGION")
	fs.StringVar(&c.primaryRegion, "primary-region", "", "the primary database's region (required with the HTTP shim)")
	fs.bindEnv("primary-region", "PRIMARY_REGION")
	fs.StringVar(&c.instance, "instance", "", "this instance's id, written into fly-replay-src in proxy mode")
	fs.bindEnv("instance", "FLY_MACHINE_ID")
	fs.StringVar(&c.replayMode, "replay-mode", string(router.ModeFly), "fly: answer fly-replay for Fly's edge; proxy: send the request to --primary-http itself")
	fs.bindEnv("replay-mode", "PGFLY_REPLAY_MODE")
	fs.StringVar(&c.primaryHTTP, "primary-http", "", "the primary region's pgfly HTTP URL, for --replay-mode=proxy")
	fs.bindEnv("primary-http", "PGFLY_PRIMARY_HTTP")
	c.maxReplayBody = router.DefaultMaxReplayBody
	fs.Var(&c.maxReplayBody, "max-replay-body", "largest request body buffered for a replay in proxy mode, e.g. 1MiB")
	fs.bindEnv("max-replay-body", "PGFLY_MAX_REPLAY_BODY")
	fs.BoolVar(&c.injectTraceparent, "inject-traceparent", false, "add a fresh W3C traceparent to requests without one, for precise matching")
	fs.bindEnv("inject-traceparent", "PGFLY_INJECT_TRACEPARENT")
	fs.StringVar(&c.consistency, "consistency", string(router.ConsistencySession), "session: reads after a client's own write wait for it (bookmarks); eventual: no bookmarks")
	fs.bindEnv("consistency", "PGFLY_CONSISTENCY")
	fs.DurationVar(&c.consistencyWait, "consistency-wait", router.DefaultConsistencyWait, "how long a read waits for the replica to reach its bookmark before it is replayed in the primary region")
	fs.bindEnv("consistency-wait", "PGFLY_CONSISTENCY_WAIT")
	fs.StringVar(&c.replayRoutes, "replay-routes", "", `routes sent to the primary region before the app runs them, e.g. "POST /posts/**,* /admin/**"`)
	fs.bindEnv("replay-routes", "PGFLY_REPLAY_ROUTES")
	fs.StringVar(&c.localRoutes, "local-routes", "", "routes never learned nor replayed up front (a refusal is still replayed); wins over --replay-routes")
	fs.bindEnv("local-routes", "PGFLY_LOCAL_ROUTES")
	fs.BoolVar(&c.learnRoutes, "learn-routes", true, "learn the routes the replica keeps refusing and send them to the primary region before the app runs them")
	fs.bindEnv("learn-routes", "PGFLY_LEARN_ROUTES")
	fs.DurationVar(&c.httpIdleTimeout, "http-idle-timeout", router.DefaultIdleTimeout, "how long a keep-alive HTTP connection may wait for its next request before the shim closes it; 0 for no limit")
	fs.bindEnv("http-idle-timeout", "PGFLY_HTTP_IDLE_TIMEOUT")
	fs.DurationVar(&c.httpBodyTimeout, "http-body-timeout", router.DefaultBodyTimeout, "how long a whole request body may take to arrive (not a gap between reads) before the shim answers 408 and closes the connection; 0 for no limit")
	fs.bindEnv("http-body-timeout", "PGFLY_HTTP_BODY_TIMEOUT")
	fs.DurationVar(&c.appTimeout, "app-timeout", router.DefaultAppTimeout, "how long the app may take to start its answer once it has the whole request before the shim answers 504 (a tainted request is replayed instead); 0 for no limit")
	fs.bindEnv("app-timeout", "PGFLY_APP_TIMEOUT")
	fs.StringVar(&c.adminListen, "admin-listen", "127.0.0.1:9187", "where /health and /metrics are served; empty disables them")
	fs.bindEnv("admin-listen", "PGFLY_ADMIN_LISTEN")
	fs.DurationVar(&c.maxLag, "max-lag", sidecar.DefaultMaxLag, "replica lag beyond which /health answers 503")
	fs.bindEnv("max-lag", "PGFLY_MAX_LAG")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.bindEnv("log-level", "PGFLY_LOG_LEVEL")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "certificate file (PEM) offered to clients that ask for TLS")
	fs.bindEnv("tls-cert", "PGFLY_TLS_CERT")
	fs.StringVar(&c.tlsKey, "tls-key", "", "private key file (PEM) for --tls-cert")
	fs.bindEnv("tls-key", "PGFLY_TLS_KEY")
	c.maxMessageSize = wire.DefaultMaxMessageSize
	fs.Var(&c.maxMessageSize, "max-message-size", "largest Postgres message accepted, e.g. 64MiB")
	fs.bindEnv("max-message-size", "PGFLY_MAX_MESSAGE_SIZE")
	fs.DurationVar(&c.connectTimeout, "connect-timeout", wire.DefaultConnectTimeout, "bounds the upstream's silence while a session logs in: connect, TLS, each wait for the server (not the client's answers); the upstream URL's connect_timeout wins")
	fs.bindEnv("connect-timeout", "PGFLY_CONNECT_TIMEOUT")
	fs.DurationVar(&c.startupTimeout, "startup-timeout", wire.DefaultStartupTimeout, "how long a client may take to send its startup packet")
	fs.bindEnv("startup-timeout", "PGFLY_STARTUP_TIMEOUT")
	fs.DurationVar(&c.tcpUserTimeout, "tcp-user-timeout", wire.DefaultTCPUserTimeout, "how long an upstream link may acknowledge nothing before its sessions end (keepalive probes while idle, a watch on unacknowledged data while busy; not the kernel's TCP_USER_TIMEOUT, which would also end a running COPY waiting on a lock); 0 leaves Go's keepalive defaults")
	fs.bindEnv("tcp-user-timeout", "PGFLY_TCP_USER_TIMEOUT")
	fs.IntVar(&c.maxClientConn, "max-client-conn", wire.DefaultMaxClientConn, "most client connections each Postgres listener holds at once; past it clients get FATAL 53300; 0 for no limit")
	fs.bindEnv("max-client-conn", "PGFLY_MAX_CLIENT_CONN")
	fs.BoolVar(&c.forward, "forward", true, "move sessions that no HTTP request can replay (--jobs-listen's, and --listen's with the HTTP shim off) to --primary when the replica refuses their writes; false leaves them the refusal")
	fs.bindEnv("forward", "PGFLY_FORWARD")
	fs.IntVar(&c.maxForwarded, "max-forwarded-sessions", wire.DefaultMaxForwarded, "most sessions each forwarding listener keeps on the primary at once (each is a backend there too); past it a refused session's client gets 53300; 0 for no limit")
	fs.bindEnv("max-forwarded-sessions", "PGFLY_MAX_FORWARDED_SESSIONS")
	fs.DurationVar(&c.shutdownTimeout, "shutdown-timeout", DefaultShutdownTimeout, "on SIGTERM, how long open sessions may go on before they are closed")
	fs.bindEnv("shutdown-timeout", "PGFLY_SHUTDOWN_TIMEOUT")
}

// sidecarConfig turns the flags into the components' configurations. It checks only what is
// the flags' own business (two flags that go together, a 0 that means "off", text that must
// parse); each component checks its configuration itself, and flagError names the flag of a
// field it refuses.
func (c *serveConfig) sidecarConfig() (sidecar.Config, error) {
	sc := sidecar.Config{
		Relay: wire.Config{
			Listen:         c.listen,
			UnixPort:       c.unixPort,
			Upstream:       c.upstream,
			MaxMessageSize: int(c.maxMessageSize),
			ConnectTimeout: c.connectTimeout,
			StartupTimeout: c.startupTimeout,
			TCPUserTimeout: c.tcpUserTimeout,
			MaxClientConn:  c.maxClientConn,
			MaxForwarded:   c.maxForwarded,
		},
		Lag:         lag.Config{Primary: c.primary},
		AdminListen: c.adminListen,
		MaxLag:      c.maxLag,
	}
	if (c.tlsCert == "") != (c.tlsKey == "") {
		return sc, errors.New("flags --tls-cert and --tls-key go together: set both or neither")
	}
	for _, d := range []struct {
		flag string
		v    time.Duration
	}{{"shutdown-timeout", c.shutdownTimeout}, {"max-lag", c.maxLag}, {"tcp-user-timeout", c.tcpUserTimeout},
		{"http-idle-timeout", c.httpIdleTimeout}, {"http-body-timeout", c.httpBodyTimeout}, {"app-timeout", c.appTimeout}} {
		if d.v < 0 {
			return sc, fmt.Errorf("invalid value %v for flag --%s: must not be negative", d.v, d.flag)
		}
	}
	for _, d := range []struct {
		flag string
		v    time.Duration
	}{{"connect-timeout", c.connectTimeout}, {"startup-timeout", c.startupTimeout}} {
		if d.v == 0 { // to the relay, zero is its default
			return sc, fmt.Errorf("invalid value %v for flag --%s: must be positive (a wait without a bound is what it prevents)", d.v, d.flag)
		}
	}
	if c.tcpUserTimeout > 0 && c.tcpUserTimeout < time.Second {
		return sc, fmt.Errorf("invalid value %v for flag --tcp-user-timeout: below 1s a live link's ordinary silence would end its sessions", c.tcpUserTimeout)
	}
	if c.maxMessageSize == 0 { // to the relay, zero is its default
		return sc, fmt.Errorf("invalid value 0 for flag --max-message-size: the minimum is %d", wire.MinMaxMessageSize)
	}
	for _, n := range []struct {
		flag string
		v    int
	}{{"max-client-conn", c.maxClientConn}, {"max-forwarded-sessions", c.maxForwarded}} {
		if n.v < 0 {
			return sc, fmt.Errorf("invalid value %d for flag --%s: must not be negative (0 for no limit)", n.v, n.flag)
		}
	}
	if c.jobsListen != "" && c.forward && c.primary == "" {
		return sc, errors.New("flag --jobs-listen forwards its sessions' writes to the primary: set --primary (or $PGFLY_PRIMARY), or --forward=false for a relay that leaves them the replica's refusal")
	}
	if c.jobsListen != "" && filepath.IsAbs(c.listen) && filepath.Clean(c.jobsListen) == filepath.Clean(c.listen) {
		return sc, fmt.Errorf("flags --listen and --jobs-listen name one directory, %s, where both sockets would be .s.PGSQL.%d (--unix-port): give --jobs-listen another", c.listen, c.unixPort)
	}
	if c.tcpUserTimeout == 0 {
		sc.Relay.TCPUserTimeout = -1 // Go's keepalive defaults
	}
	if c.maxClientConn == 0 {
		sc.Relay.MaxClientConn = -1 // no limit
	}
	if c.maxForwarded == 0 {
		sc.Relay.MaxForwarded = -1 // no limit
	}
	if c.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(c.tlsCert, c.tlsKey)
		if err != nil {
			return sc, fmt.Errorf("flags --tls-cert/--tls-key: %w", err)
		}
		sc.Relay.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	// Sessions forward where no HTTP request can be replayed for them: the jobs listener's
	// always, the app's only with the shim off (a write forwarded inside a request that is later
	// replayed would run twice).
	primary := ""
	if c.forward {
		primary = c.primary
	}
	if c.jobsListen != "" {
		jobs := sc.Relay
		jobs.Listen, jobs.Primary = c.jobsListen, primary
		sc.Jobs = &jobs
	}
	if c.httpListen == "" {
		sc.Relay.Primary = primary
	}
	// Parsed even with the shim off: a bad value is a mistake either way.
	replayRoutes, err := router.ParseRoutePatterns(c.replayRoutes)
	if err != nil {
		return sc, fmt.Errorf("invalid value for flag --replay-routes: %w", err)
	}
	localRoutes, err := router.ParseRoutePatterns(c.localRoutes)
	if err != nil {
		return sc, fmt.Errorf("invalid value for flag --local-routes: %w", err)
	}
	if c.httpListen == "" {
		return sc, nil
	}
	rc := &router.Config{
		Listen:            c.httpListen,
		Region:            c.region,
		PrimaryRegion:     c.primaryRegion,
		Instance:          c.instance,
		Mode:              router.Mode(c.replayMode),
		MaxReplayBody:     int64(c.maxReplayBody),
		InjectTraceparent: c.injectTraceparent,
		Consistency:       router.Consistency(c.consistency),
		ConsistencyWait:   c.consistencyWait,
		DisableLearning:   !c.learnRoutes,
		IdleTimeout:       orNoTimeout(c.httpIdleTimeout),
		BodyTimeout:       orNoTimeout(c.httpBodyTimeout),
		AppTimeout:        orNoTimeout(c.appTimeout),
	}
	sc.Shim = rc
	rc.ReplayRoutes, rc.LocalRoutes = replayRoutes, localRoutes
	if rc.App, err = httpURL("app", c.app); err != nil {
		return sc, err
	}
	if c.primaryHTTP != "" {
		if rc.PrimaryHTTP, err = httpURL("primary-http", c.primaryHTTP); err != nil {
			return sc, err
		}
	}
	return sc, nil
}

// componentFlags names the flag, and its environment variable, behind each component
// Config field that a flag sets, with a hint for the error where one helps. "jobs." fields are
// the jobs relay's where they differ from the relay's ("wire.") flag.
var componentFlags = map[string]struct{ flag, hint string }{
	"wire.Listen":            {"listen", ""},
	"jobs.Listen":            {"jobs-listen", ""},
	"wire.Primary":           {"primary", ""},
	"wire.MaxForwarded":      {"max-forwarded-sessions", ""},
	"wire.UnixPort":          {"unix-port", ""},
	"wire.Upstream":          {"upstream", ""},
	"wire.MaxMessageSize":    {"max-message-size", ""},
	"wire.ConnectTimeout":    {"connect-timeout", ""},
	"wire.StartupTimeout":    {"startup-timeout", ""},
	"lag.Upstream":           {"upstream", ""},
	"lag.Primary":            {"primary", ""},
	"router.App":             {"app", ""},
	"router.Mode":            {"replay-mode", ""},
	"router.PrimaryHTTP":     {"primary-http", ""},
	"router.PrimaryRegion":   {"primary-region", "with the HTTP shim; set --http-listen= to run the Postgres relay alone"},
	"router.Consistency":     {"consistency", ""},
	"router.ConsistencyWait": {"consistency-wait", ""},
}

// flagError names the flag behind a component's ConfigError, with its environment variable;
// any other error is returned as it is.
func flagError(fs *flagSet, err error) error {
	var field string
	var cause error
	var we *wire.ConfigError
	var re *router.ConfigError
	var le *lag.ConfigError
	switch {
	case errors.As(err, &we):
		field, cause = "wire."+we.Field, we.Err
		if _, own := componentFlags["jobs."+we.Field]; own && errors.Is(err, sidecar.ErrJobsRelay) {
			field = "jobs." + we.Field
		}
	case errors.As(err, &re):
		field, cause = "router."+re.Field, re.Err
	case errors.As(err, &le):
		field, cause = "lag."+le.Field, le.Err
	default:
		return err
	}
	f, ok := componentFlags[field]
	if !ok {
		return err
	}
	name := "flag --" + f.flag
	if env := fs.env[f.flag]; env != "" {
		name += " (or $" + env + ")"
	}
	msg := fmt.Sprintf("%s: %v", name, cause)
	if f.hint != "" {
		msg += " " + f.hint
	}
	return errors.New(msg)
}

// orNoTimeout turns a timeout flag's 0, which means no limit, into router.NoTimeout: to the
// router, zero is its default.
func orNoTimeout(d time.Duration) time.Duration {
	if d == 0 {
		return router.NoTimeout
	}
	return d
}

// httpURL parses an http(s) URL flag.
func httpURL(flag, s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("invalid value %q for flag --%s: want an http:// or https:// URL", s, flag)
	}
	return u, nil
}

// serveCommand is `pgfly serve`: the sidecar until a signal stops it.
type serveCommand struct {
	cfg   serveConfig
	log   *zap.Logger
	pgfly *sidecar.Sidecar
}

func (c *serveCommand) name() string         { return "serve" }
func (c *serveCommand) register(fs *flagSet) { c.cfg.register(fs) }
func (c *serveCommand) usage() string        { return "" }
func (c *serveCommand) logLevel() string     { return c.cfg.logLevel }

func (c *serveCommand) open(fs *flagSet, log *zap.Logger) error {
	c.log = log
	sc, err := c.cfg.sidecarConfig()
	if err != nil {
		return usage(err)
	}
	c.pgfly, err = openSidecar(fs, sc, log)
	return err
}

func (c *serveCommand) run(ctx context.Context, sigs <-chan os.Signal) error {
	return serveUntilSignal(ctx, c.pgfly, sigs, c.cfg.shutdownTimeout, c.log)
}

func (c *serveCommand) close() error { return closeSidecar(c.pgfly, c.log) }

// openSidecar builds pgfly from sc and binds its listeners; a field a component refuses comes
// back naming its flag, as the command line's error.
func openSidecar(fs *flagSet, sc sidecar.Config, log *zap.Logger) (*sidecar.Sidecar, error) {
	pgfly, err := sidecar.New(sc, log)
	if err != nil {
		return nil, usage(flagError(fs, err))
	}
	if err := pgfly.Listen(); err != nil {
		return nil, err
	}
	return pgfly, nil
}

// closeSidecar closes what openSidecar opened, if it did.
func closeSidecar(pgfly *sidecar.Sidecar, log *zap.Logger) error {
	if pgfly == nil {
		return nil
	}
	err := pgfly.Close()
	log.Info("stopped")
	return err
}

// serveUntilSignal runs pgfly until it fails or a signal asks it to stop. The first SIGTERM or
// SIGINT stops it gracefully within timeout; a second one returns errInterrupted at once.
func serveUntilSignal(ctx context.Context, pgfly *sidecar.Sidecar, sigs <-chan os.Signal, timeout time.Duration, log *zap.Logger) error {
	pgfly.Start()
	waited := make(chan error, 1)
	go func() { waited <- pgfly.Wait(ctx) }()
	select {
	case err := <-waited:
		return err
	case sig := <-sigs:
		log.Info("shutting down: no new sessions or requests, open ones may finish",
			zap.Stringer("signal", sig), zap.Duration("timeout", timeout))
	}
	shutdown := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		shutdown <- pgfly.Shutdown(sctx)
	}()
	select {
	case err := <-shutdown:
		if errors.Is(err, context.DeadlineExceeded) {
			log.Warn("shutdown timeout reached: closed what was still open")
		}
		return nil
	case sig := <-sigs:
		log.Warn("second signal: exiting at once", zap.Stringer("signal", sig))
		return errInterrupted
	}
}
