package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/sidecar"
)

// DefaultAppStartTimeout is how long `pgfly run` waits for the app to listen on its port.
const DefaultAppStartTimeout = 60 * time.Second

// Fly Postgres conventions (fly.io/docs/postgres): port 5432 goes through HAProxy to the
// writable leader, port 5433 straight to the member it reaches, and the DNS name
// top1.nearest.of.<app>.internal resolves to the member nearest to the asking machine.
const (
	flyReplicaPort     = "5433"
	flyNearestPrefix   = "top1.nearest.of."
	flyInternalSuffix  = ".internal"
	appAddrPollEvery   = 100 * time.Millisecond
	appAddrDialTimeout = time.Second
)

// forwardedSignals are passed on to the app. SIGTERM and SIGINT also mean "stop": pgfly
// keeps relaying until the app has exited, then stops itself.
var forwardedSignals = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2}

// runConfig is `pgfly run`'s configuration: the sidecar's flags plus the app's.
type runConfig struct {
	serveConfig
	appStartTimeout time.Duration
	check           bool
	checkFlags      checkFlags // with --check
	socket          bool
}

func (c *runConfig) register(fs *flagSet) {
	c.serveConfig.register(fs)
	fs.Lookup("upstream").Usage = "nearby Postgres URL sessions are relayed to; default: $DATABASE_URL in the primary region, its nearest replica elsewhere [$PGFLY_UPSTREAM]"
	fs.Lookup("primary").Usage = "primary Postgres URL, for bookmarks and lag, and for forwarded sessions (see --forward) of its user, after the replica accepted their own login; default: $DATABASE_URL [$PGFLY_PRIMARY]"
	fs.DurationVar(&c.appStartTimeout, "app-start-timeout", DefaultAppStartTimeout, "how long the app may take to listen on the --app port before pgfly stops it and exits")
	fs.bindEnv("app-start-timeout", "PGFLY_APP_START_TIMEOUT")
	fs.BoolVar(&c.socket, "socket", false, "put the app on a Unix socket (host=<dir> in its DATABASE_URL): in --listen's directory, or in a private one pgfly makes and removes when --listen is not a directory")
	fs.bindEnv("socket", "PGFLY_RUN_SOCKET")
	fs.BoolVar(&c.check, "check", false, "run pgfly check's checks on what run derives from DATABASE_URL (upstream, primary), print them and exit, starting nothing; the app's command may be left out")
	fs.bindEnv("check", "PGFLY_RUN_CHECK")
	c.checkFlags.register(fs)
}

const runUsage = `Usage: pgfly run [flags] -- CMD [ARGS...]

Runs pgfly and the app beside it, as the app's parent: the one-line way to put pgfly in
an app's container.

It reads the app's DATABASE_URL. Outside the primary region ($FLY_REGION differs from
$PRIMARY_REGION) pgfly relays to the nearest replica by Fly Postgres conventions: port
5433, and host top1.nearest.of.<host> when the host ends in .internal; --upstream says
otherwise. In the primary region, and when $FLY_REGION is unset, it relays to DATABASE_URL
itself. DATABASE_URL is also the primary (--primary).

It then starts CMD with DATABASE_URL pointing at pgfly on this machine (same user,
password, database and parameters; sslmode=disable, since the connection never leaves the
machine, unless --tls-cert is set), PGFLY_JOBS_DATABASE_URL likewise at --jobs-listen when
it is set, and PORT set to the --app URL's port, where the HTTP shim forwards requests. It waits for the app to listen there, passes SIGTERM, SIGINT,
SIGHUP, SIGUSR1 and SIGUSR2 on to the app's process group, keeps relaying until the app
exits, and exits with the app's status. If the app exits, pgfly exits too.

Flags:
`

// runCommand is `pgfly run`: the sidecar with the app as its child, until the app exits.
type runCommand struct {
	cfg            runConfig
	argv           []string // the app's command, after --
	dashes         bool     // the command line had a --
	stdout, stderr io.Writer

	log       *zap.Logger
	socketDir string       // the private directory made for --socket, removed at close
	target    *checkTarget // with --check: what the checks look at, instead of running
	pgfly     *sidecar.Sidecar
	shim      bool   // the HTTP shim is on: wait for the app to listen
	dbURL     string // the app's DATABASE_URL, pointed at pgfly
	jobsURL   string // the app's PGFLY_JOBS_DATABASE_URL, pointed at the jobs listener; "" when off
	appAddr   string // where the app is to listen
	appPort   string
	original  string // the DATABASE_URL pgfly was given
}

