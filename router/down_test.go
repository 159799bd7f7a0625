package router_test

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgfly/pgfly/router"
)

// failure is what the relay reports when it cannot reach the upstream for a session.
func failure() router.Violation {
	now := time.Now()
	return router.Violation{Time: now, SentAt: now, Code: "08006", Message: "pgfly could not connect to upstream 127.0.0.1:1: connection refused"}
}

// failing is an app whose database connection fails: the relay reports it, and the app answers
// 500 with the driver's error, as an app does.
func failing(wrote bool) func(*router.Shim) http.Handler {
	return func(shim *router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			shim.UpstreamFailed(failure(), wrote)
			w.WriteHeader(http.StatusInternalServerError) // the driver's error, in the app's words
			io.WriteString(w, appBody)
		})
	}
}

func TestUpstreamFailureIsReplayed(t *testing.T) {
	h := start(t, replicaRegion(), failing(false))
	for range 4 { // more than the refusals that would teach a route
		got := h.send(t, http.MethodPost, "/items", strings.NewReader("name=a"), nil)
		wantFlyReplay(t, got, "pgfly_replica_down")
	}
	wantDecisions(t, h,
		router.Decision{Outcome: "replayed", Reason: router.ReasonReplicaDown, Match: "overlap"},
		router.Decision{Outcome: "replayed", Reason: router.ReasonReplicaDown, Match: "overlap"},
		router.Decision{Outcome: "replayed", Reason: router.ReasonReplicaDown, Match: "overlap"},
		router.Decision{Outcome: "replayed", Reason: router.ReasonReplicaDown, Match: "overlap"})
	if h.appHits.Load() != 4 {
		t.Errorf("app ran %d requests, want 4: an outage must not teach that a route writes", h.appHits.Load())
	}
}

func TestUpstreamFailureAfterAWriteIsNotReplayed(t *testing.T) {
	t.Run("the lost session wrote", func(t *testing.T) {
		h := start(t, replicaRegion(), failing(true))
		got := h.send(t, http.MethodPost, "/items", strings.NewReader("name=a"), nil)
		wantAppReply(t, got, http.StatusInternalServerError)
	})
	t.Run("a write committed during the request", func(t *testing.T) {
		h := start(t, replicaRegion(), func(shim *router.Shim) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				shim.WriteCommitted(time.Now()) // the upstream was promoted: this one wrote
				shim.ReadOnly(violation(""))    // and a later statement was refused
				w.WriteHeader(http.StatusInternalServerError)
				io.WriteString(w, appBody)
			})
		})
		got := h.send(t, http.MethodPost, "/items", strings.NewReader("name=a"), nil)
		wantAppReply(t, got, http.StatusInternalServerError)
	})
}

func TestUpstreamDownIsReplayedUpFront(t *testing.T) {
	var down atomic.Bool
	cfg := replicaRegion()
	cfg.UpstreamDown = down.Load
	cfg.LocalRoutes = mustRoutes(t, "GET /healthz")
	h := start(t, cfg, reader)
	wantAppReply(t, h.send(t, http.MethodGet, "/items", nil, nil), http.StatusOK)
	down.Store(true)
	wantFlyReplay(t, h.send(t, http.MethodGet, "/items", nil, nil), "pgfly_replica_down")
	wantAppReply(t, h.send(t, http.MethodGet, "/healthz", nil, nil), http.StatusOK) // a local route stays
	if got := h.appHits.Load(); got != 2 {
		t.Errorf("app ran %d requests, want 2: the replayed one must not reach it", got)
	}
	down.Store(false)
	wantAppReply(t, h.send(t, http.MethodGet, "/items", nil, nil), http.StatusOK)
}

func TestNoReplicaDownReplayInThePrimaryRegion(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	cfg := router.Config{Region: "iad", PrimaryRegion: "iad", UpstreamDown: down.Load}
	h := start(t, cfg, failing(false))
	wantAppReply(t, h.send(t, http.MethodPost, "/items", strings.NewReader("name=a"), nil), http.StatusInternalServerError)
}

