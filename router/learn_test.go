package router_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgfly/pgfly/router"
)

// routeApp is an app in a replica region whose POST /posts/{id} is refused and answers 500
// while writes is true, and whose other requests read.
type routeApp struct {
	mu     sync.Mutex
	writes bool
	hits   map[string]int // by method and path
}

func newRouteApp() *routeApp { return &routeApp{writes: true, hits: map[string]int{}} }

func (a *routeApp) handler(shim *router.Shim) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		a.mu.Lock()
		a.hits[r.Method+" "+r.URL.Path]++
		writes := a.writes && r.Method == http.MethodPost
		a.mu.Unlock()
		if writes {
			shim.ReadOnly(violation(""))
			http.Error(w, "ERROR: cannot execute INSERT in a read-only transaction", http.StatusInternalServerError)
			return
		}
		io.WriteString(w, appBody)
	})
}

func (a *routeApp) hitsOf(key string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.hits[key]
}

func (a *routeApp) setWrites(w bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.writes = w
}

func TestLearnedWriteRoutes(t *testing.T) {
	t.Run("a route the replica keeps refusing is replayed before the app runs it", func(t *testing.T) {
		app := newRouteApp()
		h := start(t, replicaRegion(), app.handler)
		for i := range router.LearnRefusals {
			wantFlyReplay(t, h.send(t, http.MethodPost, fmt.Sprintf("/posts/%d", i+1), strings.NewReader("x"), nil), "pgfly_read_only")
		}
		const later = 200
		for i := range later {
			got := h.send(t, http.MethodPost, fmt.Sprintf("/posts/%d", 100+i), strings.NewReader("x"), nil)
			if got.header.Get("Fly-Replay") == "" {
				t.Fatalf("request %d: got %d %q, want a replay", i, got.status, got.body)
			}
		}
		ran := app.hitsOf("POST /posts/1") + app.hitsOf("POST /posts/2") + app.hitsOf("POST /posts/3")
		probes := 0
		for i := range later {
			probes += app.hitsOf(fmt.Sprintf("POST /posts/%d", 100+i))
		}
		if ran != router.LearnRefusals {
			t.Errorf("the app ran %d of the first requests, want %d", ran, router.LearnRefusals)
		}
		if max := later / router.ProbeEvery; probes > max || probes == 0 {
			t.Errorf("the app ran %d of %d requests to the learned route, want between 1 and %d (one in %d)", probes, later, max, router.ProbeEvery)
		}
		if n := h.logs.FilterMessageSnippet("learned a write route").Len(); n != 1 {
			t.Errorf("got %d log lines about learning, want 1", n)
		}
		var upFront int
		for _, d := range h.decided() {
			if d.Reason == router.ReasonRoute && d.Outcome == router.OutcomeReplayed {
				upFront++
			}
		}
		if want := later - probes; upFront != want {
			t.Errorf("got %d up-front replay decisions, want %d", upFront, want)
		}
		got := h.send(t, http.MethodPost, "/posts/999", strings.NewReader("x"), nil)
		if got.header.Get("Fly-Replay") != "region=iad;state=pgfly_route" && got.header.Get("Fly-Replay") != "region=iad;state=pgfly_read_only" {
			t.Errorf("got Fly-Replay %q, want a replay to iad", got.header.Get("Fly-Replay"))
		}

		rep := h.shim.Routes()
		if len(rep.Learned) != 1 || rep.Learned[0].Route != "POST /posts/*" || rep.Learned[0].Refused < router.LearnRefusals {
			t.Errorf("Routes() learned %+v, want POST /posts/* with its refusals", rep.Learned)
		}
		if _, err := router.ParseRoutePatterns(rep.ReplayRoutes); err != nil || rep.ReplayRoutes != "POST /posts/*" {
			t.Errorf("Routes().ReplayRoutes = %q (%v), want a valid --replay-routes value naming POST /posts/*", rep.ReplayRoutes, err)
		}
		if _, err := json.Marshal(rep); err != nil {
			t.Error(err)
		}
	})

	t.Run("a route that stops writing comes back to local service", func(t *testing.T) {
		app := newRouteApp()
		h := start(t, replicaRegion(), app.handler)
		for i := range router.LearnRefusals {
			h.send(t, http.MethodPost, fmt.Sprintf("/posts/%d", i), nil, nil)
		}
		app.setWrites(false)
		local := -1
		for i := range 4 * router.ProbeEvery * router.UnlearnProbes {
			got := h.send(t, http.MethodPost, "/posts/7", nil, nil)
			if got.header.Get("Fly-Replay") == "" {
				wantAppReply(t, got, http.StatusOK)
			}
			if len(h.shim.Routes().Learned) == 0 {
				local = i
				break
			}
		}
		if local < 0 {
			t.Fatalf("the route is still learned after it stopped writing")
		}
		for range 10 {
			wantAppReply(t, h.send(t, http.MethodPost, "/posts/7", nil, nil), http.StatusOK)
		}
	})

	t.Run("an innocent read in flight beside refused writes is not learned", func(t *testing.T) {
		h := start(t, replicaRegion(), func(shim *router.Shim) http.Handler {
			readerIn := make(chan struct{}, 1)
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Method == http.MethodGet {
					select { // once POST /items is learned, no POST comes to take this
					case readerIn <- struct{}{}:
					default:
					}
					time.Sleep(20 * time.Millisecond) // in flight while the write is refused
					io.WriteString(w, appBody)
					return
				}
				select {
				case <-readerIn:
				case <-time.After(5 * time.Second):
				}
				shim.ReadOnly(violation(""))
				http.Error(w, "read-only", http.StatusInternalServerError)
			})
		})
		for range 2 * router.LearnRefusals {
			var wg sync.WaitGroup
			wg.Go(func() { h.send(t, http.MethodGet, "/items", nil, nil) })
			wg.Go(func() { h.send(t, http.MethodPost, "/items", nil, nil) })
			wg.Wait()
		}
		rep := h.shim.Routes()
		if len(rep.Learned) != 1 || rep.Learned[0].Route != "POST /items" {
			t.Errorf("learned %+v, want only POST /items", rep.Learned)
		}
	})

	t.Run("nothing is learned with learning off", func(t *testing.T) {
		app := newRouteApp()
		cfg := replicaRegion()
		cfg.DisableLearning = true
		h := start(t, cfg, app.handler)
		for i := range 3 * router.LearnRefusals {
			wantFlyReplay(t, h.send(t, http.MethodPost, fmt.Sprintf("/posts/%d", i), nil, nil), "pgfly_read_only")
		}
		if len(h.shim.Routes().Learned) != 0 {
			t.Errorf("learned %+v with learning off", h.shim.Routes().Learned)
		}
	})

	t.Run("nothing is learned in the primary region", func(t *testing.T) {
		app := newRouteApp()
		h := start(t, router.Config{Region: "iad", PrimaryRegion: "iad"}, app.handler)
		for i := range 3 * router.LearnRefusals {
			got := h.send(t, http.MethodPost, fmt.Sprintf("/posts/%d", i), nil, nil)
			if got.status != http.StatusInternalServerError || got.header.Get("Fly-Replay") != "" {
				t.Fatalf("got %d fly-replay %q, want the app's own 500", got.status, got.header.Get("Fly-Replay"))
			}
		}
		if len(h.shim.Routes().Learned) != 0 {
			t.Errorf("learned %+v in the primary region", h.shim.Routes().Learned)
		}
	})
}

