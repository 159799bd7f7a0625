package router_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
)

// These tests drive the shim with an app that reports a read-only violation to it from inside
// its handler, before it answers: that is the real ordering, since the relay reports the
// violation before the app sees its database error. The end-to-end tests against a real
// database are in internal/regions; these cover what a real database cannot easily stage.

const (
	// appBody is what the app answers; a replayed request must never carry it.
	appBody = "APP-BODY-THAT-A-REPLAY-MUST-NOT-SEND"
	// violationTraceHeader tells the writer app which trace id its failing statement carried.
	violationTraceHeader = "X-Test-Violation-Trace"

	traceA = "4bf92f3577b34da6a3ce929d0e0e4736"
	traceB = "0af7651916cd43dd8448eb211c80319c"
)

// traceparent is a W3C traceparent header with the given trace id.
func traceparent(traceID string) string {
	return "00-" + traceID + "-00f067aa0ba902b7-01"
}

// violation is what the relay reports when the replica refuses a write.
func violation(traceID string) router.Violation {
	return router.Violation{
		SessionID: 7,
		Time:      time.Now(),
		Code:      "25006",
		Message:   "cannot execute INSERT in a read-only transaction",
		TraceID:   traceID,
	}
}

// replicaRegion is the config of a shim in a replica region.
func replicaRegion() router.Config {
	return router.Config{Region: "fra", PrimaryRegion: "iad"}
}

// writer is an app whose every request writes and is refused: it reads the request body,
// gets the violation (carrying the trace id named by violationTraceHeader, if any), and
// answers with its own error, a cookie and appBody.
func writer(shim *router.Shim) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		shim.ReadOnly(violation(r.Header.Get(violationTraceHeader)))
		http.SetCookie(w, &http.Cookie{Name: "app", Value: "1"})
		w.WriteHeader(http.StatusInternalServerError)
		io.WriteString(w, appBody)
	})
}

// reader is an app that answers 200 with appBody and a cookie, touching no database.
func reader(*router.Shim) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		http.SetCookie(w, &http.Cookie{Name: "app", Value: "1"})
		io.WriteString(w, appBody)
	})
}

// await waits in an app handler for ch, bounded so that a broken shim fails a test instead of
// hanging it.
func await(r *http.Request, ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	case <-r.Context().Done():
		return false
	case <-time.After(10 * time.Second):
		return false
	}
}

// harness is a shim listening on loopback in front of an app, with its logs, decisions and
// bookmark waits recorded.
type harness struct {
	shim    *router.Shim
	url     string // the shim's base URL
	logs    *observer.ObservedLogs
	client  *http.Client
	appHits atomic.Int64

	mu        sync.Mutex
	decisions []router.Decision
	waits     []router.Wait
}

// start runs a shim with cfg (Listen and App's host are filled in; App's path is kept) in
// front of the app that app builds; the app is given the shim so that it can report violations.
func start(tb testing.TB, cfg router.Config, app func(*router.Shim) http.Handler) *harness {
	tb.Helper()
	h := &harness{}
	appSrv := httptest.NewUnstartedServer(nil)
	base := ""
	if cfg.App != nil {
		base = cfg.App.Path
	}
	cfg.App = &url.URL{Scheme: "http", Host: appSrv.Listener.Addr().String(), Path: base}
	cfg.Listen = "127.0.0.1:0"
	cfg.Observe = func(d router.Decision) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.decisions = append(h.decisions, d)
	}
	cfg.ObserveWait = func(w router.Wait) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.waits = append(h.waits, w)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	shim, err := router.New(cfg, zap.New(core))
	if err != nil {
		appSrv.Close()
		tb.Fatalf("New: %v", err)
	}
	h.shim, h.logs = shim, logs
	handler := app(shim)
	appSrv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.appHits.Add(1)
		handler.ServeHTTP(w, r)
	})
	appSrv.Start()
	tb.Cleanup(appSrv.Close)

	if err := shim.Listen(); err != nil {
		tb.Fatalf("Listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- shim.Serve() }()
	tb.Cleanup(func() {
		if err := shim.Close(); err != nil {
			tb.Errorf("Close: %v", err)
		}
		if err := <-served; err != nil {
			tb.Errorf("Serve: got %v, want nil after Close", err)
		}
	})
	h.url = "http://" + shim.Addr().String()
	transport := &http.Transport{DisableCompression: true}
	tb.Cleanup(transport.CloseIdleConnections)
	h.client = &http.Client{
		Transport:     transport,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return h
}

// decided is the decisions so far as the metrics see them: their labels only.
func (h *harness) decided() []router.Decision {
	h.mu.Lock()
	defer h.mu.Unlock()
	labels := make([]router.Decision, len(h.decisions))
	for i, d := range h.decisions {
		labels[i] = router.Decision{Outcome: d.Outcome, Reason: d.Reason, Match: d.Match, Route: d.Route}
	}
	return labels
}

// decidedInFull is the decisions so far with what they say about their request.
func (h *harness) decidedInFull() []router.Decision {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.decisions)
}

func (h *harness) waited() []router.Wait {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.waits)
}

// reply is what a client got back from the shim.
type reply struct {
	status int
	header http.Header
	body   string
}

