package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/sidecar"
	"github.com/pgfly/pgfly/lag"
)

// Bounds of `pgfly check`: each server and the app get checkTimeout to answer, and the round
// trip is the best of rttSamples queries. A "local" replica whose round trip is at least
// farRatio of the primary's is as far away as the primary, once that is farFloor or more
// (below it, both are on this machine or beside it, and any ratio is noise).
const (
	checkTimeout = 5 * time.Second
	rttSamples   = 5
	farRatio     = 0.5
	farFloor     = 5 * time.Millisecond
)

// verdict is how a check came out.
type verdict string

const (
	verdictOK   verdict = "ok"
	verdictWarn verdict = "warn"
	verdictFail verdict = "FAIL"
)

// checkResult is one line of `pgfly check`: what it looked at, what it found, what to do.
type checkResult struct {
	Check   string  `json:"check"`
	Verdict verdict `json:"verdict"`
	Detail  string  `json:"detail"`
	Fix     string  `json:"fix,omitempty"`
}

// checkTarget is one pgfly's setup as the checks see it, whichever way it was derived
// (serve's flags, run's derivation from DATABASE_URL, the demo's regions).
type checkTarget struct {
	Region, PrimaryRegion string
	Upstream, Primary     string   // Postgres URLs; Primary may be ""
	App                   *url.URL // nil with the shim off
	HTTPListen            string   // "" with the shim off
	AdminListen           string
	MaxLag                time.Duration
	// Forwarding names the listeners whose sessions move to Primary when the replica refuses
	// their writes ("--listen" with the shim off, "--jobs-listen"); none when forwarding is off.
	Forwarding []string
	// DatabaseURL is the app's DATABASE_URL as the app will see it, and Listen pgfly's
	// Postgres address; DatabaseURLBy names what sets it to pgfly's (pgfly run, the demo),
	// when something does, so that it is not checked.
	DatabaseURL   string
	Listen        string
	UnixPort      int // the port in the socket's name when Listen is a directory
	DatabaseURLBy string
	// AppStarted is false when the app is not running yet (pgfly run --check): not checked.
	AppStarted bool
	FlyToml    string // a fly.toml to check, or ""
	Env        func(string) string
}

// checkFlags are the flags `pgfly check` and `pgfly run --check` add.
type checkFlags struct {
	json, strict bool
	flyToml      string
}

func (c *checkFlags) register(fs *flagSet) {
	fs.BoolVar(&c.json, "json", false, "print the checks as JSON, for scripts")
	fs.bindEnv("json", "PGFLY_CHECK_JSON")
	fs.BoolVar(&c.strict, "strict", false, "fail (exit status 1) on warnings too")
	fs.bindEnv("strict", "PGFLY_CHECK_STRICT")
	fs.StringVar(&c.flyToml, "fly-toml", "", "a fly.toml to check: its HTTP service's internal port and its health check must point at pgfly")
	fs.bindEnv("fly-toml", "PGFLY_FLY_TOML")
}

// checkCommand is `pgfly check`: serve's flags and environment, checked against the real
// servers and the app, one line each.
type checkCommand struct {
	cfg    serveConfig
	flags  checkFlags
	stdout io.Writer
	target checkTarget
}

func (c *checkCommand) name() string     { return "check" }
func (c *checkCommand) logLevel() string { return "error" } // the report is the output
func (c *checkCommand) close() error     { return nil }

func (c *checkCommand) register(fs *flagSet) {
	c.cfg.register(fs)
	c.flags.register(fs)
}

func (c *checkCommand) usage() string {
	return `Usage: pgfly check [serve's flags] [--json] [--strict] [--fly-toml PATH]

Checks that a multi-region setup is what it seems, with the flags and environment 'pgfly
serve' would run with: this region and the primary region, the upstream's role against the
region, the primary, round trips to both, replication lag, that both are one cluster, the
credentials pgfly logs in to the primary with, the app behind the shim, the FLY_* variables,
and with --fly-toml the HTTP service and health check. One line each, with what to do.
Exit status: 0 when nothing is wrong (warnings are printed), 1 when a check fails (or warns,
with --strict), 2 for bad usage.

Flags:
`
}