func (c *runCommand) name() string         { return "run" }
func (c *runCommand) register(fs *flagSet) { c.cfg.register(fs) }
func (c *runCommand) usage() string        { return runUsage }
func (c *runCommand) logLevel() string     { return c.cfg.logLevel }
func (c *runCommand) signals() []os.Signal { return forwardedSignals }
func (c *runCommand) close() error {
	err := closeSidecar(c.pgfly, c.log)
	if c.socketDir != "" {
		err = errors.Join(err, os.RemoveAll(c.socketDir))
	}
	return err
}
func (c *runCommand) usageHint(err error) error { return runUsageHint(err, c.dashes) }

// runUsageHint points at the -- that a command line without one lacks.
func runUsageHint(err error, dashes bool) error {
	if errors.Is(err, flag.ErrHelp) || dashes {
		return err
	}
	return fmt.Errorf("%w (the app's command goes after --: pgfly run [flags] -- CMD [ARGS...])", err)
}

func (c *runCommand) open(fs *flagSet, log *zap.Logger) error {
	c.log = log
	if c.argv == nil && !c.cfg.check {
		fs.Usage()
		return usage(errors.New("pgfly run needs the app's command after --, e.g. pgfly run -- bin/rails server"))
	}
	c.original = os.Getenv("DATABASE_URL")
	if c.original == "" {
		return usage(errors.New("$DATABASE_URL is not set: pgfly run rewrites the app's DATABASE_URL to point at pgfly, so set it to the URL the app would use without pgfly (on Fly, `fly postgres attach` sets it)"))
	}
	if c.cfg.socket && !filepath.IsAbs(c.cfg.listen) {
		listenSet := false
		fs.Visit(func(f *flag.Flag) { listenSet = listenSet || f.Name == "listen" })
		if listenSet { // on the command line or in $PGFLY_LISTEN
			return usage(fmt.Errorf("flag --socket puts the app on a Unix socket, and --listen %s is not a directory: give --listen a directory, or leave it unset for a private one", c.cfg.listen))
		}
		dir, err := os.MkdirTemp("", "pgfly-") // 0700: the app runs as pgfly's user
		if err != nil {
			return fmt.Errorf("--socket: %w", err)
		}
		c.socketDir = dir
		c.cfg.listen = c.socketDir
	}
	sc, app, how, err := c.cfg.resolve(c.original)
	if err != nil {
		return usage(err)
	}
	c.appAddr = hostPort(app)
	_, c.appPort, _ = net.SplitHostPort(c.appAddr)
	if c.cfg.check {
		if err := validate(fs, sc); err != nil {
			return err
		}
		t := serveTarget(&c.cfg.serveConfig, sc, c.cfg.checkFlags.flyToml)
		t.DatabaseURLBy, t.AppStarted = "pgfly run", false
		c.target = &t
		return nil
	}
	log.Info("upstream chosen", zap.String("upstream", redact(c.cfg.upstream)), zap.String("how", how),
		zap.String("region", c.cfg.region), zap.String("primary_region", c.cfg.primaryRegion))

	if c.pgfly, err = openSidecar(fs, sc, log); err != nil {
		return err
	}
	if c.dbURL, err = appDatabaseURL(c.original, loopback(c.pgfly.PostgresAddr()), sc.Relay.TLS != nil); err != nil {
		return err
	}
	if jobs := c.pgfly.JobsAddr(); jobs != nil {
		if c.jobsURL, err = appDatabaseURL(c.original, loopback(jobs), sc.Jobs.TLS != nil); err != nil {
			return err
		}
	}
	c.shim = sc.Shim != nil
	if c.shim && listening(c.appAddr) {
		return fmt.Errorf("something already listens on %s, where the app is to listen (PORT=%s): stop it, or point --app at a free port", c.appAddr, c.appPort)
	}
	return nil
}

func (c *runCommand) run(ctx context.Context, sigs <-chan os.Signal) error {
	if c.target != nil {
		return checkUntilSignal(ctx, sigs, c.stdout, *c.target, c.cfg.checkFlags)
	}
	cmd := exec.Command(c.argv[0], c.argv[1:]...)
	cmd.Env = childEnv(os.Environ(), c.dbURL, c.jobsURL, c.appPort)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, c.stdout, c.stderr
	// Its own process group, so that a signal pgfly passes on reaches every process of the
	// app (a shell wrapper's children too) exactly once, even when a terminal also sent it
	// to pgfly's group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	select {
	case sig := <-sigs: // a stop asked for while pgfly was starting: the app never starts
		if sig == syscall.SIGTERM || sig == syscall.SIGINT {
			c.log.Info("stopped before the app started", zap.Stringer("signal", sig))
			return exitError{128 + int(sig.(syscall.Signal))}
		}
	default:
	}
	c.pgfly.Start()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the app: %w", err)
	}
	a := &appRun{c: c, cmd: cmd, started: time.Now(), sigs: sigs, ctx: ctx, done: ctx.Done(),
		exited: make(chan error, 1), pgflyDone: make(chan error, 1)}
	fields := []zap.Field{zap.Int("pid", cmd.Process.Pid), zap.String("command", c.argv[0]),
		zap.String("port", c.appPort), zap.String("database_url", redact(c.dbURL))}
	if c.jobsURL != "" {
		fields = append(fields, zap.String("jobs_database_url", redact(c.jobsURL)))
	}
	c.log.Info("app started", fields...)
	return a.supervise()
}

