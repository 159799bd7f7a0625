package main

import (
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/edge"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
)

// The live page's ring buffers and pace: memory stays bounded however long the demo runs.
const (
	pageRequests   = 50          // requests the trail keeps
	pagePending    = 64          // decisions and waits no edge hop has claimed yet
	pageLagSamples = 60          // lag samples kept: one a second, the last minute
	pageSampleStep = time.Second // how often the replica's lag is sampled
)

//go:embed demopage.html
var demoPageHTML []byte

// requestTrail groups the setup's events into the requests they belong to, for the live page.
//
// A request is the edge's hops: hop 0 starts it, hop N+1 continues the request whose last hop
// (hop N, in the region hop N+1 comes from) asked for a replay, and a hop without a replay
// ends it. Each hop claims the decisions and bookmark waits of pgfly in the hop's region that
// name the same method and path (a wait names only the path) and happened while the hop was
// out: pgfly reports them before it answers, the edge reports the hop once it has the answer.
//
// What it cannot tell: the events carry no request id, so two requests with the same method
// and path in flight in the same region at once may swap their hops' continuations and their
// decisions; each row is still a true sequence of hops and decisions, perhaps of a twin.
type requestTrail struct {
	primary string // the primary region, where pgfly replays to

	mu      sync.Mutex
	rows    []*trailRow     // oldest first, at most pageRequests
	pending []regions.Event // decisions and waits not yet claimed, oldest first
}

// trailRow is one request as the edge saw it, with what pgfly did about it.
type trailRow struct {
	hops   []edge.Hop
	start  time.Time       // when the edge sent its first hop
	end    time.Time       // when the edge had its last hop's answer
	events []regions.Event // the decisions and waits its hops claimed
}

func newRequestTrail(primary string) *requestTrail {
	return &requestTrail{primary: primary}
}

// add takes one of the setup's events; it is a regions.Options.Observe.
func (t *requestTrail) add(ev regions.Event) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case ev.Hop != nil:
		t.addHop(ev.Time, *ev.Hop)
	case ev.Wait != nil, ev.Decision != nil && ev.Decision.Path != "":
		if len(t.pending) == pagePending {
			t.pending = t.pending[1:]
		}
		t.pending = append(t.pending, ev)
	}
	// A decision about no request (a refusal with none in flight) is in no row.
}

func (t *requestTrail) addHop(at time.Time, h edge.Hop) {
	sent := at.Add(-h.Duration)
	var row *trailRow
	if h.N > 0 {
		row = t.continued(h)
	}
	if row == nil { // hop 0, or a replay whose earlier hops have left the ring
		row = &trailRow{start: sent}
		if len(t.rows) == pageRequests {
			t.rows = t.rows[1:]
		}
		t.rows = append(t.rows, row)
	}
	row.hops = append(row.hops, h)
	row.end = at
	kept := t.pending[:0]
	for _, ev := range t.pending {
		if ev.Region == h.To && !ev.Time.Before(sent) && !ev.Time.After(at) && sameRequest(ev, h) {
			row.events = append(row.events, ev)
		} else {
			kept = append(kept, ev)
		}
	}
	clear(t.pending[len(kept):])
	t.pending = kept
}

// continued is the oldest request that h, a replay, continues; nil when none does.
func (t *requestTrail) continued(h edge.Hop) *trailRow {
	for _, r := range t.rows {
		last := r.hops[len(r.hops)-1]
		if last.Replay != "" && last.Err == nil && len(r.hops) == h.N && last.To == h.From &&
			last.Method == h.Method && last.Path == h.Path {
			return r
		}
	}
	return nil
}

// sameRequest reports whether a decision or wait names the request of hop h.
func sameRequest(ev regions.Event, h edge.Hop) bool {
	if ev.Wait != nil {
		return ev.Wait.Path == h.Path
	}
	return ev.Decision.Method == h.Method && ev.Decision.Path == h.Path
}

// trailView is a request as the page shows it.
type trailView struct {
	AtMS      int64   `json:"at_ms"` // when the edge sent it on, Unix milliseconds
	Method    string  `json:"method"`
	Path      string  `json:"path"`    // the URL path only: never the query
	Regions   string  `json:"regions"` // where it ran, in order, e.g. "fra>iad"
	Replayed  bool    `json:"replayed"`
	State     string  `json:"state"`  // "done", "failed" or "in flight"
	Status    int     `json:"status"` // the last hop's, 0 while in flight or when it failed
	Reason    string  `json:"reason"` // why it ran where it ran, in plain words
	LatencyMS float64 `json:"latency_ms"`
}