func (c *checkCommand) open(fs *flagSet, _ *zap.Logger) error {
	sc, err := c.cfg.sidecarConfig()
	if err != nil {
		return usage(err)
	}
	if err := validate(fs, sc); err != nil {
		return err
	}
	c.target = serveTarget(&c.cfg, sc, c.flags.flyToml)
	return nil
}

func (c *checkCommand) run(ctx context.Context, sigs <-chan os.Signal) error {
	return checkUntilSignal(ctx, sigs, c.stdout, c.target, c.flags)
}

// validate refuses what serve would refuse: each component checks its own configuration when
// it is built (nothing listens or connects until Listen and Start).
func validate(fs *flagSet, sc sidecar.Config) error {
	pgfly, err := sidecar.New(sc, zap.NewNop())
	if err != nil {
		return usage(flagError(fs, err))
	}
	return pgfly.Close()
}

// checkUntilSignal runs the checks and reports them; a signal stops them, and the command
// exits as interrupted.
func checkUntilSignal(ctx context.Context, sigs <-chan os.Signal, w io.Writer, t checkTarget, f checkFlags) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	interrupted := make(chan struct{})
	go func() {
		for {
			select {
			case sig := <-sigs: // pgfly run passes others on to an app; here only these stop
				if sig != syscall.SIGTERM && sig != syscall.SIGINT {
					continue
				}
				close(interrupted)
				cancel()
			case <-ctx.Done():
			}
			return
		}
	}()
	results := runChecks(ctx, t)
	select {
	case <-interrupted:
		return errInterrupted
	default:
	}
	return report(w, results, f)
}

// serveTarget is what serve would run, as the checks see it.
func serveTarget(c *serveConfig, sc sidecar.Config, flyToml string) checkTarget {
	t := checkTarget{Region: c.region, PrimaryRegion: c.primaryRegion, Upstream: sc.Relay.Upstream, Primary: sc.Lag.Primary,
		AdminListen: c.adminListen, MaxLag: c.maxLag, DatabaseURL: os.Getenv("DATABASE_URL"), Listen: c.listen, UnixPort: c.unixPort,
		AppStarted: true, FlyToml: flyToml, Env: os.Getenv}
	if sc.Shim != nil {
		t.App, t.HTTPListen = sc.Shim.App, c.httpListen
	}
	if sc.Relay.Primary != "" {
		t.Forwarding = append(t.Forwarding, "--listen")
	}
	if sc.Jobs != nil && sc.Jobs.Primary != "" {
		t.Forwarding = append(t.Forwarding, "--jobs-listen")
	}
	if t.MaxLag == 0 {
		t.MaxLag = sidecar.DefaultMaxLag
	}
	return t
}

// report prints the results and says whether they pass.
func report(w io.Writer, results []checkResult, f checkFlags) error {
	failed, warned := 0, 0
	for _, r := range results {
		switch r.Verdict {
		case verdictFail:
			failed++
		case verdictWarn:
			warned++
		}
	}
	pass := failed == 0 && (!f.strict || warned == 0)
	if f.json {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(struct {
			OK     bool          `json:"ok"`
			Checks []checkResult `json:"checks"`
		}{pass, results}); err != nil {
			return err
		}
	} else {
		printChecks(w, results)
		fmt.Fprintf(w, "%d failed, %d warnings, %d ok\n", failed, warned, len(results)-failed-warned)
	}
	if !pass {
		return exitError{1}
	}
	return nil
}

// printChecks prints one line per check: verdict, name, what it found, and what to do.
func printChecks(w io.Writer, results []checkResult) {
	for _, r := range results {
		line := fmt.Sprintf("%-4s  %-15s %s", r.Verdict, r.Check, r.Detail)
		if r.Fix != "" {
			line += ". Fix: " + r.Fix
		}
		fmt.Fprintln(w, line)
	}
}