// appPhase is where a running app is in its life, as pgfly sees it. Its exit ends every
// phase.
type appPhase int

const (
	appStarting appPhase = iota // not yet listening on its port (with the shim on)
	appRunning                  // listening, or no shim to wait for
	appStopping                 // asked to stop: a signal, pgfly's failure or a start timeout
)

// appRun supervises the app: what it waits for, and what each event does in each phase.
type appRun struct {
	c       *runCommand
	cmd     *exec.Cmd
	started time.Time
	phase   appPhase
	failure error // why pgfly stops the app, when it is not the app's own doing

	sigs      <-chan os.Signal
	ctx       context.Context
	done      <-chan struct{}  // ctx's: the caller gave up; nil once acted on
	ready     chan error       // the app listens on its port, or did not in time
	pgflyDone chan error       // pgfly stopped on its own; nil once acted on
	kill      <-chan time.Time // in appStopping: when the app gets SIGKILL
	exited    chan error
}

// supervise waits for the app to exit, passing on signals and stopping it when pgfly must,
// then stops pgfly and returns the app's status (or why pgfly stopped it).
func (a *appRun) supervise() error {
	log := a.c.log
	go func() { a.exited <- a.cmd.Wait() }()
	waitCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { a.pgflyDone <- a.c.pgfly.Wait(waitCtx) }()
	if a.c.shim {
		a.ready = make(chan error, 1)
		go func() { a.ready <- waitListening(waitCtx, a.c.appAddr, a.c.cfg.appStartTimeout) }()
	} else {
		a.phase = appRunning
		log.Info("no HTTP shim (--http-listen is empty): not waiting for the app to listen")
	}
	for {
		select {
		case err := <-a.ready:
			a.listened(err)
		case sig := <-a.sigs:
			a.signalled(sig)
		case <-a.done:
			a.done = nil
			log.Info("stopping the app", zap.Error(a.ctx.Err()))
			a.stop(syscall.SIGTERM)
		case err := <-a.pgflyDone:
			a.pgflyDone = nil
			if err != nil && !errors.Is(err, context.Canceled) {
				a.failure = err
				log.Error("pgfly failed: stopping the app", zap.Error(err))
				a.stop(syscall.SIGTERM)
			}
		case <-a.kill:
			log.Warn("the app did not exit in time (--shutdown-timeout): killing it", zap.Duration("timeout", a.c.cfg.shutdownTimeout))
			a.signal(syscall.SIGKILL)
			a.kill = nil // once
		case err := <-a.exited:
			cancel()
			return a.exit(err)
		}
	}
}

// listened: the app listens on its port, or did not within --app-start-timeout.
func (a *appRun) listened(err error) {
	a.ready = nil
	switch {
	case err == nil:
		a.c.log.Info("app is listening", zap.String("addr", a.c.appAddr), zap.Duration("after", time.Since(a.started)))
		if a.phase == appStarting {
			a.phase = appRunning
		}
		return
	case a.phase == appStopping:
		return // stopping already: not listening is no news
	}
	a.failure = fmt.Errorf("the app did not listen on %s within %v (--app-start-timeout): does it listen on $PORT (%s)? point --app at where it listens",
		a.c.appAddr, a.c.cfg.appStartTimeout, a.c.appPort)
	a.c.log.Error("stopping the app", zap.Error(a.failure))
	a.stop(syscall.SIGTERM)
}

// signalled passes a signal on to the app; SIGTERM and SIGINT also mean pgfly stops once the
// app has exited.
func (a *appRun) signalled(sig os.Signal) {
	if sig != syscall.SIGTERM && sig != syscall.SIGINT {
		a.signal(sig)
		return
	}
	if a.phase != appStopping {
		a.c.log.Info("passing the signal to the app; pgfly stops once it has exited",
			zap.Stringer("signal", sig), zap.Duration("timeout", a.c.cfg.shutdownTimeout))
	}
	a.stop(sig)
}