// views are the requests, newest first.
func (t *requestTrail) views() []trailView {
	t.mu.Lock()
	defer t.mu.Unlock()
	views := make([]trailView, 0, len(t.rows))
	for i := len(t.rows) - 1; i >= 0; i-- {
		views = append(views, t.view(t.rows[i]))
	}
	return views
}

func (t *requestTrail) view(r *trailRow) trailView {
	first, last := r.hops[0], r.hops[len(r.hops)-1]
	ran := make([]string, 0, len(r.hops)+1)
	if first.From != "" {
		ran = append(ran, first.From) // its earlier hops have left the ring
	}
	var reasons []string
	replayed := first.From != ""
	if replayed {
		reasons = append(reasons, fmt.Sprintf("%s asked for a replay (fly-replay state %s); the request's first hop has left the trail", first.From, first.State))
	}
	for _, h := range r.hops {
		ran = append(ran, h.To)
		if h.Replay != "" {
			replayed = true
			reasons = append(reasons, t.replayWhy(r, h))
		}
	}
	v := trailView{AtMS: r.start.UnixMilli(), Method: first.Method, Path: first.Path, Regions: strings.Join(ran, ">"),
		Replayed: replayed, State: "done", Status: last.Status, LatencyMS: float64(r.end.Sub(r.start).Microseconds()) / 1000}
	switch {
	case last.Err != nil: // never the error's text: it holds the URL, query and all
		v.State, v.Status = "failed", 0
		reasons = append(reasons, fmt.Sprintf("the edge could not reach region %s", last.To))
	case last.Replay != "":
		v.State, v.Status = "in flight", 0
		reasons = append(reasons, "the edge has not reported the replay's answer (yet)")
	case !replayed:
		reasons = append(reasons, t.servedWhy(r, last))
	default:
		if why := t.refusedWhy(r, last); why != "" {
			reasons = append(reasons, why)
		}
	}
	v.Reason = strings.Join(reasons, "; then ")
	return v
}

// replayWhy says why region h.To asked for the replay h's answer carried.
func (t *requestTrail) replayWhy(r *trailRow, h edge.Hop) string {
	for _, ev := range r.events {
		if ev.Region == h.To {
			if why := replayReason(t.primary, ev); why != "" {
				return why
			}
		}
	}
	return fmt.Sprintf("%s answered fly-replay: %s (pgfly's decision there was not seen)", h.To, h.Replay)
}

// servedWhy says why a request that was not replayed could run where it ran.
func (t *requestTrail) servedWhy(r *trailRow, h edge.Hop) string {
	if why := t.refusedWhy(r, h); why != "" {
		return why
	}
	return servedReason(t.primary, h.To, r.events)
}

// refusedWhy explains a decision in hop h's region that was not a replay: "" when there is none.
func (t *requestTrail) refusedWhy(r *trailRow, h edge.Hop) string {
	for _, ev := range r.events {
		d := ev.Decision
		if d == nil || ev.Region != h.To || d.Outcome == router.OutcomeReplayed {
			continue
		}
		switch d.Outcome {
		case router.OutcomeLoopBlocked:
			return fmt.Sprintf("it was replayed already and hit a read-only database again in %s: pgfly does not replay twice", h.To)
		case router.OutcomePrimary:
			return fmt.Sprintf("the database in %s, the primary region, refused a write as read-only (SQLSTATE %s): an error, not replayed", h.To, d.Code)
		case router.OutcomeStarted:
			return fmt.Sprintf("the database in %s refused a write after the response had started: too late to replay", h.To)
		}
		return fmt.Sprintf("pgfly in %s did not replay it (%s)", h.To, d.Outcome)
	}
	return ""
}

// lagSample is the replica's lag at one moment.
type lagSample struct {
	at      time.Time
	known   bool // false while the replica or the primary is down, or the lag unknown
	seconds float64
	bytes   int64
}

// lagPoint is a lag sample as the page draws it.
type lagPoint struct {
	AtMS    int64    `json:"at_ms"`
	Seconds *float64 `json:"seconds"` // null when unknown
	Bytes   *int64   `json:"bytes"`   // null when unknown
}

// pageState is what the page's JavaScript polls for.
type pageState struct {
	NowMS    int64       `json:"now_ms"`
	Primary  string      `json:"primary"`
	Replica  string      `json:"replica"` // whose lag is drawn
	Requests []trailView `json:"requests"`
	Lag      []lagPoint  `json:"lag"` // oldest first
}