// runChecks runs every check against t, each bounded by checkTimeout.
func runChecks(ctx context.Context, t checkTarget) []checkResult {
	if t.Env == nil {
		t.Env = func(string) string { return "" }
	}
	var out []checkResult
	add := func(check string, v verdict, fix string, format string, args ...any) {
		out = append(out, checkResult{Check: check, Verdict: v, Detail: fmt.Sprintf(format, args...), Fix: fix})
	}

	// The regions.
	replicaRegion := t.Region != "" && t.PrimaryRegion != "" && t.Region != t.PrimaryRegion
	switch {
	case t.PrimaryRegion == "" && t.App != nil:
		add("regions", verdictFail, "set --primary-region (PRIMARY_REGION), or --http-listen= to run the relay alone",
			"no primary region: the HTTP shim cannot say where to replay")
	case t.Region == "":
		add("regions", verdictWarn, "set --region (FLY_REGION, which Fly sets on every machine)",
			"this region is not known (primary region %s): the checks cannot tell what the upstream should be", orNone(t.PrimaryRegion))
	case replicaRegion:
		add("regions", verdictOK, "", "this region %s is a replica region; the primary region is %s", t.Region, t.PrimaryRegion)
	default:
		add("regions", verdictOK, "", "this region %s is the primary region", t.Region)
	}
	flyChecks(t, add)

	// The servers: reachable, how far, and what the monitor makes of them.
	up := probe(ctx, t.Upstream)
	var pri serverProbe
	if t.Primary != "" {
		pri = probe(ctx, t.Primary)
	}
	if up.err != nil {
		add("upstream", verdictFail, "check --upstream's host, port, user and password, and that the server runs",
			"%s does not answer: %s", redact(t.Upstream), oneLine(up.err))
	} else {
		add("upstream", verdictOK, "", "%s answers; round trip %s", redact(t.Upstream), ms(up.rtt))
	}
	st, stErr := monitorStatus(ctx, t)
	upstreamRole(t, up, st, stErr, replicaRegion, add)
	primaryChecks(t, up, pri, st, replicaRegion, add)
	appChecks(ctx, t, add)
	if t.FlyToml != "" {
		flyTomlChecks(t, add)
	}
	return out
}

// adder records one check's result.
type adder func(check string, v verdict, fix string, format string, args ...any)

// flyChecks: on Fly (FLY_APP_NAME is set on every machine), the variables pgfly reads.
func flyChecks(t checkTarget, add adder) {
	if t.Env("FLY_APP_NAME") == "" {
		add("fly", verdictOK, "", "not on Fly (no $FLY_APP_NAME): the FLY_* variables are not checked")
		return
	}
	var missing []string
	for _, v := range []string{"FLY_REGION", "PRIMARY_REGION", "FLY_MACHINE_ID"} {
		if t.Env(v) == "" {
			missing = append(missing, "$"+v)
		}
	}
	if len(missing) > 0 {
		add("fly", verdictFail, "set primary_region in fly.toml (Fly derives PRIMARY_REGION from it); FLY_REGION and FLY_MACHINE_ID come from Fly itself",
			"on Fly (app %s) without %s", t.Env("FLY_APP_NAME"), strings.Join(missing, ", "))
		return
	}
	add("fly", verdictOK, "", "on Fly: app %s, machine %s, $FLY_REGION and $PRIMARY_REGION set", t.Env("FLY_APP_NAME"), t.Env("FLY_MACHINE_ID"))
}

// upstreamRole: a replica region's upstream must be in recovery and the primary region's must
// not; the reverse sends every read across regions, or writes nowhere.
func upstreamRole(t checkTarget, up serverProbe, st lag.Status, stErr error, replicaRegion bool, add adder) {
	switch {
	case up.err != nil:
		return
	case stErr != nil || st.Role == lag.RoleUnknown:
		add("upstream role", verdictWarn, "", "not known: %v", orText(stErr, st.UpstreamError))
	case t.Region == "" || t.PrimaryRegion == "":
		add("upstream role", verdictWarn, "set --region and --primary-region", "%s, with no region to compare it to", roleText(st.Role))
	case replicaRegion && st.Role == lag.RolePrimary:
		add("upstream role", verdictFail, "point --upstream at this region's replica (on Fly Postgres: port 5433 of top1.nearest.of.<db>.internal)",
			"%s in replica region %s: every read crosses regions, and nothing is ever replayed", roleText(st.Role), t.Region)
	case !replicaRegion && st.Role == lag.RoleReplica:
		add("upstream role", verdictFail, "point --upstream at the primary, or correct PRIMARY_REGION (stale after a failover?)",
			"%s in the primary region %s: its writes are refused and nothing can replay them", roleText(st.Role), t.Region)
	default:
		add("upstream role", verdictOK, "", "%s, as region %s needs", roleText(st.Role), t.Region)
	}
}