// newRequest builds a request to the shim; target is a path with an optional query.
func (h *harness) newRequest(tb testing.TB, method, target string, body io.Reader, header http.Header) *http.Request {
	tb.Helper()
	req, err := http.NewRequest(method, h.url+target, body)
	if err != nil {
		tb.Fatalf("new request: %v", err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	return req
}

// try sends req with a bounded wait and reads the whole answer; it may run on any goroutine.
func (h *harness) try(req *http.Request) (reply, error) {
	ctx, cancel := context.WithTimeout(req.Context(), 10*time.Second)
	defer cancel()
	resp, err := h.client.Do(req.WithContext(ctx))
	if err != nil {
		return reply{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return reply{}, fmt.Errorf("read the answer to %s %s: %w", req.Method, req.URL, err)
	}
	return reply{resp.StatusCode, resp.Header, string(b)}, nil
}

// do is try on the test's goroutine, failing the test on an error.
func (h *harness) do(tb testing.TB, req *http.Request) reply {
	tb.Helper()
	r, err := h.try(req)
	if err != nil {
		tb.Fatal(err)
	}
	return r
}

func (h *harness) send(tb testing.TB, method, target string, body io.Reader, header http.Header) reply {
	tb.Helper()
	return h.do(tb, h.newRequest(tb, method, target, body, header))
}

// wantFlyReplay checks that a reply is the shim's fly-replay answer, not the app's.
func wantFlyReplay(tb testing.TB, got reply, state string) {
	tb.Helper()
	if got.status != http.StatusConflict {
		tb.Fatalf("got status %d (body %q), want %d", got.status, got.body, http.StatusConflict)
	}
	if fr, want := got.header.Get("Fly-Replay"), "region=iad;state="+state; fr != want {
		tb.Errorf("got Fly-Replay %q, want %q", fr, want)
	}
	if strings.Contains(got.body, appBody) {
		tb.Errorf("got body %q, want it without the app's body", got.body)
	}
	if strings.Count(got.body, "\n") != 1 || !strings.HasSuffix(got.body, "\n") || !strings.Contains(got.body, "iad") {
		tb.Errorf("got body %q, want one line naming region iad", got.body)
	}
	if cc := got.header.Get("Cache-Control"); cc != "no-store" {
		tb.Errorf("got Cache-Control %q, want no-store", cc)
	}
	if ct := got.header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		tb.Errorf("got Content-Type %q, want text/plain", ct)
	}
}

// wantAppReply checks that a reply is the app's own answer.
func wantAppReply(tb testing.TB, got reply, status int) {
	tb.Helper()
	if got.status != status || got.body != appBody {
		tb.Fatalf("got %d %q, want the app's %d %q", got.status, got.body, status, appBody)
	}
	if fr := got.header.Get("Fly-Replay"); fr != "" {
		tb.Errorf("got Fly-Replay %q, want none", fr)
	}
}

// wantDecisions: a decision is reported once the shim's handler returns, which can be just after
// the client has the response, so it waits a little for the count to be reached.
func wantDecisions(tb testing.TB, h *harness, want ...router.Decision) {
	tb.Helper()
	got := h.decided()
	for deadline := time.Now().Add(5 * time.Second); len(got) < len(want) && time.Now().Before(deadline); got = h.decided() {
		time.Sleep(5 * time.Millisecond)
	}
	if len(want) == 0 {
		want = nil
	}
	if !slices.Equal(got, want) {
		tb.Errorf("got decisions %+v, want %+v", got, want)
	}
}

func TestTaintedRequestGetsFlyReplay(t *testing.T) {
	for _, tc := range []struct {
		name      string
		appStatus int
		respond   func(w http.ResponseWriter, r *http.Request)
	}{
		{"the app answers with a short error", http.StatusInternalServerError, func(w http.ResponseWriter, r *http.Request) {
			http.SetCookie(w, &http.Cookie{Name: "app", Value: "1"})
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, appBody)
		}},
		{"the app answers with more than is drained", http.StatusInternalServerError, func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, appBody)
			w.Write(make([]byte, 1<<20))
		}},
		{"the app ignores the error and keeps its answer open", http.StatusOK, func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, appBody)
			http.NewResponseController(w).Flush()
			<-r.Context().Done() // until the shim drops the connection
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, replicaRegion(), func(shim *router.Shim) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					shim.ReadOnly(violation(""))
					tc.respond(w, r)
				})
			})
			got := h.send(t, http.MethodPost, "/items?x=1", strings.NewReader("name=a"), nil)
			wantFlyReplay(t, got, "pgfly_read_only")
			if c := got.header.Values("Set-Cookie"); len(c) != 0 {
				t.Errorf("got Set-Cookie %q, want none of the app's cookies", c)
			}
			wantDecisions(t, h, router.Decision{Outcome: "replayed", Reason: router.ReasonReadOnly, Match: "overlap"})

			lines := h.logs.FilterMessage("replaying in the primary region").All()
			if len(lines) != 1 {
				t.Fatalf("got %d replay log lines, want 1", len(lines))
			}
			fields := lines[0].ContextMap()
			for k, want := range map[string]any{
				"method": "POST", "path": "/items", "region": "fra", "target_region": "iad", "reason": "read_only",
				"session": uint64(7), "sqlstate": "25006", "match": "overlap", "mode": "fly", "app_status": int64(tc.appStatus),
			} {
				if fields[k] != want {
					t.Errorf("log field %s: got %v (%T), want %v (%T)", k, fields[k], fields[k], want, want)
				}
			}
		})
	}
}

// pairApp is an app with two requests in flight at once: /a gets the violation once /b has
// arrived, and /b answers only after that. traceOf gives the trace id the violation carries.
func pairApp(traceOf func(r *http.Request) string) func(*router.Shim) http.Handler {
	return pairAppWith(func(shim *router.Shim, r *http.Request) { shim.ReadOnly(violation(traceOf(r))) }, nil)
}

// pairAppWith is an app with /a and /b in flight at once: /a reports what fire reports once
// /b has arrived, and /b answers only after that. Each answers appBody with its status from
// status (200 when absent).
func pairAppWith(fire func(*router.Shim, *http.Request), status map[string]int) func(*router.Shim) http.Handler {
	return func(shim *router.Shim) http.Handler {
		bArrived, fired := make(chan struct{}), make(chan struct{})
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/a":
				if !await(r, bArrived) {
					http.Error(w, "/b never arrived", http.StatusGatewayTimeout)
					return
				}
				fire(shim, r)
				close(fired)
			case "/b":
				close(bArrived)
				if !await(r, fired) {
					http.Error(w, "/a never got its event", http.StatusGatewayTimeout)
					return
				}
			}
			if code, ok := status[r.URL.Path]; ok {
				w.WriteHeader(code)
			}
			io.WriteString(w, appBody)
		})
	}
}

// sendPair sends GET /a and GET /b at once, with the given headers, and returns their replies.
func sendPair(tb testing.TB, h *harness, headerA, headerB http.Header) (a, b reply) {
	tb.Helper()
	reqA := h.newRequest(tb, http.MethodGet, "/a", nil, headerA)
	reqB := h.newRequest(tb, http.MethodGet, "/b", nil, headerB)
	var errA, errB error
	var wg sync.WaitGroup
	wg.Go(func() { a, errA = h.try(reqA) })
	wg.Go(func() { b, errB = h.try(reqB) })
	wg.Wait()
	if err := errors.Join(errA, errB); err != nil {
		tb.Fatal(err)
	}
	return a, b
}

func TestPreciseAndOverlapMatching(t *testing.T) {
	for _, tc := range []struct {
		name             string
		traceID          string // carried by the failing statement
		taintA, taintB   bool
		wantMatch        router.Match
		wantReplayedReqs int
	}{
		{"the trace id of /a taints only /a", traceA, true, false, "precise", 1},
		{"the trace id of /b taints only /b, though /a saw the error", traceB, false, true, "precise", 1},
		{"without a trace id both are tainted", "", true, true, "overlap", 2},
		{"a trace id no request carries falls back to overlap", "11111111111111111111111111111111", true, true, "overlap", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, replicaRegion(), pairApp(func(*http.Request) string { return tc.traceID }))
			a, b := sendPair(t, h,
				http.Header{"Traceparent": {traceparent(traceA)}},
				http.Header{"Traceparent": {traceparent(traceB)}})
			for _, r := range []struct {
				name    string
				got     reply
				tainted bool
			}{{"/a", a, tc.taintA}, {"/b", b, tc.taintB}} {
				if r.tainted {
					wantFlyReplay(t, r.got, "pgfly_read_only")
				} else {
					wantAppReply(t, r.got, http.StatusOK)
				}
			}
			var want []router.Decision
			for range tc.wantReplayedReqs {
				want = append(want, router.Decision{Outcome: "replayed", Reason: router.ReasonReadOnly, Match: tc.wantMatch})
			}
			wantDecisions(t, h, want...)
		})
	}
}