// stop signals the app to stop; the first time, it gives it --shutdown-timeout to exit.
func (a *appRun) stop(sig os.Signal) {
	if a.phase != appStopping {
		a.phase = appStopping
		a.kill = time.After(a.c.cfg.shutdownTimeout)
	}
	a.signal(sig)
}

// exit: the app has exited. What it left in its process group goes with it, then pgfly
// shuts down.
func (a *appRun) exit(err error) error {
	log := a.c.log
	code := exitCode(a.cmd, err)
	fields := []zap.Field{zap.Int("status", code), zap.Duration("ran", time.Since(a.started))}
	switch {
	case a.phase != appStopping && code != 0:
		log.Error("the app exited on its own: stopping pgfly", fields...)
	case a.phase != appStopping:
		log.Info("the app exited on its own with status 0: stopping pgfly", fields...)
	default:
		log.Info("the app exited", fields...)
	}
	a.signal(syscall.SIGTERM)
	sctx, cancel := context.WithTimeout(context.Background(), a.c.cfg.shutdownTimeout)
	if err := a.c.pgfly.Shutdown(sctx); err != nil {
		log.Warn("shutdown", zap.Error(err))
	}
	cancel()
	switch {
	case a.failure != nil:
		return a.failure
	case code != 0:
		return exitError{code}
	}
	return nil
}

// signal sends sig to the app's process group.
func (a *appRun) signal(sig os.Signal) {
	s, ok := sig.(syscall.Signal)
	if !ok {
		return
	}
	if err := syscall.Kill(-a.cmd.Process.Pid, s); err != nil && !errors.Is(err, syscall.ESRCH) {
		a.c.log.Warn("signal the app", zap.Stringer("signal", sig), zap.Error(err))
	}
}

// resolve fills in what run derives from the app's DATABASE_URL (the upstream and the
// primary, unless set) and checks the flags together. It returns the sidecar's
// configuration, the app's URL, and how the upstream was chosen.
func (c *runConfig) resolve(original string) (sc sidecar.Config, app *url.URL, how string, err error) {
	how = "--upstream"
	if c.upstream == "" {
		if c.upstream, how, err = defaultUpstream(original, c.region, c.primaryRegion); err != nil {
			return sc, nil, "", err
		}
	}
	if c.primary == "" {
		c.primary = original
	}
	if c.appStartTimeout <= 0 {
		return sc, nil, "", fmt.Errorf("invalid value %v for flag --app-start-timeout: must be positive", c.appStartTimeout)
	}
	if sc, err = c.sidecarConfig(); err != nil {
		return sc, nil, "", err
	}
	if app, err = httpURL("app", c.app); err != nil {
		return sc, nil, "", err
	}
	return sc, app, how, nil
}

// exitCode is the app's exit status as a shell reports it: 128+N when signal N killed it.
func exitCode(cmd *exec.Cmd, err error) int {
	if cmd.ProcessState == nil {
		return 1
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	if code := cmd.ProcessState.ExitCode(); code >= 0 {
		return code
	}
	return 1
}

// splitCommand separates pgfly's flags from the app's command at the first "--". The
// command is nil when there is no "--" or nothing after it.
func splitCommand(args []string) (flags, argv []string) {
	i := slices.Index(args, "--")
	if i < 0 {
		return args, nil
	}
	if i == len(args)-1 {
		return args[:i], nil
	}
	return args[:i], args[i+1:]
}

// defaultUpstream picks the Postgres pgfly relays to when --upstream is not set, and says
// why: the app's own DATABASE_URL in the primary region (or off Fly, with no region), the
// nearest replica by Fly Postgres conventions elsewhere.
func defaultUpstream(original, region, primaryRegion string) (upstream, how string, err error) {
	if region == "" || primaryRegion == "" || region == primaryRegion {
		return original, "DATABASE_URL (primary region, or no $FLY_REGION/$PRIMARY_REGION)", nil
	}
	u, err := parsePostgresURL(original)
	if err != nil {
		return "", "", err
	}
	host := u.Hostname()
	if host == "" || strings.Contains(u.Host, ",") {
		return "", "", errors.New("cannot derive the nearest replica from $DATABASE_URL (no single host in it): set --upstream")
	}
	if strings.HasSuffix(host, flyInternalSuffix) && !strings.HasPrefix(host, flyNearestPrefix) {
		host = flyNearestPrefix + host
	}
	u.Host = net.JoinHostPort(host, flyReplicaPort)
	return u.String(), "nearest replica of DATABASE_URL by Fly Postgres conventions (region " + region + " is not the primary region " + primaryRegion + ")", nil
}

// appDatabaseURL is the app's DATABASE_URL pointed at pgfly's address: the same user,
// password, database and parameters, minus those that would send the app elsewhere (host,
// hostaddr, port) or make it refuse a replica (target_session_attrs). Without TLS toward
// pgfly it sets sslmode=disable: the connection never leaves the machine, pgfly answers
// SSLRequest with N unless --tls-cert is set (so sslmode=require would fail), and pgfly
// applies the original sslmode toward the real database. channel_binding and
// sslnegotiation go with TLS, since they require it. A pgflyAddr that is a Unix socket's
// path (<dir>/.s.PGSQL.<port>) becomes host=<dir>&port=<port>, the form libpq, pgx,
// node-postgres and psycopg dial.
func appDatabaseURL(original, pgflyAddr string, tls bool) (string, error) {
	u, err := parsePostgresURL(original)
	if err != nil {
		return "", err
	}
	u.Host = pgflyAddr
	q := u.Query()
	for _, k := range []string{"host", "hostaddr", "port", "target_session_attrs"} {
		q.Del(k)
	}
	if filepath.IsAbs(pgflyAddr) {
		dir, name := filepath.Split(pgflyAddr)
		u.Host = ""
		if u.Path == "" {
			u.Path = "/" // so that the URL keeps its "//": postgres:///?host=...
		}
		q.Set("host", filepath.Clean(dir))
		q.Set("port", strings.TrimPrefix(name, ".s.PGSQL."))
	}
	if !tls {
		q.Set("sslmode", "disable")
		q.Del("channel_binding")
		q.Del("sslnegotiation")
	}
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// parsePostgresURL parses a postgres:// or postgresql:// URL.
func parsePostgresURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return nil, errors.New("$DATABASE_URL is not a postgres:// URL (pgfly run needs the URL form, postgres://user:password@host:port/database)")
	}
	return u, nil
}

