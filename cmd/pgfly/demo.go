package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/edge"
	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/internal/sampleapp"
	"github.com/pgfly/pgfly/internal/sidecar"
	"github.com/pgfly/pgfly/router"
)

// demoStartTimeout bounds starting the whole demo setup.
const demoStartTimeout = 2 * time.Minute

// demoRequestTimeout bounds each request of the scenario.
const demoRequestTimeout = 30 * time.Second

// demoConfig is `pgfly demo`'s configuration, from flags and the environment.
type demoConfig struct {
	listen   string
	scenario bool
	install  bool
	logLevel string
}

func (c *demoConfig) register(fs *flagSet) {
	fs.StringVar(&c.listen, "listen", DefaultEdgeListen, "where the demo's edge takes requests: the address to open in a browser (--scenario picks a free port unless this is set)")
	fs.bindEnv("listen", "PGFLY_DEMO_LISTEN")
	fs.BoolVar(&c.scenario, "scenario", false, "run a short scripted tour, print what happened, and exit")
	fs.bindEnv("scenario", "PGFLY_DEMO_SCENARIO")
	fs.BoolVar(&c.install, "install", false, "first install the PostgreSQL server (the Debian package postgresql, with apt-get; Debian or Ubuntu, as root) if its binaries are missing; nothing when they are there")
	fs.bindEnv("install", "PGFLY_DEMO_INSTALL")
	fs.StringVar(&c.logLevel, "log-level", "error", "level of the JSON logs every component writes to stderr: debug, info, warn or error")
	fs.bindEnv("log-level", "PGFLY_LOG_LEVEL")
}

const demoUsage = `Usage: pgfly demo [flags]

Starts a whole two-region setup on this machine and shows pgfly at work: a real PostgreSQL
primary (region iad) and streaming replica (region fra), in each region the demo guestbook
app behind its own pgfly, and a local stand-in for Fly's edge in front. It needs the
PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_basebackup; set $PGFLY_PG_BIN to
their directory if they are not found); --install installs them first where they are missing,
on Debian or Ubuntu as root. Ctrl-C or SIGTERM stops everything and removes the
data directory.

Flags:
`

// demoCommand is `pgfly demo`: the whole two-region setup, as a tour or until a signal.
type demoCommand struct {
	cfg    demoConfig
	stdout io.Writer
	log    *zap.Logger
}

func (c *demoCommand) name() string         { return "demo" }
func (c *demoCommand) register(fs *flagSet) { c.cfg.register(fs) }
func (c *demoCommand) usage() string        { return demoUsage }
func (c *demoCommand) logLevel() string     { return c.cfg.logLevel }
func (c *demoCommand) close() error         { return nil } // run stops what it starts

func (c *demoCommand) open(fs *flagSet, log *zap.Logger) error {
	c.log = log
	listenSet := false
	fs.Visit(func(f *flag.Flag) { listenSet = listenSet || f.Name == "listen" })
	if c.cfg.scenario && !listenSet {
		c.cfg.listen = "127.0.0.1:0"
	}
	return checkListen(c.cfg.listen)
}