func TestConfiguredRoutes(t *testing.T) {
	patterns := func(s string) router.RoutePatterns {
		ps, err := router.ParseRoutePatterns(s)
		if err != nil {
			t.Fatal(err)
		}
		return ps
	}
	t.Run("--replay-routes are replayed before the app runs them", func(t *testing.T) {
		cfg := replicaRegion()
		cfg.ReplayRoutes = patterns("POST /items,* /admin/**")
		app := newRouteApp()
		h := start(t, cfg, app.handler)
		for _, target := range []string{"/items", "/admin/users/1"} {
			wantFlyReplay(t, h.send(t, http.MethodPost, target, nil, nil), "pgfly_route")
		}
		wantAppReply(t, h.send(t, http.MethodGet, "/items", nil, nil), http.StatusOK)
		if n := h.appHits.Load(); n != 1 {
			t.Errorf("the app got %d requests, want only the GET", n)
		}
		wantDecisions(t, h,
			router.Decision{Outcome: router.OutcomeReplayed, Reason: router.ReasonRoute, Route: "configured"},
			router.Decision{Outcome: router.OutcomeReplayed, Reason: router.ReasonRoute, Route: "configured"})
	})
	t.Run("--local-routes win, and their refusals are still replayed", func(t *testing.T) {
		cfg := replicaRegion()
		cfg.ReplayRoutes = patterns("* /**")
		cfg.LocalRoutes = patterns("POST /posts/*")
		app := newRouteApp()
		h := start(t, cfg, app.handler)
		for i := range 3 * router.LearnRefusals {
			wantFlyReplay(t, h.send(t, http.MethodPost, fmt.Sprintf("/posts/%d", i), nil, nil), "pgfly_read_only")
		}
		if n := h.appHits.Load(); n != 3*router.LearnRefusals {
			t.Errorf("the app got %d requests, want all %d: a local route is never sent up front", n, 3*router.LearnRefusals)
		}
		wantFlyReplay(t, h.send(t, http.MethodGet, "/other", nil, nil), "pgfly_route")
	})
	t.Run("a request replayed by pgfly is served where it lands", func(t *testing.T) {
		cfg := replicaRegion()
		cfg.ReplayRoutes = patterns("POST /items")
		h := start(t, cfg, reader)
		got := h.send(t, http.MethodPost, "/items", nil, http.Header{"Fly-Replay-Src": {"instance=a;region=fra;t=1;state=pgfly_route"}})
		wantAppReply(t, got, http.StatusOK)
	})
	t.Run("in proxy mode a configured route goes to the primary region, body and all", func(t *testing.T) {
		primary := startPrimary(t)
		cfg := proxyConfig(primary.url)
		cfg.ReplayRoutes = patterns("POST /items")
		cfg.MaxReplayBody = 4 // over the limit: streamed, since the app has not read it
		h := start(t, cfg, reader)
		wantPrimaryReply(t, h.send(t, http.MethodPost, "/items", strings.NewReader("name=a long body"), nil))
		seen := primary.seen()
		if len(seen) != 1 || seen[0].body != "name=a long body" {
			t.Fatalf("the primary region got %+v, want the POST with its whole body", seen)
		}
		wantReplaySrc(t, seen[0].header.Get("Fly-Replay-Src"), "pgfly_route")
		if n := h.appHits.Load(); n != 0 {
			t.Errorf("the app got %d requests, want none", n)
		}
	})
}