func mustRoutes(tb testing.TB, s string) router.RoutePatterns {
	tb.Helper()
	p, err := router.ParseRoutePatterns(s)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// downPair is pairAppWith for a failure of /a's session, carrying traceID.
func downPair(traceID string, status map[string]int) func(*router.Shim) http.Handler {
	return pairAppWith(func(shim *router.Shim, _ *http.Request) {
		f := failure()
		f.TraceID = traceID
		shim.UpstreamFailed(f, false)
	}, status)
}

func TestUpstreamFailureSparesWhatItDidNotBreak(t *testing.T) {
	headers := []http.Header{{"Traceparent": {traceparent(traceA)}}, {"Traceparent": {traceparent(traceB)}}}
	t.Run("an answer the app still gave stands", func(t *testing.T) {
		h := start(t, replicaRegion(), downPair("", map[string]int{"/a": 500, "/b": 200}))
		a, b := sendPair(t, h, headers[0], headers[1])
		wantFlyReplay(t, a, "pgfly_replica_down")
		wantAppReply(t, b, http.StatusOK)
	})
	t.Run("the trace id of the statement in flight names its request", func(t *testing.T) {
		h := start(t, replicaRegion(), downPair(traceA, map[string]int{"/a": 500, "/b": 500}))
		a, b := sendPair(t, h, headers[0], headers[1])
		wantFlyReplay(t, a, "pgfly_replica_down")
		wantAppReply(t, b, http.StatusInternalServerError) // its own error, not the outage
	})
}

func TestWriteCommittedBeforeTheRegionKnewIsRemembered(t *testing.T) {
	// A promoted upstream is taken for the primary until two primaries are seen; a write
	// committed meanwhile must still keep its request from being replayed later.
	var primary atomic.Bool
	primary.Store(true)
	cfg := replicaRegion()
	cfg.IsPrimary = primary.Load
	h := start(t, cfg, func(shim *router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			shim.WriteCommitted(time.Now())
			primary.Store(false) // two primaries seen: the region replays again
			shim.UpstreamFailed(failure(), false)
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, appBody)
		})
	})
	wantAppReply(t, h.send(t, http.MethodPost, "/items", strings.NewReader("name=a"), nil), http.StatusInternalServerError)
}

func TestAnOutageTeachesNoRoute(t *testing.T) {
	// Two reads in flight; a refusal of someone's statement taints both (by overlap, naming
	// neither), then the database goes away and the app fails both. They are replayed, but
	// failing for an outage is not evidence that GET /items/* writes.
	var mu sync.Mutex
	var arrived chan struct{}
	var failed chan struct{}
	h := start(t, replicaRegion(), func(shim *router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			arr, fail := arrived, failed
			mu.Unlock()
			if r.Header.Get("X-First") != "" {
				if !await(r, arr) {
					http.Error(w, "the second never arrived", http.StatusGatewayTimeout)
					return
				}
				shim.ReadOnly(violation(""))
				shim.UpstreamFailed(failure(), false)
				close(fail)
			} else if arr != nil {
				close(arr)
				if !await(r, fail) {
					http.Error(w, "the first never failed", http.StatusGatewayTimeout)
					return
				}
			}
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, appBody)
		})
	})
	for i := range 2 * router.LearnRefusals {
		mu.Lock()
		arrived, failed = make(chan struct{}), make(chan struct{})
		mu.Unlock()
		first := h.newRequest(t, http.MethodGet, fmt.Sprintf("/items/%d", 2*i), nil, http.Header{"X-First": {"1"}})
		second := h.newRequest(t, http.MethodGet, fmt.Sprintf("/items/%d", 2*i+1), nil, nil)
		var a, b reply
		var errA, errB error
		var wg sync.WaitGroup
		wg.Go(func() { a, errA = h.try(first) })
		wg.Go(func() { b, errB = h.try(second) })
		wg.Wait()
		if err := errors.Join(errA, errB); err != nil {
			t.Fatal(err)
		}
		wantFlyReplay(t, a, "pgfly_read_only")
		wantFlyReplay(t, b, "pgfly_read_only")
	}
	mu.Lock()
	arrived = nil
	mu.Unlock()
	before := h.appHits.Load()
	h.send(t, http.MethodGet, "/items/99", nil, nil)
	if h.appHits.Load() != before+1 {
		t.Errorf("GET /items/99 was sent to the primary region before the app ran it: an outage taught the route")
	}
}