// primaryChecks: the primary, how far it is beside the upstream, lag, one cluster, and the
// credentials pgfly logs in to the primary with.
func primaryChecks(t checkTarget, up, pri serverProbe, st lag.Status, replicaRegion bool, add adder) {
	if t.Primary == "" {
		if up.err != nil {
			return // the upstream's failure says it all
		}
		if replicaRegion || st.Role == lag.RoleReplica {
			add("primary", verdictWarn, "set --primary to the primary's URL (pgfly run takes DATABASE_URL)",
				"no --primary: no bookmarks (reads after a write may not see it) and lag is the replica's own guess")
		} else {
			add("primary", verdictOK, "", "the upstream is the primary (no --primary)")
		}
	} else if pri.err != nil {
		add("primary", verdictFail, "check --primary's host, port, user and password",
			"%s does not answer: %s", redact(t.Primary), oneLine(pri.err))
	} else if pri.inRecovery {
		add("primary", verdictFail, "point --primary at the writable primary (on Fly Postgres: port 5432, through HAProxy)",
			"%s answers but is in recovery", redact(t.Primary))
	} else {
		add("primary", verdictOK, "", "%s answers and takes writes; round trip %s", redact(t.Primary), ms(pri.rtt))
	}

	if up.err == nil && pri.err == nil && t.Primary != "" && st.Role == lag.RoleReplica {
		if pri.rtt >= farFloor && float64(up.rtt) >= farRatio*float64(pri.rtt) {
			add("distance", verdictWarn, "point --upstream at a replica in this region (does the nearest-replica name resolve to the primary?)",
				"the \"local\" replica is as far away as the primary: round trip %s, the primary's %s", ms(up.rtt), ms(pri.rtt))
		} else if pri.rtt < farFloor {
			add("distance", verdictOK, "", "the replica and the primary are both near (round trips %s and %s): no distance to tell apart", ms(up.rtt), ms(pri.rtt))
		} else {
			add("distance", verdictOK, "", "the replica is nearer than the primary: round trip %s against %s", ms(up.rtt), ms(pri.rtt))
		}
	}

	if st.Role == lag.RoleReplica {
		switch {
		case st.LagSeconds < 0 || st.LagBytes < 0 && t.Primary != "":
			add("lag", verdictWarn, "", "not known yet")
		case time.Duration(st.LagSeconds*float64(time.Second)) > t.MaxLag:
			add("lag", verdictWarn, "look at the replica's WAL stream (pg_stat_wal_receiver) and replay (pg_is_wal_replay_paused())",
				"%.1fs behind the primary (%d bytes), over --max-lag %v: /health answers 503", st.LagSeconds, st.LagBytes, t.MaxLag)
		default:
			add("lag", verdictOK, "", "%.3fs behind the primary (%d bytes), under --max-lag %v", st.LagSeconds, max(st.LagBytes, 0), t.MaxLag)
		}
	}

	if t.Primary != "" && up.err == nil && pri.err == nil {
		switch {
		case st.SystemID == 0 || st.PrimarySystemID == 0:
			add("one cluster", verdictWarn, "log in as a role that may read pg_control_system() (a superuser or pg_monitor member)",
				"the system identifiers could not be read")
		case st.SystemID != st.PrimarySystemID:
			add("one cluster", verdictFail, "point --upstream and --primary at one cluster",
				"the upstream (system %d) and the primary (system %d) are different clusters: bookmarks from one mean nothing to the other", st.SystemID, st.PrimarySystemID)
		default:
			add("one cluster", verdictOK, "", "the upstream and the primary are one cluster (system %d)", st.SystemID)
		}
	}

	if t.Primary != "" && (pri.err == nil || isAuthFailure(pri.err)) {
		credentials(t, pri, add)
	}
}