var validTraceparent = regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-01$`)

func TestInjectTraceparent(t *testing.T) {
	echo := func(*router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, strings.Join(r.Header.Values("Traceparent"), ","))
		})
	}
	for _, tc := range []struct {
		name   string
		inject bool
		sent   string            // the client's traceparent, "" for none
		check  func(string) bool // of what the app saw
	}{
		{"a request without one gets a valid one", true, "", func(seen string) bool {
			return validTraceparent.MatchString(seen) && !strings.Contains(seen, strings.Repeat("0", 32))
		}},
		{"a request with one keeps it", true, traceparent(traceA), func(seen string) bool { return seen == traceparent(traceA) }},
		{"an invalid one is left as it is", true, "garbage", func(seen string) bool { return seen == "garbage" }},
		{"nothing is added when injection is off", false, "", func(seen string) bool { return seen == "" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := replicaRegion()
			cfg.InjectTraceparent = tc.inject
			h := start(t, cfg, echo)
			header := http.Header{}
			if tc.sent != "" {
				header.Set("Traceparent", tc.sent)
			}
			got := h.send(t, http.MethodGet, "/", nil, header)
			if got.status != http.StatusOK || !tc.check(got.body) {
				t.Fatalf("got %d, app saw traceparent %q", got.status, got.body)
			}
		})
	}

	t.Run("each request gets its own", func(t *testing.T) {
		cfg := replicaRegion()
		cfg.InjectTraceparent = true
		h := start(t, cfg, echo)
		first := h.send(t, http.MethodGet, "/", nil, nil).body
		second := h.send(t, http.MethodGet, "/", nil, nil).body
		if first == second || !validTraceparent.MatchString(first) || !validTraceparent.MatchString(second) {
			t.Fatalf("got %q and %q, want two different valid traceparents", first, second)
		}
	})

	t.Run("an injected trace id matches precisely", func(t *testing.T) {
		cfg := replicaRegion()
		cfg.InjectTraceparent = true
		// /a propagates the traceparent it was given into its statement, as sqlcommenter does.
		h := start(t, cfg, pairApp(func(r *http.Request) string {
			return strings.Split(r.Header.Get("Traceparent"), "-")[1]
		}))
		a, b := sendPair(t, h, nil, nil)
		wantFlyReplay(t, a, "pgfly_read_only")
		wantAppReply(t, b, http.StatusOK)
		wantDecisions(t, h, router.Decision{Outcome: "replayed", Reason: router.ReasonReadOnly, Match: "precise"})
	})
}

// streamer is an app whose response starts before its write fails: it sends its headers and
// a first part, waits until the client has the headers, gets the violation, and finishes.
func streamer(headersSeen <-chan struct{}) func(*router.Shim) http.Handler {
	return func(shim *router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "first part, ")
			http.NewResponseController(w).Flush()
			if !await(r, headersSeen) {
				return
			}
			shim.ReadOnly(violation(r.Header.Get(violationTraceHeader)))
			io.WriteString(w, "then the write failed")
		})
	}
}

// doStreaming sends req and closes headersSeen as soon as the answer's headers arrive.
func (h *harness) doStreaming(tb testing.TB, req *http.Request, headersSeen chan<- struct{}) reply {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := h.client.Do(req.WithContext(ctx))
	close(headersSeen)
	if err != nil {
		tb.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("read body: %v", err)
	}
	return reply{resp.StatusCode, resp.Header, string(b)}
}

func TestStartedResponseIsNotReplaced(t *testing.T) {
	for _, tc := range []struct {
		name    string
		traceID string
		match   router.Match
	}{
		{"overlap", "", "overlap"},
		{"precise", traceA, "precise"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			headersSeen := make(chan struct{})
			h := start(t, replicaRegion(), streamer(headersSeen))
			req := h.newRequest(t, http.MethodGet, "/stream", nil, http.Header{
				"Traceparent":        {traceparent(traceA)},
				violationTraceHeader: {tc.traceID},
			})
			got := h.doStreaming(t, req, headersSeen)
			if got.status != http.StatusOK || got.body != "first part, then the write failed" || got.header.Get("Fly-Replay") != "" {
				t.Fatalf("got %d %q fly-replay %q, want the app's whole stream", got.status, got.body, got.header.Get("Fly-Replay"))
			}
			if n := h.logs.FilterLevelExact(zapcore.WarnLevel).FilterMessageSnippet("cannot replay").Len(); n != 1 {
				t.Errorf("got %d warnings that the response cannot be replayed, want 1", n)
			}
			wantDecisions(t, h, router.Decision{Outcome: "started", Reason: router.ReasonReadOnly, Match: tc.match})
		})
	}
}

func TestNothingIsReplayedInThePrimaryRegion(t *testing.T) {
	primary := startPrimary(t)
	for _, tc := range []struct {
		name string
		cfg  router.Config
	}{
		{"the region is the primary region", router.Config{Region: "iad", PrimaryRegion: "iad"}},
		{"the database is the primary", router.Config{Region: "fra", PrimaryRegion: "iad", IsPrimary: func() bool { return true }}},
		{"the region is the primary region, proxy mode", router.Config{Region: "iad", PrimaryRegion: "iad", Mode: router.ModeProxy, PrimaryHTTP: primary.url}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, tc.cfg, writer)
			got := h.send(t, http.MethodPost, "/items", strings.NewReader("name=a"), nil)
			wantAppReply(t, got, http.StatusInternalServerError)
			if n := h.logs.FilterLevelExact(zapcore.ErrorLevel).FilterMessageSnippet("primary region").Len(); n != 1 {
				t.Errorf("got %d error log lines about a violation in the primary region, want 1", n)
			}
			wantDecisions(t, h, router.Decision{Outcome: "primary", Reason: router.ReasonReadOnly})
			if n := primary.hits(); n != 0 {
				t.Errorf("the primary region got %d requests, want none", n)
			}
		})
	}

	t.Run("a database that is not the primary replays", func(t *testing.T) {
		cfg := replicaRegion()
		cfg.IsPrimary = func() bool { return false }
		h := start(t, cfg, writer)
		wantFlyReplay(t, h.send(t, http.MethodPost, "/items", nil, nil), "pgfly_read_only")
	})
}

func TestLoopGuard(t *testing.T) {
	primary := startPrimary(t)
	for _, tc := range []struct {
		name    string
		mode    router.Mode
		header  http.Header
		blocked bool
	}{
		{"replayed by pgfly for a write", router.ModeFly, http.Header{"Fly-Replay-Src": {"instance=abc;region=fra;t=1700000000000000;state=pgfly_read_only"}}, true},
		{"replayed by pgfly for lag", router.ModeFly, http.Header{"Fly-Replay-Src": {"instance=abc;region=fra;t=1;state=pgfly_lag"}}, true},
		{"a quoted state", router.ModeFly, http.Header{"Fly-Replay-Src": {`instance=abc;region=fra;t=1;state="pgfly_read_only"`}}, true},
		{"fly could not deliver a replay", router.ModeFly, http.Header{"Fly-Replay-Failed": {"region=iad;reason=timeout"}}, true},
		{"replayed by pgfly, proxy mode", router.ModeProxy, http.Header{"Fly-Replay-Src": {"instance=abc;region=fra;t=1;state=pgfly_read_only"}}, true},
		{"replayed by someone else", router.ModeFly, http.Header{"Fly-Replay-Src": {"instance=abc;region=fra;t=1;state=captured_write"}}, false},
		{"not replayed at all", router.ModeFly, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := replicaRegion()
			cfg.Mode = tc.mode
			if tc.mode == router.ModeProxy {
				cfg.PrimaryHTTP = primary.url
			}
			h := start(t, cfg, writer)
			before := primary.hits()
			got := h.send(t, http.MethodPost, "/items", strings.NewReader("name=a"), tc.header)
			if !tc.blocked {
				wantFlyReplay(t, got, "pgfly_read_only")
				return
			}
			if got.status != http.StatusServiceUnavailable || !strings.Contains(got.body, "already replayed") ||
				strings.Contains(got.body, appBody) || got.header.Get("Fly-Replay") != "" {
				t.Fatalf("got %d %q fly-replay %q, want 503 saying it was already replayed, without fly-replay",
					got.status, got.body, got.header.Get("Fly-Replay"))
			}
			if n := h.logs.FilterLevelExact(zapcore.ErrorLevel).FilterMessageSnippet("not replaying twice").Len(); n != 1 {
				t.Errorf("got %d error log lines for the blocked loop, want 1", n)
			}
			if n := primary.hits() - before; n != 0 {
				t.Errorf("the primary region got %d requests, want none", n)
			}
			wantDecisions(t, h, router.Decision{Outcome: "loop_blocked", Reason: router.ReasonReadOnly, Match: "overlap"})
		})
	}
}

func TestUpgradeIsNeverTainted(t *testing.T) {
	// The app gets the violation while the upgrade request is in flight, then accepts the
	// upgrade and echoes one line, or refuses it with its own answer.
	upgrader := func(shim *router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			shim.ReadOnly(violation(r.Header.Get(violationTraceHeader)))
			if r.URL.Query().Get("refuse") != "" {
				w.WriteHeader(http.StatusUpgradeRequired)
				io.WriteString(w, appBody)
				return
			}
			conn, brw, ok := acceptUpgrade(w)
			if !ok {
				return
			}
			defer conn.Close()
			line, _ := brw.ReadString('\n')
			brw.WriteString("echo: " + line)
			brw.Flush()
		})
	}
	for _, tc := range []struct {
		name    string
		target  string
		traceID string // carried by the failing statement
	}{
		{"an accepted upgrade", "/ws", ""},
		{"a refused upgrade", "/ws?refuse=1", ""},
		{"a refused upgrade whose trace id the violation carries", "/ws?refuse=1", traceA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := start(t, replicaRegion(), upgrader)
			req := h.newRequest(t, http.MethodGet, tc.target, nil, http.Header{
				"Connection":         {"Upgrade"},
				"Upgrade":            {"websocket"},
				"Traceparent":        {traceparent(traceA)},
				violationTraceHeader: {tc.traceID},
			})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := h.client.Do(req.WithContext(ctx))
			if err != nil {
				t.Fatalf("upgrade: %v", err)
			}
			defer resp.Body.Close()
			if strings.Contains(tc.target, "refuse") {
				b, _ := io.ReadAll(resp.Body)
				wantAppReply(t, reply{resp.StatusCode, resp.Header, string(b)}, http.StatusUpgradeRequired)
			} else {
				if resp.StatusCode != http.StatusSwitchingProtocols {
					t.Fatalf("got status %d, want 101", resp.StatusCode)
				}
				conn, ok := resp.Body.(io.ReadWriteCloser)
				if !ok {
					t.Fatalf("got a %T body for a 101, want an io.ReadWriteCloser", resp.Body)
				}
				io.WriteString(conn, "hello\n")
				b, err := io.ReadAll(conn)
				if err != nil || string(b) != "echo: hello\n" {
					t.Fatalf("got %q (%v) over the upgraded connection, want the echo", b, err)
				}
			}
			wantDecisions(t, h, router.Decision{Outcome: "no_request", Reason: router.ReasonReadOnly})
		})
	}
}

// primaryRegion is a fake primary region's pgfly: it records each request and answers 201.
type primaryRegion struct {
	url *url.URL
	mu  sync.Mutex
	got []seenRequest
}

type seenRequest struct {
	method, uri, host string
	header            http.Header
	body              string
}

const primaryBody = "the primary region's answer"

func startPrimary(tb testing.TB) *primaryRegion {
	tb.Helper()
	p := &primaryRegion{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		p.mu.Lock()
		p.got = append(p.got, seenRequest{r.Method, r.RequestURI, r.Host, r.Header.Clone(), string(b)})
		p.mu.Unlock()
		w.Header().Set("X-Answered-By", "primary")
		http.SetCookie(w, &http.Cookie{Name: "primary", Value: "1"})
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, primaryBody)
	}))
	tb.Cleanup(srv.Close)
	p.url = &url.URL{Scheme: "http", Host: srv.Listener.Addr().String()}
	return p
}

func (p *primaryRegion) hits() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.got)
}

func (p *primaryRegion) seen() []seenRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.got)
}

func proxyConfig(primary *url.URL) router.Config {
	cfg := replicaRegion()
	cfg.Mode, cfg.PrimaryHTTP, cfg.Instance = router.ModeProxy, primary, "machine-1"
	return cfg
}

// wantPrimaryReply checks that a reply is the primary region's answer.
func wantPrimaryReply(tb testing.TB, got reply) {
	tb.Helper()
	if got.status != http.StatusCreated || got.body != primaryBody || got.header.Get("X-Answered-By") != "primary" {
		tb.Fatalf("got %d %q X-Answered-By %q, want the primary region's 201 %q", got.status, got.body, got.header.Get("X-Answered-By"), primaryBody)
	}
	if c := got.header.Values("Set-Cookie"); len(c) != 1 || c[0] != "primary=1" {
		tb.Errorf("got Set-Cookie %q, want only the primary's", c)
	}
}

// wantReplaySrc checks the fly-replay-src the shim adds to a replay in proxy mode.
func wantReplaySrc(tb testing.TB, src, state string) {
	tb.Helper()
	if !regexp.MustCompile(`^instance=machine-1;region=fra;t=[0-9]+;state=` + state + `$`).MatchString(src) {
		tb.Errorf("got Fly-Replay-Src %q, want instance=machine-1;region=fra;t=<µs>;state=%s", src, state)
	}
}

// chunked hides a reader's length, so that the client sends its body chunked.
type chunked struct{ io.Reader }

func TestProxyModeReplaysTheSameRequest(t *testing.T) {
	for _, tc := range []struct {
		name   string
		method string
		target string
		body   io.Reader
		want   string // the body the primary must get
	}{
		{"a form POST with an escaped path and query", http.MethodPost, "/items/a%2Fb?x=1&y=%20z&x=2", strings.NewReader("name=hello&n=2"), "name=hello&n=2"},
		{"a chunked PUT", http.MethodPut, "/items/1", chunked{strings.NewReader("exact body \x00 ünïcode")}, "exact body \x00 ünïcode"},
		{"a GET that writes", http.MethodGet, "/touch?name=x", nil, ""},
		{"a DELETE", http.MethodDelete, "/items/1", nil, ""},
		{"a body exactly at the limit", http.MethodPost, "/upload", strings.NewReader(strings.Repeat("x", 1000)), strings.Repeat("x", 1000)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			primary := startPrimary(t)
			cfg := proxyConfig(primary.url)
			cfg.MaxReplayBody = 1000
			h := start(t, cfg, writer)
			req := h.newRequest(t, tc.method, tc.target, tc.body, http.Header{
				"Content-Type":    {"application/x-www-form-urlencoded"},
				"X-Custom":        {"one", "two"},
				"X-Forwarded-For": {"203.0.113.9"},
				"Traceparent":     {traceparent(traceA)},
				"Connection":      {"X-Hop"},
				"X-Hop":           {"hop-by-hop, not replayed"},
			})
			req.Host = "app.example.com"
			got := h.do(t, req)
			wantPrimaryReply(t, got)

			seen := primary.seen()
			if len(seen) != 1 {
				t.Fatalf("the primary region got %d requests, want 1", len(seen))
			}
			s := seen[0]
			if s.method != tc.method || s.uri != tc.target || s.host != "app.example.com" || s.body != tc.want {
				t.Errorf("got %s %s host %s body %q, want %s %s host app.example.com body %q",
					s.method, s.uri, s.host, s.body, tc.method, tc.target, tc.want)
			}
			for k, want := range map[string][]string{
				"Content-Type":    {"application/x-www-form-urlencoded"},
				"X-Custom":        {"one", "two"},
				"X-Forwarded-For": {"203.0.113.9"},
				"Traceparent":     {traceparent(traceA)},
				"X-Hop":           nil,
			} {
				if got := s.header.Values(k); !slices.Equal(got, want) {
					t.Errorf("primary got %s %q, want %q", k, got, want)
				}
			}
			wantReplaySrc(t, s.header.Get("Fly-Replay-Src"), "pgfly_read_only")
			if n := h.appHits.Load(); n != 1 {
				t.Errorf("the app got %d requests, want 1", n)
			}
			wantDecisions(t, h, router.Decision{Outcome: "replayed", Reason: router.ReasonReadOnly, Match: "overlap"})
		})
	}
}

func TestProxyModeWithAnAppUnderABasePath(t *testing.T) {
	primary := startPrimary(t)
	cfg := proxyConfig(primary.url)
	cfg.App = &url.URL{Path: "/base"}
	appSaw := make(chan string, 1)
	h := start(t, cfg, func(shim *router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			appSaw <- r.RequestURI
			writer(shim).ServeHTTP(w, r)
		})
	})
	wantPrimaryReply(t, h.send(t, http.MethodPost, "/items?q=1", strings.NewReader("name=a"), nil))
	if uri := <-appSaw; uri != "/base/items?q=1" {
		t.Errorf("the app got %s, want /base/items?q=1", uri)
	}
	// The primary region's pgfly adds the base path itself.
	if seen := primary.seen(); len(seen) != 1 || seen[0].uri != "/items?q=1" {
		t.Errorf("the primary region got %+v, want one request for /items?q=1", seen)
	}
}

func TestProxyModeBodyOverTheLimit(t *testing.T) {
	for _, tc := range []struct {
		name string
		body func() io.Reader
	}{
		{"with a content length", func() io.Reader { return strings.NewReader(strings.Repeat("x", 1001)) }},
		{"chunked", func() io.Reader { return chunked{strings.NewReader(strings.Repeat("x", 5000))} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			primary := startPrimary(t)
			cfg := proxyConfig(primary.url)
			cfg.MaxReplayBody = 1000
			var appGot atomic.Int64
			h := start(t, cfg, func(shim *router.Shim) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					n, _ := io.Copy(io.Discard, r.Body)
					appGot.Store(n)
					writer(shim).ServeHTTP(w, r)
				})
			})
			body := tc.body()
			want, _ := io.Copy(io.Discard, tc.body())
			got := h.send(t, http.MethodPost, "/upload", body, nil)
			if got.status != http.StatusServiceUnavailable || !strings.Contains(got.body, "1000-byte") || strings.Contains(got.body, appBody) {
				t.Fatalf("got %d %q, want 503 naming the 1000-byte limit", got.status, got.body)
			}
			if n := appGot.Load(); n != want {
				t.Errorf("the app got a %d-byte body, want all %d bytes", n, want)
			}
			if n := primary.hits(); n != 0 {
				t.Errorf("the primary region got %d requests, want none", n)
			}
			wantDecisions(t, h, router.Decision{Outcome: "too_large", Reason: router.ReasonReadOnly, Match: "overlap"})
		})
	}
}

// unreachable is a loopback URL nothing listens on.
func unreachable(tb testing.TB) *url.URL {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return &url.URL{Scheme: "http", Host: addr}
}

func TestProxyModePrimaryUnreachable(t *testing.T) {
	h := start(t, proxyConfig(unreachable(t)), writer)
	got := h.send(t, http.MethodPost, "/items", strings.NewReader("name=a"), nil)
	if got.status != http.StatusBadGateway || !strings.Contains(got.body, "could not replay") || strings.Contains(got.body, appBody) {
		t.Fatalf("got %d %q, want 502 saying the replay failed", got.status, got.body)
	}
	if n := h.logs.FilterLevelExact(zapcore.ErrorLevel).FilterMessageSnippet("replay to the primary region failed").Len(); n != 1 {
		t.Errorf("got %d error log lines for the failed replay, want 1", n)
	}
	wantDecisions(t, h, router.Decision{Outcome: "not_replayed", Reason: router.ReasonReadOnly, Match: "overlap"})
}

// fakeReplica is the lag monitor as the shim sees it: the primary is at lsn on timeline 1 of
// system 42, and so is the replica's history.
type fakeReplica struct {
	lsn    lag.LSN
	lsnErr error
	lagged bool // WaitForPosition waits until its context is done

	mu      sync.Mutex
	waitFor []lag.Position
	waiting chan struct{} // closed when WaitForPosition is first called
}

const fakeTimeline, fakeSystem = 1, 42

func newFakeReplica(lsn lag.LSN) *fakeReplica {
	return &fakeReplica{lsn: lsn, waiting: make(chan struct{})}
}

func (f *fakeReplica) PrimaryPosition(ctx context.Context) (lag.Position, error) {
	return lag.Position{LSN: f.lsn, Timeline: fakeTimeline, SystemID: fakeSystem}, f.lsnErr
}

func (f *fakeReplica) WaitForPosition(ctx context.Context, p lag.Position) error {
	f.mu.Lock()
	f.waitFor = append(f.waitFor, p)
	if len(f.waitFor) == 1 {
		close(f.waiting)
	}
	f.mu.Unlock()
	if p.Timeline != fakeTimeline || p.SystemID != fakeSystem {
		return lag.ErrOtherHistory
	}
	if f.lagged {
		<-ctx.Done()
		return ctx.Err()
	}
	return nil
}

func (f *fakeReplica) waits() []lag.Position {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.waitFor)
}

func TestBookmarks(t *testing.T) {
	const lsnText = "16/B374D848@1:42" // the LSN, timeline 1 of system 42
	pos, err := lag.ParsePosition(lsnText)
	if err != nil {
		t.Fatal(err)
	}
	lsn := pos.LSN
	primaryRegion := router.Config{Region: "iad", PrimaryRegion: "iad"}
	isPrimary := router.Config{Region: "fra", PrimaryRegion: "iad", IsPrimary: func() bool { return true }}
	eventual := func(cfg router.Config) router.Config { cfg.Consistency = router.ConsistencyEventual; return cfg }
	bookmark := http.Header{"Cookie": {"pgfly_lsn=" + lsnText}}
	for _, tc := range []struct {
		name       string
		cfg        router.Config
		method     string
		header     http.Header
		lagged     bool
		lsnErr     error
		wantCookie bool           // a pgfly_lsn cookie with lsnText
		wantSecure bool           // and it is Secure
		wantWaits  []lag.Position // the positions waited for
		wantLag    bool           // replayed for lag, without the app
	}{
		// In the primary region: bookmarks are handed out.
		{name: "a POST in the primary region gets a bookmark", cfg: primaryRegion, method: http.MethodPost, wantCookie: true},
		{name: "over HTTPS the bookmark is secure", cfg: primaryRegion, method: http.MethodPost,
			header: http.Header{"X-Forwarded-Proto": {"https"}}, wantCookie: true, wantSecure: true},
		{name: "a POST on the primary database gets one", cfg: isPrimary, method: http.MethodPost, wantCookie: true},
		{name: "a GET gets none", cfg: primaryRegion, method: http.MethodGet},
		{name: "a HEAD gets none", cfg: primaryRegion, method: http.MethodHead},
		{name: "a GET replayed by pgfly gets one", cfg: primaryRegion, method: http.MethodGet,
			header: http.Header{"Fly-Replay-Src": {"instance=a;region=fra;t=1;state=pgfly_read_only"}}, wantCookie: true},
		{name: "no bookmark when the primary's position is unknown", cfg: primaryRegion, method: http.MethodPost, lsnErr: errors.New("primary down")},
		{name: "no bookmark with eventual consistency", cfg: eventual(primaryRegion), method: http.MethodPost},
		{name: "a bookmark is not waited for in the primary region", cfg: primaryRegion, method: http.MethodGet, header: bookmark},
		// In a replica region: bookmarks are waited for.
		{name: "a POST in a replica region gets none", cfg: replicaRegion(), method: http.MethodPost},
		{name: "a bookmark the replica has replayed is served here", cfg: replicaRegion(), method: http.MethodGet,
			header: bookmark, wantWaits: []lag.Position{pos}},
		{name: "a bookmark the replica lags behind is replayed", cfg: replicaRegion(), method: http.MethodGet,
			header: bookmark, lagged: true, wantWaits: []lag.Position{pos}, wantLag: true},
		{name: "a bookmark of another timeline is replayed at once", cfg: replicaRegion(), method: http.MethodGet,
			header:    http.Header{"Cookie": {"pgfly_lsn=16/B374D848@2:42"}},
			wantWaits: []lag.Position{{LSN: lsn, Timeline: 2, SystemID: 42}}, wantLag: true},
		{name: "a bookmark of another system is replayed at once", cfg: replicaRegion(), method: http.MethodGet,
			header:    http.Header{"Cookie": {"pgfly_lsn=16/B374D848@1:43"}},
			wantWaits: []lag.Position{{LSN: lsn, Timeline: 1, SystemID: 43}}, wantLag: true},
		{name: "a bookmark without a timeline (an older pgfly's) is replayed at once", cfg: replicaRegion(), method: http.MethodGet,
			header: http.Header{"Cookie": {"pgfly_lsn=16/B374D848"}}, wantWaits: []lag.Position{{LSN: lsn}}, wantLag: true},
		{name: "a malformed bookmark is ignored", cfg: replicaRegion(), method: http.MethodGet,
			header: http.Header{"Cookie": {"pgfly_lsn=16-B374D848"}}},
		{name: "a GET without a bookmark does not wait", cfg: replicaRegion(), method: http.MethodGet, lagged: true},
		{name: "eventual consistency does not wait", cfg: eventual(replicaRegion()), method: http.MethodGet, header: bookmark, lagged: true},
		{name: "a request replayed by pgfly does not wait", cfg: replicaRegion(), method: http.MethodGet, lagged: true,
			header: http.Header{"Cookie": {"pgfly_lsn=" + lsnText}, "Fly-Replay-Src": {"instance=a;region=fra;t=1;state=pgfly_lag"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			replica := newFakeReplica(lsn)
			replica.lagged, replica.lsnErr = tc.lagged, tc.lsnErr
			cfg := tc.cfg
			cfg.Replica = replica
			cfg.ConsistencyWait = 50 * time.Millisecond
			h := start(t, cfg, reader)
			got := h.send(t, tc.method, "/items", nil, tc.header)

			if tc.wantLag {
				wantFlyReplay(t, got, "pgfly_lag")
				if n := h.appHits.Load(); n != 0 {
					t.Errorf("the app got %d requests, want none", n)
				}
			} else {
				wantBody := appBody
				if tc.method == http.MethodHead {
					wantBody = ""
				}
				if got.status != http.StatusOK || got.body != wantBody {
					t.Fatalf("got %d %q, want the app's 200 %q", got.status, got.body, wantBody)
				}
				if n := h.appHits.Load(); n != 1 {
					t.Errorf("the app got %d requests, want 1", n)
				}
			}
			if w := replica.waits(); !slices.Equal(w, tc.wantWaits) {
				t.Errorf("got waits for %v, want %v", w, tc.wantWaits)
			}
			for _, e := range h.logs.All() { // debug level included
				if line := fmt.Sprint(e.Message, e.ContextMap()); strings.Contains(line, "B374D848") {
					t.Errorf("a log line holds the bookmark cookie's contents: %s", line)
				}
			}

			var cookie *http.Cookie
			var others []string
			for _, c := range (&http.Response{Header: got.header}).Cookies() {
				if c.Name == router.BookmarkCookie {
					cookie = c
				} else {
					others = append(others, c.String())
				}
			}
			if !tc.wantLag && !slices.Equal(others, []string{"app=1"}) {
				t.Errorf("got other cookies %q, want the app's own", others)
			}
			switch {
			case !tc.wantCookie && cookie != nil:
				t.Errorf("got bookmark %q, want none", cookie)
			case tc.wantCookie && cookie == nil:
				t.Errorf("got no bookmark, want %s", lsnText)
			case tc.wantCookie:
				if cookie.Value != lsnText || cookie.Path != "/" || cookie.MaxAge != int(router.BookmarkMaxAge/time.Second) ||
					!cookie.HttpOnly || cookie.SameSite != http.SameSiteLaxMode || cookie.Secure != tc.wantSecure {
					t.Errorf("got bookmark %q, want %s for / for %v, HttpOnly, SameSite=Lax, Secure %v",
						cookie, lsnText, router.BookmarkMaxAge, tc.wantSecure)
				}
			}
		})
	}

	t.Run("in proxy mode a lagging bookmark is replayed by the shim", func(t *testing.T) {
		primary := startPrimary(t)
		replica := newFakeReplica(lsn)
		replica.lagged = true
		cfg := proxyConfig(primary.url)
		cfg.Replica, cfg.ConsistencyWait = replica, 50*time.Millisecond
		h := start(t, cfg, reader)
		got := h.send(t, http.MethodPost, "/items/a%2Fb?q=1", strings.NewReader("name=a"), bookmark)
		wantPrimaryReply(t, got)
		seen := primary.seen()
		if len(seen) != 1 || seen[0].method != http.MethodPost || seen[0].uri != "/items/a%2Fb?q=1" || seen[0].body != "name=a" ||
			seen[0].header.Get("Cookie") != "pgfly_lsn="+lsnText {
			t.Fatalf("the primary region got %+v, want the POST with its body and bookmark", seen)
		}
		wantReplaySrc(t, seen[0].header.Get("Fly-Replay-Src"), "pgfly_lag")
		if n := h.appHits.Load(); n != 0 {
			t.Errorf("the app got %d requests, want none", n)
		}
	})
}

func TestDecisions(t *testing.T) {
	lagging := func() router.Replica { r := newFakeReplica(1); r.lagged = true; return r }
	withReplica := func(cfg router.Config, r router.Replica) router.Config {
		cfg.Replica, cfg.ConsistencyWait = r, 20*time.Millisecond
		return cfg
	}
	limited := func(cfg router.Config) router.Config { cfg.MaxReplayBody = 10; return cfg }
	decision := func(outcome router.Outcome, reason router.Reason, match router.Match) router.Decision {
		return router.Decision{Outcome: outcome, Reason: reason, Match: match}
	}
	precise := http.Header{"Traceparent": {traceparent(traceA)}, violationTraceHeader: {traceA}}
	bookmark := http.Header{"Cookie": {"pgfly_lsn=0/1@1:42"}}
	down := unreachable(t)
	for _, tc := range []struct {
		name      string
		cfg       func(primary *url.URL) router.Config
		app       func(headersSeen <-chan struct{}) func(*router.Shim) http.Handler
		header    http.Header
		body      string
		noRequest bool // the violation comes with no request in flight
		want      []router.Decision
	}{
		{name: "no violation", app: appOf(reader)},
		{name: "replayed, overlap", want: []router.Decision{decision("replayed", "read_only", "overlap")}},
		{name: "replayed, precise", header: precise, want: []router.Decision{decision("replayed", "read_only", "precise")}},
		{name: "loop blocked", header: http.Header{"Fly-Replay-Src": {"state=pgfly_read_only"}},
			want: []router.Decision{decision("loop_blocked", "read_only", "overlap")}},
		{name: "started, overlap", app: streamer, want: []router.Decision{decision("started", "read_only", "overlap")}},
		{name: "started, precise", app: streamer, header: precise, want: []router.Decision{decision("started", "read_only", "precise")}},
		{name: "no request in flight", noRequest: true, want: []router.Decision{decision("no_request", "read_only", "")}},
		{name: "in the primary region", cfg: func(*url.URL) router.Config { return router.Config{Region: "iad", PrimaryRegion: "iad"} },
			want: []router.Decision{decision("primary", "read_only", "")}},
		{name: "proxy mode, replayed", cfg: proxyConfig, want: []router.Decision{decision("replayed", "read_only", "overlap")}},
		{name: "proxy mode, body too large", cfg: func(p *url.URL) router.Config { return limited(proxyConfig(p)) },
			body: "more than ten bytes", want: []router.Decision{decision("too_large", "read_only", "overlap")}},
		{name: "proxy mode, primary unreachable", cfg: func(*url.URL) router.Config { return proxyConfig(down) },
			want: []router.Decision{decision("not_replayed", "read_only", "overlap")}},
		{name: "lagging bookmark", cfg: func(*url.URL) router.Config { return withReplica(replicaRegion(), lagging()) },
			app: appOf(reader), header: bookmark, want: []router.Decision{decision("replayed", "lag", "")}},
		{name: "lagging bookmark, proxy mode", cfg: func(p *url.URL) router.Config { return withReplica(proxyConfig(p), lagging()) },
			app: appOf(reader), header: bookmark, want: []router.Decision{decision("replayed", "lag", "")}},
		// Sent before the app ran it, a body over the limit is streamed to the primary region.
		{name: "lagging bookmark, proxy mode, body too large", cfg: func(p *url.URL) router.Config { return limited(withReplica(proxyConfig(p), lagging())) },
			app: appOf(reader), header: bookmark, body: "more than ten bytes", want: []router.Decision{decision("replayed", "lag", "")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			primary := startPrimary(t)
			cfg := replicaRegion()
			if tc.cfg != nil {
				cfg = tc.cfg(primary.url)
			}
			app := tc.app
			if app == nil {
				app = appOf(writer)
			}
			headersSeen := make(chan struct{})
			h := start(t, cfg, app(headersSeen))
			if tc.noRequest {
				h.shim.ReadOnly(violation(""))
			} else {
				h.doStreaming(t, h.newRequest(t, http.MethodPost, "/items", strings.NewReader(tc.body), tc.header), headersSeen)
			}
			wantDecisions(t, h, tc.want...)
		})
	}
}

// appOf adapts an app that needs no coordination with the client to TestDecisions' rows.
func appOf(app func(*router.Shim) http.Handler) func(<-chan struct{}) func(*router.Shim) http.Handler {
	return func(<-chan struct{}) func(*router.Shim) http.Handler { return app }
}

func TestWaitOutcomes(t *testing.T) {
	const wait = 50 * time.Millisecond
	for _, tc := range []struct {
		name   string
		lagged bool
		cancel bool // the client gives up while the shim waits
		want   router.WaitOutcome
	}{
		{"caught up", false, false, "caught_up"},
		{"timeout", true, false, "timeout"},
		{"cancelled", true, true, "cancelled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			replica := newFakeReplica(1)
			replica.lagged = tc.lagged
			cfg := replicaRegion()
			cfg.Replica, cfg.ConsistencyWait = replica, wait
			if tc.cancel {
				cfg.ConsistencyWait = time.Minute // the client's cancellation ends the wait
			}
			h := start(t, cfg, reader)
			req := h.newRequest(t, http.MethodGet, "/", nil, http.Header{"Cookie": {"pgfly_lsn=0/1@1:42"}})
			if tc.cancel {
				ctx, cancel := context.WithCancel(context.Background())
				go func() {
					select {
					case <-replica.waiting:
					case <-time.After(10 * time.Second):
					}
					cancel()
				}()
				if _, err := h.client.Do(req.WithContext(ctx)); !errors.Is(err, context.Canceled) {
					t.Fatalf("got %v, want the client's cancellation", err)
				}
				deadline := time.Now().Add(10 * time.Second)
				for len(h.waited()) == 0 && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
			} else {
				h.send(t, http.MethodGet, "/", nil, req.Header)
			}
			got := h.waited()
			if len(got) != 1 || got[0].Outcome != tc.want {
				t.Fatalf("got waits %+v, want one %q", got, tc.want)
			}
			if tc.want == "timeout" && got[0].Waited < wait {
				t.Errorf("got a timeout after %v, want at least the %v ConsistencyWait", got[0].Waited, wait)
			}
			if tc.cancel && h.appHits.Load() != 0 {
				t.Errorf("the app got %d requests after the client gave up, want none", h.appHits.Load())
			}
		})
	}
}

func TestNewRejectsBadConfigs(t *testing.T) {
	app := &url.URL{Scheme: "http", Host: "127.0.0.1:3000"}
	primary := &url.URL{Scheme: "http", Host: "127.0.0.1:8081"}
	for _, tc := range []struct {
		name    string
		cfg     router.Config
		wantErr string // the Config field the error names, "" for none
	}{
		{"a valid config", router.Config{App: app, PrimaryRegion: "iad"}, ""},
		{"a valid proxy config", router.Config{App: app, PrimaryRegion: "iad", Mode: router.ModeProxy, PrimaryHTTP: primary}, ""},
		{"no app", router.Config{PrimaryRegion: "iad"}, "App"},
		{"an app URL without a host", router.Config{App: &url.URL{Path: "/app"}, PrimaryRegion: "iad"}, "App"},
		{"no primary region", router.Config{App: app}, "PrimaryRegion"},
		{"proxy mode without the primary's URL", router.Config{App: app, PrimaryRegion: "iad", Mode: router.ModeProxy}, "PrimaryHTTP"},
		{"proxy mode with a URL without a host", router.Config{App: app, PrimaryRegion: "iad", Mode: router.ModeProxy, PrimaryHTTP: &url.URL{Path: "/x"}}, "PrimaryHTTP"},
		{"an unknown mode", router.Config{App: app, PrimaryRegion: "iad", Mode: "pigeon"}, "Mode"},
		{"an unknown consistency", router.Config{App: app, PrimaryRegion: "iad", Consistency: "strong"}, "Consistency"},
		{"a negative consistency wait", router.Config{App: app, PrimaryRegion: "iad", ConsistencyWait: -time.Second}, "ConsistencyWait"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := router.New(tc.cfg, nil)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("got %v, want no error", err)
			case tc.wantErr == "" && s == nil:
				t.Fatal("got a nil shim, want one")
			case tc.wantErr != "":
				var ce *router.ConfigError
				if !errors.As(err, &ce) || ce.Field != tc.wantErr {
					t.Fatalf("got %v, want a ConfigError for field %s", err, tc.wantErr)
				}
			}
		})
	}
}

func TestLifecycle(t *testing.T) {
	newShim := func(tb testing.TB) *router.Shim {
		tb.Helper()
		s, err := router.New(router.Config{
			Listen:        "127.0.0.1:0",
			App:           &url.URL{Scheme: "http", Host: "127.0.0.1:3000"},
			PrimaryRegion: "iad",
		}, nil)
		if err != nil {
			tb.Fatal(err)
		}
		if err := s.Listen(); err != nil {
			tb.Fatal(err)
		}
		return s
	}
	// released checks that a closed shim's port is free again.
	released := func(tb testing.TB, addr net.Addr) {
		tb.Helper()
		ln, err := net.Listen("tcp", addr.String())
		if err != nil {
			tb.Fatalf("listen on the closed shim's %s: %v", addr, err)
		}
		ln.Close()
	}

	for _, stop := range []struct {
		name string
		stop func(*router.Shim) error
	}{
		{"Close", (*router.Shim).Close},
		{"Shutdown", func(s *router.Shim) error { return s.Shutdown(context.Background()) }},
	} {
		t.Run(stop.name+" before Serve", func(t *testing.T) {
			s := newShim(t)
			if err := stop.stop(s); err != nil {
				t.Fatalf("%s: %v", stop.name, err)
			}
			done := make(chan error, 1)
			go func() { done <- s.Serve() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Serve after %s: got %v, want nil", stop.name, err)
				}
			case <-time.After(10 * time.Second):
				s.Close()
				t.Fatalf("Serve after %s did not return", stop.name)
			}
			released(t, s.Addr())
			if err := s.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
		})
		t.Run(stop.name+" while serving", func(t *testing.T) {
			s := newShim(t)
			done := make(chan error, 1)
			go func() { done <- s.Serve() }()
			// A request answered shows Serve is running.
			resp, err := http.Get("http://" + s.Addr().String() + "/")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if err := stop.stop(s); err != nil {
				t.Fatalf("%s: %v", stop.name, err)
			}
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Serve: got %v, want nil", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Serve did not return")
			}
			released(t, s.Addr())
			if err := s.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
		})
	}

	t.Run("InFlight counts the requests the app is serving", func(t *testing.T) {
		arrived, release := make(chan struct{}), make(chan struct{})
		h := start(t, replicaRegion(), func(*router.Shim) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				close(arrived)
				await(r, release)
				io.WriteString(w, appBody)
			})
		})
		if n := h.shim.InFlight(); n != 0 {
			t.Fatalf("got %d in flight before any request, want 0", n)
		}
		done := make(chan reply, 1)
		req := h.newRequest(t, http.MethodGet, "/", nil, nil)
		go func() {
			r, err := h.try(req)
			if err != nil {
				r.body = err.Error()
			}
			done <- r
		}()
		select {
		case <-arrived:
		case <-time.After(10 * time.Second):
			t.Fatal("the request never reached the app")
		}
		if n := h.shim.InFlight(); n != 1 {
			t.Errorf("got %d in flight while the app serves one, want 1", n)
		}
		close(release)
		wantAppReply(t, <-done, http.StatusOK)
		// The shim forgets the request just after the client has its answer.
		deadline := time.Now().Add(10 * time.Second)
		for h.shim.InFlight() != 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if n := h.shim.InFlight(); n != 0 {
			t.Errorf("got %d in flight after the answer, want 0", n)
		}
	})
}

// TestProxyModeDropsThePrimarysHopByHopHeaders: headers of the primary's connection to the
// shim are not the client's.
func TestProxyModeDropsThePrimarysHopByHopHeaders(t *testing.T) {
	primary := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "X-Hop")
		w.Header().Set("X-Hop", "hop")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-End", "end")
		w.WriteHeader(http.StatusCreated)
	}))
	t.Cleanup(primary.Close)
	u, _ := url.Parse(primary.URL)
	h := start(t, proxyConfig(u), writer)
	got := h.send(t, http.MethodPost, "/items", strings.NewReader("name=a"), nil)
	if got.status != http.StatusCreated || got.header.Get("X-End") != "end" {
		t.Fatalf("got %d with X-End %q, want the primary's 201 and its end-to-end header", got.status, got.header.Get("X-End"))
	}
	for _, name := range []string{"X-Hop", "Keep-Alive"} {
		if v := got.header.Get(name); v != "" {
			t.Errorf("got %s: %q, want the hop-by-hop header dropped", name, v)
		}
	}
}

// TestTaintedRequestWhoseAppFailsIsReplayed: an app that dies on the refusal (here it aborts
// the connection, as a crashed handler does) gives the proxy nothing to answer with; the
// request is replayed like any tainted one instead of getting the proxy's 502.
func TestTaintedRequestWhoseAppFailsIsReplayed(t *testing.T) {
	h := start(t, replicaRegion(), func(shim *router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			shim.ReadOnly(violation(""))
			panic(http.ErrAbortHandler)
		})
	})
	wantFlyReplay(t, h.send(t, http.MethodPost, "/items", strings.NewReader("x"), nil), "pgfly_read_only")
	wantDecisions(t, h, router.Decision{Outcome: router.OutcomeReplayed, Reason: router.ReasonReadOnly, Match: router.MatchOverlap})
}

// acceptUpgrade takes over an app's connection and answers 101 Switching Protocols to a
// WebSocket upgrade, as an app's WebSocket library would; ok is false when it could not (the
// app has answered 500 then).
func acceptUpgrade(w http.ResponseWriter) (conn net.Conn, brw *bufio.ReadWriter, ok bool) {
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return nil, nil, false
	}
	brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	brw.Flush()
	return conn, brw, true
}

// TestDecisionsSayWhichRequest: besides its labels, a decision names the request, the refusal
// that caused it and the route, for whoever shows what happened.
func TestDecisionsSayWhichRequest(t *testing.T) {
	t.Run("a refusal", func(t *testing.T) {
		h := start(t, replicaRegion(), writer)
		wantFlyReplay(t, h.send(t, http.MethodPost, "/items/3?name=x", nil, nil), "pgfly_read_only")
		wantDecisions(t, h, router.Decision{Outcome: router.OutcomeReplayed, Reason: router.ReasonReadOnly, Match: router.MatchOverlap})
		v := violation("")
		want := router.Decision{Outcome: router.OutcomeReplayed, Reason: router.ReasonReadOnly, Match: router.MatchOverlap,
			Method: http.MethodPost, Path: "/items/3", Code: v.Code, Message: v.Message}
		if got := h.decidedInFull(); len(got) != 1 || got[0] != want {
			t.Errorf("got %+v, want %+v", got, want)
		}
	})
	t.Run("a configured route", func(t *testing.T) {
		cfg := replicaRegion()
		var err error
		if cfg.ReplayRoutes, err = router.ParseRoutePatterns("POST /items/*"); err != nil {
			t.Fatal(err)
		}
		h := start(t, cfg, writer)
		wantFlyReplay(t, h.send(t, http.MethodPost, "/items/3", nil, nil), "pgfly_route")
		wantDecisions(t, h, router.Decision{Outcome: router.OutcomeReplayed, Reason: router.ReasonRoute, Route: "configured"})
		want := router.Decision{Outcome: router.OutcomeReplayed, Reason: router.ReasonRoute, Route: "configured",
			Method: http.MethodPost, Path: "/items/3", RouteKey: "POST /items/*"}
		if got := h.decidedInFull(); len(got) != 1 || got[0] != want {
			t.Errorf("got %+v, want %+v", got, want)
		}
	})
}

// TestStalledResponseOfKnownLengthReachesTheClient: what the app has sent of a response with a
// Content-Length reaches the client while the app stalls (a long poll, a progress download),
// not only when it finishes.
func TestStalledResponseOfKnownLengthReachesTheClient(t *testing.T) {
	release := make(chan struct{})
	h := start(t, replicaRegion(), func(*router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "10")
			io.WriteString(w, "first")
			http.NewResponseController(w).Flush()
			select {
			case <-release:
			case <-r.Context().Done():
			}
			io.WriteString(w, "-last")
		})
	})
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := h.client.Do(h.newRequest(t, http.MethodGet, "/poll", nil, nil).WithContext(ctx))
	if err != nil {
		t.Fatalf("no headers while the app stalls: %v", err)
	}
	defer resp.Body.Close()
	got := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, got); err != nil || string(got) != "first" {
		t.Fatalf("while the app stalls: read %q, %v; want the 5 bytes it sent", got, err)
	}
}