// demoPage serves the interactive demo's live page: the trail of the last requests and the
// replica's lag over the last minute, polled by the page once a second from /state.json. It
// has a listener of its own, so that no app route can clash with it and the edge, a stand-in
// for Fly's, stays a pure proxy. Its lifecycle is newDemoPage, Listen (which also starts the
// lag sampling), Serve, Close.
type demoPage struct {
	listen  string
	trail   *requestTrail
	replica string
	status  func() lag.Status // the replica region's pgfly's view of its replica

	mu      sync.Mutex
	samples []lagSample // oldest first, at most pageLagSamples

	ln        net.Listener
	srv       *http.Server
	stop      chan struct{}
	sampling  sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// startDemoPage serves the live page of setup s on the host of the edge's address, on a free
// port: reachable wherever the edge is, and clashing with nothing the edge forwards.
func startDemoPage(edgeListen string, trail *requestTrail, s *regions.Setup, log *zap.Logger) (*demoPage, error) {
	host, _, err := net.SplitHostPort(edgeListen)
	if err != nil {
		host = "127.0.0.1"
	}
	p := newDemoPage(net.JoinHostPort(host, "0"), trail, s.Replica.Name, s.Replica.Sidecar.Status)
	if err := p.Listen(); err != nil {
		return nil, err
	}
	go func() { // ends at Close
		if err := p.Serve(); err != nil {
			log.Error("demo page stopped", zap.Error(err))
		}
	}()
	return p, nil
}

func newDemoPage(listen string, trail *requestTrail, replica string, status func() lag.Status) *demoPage {
	p := &demoPage{listen: listen, trail: trail, replica: replica, status: status, stop: make(chan struct{})}
	p.srv = &http.Server{Handler: p.handler(), ReadHeaderTimeout: 10 * time.Second}
	return p
}

// Listen binds the page's address and starts sampling the replica's lag.
func (p *demoPage) Listen() error {
	ln, err := net.Listen("tcp", p.listen)
	if err != nil {
		return fmt.Errorf("listen for the demo page on %s: %w", p.listen, err)
	}
	p.ln = ln
	p.sampling.Add(1)
	go p.sample()
	return nil
}

// Addr is where the page listens, once Listen has bound it.
func (p *demoPage) Addr() net.Addr { return p.ln.Addr() }

// URL is the page's address for a browser.
func (p *demoPage) URL() string { return "http://" + loopback(p.Addr()) + "/" }

// Serve answers until Close.
func (p *demoPage) Serve() error {
	if err := p.srv.Serve(p.ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Close stops serving and sampling; it is idempotent.
func (p *demoPage) Close() error {
	p.closeOnce.Do(func() {
		close(p.stop)
		p.closeErr = p.srv.Close()
		if p.ln != nil {
			p.ln.Close() // in case Serve never ran
		}
		p.sampling.Wait()
	})
	return p.closeErr
}

// sample records the replica's lag once a step until Close.
func (p *demoPage) sample() {
	defer p.sampling.Done()
	tick := time.NewTicker(pageSampleStep)
	defer tick.Stop()
	for {
		p.record(time.Now(), p.status())
		select {
		case <-tick.C:
		case <-p.stop:
			return
		}
	}
}

// record keeps one lag sample, dropping the oldest beyond the last minute's.
func (p *demoPage) record(at time.Time, st lag.Status) {
	s := lagSample{at: at, known: st.UpstreamUp && st.LagSeconds >= 0 && st.LagBytes >= 0,
		seconds: st.LagSeconds, bytes: st.LagBytes}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.samples) == pageLagSamples {
		p.samples = p.samples[1:]
	}
	p.samples = append(p.samples, s)
}

func (p *demoPage) state(now time.Time) pageState {
	st := pageState{NowMS: now.UnixMilli(), Primary: p.trail.primary, Replica: p.replica, Requests: p.trail.views()}
	p.mu.Lock()
	defer p.mu.Unlock()
	st.Lag = make([]lagPoint, 0, len(p.samples))
	for _, s := range p.samples {
		pt := lagPoint{AtMS: s.at.UnixMilli()}
		if s.known {
			pt.Seconds, pt.Bytes = &s.seconds, &s.bytes
		}
		st.Lag = append(st.Lag, pt)
	}
	return st
}

func (p *demoPage) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		// One file, no build step, nothing from elsewhere: the page's own inline script and
		// style, and fetches back to this server.
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'")
		h.Set("Cache-Control", "no-store")
		w.Write(demoPageHTML)
	})
	mux.HandleFunc("GET /state.json", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		json.NewEncoder(w).Encode(p.state(time.Now()))
	})
	return mux
}