// isAuthFailure reports a login refused for its credentials (28P01, 28000), as against a
// server that could not be reached.
func isAuthFailure(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "28P01" || pe.Code == "28000")
}

// credentials: the user and password pgfly logs in to the primary with, for lag and
// bookmarks, and for forwarded sessions: a session of --primary's user that moves to the
// primary logs in there with that password, once the replica accepted the client's own login;
// a session of another user gets only what the primary's pg_hba.conf allows without one. The
// check tries pgfly's own login, not a session's.
func credentials(t checkTarget, pri serverProbe, add adder) {
	pu, err1 := pgx.ParseConfig(t.Primary)
	uu, err2 := pgx.ParseConfig(t.Upstream)
	if err1 != nil || err2 != nil {
		return
	}
	forwarding := "forwarding is off, so --primary's credentials serve only pgfly's own queries (lag, bookmarks)"
	if len(t.Forwarding) > 0 {
		forwarding = fmt.Sprintf("forwarding is on for %s: a session of %s that moves to the primary logs in there with --primary's password, after the replica accepted the client's own login",
			strings.Join(t.Forwarding, " and "), pu.User)
	}
	switch {
	case pri.err != nil:
		add("credentials", verdictFail, "put the primary's user and password in --primary's URL",
			"the primary refused pgfly's login as %s; %s", pu.User, forwarding)
	case pu.User != uu.User && len(t.Forwarding) > 0:
		add("credentials", verdictWarn, "use one URL's user for both (on Fly, DATABASE_URL serves both)",
			"pgfly logs in to the primary as %s, the upstream as %s: a forwarded session of %s has no password for the primary, only what its pg_hba.conf allows without one", pu.User, uu.User, uu.User)
	default:
		add("credentials", verdictOK, "", "pgfly logs in to the primary as %s; %s", pu.User, forwarding)
	}
}

// appChecks: the app answers behind the shim, and its DATABASE_URL points at pgfly.
func appChecks(ctx context.Context, t checkTarget, add adder) {
	switch {
	case t.App == nil:
		add("app", verdictOK, "", "no HTTP shim (--http-listen is empty): no app to check")
	case !t.AppStarted:
		add("app", verdictOK, "", "pgfly run starts the app at %s: not checked before it runs", t.App.Redacted())
	default:
		ctx, cancel := context.WithTimeout(ctx, checkTimeout)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, t.App.String(), nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			add("app", verdictFail, "start the app, or point --app at where it listens",
				"the app at %s does not answer: %v", t.App.Redacted(), err)
			break
		}
		resp.Body.Close()
		add("app", verdictOK, "", "the app at %s answers (HTTP %d)", t.App.Redacted(), resp.StatusCode)
	}
	switch {
	case t.DatabaseURLBy != "":
		add("database url", verdictOK, "", "%s points the app's DATABASE_URL at pgfly (%s)", t.DatabaseURLBy, t.Listen)
	case t.DatabaseURL == "":
		add("database url", verdictOK, "", "no $DATABASE_URL here: not checked")
	default:
		u, err := url.Parse(t.DatabaseURL)
		socketDir := ""
		if err == nil {
			socketDir = u.Query().Get("host") // libpq's form for a Unix socket: the directory
		}
		switch {
		case err != nil || u.Host == "" && !filepath.IsAbs(socketDir):
			add("database url", verdictWarn, "", "$DATABASE_URL is not a URL with a host: not checked")
			return
		case filepath.IsAbs(socketDir) && filepath.IsAbs(t.Listen) && filepath.Clean(socketDir) == filepath.Clean(t.Listen) &&
			portOr5432(u.Query().Get("port")) == portOr5432(strconv.Itoa(t.UnixPort)):
			add("database url", verdictOK, "", "$DATABASE_URL points at pgfly's Unix socket in %s", t.Listen)
			return
		case filepath.IsAbs(socketDir):
			add("database url", verdictFail, fmt.Sprintf("point the app's DATABASE_URL at pgfly, host=%s&port=%s", t.Listen, portOr5432(strconv.Itoa(t.UnixPort))),
				"$DATABASE_URL points at the Unix socket in %s, port %s, not at pgfly", socketDir, portOr5432(u.Query().Get("port")))
			return
		}
		if sameAddr(u.Host, t.Listen) {
			add("database url", verdictOK, "", "$DATABASE_URL points at pgfly (%s)", t.Listen)
			break
		}
		add("database url", verdictFail, fmt.Sprintf("point the app's DATABASE_URL at pgfly, host %s (pgfly run does it)", t.Listen),
			"$DATABASE_URL points at %s, not at pgfly: the app's writes fail on the replica, or every read crosses regions", u.Host)
	}
}