// childEnv is pgfly's environment with DATABASE_URL, PGFLY_JOBS_DATABASE_URL and PORT
// replaced. PGFLY_JOBS_DATABASE_URL is left out when jobsURL is "" (no jobs listener), so
// that an app that falls back to DATABASE_URL without it does, rather than using a stale one.
func childEnv(env []string, dbURL, jobsURL, port string) []string {
	out := make([]string, 0, len(env)+3)
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if name == "DATABASE_URL" || name == "PGFLY_JOBS_DATABASE_URL" || name == "PORT" {
			continue
		}
		out = append(out, kv)
	}
	out = append(out, "DATABASE_URL="+dbURL, "PORT="+port)
	if jobsURL != "" {
		out = append(out, "PGFLY_JOBS_DATABASE_URL="+jobsURL)
	}
	return out
}

// hostPort is an http URL's host with its port, the scheme's default when absent.
func hostPort(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// loopback is a listener's address as a client on this machine dials it: 127.0.0.1 for a
// listener on every interface (Go's are dual-stack, so this holds for [::] too, and works
// where IPv6 is off).
func loopback(a net.Addr) string {
	tcp, ok := a.(*net.TCPAddr)
	if !ok {
		return a.String()
	}
	ip := tcp.IP
	if ip == nil || ip.IsUnspecified() {
		ip = net.IPv4(127, 0, 0, 1)
	}
	return (&net.TCPAddr{IP: ip, Port: tcp.Port}).String()
}

// listening reports whether something accepts connections at addr.
func listening(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, appAddrDialTimeout)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// waitListening polls addr until it accepts a connection, timeout passes, or ctx ends.
func waitListening(ctx context.Context, addr string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(appAddrPollEvery)
	defer tick.Stop()
	var d net.Dialer
	for {
		dctx, dcancel := context.WithTimeout(ctx, appAddrDialTimeout)
		c, err := d.DialContext(dctx, "tcp", addr)
		dcancel()
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// redact hides a connection string's password, for logs: the URL's user password and a
// password query parameter, or a keyword/value string's password.
func redact(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(unparsable URL)"
	}
	if u.Scheme == "" { // keyword/value form, e.g. "host=db password=secret"
		return keywordPassword.ReplaceAllString(s, "${1}xxxxx")
	}
	if q := u.Query(); q.Has("password") || q.Has("sslpassword") {
		for _, k := range []string{"password", "sslpassword"} {
			if q.Has(k) {
				q.Set(k, "xxxxx")
			}
		}
		u.RawQuery = q.Encode()
	}
	return u.Redacted()
}

// keywordPassword matches the password (or the client key's, sslpassword) of a keyword/value
// connection string, quoted or not.
var keywordPassword = regexp.MustCompile(`(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:\\.|\S)*)`)
