package router_test

import (
	"io"
	"net/http"
	"strings"
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
