package sidecar_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
	"github.com/pgfly/pgfly/internal/sidecar"
	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// TestJobsListener: in a replica region with the shim on, a standby refusal on the jobs
// listener leaves an HTTP request in flight alone (the app's answer goes through), while the
// same refusal on the app's listener taints it (replayed). Forwarding is off (no Primary on
// the jobs relay), so that the refusal reaches the job as it is.
func TestJobsListener(t *testing.T) {
	c := pgtest.Start(t, pgcluster.Options{})
	su := pgcluster.RoleSuperuser.Name
	entered, release := make(chan struct{}), make(chan struct{})
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select { // held until the test has made its refusal
		case entered <- struct{}{}:
		case <-r.Context().Done():
			return
		}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "the app's answer")
	}))
	t.Cleanup(app.Close)
	appURL, _ := url.Parse(app.URL)

	replica := c.Replica.URL(su, "", pgcluster.Database)
	s := startSidecar(t, sidecar.Config{
		Relay:       wire.Config{Listen: "127.0.0.1:0", Upstream: replica},
		Jobs:        &wire.Config{Listen: "127.0.0.1:0", Upstream: replica},
		Shim:        &router.Config{Listen: "127.0.0.1:0", App: appURL, Region: "fra", PrimaryRegion: "iad"},
		AdminListen: "127.0.0.1:0",
	})
	if s.JobsAddr() == nil || s.JobsAddr().String() == s.PostgresAddr().String() {
		t.Fatalf("JobsAddr: got %v beside PostgresAddr %v, want a listener of its own", s.JobsAddr(), s.PostgresAddr())
	}

	// refusedDuringRequest sends a GET through the shim, and while the app holds it, runs a
	// write through the relay at addr, which the standby refuses; it returns the response.
	refusedDuringRequest := func(t *testing.T, path string, addr fmt.Stringer) *http.Response {
		t.Helper()
		type result struct {
			resp *http.Response
			err  error
		}
		got := make(chan result, 1)
		go func() {
			resp, err := http.Get("http://" + s.HTTPAddr().String() + path)
			got <- result{resp, err}
		}()
		select {
		case <-entered:
		case r := <-got:
			t.Fatalf("GET %s: got %v %v before the app had it", path, r.resp, r.err)
		case <-time.After(30 * time.Second):
			t.Fatalf("GET %s: the app did not get it within 30s", path)
		}
		conn, err := pgx.Connect(t.Context(), fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", su, addr, pgcluster.Database))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		_, err = conn.Exec(t.Context(), "create table jobs_listener_test (id int)")
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "25006" {
			t.Fatalf("a write through %s: got %v, want the standby's 25006", addr, err)
		}
		release <- struct{}{}
		select {
		case r := <-got:
			if r.err != nil {
				t.Fatalf("GET %s: %v", path, r.err)
			}
			t.Cleanup(func() { r.resp.Body.Close() })
			return r.resp
		case <-time.After(30 * time.Second):
			t.Fatalf("GET %s: no response within 30s of the app's answer", path)
			return nil
		}
	}

	t.Run("a refusal on the jobs listener taints no request", func(t *testing.T) {
		resp := refusedDuringRequest(t, "/during-a-job", s.JobsAddr())
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || string(body) != "the app's answer" || resp.Header.Get("Fly-Replay") != "" {
			t.Errorf("got %d %q fly-replay %q, want the app's 200 and no replay", resp.StatusCode, body, resp.Header.Get("Fly-Replay"))
		}
	})
	t.Run("a refusal on the app's listener taints the request in flight", func(t *testing.T) {
		resp := refusedDuringRequest(t, "/during-an-app-write", s.PostgresAddr())
		if resp.StatusCode != http.StatusConflict || !strings.HasPrefix(resp.Header.Get("Fly-Replay"), "region=iad") {
			t.Errorf("got %d fly-replay %q, want 409 with fly-replay: region=iad", resp.StatusCode, resp.Header.Get("Fly-Replay"))
		}
	})

	t.Run("metrics", func(t *testing.T) {
		_, body := get(t, "http://"+s.AdminAddr().String()+"/metrics")
		lines := make(map[string]bool)
		for _, l := range strings.Split(body, "\n") {
			lines[l] = true
		}
		for _, want := range []string{
			`pgfly_sessions_total{listener="app"} 1`,
			`pgfly_sessions_total{listener="jobs"} 1`,
			`pgfly_readonly_violations_total 2`, // both refusals count
			`pgfly_forwarded_sessions 0`,
			`pgfly_forwards_total{outcome="moved"} 0`,
			`pgfly_forwards_total{outcome="retry"} 0`,
			`pgfly_forwards_total{outcome="refused"} 0`,
			`pgfly_forwards_total{outcome="limit"} 0`,
			`pgfly_forwards_total{outcome="direct"} 0`,
		} {
			if !lines[want] {
				t.Errorf("/metrics lacks the line %s", want)
			}
		}
	})
}

// TestRelayBehindShimNeverForwards: a relay behind the HTTP shim must not forward, since a write
// forwarded inside a request that is later replayed would run twice.
func TestRelayBehindShimNeverForwards(t *testing.T) {
	appURL, _ := url.Parse("http://127.0.0.1:1")
	const upstream = "postgres://postgres@127.0.0.1:1/pgfly?sslmode=disable"
	_, err := sidecar.New(sidecar.Config{
		Relay: wire.Config{Listen: "127.0.0.1:0", Upstream: upstream, Primary: upstream},
		Shim:  &router.Config{Listen: "127.0.0.1:0", App: appURL, Region: "fra", PrimaryRegion: "iad"},
	}, nil)
	if err == nil || !strings.Contains(err.Error(), "Relay.Primary") {
		t.Errorf("got %v, want an error naming Relay.Primary", err)
	}
}