func TestRequestsAfterTheRefusedStatementAreNotTainted(t *testing.T) {
	var sentAt time.Time
	aSent, bIn, violated := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var tainted []int
	cfg := replicaRegion()
	cfg.ObserveRefusal = func(n int) { tainted = append(tainted, n) }
	h := start(t, cfg, func(shim *router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/a": // sends its statement, then /b starts, then the refusal arrives
				sentAt = time.Now()
				close(aSent)
				if !await(r, bIn) {
					return
				}
				v := violation("")
				v.SentAt = sentAt
				shim.ReadOnly(v)
				close(violated)
				http.Error(w, "read-only", http.StatusInternalServerError)
			case "/b":
				close(bIn)
				await(r, violated)
				io.WriteString(w, appBody)
			}
		})
	})
	var a, b reply
	var wg sync.WaitGroup
	wg.Go(func() { a = h.send(t, http.MethodPost, "/a", nil, nil) })
	select { // /b starts strictly after /a's statement was sent, however loaded the machine
	case <-aSent:
	case <-time.After(10 * time.Second):
		t.Fatal("/a never sent its statement")
	}
	time.Sleep(time.Millisecond)
	wg.Go(func() { b = h.send(t, http.MethodGet, "/b", nil, nil) })
	wg.Wait()
	wantFlyReplay(t, a, "pgfly_read_only")
	wantAppReply(t, b, http.StatusOK)
	if len(tainted) != 1 || tainted[0] != 1 {
		t.Errorf("got tainted counts %v, want one refusal that tainted 1 request", tainted)
	}
}