func (c *demoCommand) run(ctx context.Context, sigs <-chan os.Signal) error {
	sctx, stop := context.WithCancel(ctx) // ends at the first signal
	defer stop()
	go func() {
		select {
		case <-sigs:
			stop()
		case <-sctx.Done():
		}
	}()
	stdout := c.stdout
	trace := &trace{primary: regions.DefaultPrimaryRegion}
	if !c.cfg.scenario {
		trace.live = stdout
	}

	if c.cfg.install {
		if err := installDemo(sctx, stdout); err != nil {
			return err
		}
	}
	fmt.Fprintln(stdout, "pgfly demo: starting a PostgreSQL primary and streaming replica, and in each of two regions the demo app and pgfly ...")
	startCtx, cancel := context.WithTimeout(sctx, demoStartTimeout)
	trail := newRequestTrail(regions.DefaultPrimaryRegion)
	observe := func(ev regions.Event) { trace.add(ev); trail.add(ev) }
	s, err := regions.Start(startCtx, regions.Options{Listen: c.cfg.listen, Log: c.log, Observe: observe})
	cancel()
	switch {
	case err != nil && sctx.Err() != nil:
		fmt.Fprintln(stdout, "pgfly demo: stopped before it was ready; nothing is left running")
		return nil
	case errors.Is(err, pgcluster.ErrBinariesNotFound):
		return fmt.Errorf("the demo runs a real PostgreSQL primary and replica on this machine: %w (on Debian or Ubuntu, as root, pgfly demo --install does it)", err)
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("%w: stop what uses that address, or pick another with --listen, e.g. pgfly demo --listen 127.0.0.1:8090", err)
	case err != nil:
		return fmt.Errorf("start the demo: %w", err)
	}
	closeAll := func() error {
		dir := s.Cluster.Dir
		err := s.Close()
		if err != nil {
			return fmt.Errorf("stop the demo: %w", err)
		}
		fmt.Fprintf(stdout, "pgfly demo: stopped the edge, both regions' apps and pgfly, and PostgreSQL; removed %s\n", dir)
		return nil
	}

	printDemoChecks(sctx, stdout, s)
	if c.cfg.scenario {
		serr := runScenario(sctx, s, trace, stdout)
		if cerr := closeAll(); serr == nil {
			serr = cerr
		}
		return serr
	}
	page, err := startDemoPage(c.cfg.listen, trail, s, c.log)
	if err != nil {
		return errors.Join(err, closeAll())
	}
	printDemo(stdout, s, page.URL())
	<-sctx.Done()
	fmt.Fprintln(stdout, "\npgfly demo: stopping ...")
	trace.stopLive()
	return errors.Join(page.Close(), closeAll())
}

// printDemoChecks prints what `pgfly check` says of each region's pgfly.
func printDemoChecks(ctx context.Context, w io.Writer, s *regions.Setup) {
	su := pgcluster.RoleSuperuser.Name
	primary := s.Cluster.Primary.URL(su, "", pgcluster.Database)
	for _, r := range []struct {
		region   *regions.Region
		upstream string
	}{{s.Replica, s.Cluster.Replica.URL(su, "", pgcluster.Database)}, {s.Primary, primary}} {
		app, _ := url.Parse(r.region.AppURL)
		t := checkTarget{Region: r.region.Name, PrimaryRegion: s.Primary.Name, Upstream: r.upstream, Primary: primary,
			App: app, HTTPListen: r.region.Sidecar.HTTPAddr().String(), AdminListen: r.region.Sidecar.AdminAddr().String(),
			MaxLag: sidecar.DefaultMaxLag, DatabaseURLBy: "the demo", Listen: r.region.Sidecar.PostgresAddr().String(), AppStarted: true}
		fmt.Fprintf(w, "\npgfly check, region %s:\n", r.region.Name)
		printChecks(w, runChecks(ctx, t))
	}
}

// checkListen fails, with what to do, when the edge's address is taken.
func checkListen(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("cannot listen on %s: it is already in use; stop what uses it (another pgfly demo?), or pick another address with --listen, e.g. pgfly demo --listen 127.0.0.1:8090", addr)
		}
		return fmt.Errorf("cannot listen on %s: %w; pick another address with --listen", addr, err)
	}
	return ln.Close()
}

// printDemo tells what runs where and what to try.
func printDemo(w io.Writer, s *regions.Setup, pageURL string) {
	health := func(r *regions.Region) string { return r.AdminURL + "/health" }
	fmt.Fprintf(w, `
pgfly demo is running. Open %[1]s/ in a browser, and beside it the live page %[13]s

  edge      %[1]s   a stand-in for Fly's edge; sends requests to %[2]s first
  page      %[13]s   live: the last requests (where each ran, replayed or not, why) and %[2]s's lag
  %-9[2]s replica region   app %[3]s   pgfly %[4]s   health %[5]s
  %-9[6]s primary region   app %[7]s   pgfly %[8]s   health %[9]s
  postgres  primary %[10]s, replica %[11]s (user postgres, database pgfly)
            data in %[12]s, removed when the demo stops

Try:
  1. Open the page: %[2]s served it, reading from its replica.
  2. Sign the guestbook. %[2]s's replica refuses the INSERT; pgfly there answers fly-replay and
     the edge runs the same request again in %[6]s. The page you come back to is served by %[2]s
     and shows your entry: your pgfly_lsn bookmark made %[2]s wait until its replica had it.
  3. The same from a terminal (look at X-Edge-Trail and X-App-Region):
       curl -si -d name=curl %[1]s/items
  4. A write sent to the primary region directly is not replayed:
       curl -si -H 'fly-prefer-region: %[6]s' -d name=direct %[1]s/items
  5. pgfly's view of each region (role, replay position, lag):
       curl -s %[5]s
       curl -s %[9]s

Ctrl-C stops everything. What happens, as it happens:
`, s.EdgeURL, s.Replica.Name, s.Replica.AppURL, s.Replica.ShimURL, health(s.Replica),
		s.Primary.Name, s.Primary.AppURL, s.Primary.ShimURL, health(s.Primary),
		s.Cluster.Primary.Addr(), s.Cluster.Replica.Addr(), s.Cluster.Dir, pageURL)
}

// scenarioStep is one request of the scripted tour.
type scenarioStep struct {
	title  string
	method string
	path   string
	form   url.Values
	accept string
	// check says what the answer must be; an error fails the scenario.
	check func(a *answer) error
}

// answer is what the scenario's client got back, and what pgfly and the edge did meanwhile.
type answer struct {
	status       int
	trail        string // X-Edge-Trail
	region       string // X-App-Region
	body         string
	bookmark     string // a pgfly_lsn cookie the response set
	events       []regions.Event
	replayReason string // why pgfly asked for a replay
}

// runScenario walks through the setup without interaction and prints a transcript.
func runScenario(ctx context.Context, s *regions.Setup, tr *trace, w io.Writer) error {
	replica, primary := s.Replica.Name, s.Primary.Name
	guest := fmt.Sprintf("scenario-guest-%d", time.Now().UnixNano()%1_000_000)
	jar, _ := cookiejar.New(nil)
	client := &http.Client{
		Jar:           jar,
		Timeout:       demoRequestTimeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	const html = "text/html"
	steps := []scenarioStep{
		{title: "A read: the guestbook page, as a browser asks for it", method: http.MethodGet, path: "/", accept: html,
			check: func(a *answer) error {
				return want(a.status == http.StatusOK && a.trail == replica, "200 served in %s, not replayed", replica)
			}},
		{title: "A write: sign the guestbook as " + guest, method: http.MethodPost, path: "/items", accept: html,
			form: url.Values{"name": {guest}},
			check: func(a *answer) error {
				if err := want(a.status == http.StatusSeeOther && a.trail == replica+">"+primary && a.region == primary,
					"303 after a replay %s>%s", replica, primary); err != nil {
					return err
				}
				return want(a.bookmark != "", "a %s bookmark cookie", router.BookmarkCookie)
			}},
		{title: "Follow the redirect: the page again, with the bookmark", method: http.MethodGet, path: "/", accept: html,
			check: func(a *answer) error {
				return want(a.status == http.StatusOK && strings.Contains(a.body, guest), "200 showing %s", guest)
			}},
		{title: "A read-only API call: list the entries as JSON", method: http.MethodGet, path: "/items", accept: "application/json",
			check: func(a *answer) error {
				var items []sampleapp.Item
				if err := json.Unmarshal([]byte(a.body), &items); err != nil {
					return fmt.Errorf("decode %q: %w", a.body, err)
				}
				found := slices.ContainsFunc(items, func(it sampleapp.Item) bool { return it.Name == guest })
				return want(a.status == http.StatusOK && a.trail == replica && found, "200 from %s listing %s", replica, guest)
			}},
	}

	fmt.Fprintf(w, "\nScenario: %s is the primary region, %s a replica region; every request goes to the edge at %s, which sends it to %s first.\n",
		primary, replica, s.EdgeURL, replica)
	var failed []string
	for i, st := range steps {
		fmt.Fprintf(w, "\n%d. %s\n   %s %s\n", i+1, st.title, st.method, st.path)
		a, err := scenarioRequest(ctx, client, tr, s.EdgeURL, st)
		if err != nil {
			fmt.Fprintf(w, "   failed: %v\n", err)
			failed = append(failed, fmt.Sprintf("step %d: %v", i+1, err))
			if ctx.Err() != nil {
				break
			}
			continue
		}
		for _, ev := range a.events {
			for _, line := range tr.lines(ev) {
				fmt.Fprintf(w, "   %s\n", line)
			}
		}
		fmt.Fprintf(w, "   -> %d %s, ran in %s (X-Edge-Trail: %s, X-App-Region: %s)\n",
			a.status, http.StatusText(a.status), strings.ReplaceAll(a.trail, ">", " then "), a.trail, a.region)
		if strings.Contains(a.trail, ">") {
			fmt.Fprintf(w, "   replayed: yes, %s: %s\n", a.trail, a.replayReason)
		} else {
			fmt.Fprintf(w, "   replayed: no, %s\n", servedReason(primary, replica, a.events))
		}
		if a.bookmark != "" {
			fmt.Fprintf(w, "   bookmark: %s=%s, the primary's WAL position after this write (@ its timeline : its system)\n", router.BookmarkCookie, a.bookmark)
		}
		if st.method == http.MethodGet && st.path == "/" && i > 0 {
			fmt.Fprintf(w, "   the page shows %s: %s\n", guest, yesNo(strings.Contains(a.body, guest)))
		}
		if err := st.check(a); err != nil {
			fmt.Fprintf(w, "   unexpected: %v\n", err)
			failed = append(failed, fmt.Sprintf("step %d: %v", i+1, err))
		}
	}
	if len(failed) > 0 {
		fmt.Fprintf(w, "\nScenario failed.\n")
		return fmt.Errorf("scenario: %s", strings.Join(failed, "; "))
	}
	fmt.Fprintf(w, "\nScenario done: the write was replayed %s>%s, and the next read, served in %s, saw it.\n", replica, primary, replica)
	return nil
}

// scenarioRequest sends one step's request to the edge and gathers what happened.
func scenarioRequest(ctx context.Context, client *http.Client, tr *trace, edgeURL string, st scenarioStep) (*answer, error) {
	ctx, cancel := context.WithTimeout(ctx, demoRequestTimeout)
	defer cancel()
	var body io.Reader
	if st.form != nil {
		body = strings.NewReader(st.form.Encode())
	}
	req, err := http.NewRequestWithContext(ctx, st.method, edgeURL+st.path, body)
	if err != nil {
		return nil, err
	}
	if st.form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	req.Header.Set("Accept", st.accept)
	mark := tr.mark()
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("read the answer: %w", err)
	}
	a := &answer{status: resp.StatusCode, trail: resp.Header.Get(edge.TrailHeader),
		region: resp.Header.Get(sampleapp.RegionHeader), body: string(b), events: tr.since(mark)}
	for _, c := range resp.Cookies() {
		if c.Name == router.BookmarkCookie {
			a.bookmark = c.Value
		}
	}
	for _, ev := range a.events {
		if r := tr.replayReason(ev); r != "" {
			a.replayReason = r
		}
	}
	if a.replayReason == "" {
		a.replayReason = "a region answered with fly-replay"
	}
	return a, nil
}

// servedReason says why a request that was not replayed could run in region, from its
// events; the transcript and the live page say it the same way.
func servedReason(primary, region string, events []regions.Event) string {
	for _, ev := range events {
		if w := ev.Wait; w != nil && ev.Region == region && w.Outcome == router.WaitCaughtUp {
			return fmt.Sprintf("it carried the bookmark of a write and the replica in %s had replayed it after %s, so %s served it",
				region, duration(w.Waited), region)
		}
	}
	if region == primary {
		return fmt.Sprintf("it was sent to %s, the primary region, where writes succeed: nothing to replay", region)
	}
	return fmt.Sprintf("nothing in it wrote, so the replica in %s served it", region)
}

func want(ok bool, format string, args ...any) error {
	if ok {
		return nil
	}
	return fmt.Errorf("want "+format, args...)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// trace tells what happened to each request (the edge's hops, pgfly's decisions and bookmark
// waits), from the setup's events rather than its logs: in the interactive demo it prints them
// as they happen and keeps none (it runs for as long as the user likes); in the scenario it
// keeps them for the transcript, which is a few requests long.
type trace struct {
	primary string // the primary region, where pgfly replays to
	mu      sync.Mutex
	events  []regions.Event
	live    io.Writer // nil: keep only
}

func (t *trace) add(ev regions.Event) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.live == nil {
		t.events = append(t.events, ev)
		return
	}
	for _, line := range t.lines(ev) {
		fmt.Fprintf(t.live, "  %s  %s\n", ev.Time.Format("15:04:05.000"), line)
	}
}

func (t *trace) stopLive() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.live = nil
}

func (t *trace) mark() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.events)
}

func (t *trace) since(mark int) []regions.Event {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.events[mark:])
}

// lines are an event as the demo prints it: one line each, but two for a refusal that was
// replayed (what the database said, then what pgfly did).
func (t *trace) lines(ev regions.Event) []string {
	switch {
	case ev.Hop != nil:
		return []string{hopLine(ev.Hop)}
	case ev.Wait != nil:
		w := ev.Wait
		if w.Outcome == router.WaitCaughtUp {
			return []string{fmt.Sprintf("%s   pgfly: %s carries a bookmark; the replica had replayed it after %s", ev.Region, w.Path, duration(w.Waited))}
		}
		return []string{fmt.Sprintf("%s   pgfly: %s carries a bookmark; the replica had not replayed it after %s (%s)", ev.Region, w.Path, duration(w.Waited), w.Outcome)}
	case ev.Decision != nil:
		return t.decisionLines(ev.Region, ev.Decision)
	}
	return nil
}

func hopLine(h *edge.Hop) string {
	req := h.Method + " " + h.Path
	switch {
	case h.Err != nil:
		return fmt.Sprintf("edge  %s -> %s: failed: %v", req, h.To, h.Err)
	case h.Replay != "":
		return fmt.Sprintf("edge  %s -> %s: %d with fly-replay: %s", req, h.To, h.Status, h.Replay)
	case h.From != "":
		return fmt.Sprintf("edge  %s -> %s: %d (replayed from %s, fly-replay-src state=%s)", req, h.To, h.Status, h.From, h.State)
	}
	return fmt.Sprintf("edge  %s -> %s: %d", req, h.To, h.Status)
}

func (t *trace) decisionLines(region string, d *router.Decision) []string {
	var lines []string
	if d.Code != "" {
		lines = append(lines, fmt.Sprintf("%s   pgfly: the database refused a write: %s (SQLSTATE %s)", region, d.Message, d.Code))
	}
	req := d.Method + " " + d.Path
	switch d.Outcome {
	case router.OutcomeReplayed:
		lines = append(lines, fmt.Sprintf("%s   pgfly: %s: answering fly-replay: region=%s (reason %s)", region, req, t.primary, d.Reason))
	case router.OutcomeLoopBlocked:
		lines = append(lines, fmt.Sprintf("%s   pgfly: %s was replayed already and hit a read-only database again: not replaying it twice", region, req))
	case router.OutcomeNotReplayed:
		lines = append(lines, fmt.Sprintf("%s   pgfly: %s: could not reach the primary region to replay it", region, req))
	default:
		lines = append(lines, fmt.Sprintf("%s   pgfly: not replayed (%s)", region, d.Outcome))
	}
	return lines
}

// duration is a short wait as the demo prints it.
func duration(d time.Duration) string {
	if d < 100*time.Microsecond {
		return "<0.1ms"
	}
	return d.Round(100 * time.Microsecond).String()
}

// replayReason explains why pgfly replayed a request; "" for an event that is not a replay.
func (t *trace) replayReason(ev regions.Event) string { return replayReason(t.primary, ev) }

// replayReason explains, in plain words, why pgfly replayed a request in region primary; ""
// for an event that is not a replay. The transcript and the live page say it the same way.
func replayReason(primary string, ev regions.Event) string {
	d := ev.Decision
	if d == nil || d.Outcome != router.OutcomeReplayed {
		return ""
	}
	switch d.Reason {
	case router.ReasonReadOnly:
		return fmt.Sprintf("the database in %s is a read-only replica and refused the write (SQLSTATE %s), so pgfly there answered fly-replay: region=%s",
			ev.Region, d.Code, primary)
	case router.ReasonLag:
		return fmt.Sprintf("the replica in %s had not replayed the request's bookmark in time, so pgfly there answered fly-replay: region=%s",
			ev.Region, primary)
	case router.ReasonRoute:
		return fmt.Sprintf("%s is a %s write route, so pgfly in %s answered fly-replay: region=%s before the app ran it",
			d.RouteKey, d.Route, ev.Region, primary)
	case router.ReasonReplicaDown:
		return fmt.Sprintf("the database in %s could not be reached, so pgfly there answered fly-replay: region=%s", ev.Region, primary)
	}
	return "pgfly asked for a replay (" + string(d.Reason) + ")"
}