// portOr5432 is a port as libpq reads it: 5432 when it is not given.
func portOr5432(p string) string {
	if p == "" || p == "0" {
		return "5432"
	}
	return p
}

// sameAddr reports whether a host:port names the address pgfly listens on (a listener on
// every interface is reached on loopback).
func sameAddr(hostport, listen string) bool {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil {
		h, p = hostport, "5432"
	}
	lh, lp, err := net.SplitHostPort(listen)
	if err != nil || p != lp {
		return false
	}
	loop := func(s string) bool { return s == "" || isLoopbackHost(s) }
	return h == lh || loop(h) && (loop(lh) || lh == "0.0.0.0" || lh == "::")
}

// serverProbe is one server as a client reaches it: whether it answers, its round trip, and
// whether it is in recovery.
type serverProbe struct {
	rtt        time.Duration
	inRecovery bool
	err        error
}

// probe logs in with url and times rttSamples round trips, keeping the best.
func probe(ctx context.Context, url string) serverProbe {
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return serverProbe{err: err}
	}
	defer conn.Close(context.Background())
	p := serverProbe{rtt: -1}
	for range rttSamples {
		start := time.Now()
		if err := conn.QueryRow(ctx, "select pg_is_in_recovery()").Scan(&p.inRecovery); err != nil {
			return serverProbe{err: err}
		}
		if d := time.Since(start); p.rtt < 0 || d < p.rtt {
			p.rtt = d
		}
	}
	return p
}

// monitorStatus is what pgfly's monitor makes of the upstream and the primary after one poll
// of each: the same reading /health and the shim act on.
func monitorStatus(ctx context.Context, t checkTarget) (lag.Status, error) {
	m, err := lag.New(lag.Config{Upstream: t.Upstream, Primary: t.Primary, QueryTimeout: checkTimeout}, zap.NewNop())
	if err != nil {
		return lag.Status{}, err
	}
	defer m.Close()
	m.Start()
	ctx, cancel := context.WithTimeout(ctx, 2*checkTimeout)
	defer cancel()
	if err := m.Ready(ctx); err != nil {
		return lag.Status{}, err
	}
	// The first polls may leave the identities (read from the control file, after the first
	// poll) and the lag unknown: wait a little for them, up to two polls' worth.
	deadline := time.Now().Add(2 * lag.DefaultInterval)
	for {
		st := m.Status()
		known := st.SystemID != 0 && (t.Primary == "" || st.PrimarySystemID != 0) && st.LagSeconds >= 0
		if known || !st.UpstreamUp || time.Now().After(deadline) || ctx.Err() != nil {
			return st, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func roleText(r lag.Role) string {
	switch r {
	case lag.RolePrimary:
		return "a primary (not in recovery)"
	case lag.RoleReplica:
		return "a replica (in recovery)"
	}
	return string(r)
}

func orNone(s string) string {
	if s == "" {
		return "not set"
	}
	return s
}

func orText(err error, s string) string {
	if err != nil {
		return err.Error()
	}
	if s == "" {
		return "the monitor has not heard from it"
	}
	return s
}

// oneLine is an error on one line (pgx lists each address it tried on a line of its own),
// each distinct line once.
func oneLine(err error) string {
	var parts []string
	for _, l := range strings.Split(err.Error(), "\n") {
		if l = strings.TrimSpace(l); l != "" && !slices.Contains(parts, l) {
			parts = append(parts, l)
		}
	}
	return strings.Join(parts, " ")
}

// ms is a round trip as the checks print it.
func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }
