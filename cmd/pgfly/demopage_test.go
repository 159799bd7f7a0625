package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgfly/pgfly/internal/edge"
	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
)

// events builds a timeline of the setup's events, a millisecond apart.
type events struct {
	at  time.Time
	evs []regions.Event
}

func newEvents() *events { return &events{at: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (e *events) next() time.Time { e.at = e.at.Add(time.Millisecond); return e.at }

// hop is the edge's report of hop h, which took d, arriving now.
func (e *events) hop(h edge.Hop, d time.Duration) *events {
	h.Duration = d
	e.evs = append(e.evs, regions.Event{Time: e.next(), Hop: &h})
	return e
}

func (e *events) decision(region string, d router.Decision) *events {
	e.evs = append(e.evs, regions.Event{Time: e.next(), Region: region, Decision: &d})
	return e
}

func (e *events) wait(region string, w router.Wait) *events {
	e.evs = append(e.evs, regions.Event{Time: e.next(), Region: region, Wait: &w})
	return e
}

func (e *events) trail() *requestTrail {
	t := newRequestTrail("iad")
	for _, ev := range e.evs {
		t.add(ev)
	}
	return t
}

var (
	readOnly = router.Decision{Outcome: router.OutcomeReplayed, Reason: router.ReasonReadOnly, Match: router.MatchOverlap,
		Method: "POST", Path: "/items", Code: "25006", Message: "cannot execute INSERT in a read-only transaction"}
	toIad        = edge.Hop{Method: "POST", Path: "/items", To: "fra", Status: 409, Replay: "region=iad;state=pgfly_read_only"}
	replayedInto = edge.Hop{Method: "POST", Path: "/items", N: 1, From: "fra", To: "iad", State: "pgfly_read_only", Status: 303}
	readInFra    = edge.Hop{Method: "GET", Path: "/", To: "fra", Status: 200}
)

func TestRequestTrail(t *testing.T) {
	tests := []struct {
		name   string
		events *events
		want   []trailView // newest first; AtMS not compared, LatencyMS only when set
	}{
		{name: "a write replayed from fra to iad",
			events: newEvents().decision("fra", readOnly).hop(toIad, 2*time.Millisecond).hop(replayedInto, time.Millisecond),
			want: []trailView{{Method: "POST", Path: "/items", Regions: "fra>iad", Replayed: true, State: "done", Status: 303, LatencyMS: 3,
				Reason: "the database in fra is a read-only replica and refused the write (SQLSTATE 25006), so pgfly there answered fly-replay: region=iad"}}},
		{name: "a read served in fra",
			events: newEvents().hop(readInFra, time.Millisecond),
			want: []trailView{{Method: "GET", Path: "/", Regions: "fra", State: "done", Status: 200, LatencyMS: 1,
				Reason: "nothing in it wrote, so the replica in fra served it"}}},
		{name: "a read with a bookmark the replica had",
			events: newEvents().wait("fra", router.Wait{Path: "/", Waited: 300 * time.Microsecond, Outcome: router.WaitCaughtUp}).hop(readInFra, 2*time.Millisecond),
			want: []trailView{{Method: "GET", Path: "/", Regions: "fra", State: "done", Status: 200,
				Reason: "it carried the bookmark of a write and the replica in fra had replayed it after 300µs, so fra served it"}}},
		{name: "a write sent to the primary region directly",
			events: newEvents().hop(edge.Hop{Method: "POST", Path: "/items", To: "iad", Status: 303}, time.Millisecond),
			want: []trailView{{Method: "POST", Path: "/items", Regions: "iad", State: "done", Status: 303,
				Reason: "it was sent to iad, the primary region, where writes succeed: nothing to replay"}}},
		{name: "a read sent while the write is between its hops",
			events: newEvents().decision("fra", readOnly).hop(toIad, time.Millisecond).hop(readInFra, time.Millisecond).hop(replayedInto, 3*time.Millisecond),
			want: []trailView{
				{Method: "GET", Path: "/", Regions: "fra", State: "done", Status: 200, Reason: "nothing in it wrote, so the replica in fra served it"},
				{Method: "POST", Path: "/items", Regions: "fra>iad", Replayed: true, State: "done", Status: 303,
					Reason: "the database in fra is a read-only replica and refused the write (SQLSTATE 25006), so pgfly there answered fly-replay: region=iad"}}},
		{name: "a decision from before the hop was sent is not the hop's",
			events: newEvents().decision("fra", readOnly).hop(readInFra, time.Millisecond).hop(toIad, time.Microsecond),
			want: []trailView{
				{Method: "POST", Path: "/items", Regions: "fra", Replayed: true, State: "in flight",
					Reason: "fra answered fly-replay: region=iad;state=pgfly_read_only (pgfly's decision there was not seen); then the edge has not reported the replay's answer (yet)"},
				{Method: "GET", Path: "/", Regions: "fra", State: "done", Status: 200, Reason: "nothing in it wrote, so the replica in fra served it"}}},
		{name: "a replay that hit a read-only database again",
			events: newEvents().decision("fra", readOnly).hop(toIad, time.Millisecond).
				decision("iad", router.Decision{Outcome: router.OutcomeLoopBlocked, Reason: router.ReasonReadOnly, Method: "POST", Path: "/items"}).
				hop(edge.Hop{Method: "POST", Path: "/items", N: 1, From: "fra", To: "iad", Status: 503}, 2*time.Millisecond),
			want: []trailView{{Method: "POST", Path: "/items", Regions: "fra>iad", Replayed: true, State: "done", Status: 503,
				Reason: "the database in fra is a read-only replica and refused the write (SQLSTATE 25006), so pgfly there answered fly-replay: region=iad; " +
					"then it was replayed already and hit a read-only database again in iad: pgfly does not replay twice"}}},
		{name: "a region the edge could not reach: the error, which holds the URL, is not shown",
			events: newEvents().hop(edge.Hop{Method: "GET", Path: "/", To: "fra", Err: errors.New(`Get "http://127.0.0.1:1/?secret=s3cr3t": connection refused`)}, time.Millisecond),
			want:   []trailView{{Method: "GET", Path: "/", Regions: "fra", State: "failed", Reason: "the edge could not reach region fra"}}},
		{name: "a replay whose first hop has left the ring",
			events: newEvents().hop(replayedInto, time.Millisecond),
			want: []trailView{{Method: "POST", Path: "/items", Regions: "fra>iad", Replayed: true, State: "done", Status: 303,
				Reason: "fra asked for a replay (fly-replay state pgfly_read_only); the request's first hop has left the trail"}}},
		{name: "a refusal with no request in flight is in no row",
			events: newEvents().decision("fra", router.Decision{Outcome: router.OutcomeNoRequest, Reason: router.ReasonReadOnly, Code: "25006"}),
			want:   []trailView{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.events.trail().views()
			if len(got) != len(tt.want) {
				t.Fatalf("got %d rows %+v, want %d", len(got), got, len(tt.want))
			}
			for i, w := range tt.want {
				g := got[i]
				w.AtMS = g.AtMS
				if w.LatencyMS == 0 {
					w.LatencyMS = g.LatencyMS
				}
				if g != w {
					t.Errorf("row %d:\n got %+v\nwant %+v", i, g, w)
				}
			}
		})
	}
}

func TestRequestTrailIsBounded(t *testing.T) {
	e := newEvents()
	for i := range 3 * pageRequests {
		e.decision("fra", router.Decision{Outcome: router.OutcomeReplayed, Reason: router.ReasonLag, Method: "GET", Path: fmt.Sprintf("/never/%d", i)})
		e.hop(edge.Hop{Method: "GET", Path: fmt.Sprintf("/%d", i), To: "fra", Status: 200}, time.Millisecond)
	}
	tr := e.trail()
	views := tr.views()
	if len(views) != pageRequests {
		t.Fatalf("rows: got %d, want %d", len(views), pageRequests)
	}
	if want := fmt.Sprintf("/%d", 3*pageRequests-1); views[0].Path != want {
		t.Errorf("newest row: got %s, want %s", views[0].Path, want)
	}
	if len(tr.pending) != pagePending {
		t.Errorf("unclaimed decisions kept: got %d, want %d", len(tr.pending), pagePending)
	}
}

func TestDemoPageState(t *testing.T) {
	tr := newEvents().decision("fra", readOnly).hop(toIad, time.Millisecond).hop(replayedInto, time.Millisecond).trail()
	p := newDemoPage("127.0.0.1:0", tr, "fra", nil)
	start := time.Now()
	for i := range pageLagSamples + 5 {
		st := lag.Status{UpstreamUp: true, LagSeconds: float64(i) / 10, LagBytes: int64(i)}
		if i == pageLagSamples+4 {
			st = lag.Status{UpstreamUp: false, LagSeconds: -1, LagBytes: -1}
		}
		p.record(start.Add(time.Duration(i)*time.Second), st)
	}
	srv := httptest.NewServer(p.handler())
	defer srv.Close()

	resp, err := http.Get(srv.URL + "/state.json")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type: got %q, want application/json", ct)
	}
	var got struct {
		Primary, Replica string
		Requests         []trailView
		Lag              []struct {
			AtMS    int64    `json:"at_ms"`
			Seconds *float64 `json:"seconds"`
			Bytes   *int64   `json:"bytes"`
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.Primary != "iad" || got.Replica != "fra" {
		t.Errorf("regions: got primary %q replica %q, want iad and fra", got.Primary, got.Replica)
	}
	if len(got.Requests) != 1 || got.Requests[0].Regions != "fra>iad" || !got.Requests[0].Replayed {
		t.Errorf("requests: got %+v, want the write replayed fra>iad", got.Requests)
	}
	if len(got.Lag) != pageLagSamples {
		t.Fatalf("lag samples: got %d, want the last %d", len(got.Lag), pageLagSamples)
	}
	if first := got.Lag[0]; first.Seconds == nil || *first.Seconds != 0.5 || *first.Bytes != 5 {
		t.Errorf("oldest sample kept: got %+v, want the 6th (0.5 s, 5 bytes)", first)
	}
	if last := got.Lag[len(got.Lag)-1]; last.Seconds != nil || last.Bytes != nil {
		t.Errorf("sample while the replica is down: got %+v, want null seconds and bytes: unknown, not zero", last)
	}

	page := send(t, "GET", srv.URL+"/", "", nil)
	if page.status != http.StatusOK || !strings.Contains(page.body, "<svg id=\"lag-chart\"") {
		t.Errorf("GET /: got %d, want 200 and the page", page.status)
	}
	if csp := page.header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") {
		t.Errorf("Content-Security-Policy: got %q, want nothing loaded from elsewhere", csp)
	}
	for _, external := range []string{"<script src", "http://", "https://"} {
		if strings.Contains(strings.ReplaceAll(page.body, `"http://www.w3.org/2000/svg"`, ""), external) {
			t.Errorf("the page has %q, want it to load nothing from elsewhere", external)
		}
	}
	if got := send(t, "GET", srv.URL+"/items", "", nil).status; got != http.StatusNotFound {
		t.Errorf("GET /items on the page's server: got %d, want 404", got)
	}
}

func TestDemoPageSamplesUntilClosed(t *testing.T) {
	polled := make(chan struct{}, 1)
	status := func() lag.Status {
		select {
		case polled <- struct{}{}:
		default:
		}
		return lag.Status{UpstreamUp: true}
	}
	p := newDemoPage("127.0.0.1:0", newRequestTrail("iad"), "fra", status)
	if err := p.Listen(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve() }()
	select {
	case <-polled:
	case <-time.After(10 * time.Second):
		t.Fatal("the page did not sample the lag after Listen")
	}
	resp, err := http.Get(p.URL() + "state.json")
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err := p.Close(); err != nil {
		t.Errorf("Close: got %v, want nil", err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: got %v, want nil", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Serve after Close: got %v, want nil", err)
	}
}

// TestDemoPageInBrowser runs the demo's setup, sends a write and a read through its edge, and
// loads the live page in headless chromium, so that what is checked is what the page's
// JavaScript drew, not the HTML the server sent.
func TestDemoPageInBrowser(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("chromium not found (%v): this test runs the demo page's JavaScript in Debian's headless chromium; "+
			"install it with: DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	trail := newRequestTrail(regions.DefaultPrimaryRegion)
	s, err := regions.Start(ctx, regions.Options{Observe: trail.add})
	if err != nil {
		t.Fatalf("start the demo's setup: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close the setup: %v", err)
		}
	})
	page, err := startDemoPage("127.0.0.1:0", trail, s, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { page.Close() })

	form := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}, "Accept": {"text/html"}}
	if got := send(t, "POST", s.EdgeURL+"/items", "name=browser-test", form); got.status != http.StatusSeeOther || got.header.Get(edge.TrailHeader) != "fra>iad" {
		t.Fatalf("POST /items: got %d trail %q, want 303 after a replay fra>iad", got.status, got.header.Get(edge.TrailHeader))
	}
	if got := send(t, "GET", s.EdgeURL+"/", "", http.Header{"Accept": {"text/html"}}); got.status != http.StatusOK || got.header.Get(edge.TrailHeader) != "fra" {
		t.Fatalf("GET /: got %d trail %q, want 200 served in fra", got.status, got.header.Get(edge.TrailHeader))
	}
	// Some lag to draw: fra's replica stops replaying, and another write commits in iad.
	replica, err := sql.Open("pgx", s.Cluster.Replica.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	if err != nil {
		t.Fatal(err)
	}
	defer replica.Close()
	if _, err := replica.ExecContext(ctx, "SELECT pg_wal_replay_pause()"); err != nil {
		t.Fatalf("pause the replica's replay: %v", err)
	}
	send(t, "POST", s.EdgeURL+"/items", "name=browser-test-2", form)
	lagging := func() bool {
		lag := page.state(time.Now()).Lag
		return len(lag) >= 3 && lag[len(lag)-1].Seconds != nil && *lag[len(lag)-1].Seconds >= 0.5
	}
	for deadline := time.Now().Add(20 * time.Second); !lagging(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("lag samples after 20s: got %+v, want at least 3, the last 0.5s or more", page.state(time.Now()).Lag)
		}
	}

	dom := dumpDOM(t, ctx, browser, page.URL())
	rows := trailRows(dom)
	if len(rows) == 0 {
		t.Fatalf("got no trail rows in the page as chromium drew it:\n%s", dom)
	}
	tests := []struct {
		name   string
		attrs  map[string]string // the row's data- attributes
		reason string            // a fragment of the row's text
	}{
		{name: "the write, replayed", attrs: map[string]string{"method": "POST", "path": "/items", "regions": "fra>iad", "replayed": "yes", "state": "done"},
			reason: "the database in fra is a read-only replica and refused the write (SQLSTATE 25006), so pgfly there answered fly-replay: region=iad"},
		{name: "the read, served in fra", attrs: map[string]string{"method": "GET", "path": "/", "regions": "fra", "replayed": "no", "state": "done"},
			reason: "nothing in it wrote, so the replica in fra served it"},
	}
	for _, tt := range tests {
		if !hasRow(rows, tt.attrs, tt.reason) {
			t.Errorf("%s: got rows %q, want one with %v saying %q", tt.name, rows, tt.attrs, tt.reason)
		}
	}
	if n := strings.Count(dom, `<circle class="lag-point"`); n < 3 {
		t.Errorf("lag chart: got %d points, want at least 3 (one a second)", n)
	}
	if !regexp.MustCompile(`<path id="lag-line" d="M[0-9.]+ [0-9.]+ L`).MatchString(dom) {
		t.Errorf("lag chart: got no line through the points in\n%s", dom)
	}
	lifted := false // a point above the chart's baseline (y 125): the lag the pause made
	for _, m := range regexp.MustCompile(`<circle class="lag-point" cx="[0-9.]+" cy="([0-9.]+)"`).FindAllStringSubmatch(dom, -1) {
		y, _ := strconv.ParseFloat(m[1], 64)
		lifted = lifted || y < 120
	}
	if !lifted {
		t.Errorf("lag chart: got every point on the baseline, want the paused replica's lag drawn above it")
	}
	if !strings.Contains(dom, "Now: the replica in fra is ") {
		t.Errorf("got no line saying how far fra's replica is behind")
	}
}

// dumpDOM loads u in headless chromium and returns the DOM once its scripts have had five
// seconds of (virtual) time.
func dumpDOM(t *testing.T, ctx context.Context, browser, u string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	// --no-sandbox: the tests run as root, where chromium's sandbox refuses to start.
	cmd := exec.CommandContext(ctx, browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--no-first-run", "--user-data-dir="+t.TempDir(), "--virtual-time-budget=5000", "--dump-dom", u)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // its helpers too end with it
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if cmd.Process != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // whatever of its group is left
	}
	if err != nil {
		t.Fatalf("chromium --dump-dom %s: %v\nstderr:\n%s", u, err, &stderr)
	}
	return string(out)
}

// renderedRow is a request trail row of the rendered page: its data- attributes and its text.
type renderedRow struct {
	attrs map[string]string
	text  string
}

func (r renderedRow) String() string { return fmt.Sprintf("%v %q", r.attrs, r.text) }

// trailRows are the request trail's rows in a dumped DOM.
func trailRows(dom string) []renderedRow {
	var rows []renderedRow
	tags := regexp.MustCompile(`<[^>]*>`)
	for _, m := range regexp.MustCompile(`(?s)<tr class="req[^"]*"([^>]*)>(.*?)</tr>`).FindAllStringSubmatch(dom, -1) {
		r := renderedRow{attrs: make(map[string]string), text: html.UnescapeString(tags.ReplaceAllString(m[2], " "))}
		for _, a := range regexp.MustCompile(`data-([a-z]+)="([^"]*)"`).FindAllStringSubmatch(m[1], -1) {
			r.attrs[a[1]] = html.UnescapeString(a[2])
		}
		rows = append(rows, r)
	}
	return rows
}

// hasRow reports whether a row has all of attrs and says reason.
func hasRow(rows []renderedRow, attrs map[string]string, reason string) bool {
	for _, r := range rows {
		ok := strings.Contains(r.text, reason)
		for k, v := range attrs {
			ok = ok && r.attrs[k] == v
		}
		if ok {
			return true
		}
	}
	return false
}
