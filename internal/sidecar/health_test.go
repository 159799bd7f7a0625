package sidecar_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
	"github.com/pgfly/pgfly/internal/sidecar"
	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/wire"
)

// healthReport is the part of /health these tests read.
type healthReport struct {
	Status             string `json:"status"`
	Role               string `json:"role"`
	SystemID           string `json:"system_id"`
	Timeline           uint32 `json:"timeline"`
	PrimarySystemID    string `json:"primary_system_id"`
	PrimaryTimeline    uint32 `json:"primary_timeline"`
	TwoPrimaries       bool   `json:"two_primaries"`
	TwoPrimariesReason string `json:"two_primaries_reason"`
}

// TestHealthTwoPrimaries promotes the replica of a cluster of its own while the primary runs:
// the replica region's /health turns 503 two_primaries and its gauge 1, while a pgfly whose
// upstream and primary are one server reached by two addresses stays healthy.
func TestHealthTwoPrimaries(t *testing.T) {
	c := pgtest.Start(t, pgcluster.Options{})
	url := func(addr string) string {
		return strings.Replace(c.Primary.URL(pgcluster.RoleSCRAM.Name, pgcluster.RoleSCRAM.Password, pgcluster.Database),
			c.Primary.Addr(), addr, 1)
	}
	replicaRegion := start(t, url(c.Replica.Addr()), url(c.Primary.Addr()))
	primaryRegion := start(t, url(c.Primary.Addr()), url(pgtest.Proxy(t, c.Primary.Addr())))

	for name, admin := range map[string]string{"replica region": replicaRegion, "primary region": primaryRegion} {
		if code, h := health(t, admin); code != http.StatusOK || h.Status != "ok" || h.TwoPrimaries || h.Timeline != 1 || h.SystemID == "" {
			t.Errorf("%s before the promotion: got %d %+v, want 200 ok on timeline 1 with a system id", name, code, h)
		}
	}

	if err := c.Replica.Promote(t.Context()); err != nil {
		t.Fatal(err)
	}

	t.Run("the replica region", func(t *testing.T) {
		var code int
		var h healthReport
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if code, h = health(t, replicaRegion); h.Status == "two_primaries" || time.Now().After(deadline) {
				break
			}
		}
		if code != http.StatusServiceUnavailable || h.Status != "two_primaries" || !h.TwoPrimaries || h.TwoPrimariesReason == "" {
			t.Fatalf("got %d %+v, want 503 two_primaries with a reason", code, h)
		}
		if h.Role != "primary" || h.SystemID != h.PrimarySystemID || h.Timeline != 2 || h.PrimaryTimeline != 1 {
			t.Errorf("got role %s, system ids %s and %s, timelines %d and %d; want a primary, one system id, timelines 2 and 1",
				h.Role, h.SystemID, h.PrimarySystemID, h.Timeline, h.PrimaryTimeline)
		}
		if got := gauge(t, replicaRegion, "pgfly_two_primaries"); got != "1" {
			t.Errorf("pgfly_two_primaries: got %q, want 1", got)
		}
	})

	t.Run("one server by two addresses", func(t *testing.T) {
		if code, h := health(t, primaryRegion); code != http.StatusOK || h.Status != "ok" || h.TwoPrimaries {
			t.Errorf("got %d %+v, want 200 ok", code, h)
		}
		if got := gauge(t, primaryRegion, "pgfly_two_primaries"); got != "0" {
			t.Errorf("pgfly_two_primaries: got %q, want 0", got)
		}
	})
}

// start starts a pgfly with the shim off, whose monitor has looked at both servers, and
// returns its admin address.
func start(tb testing.TB, upstream, primary string) string {
	tb.Helper()
	s := startSidecar(tb, sidecar.Config{
		Relay:       wire.Config{Listen: "127.0.0.1:0", Upstream: upstream},
		Lag:         lag.Config{Primary: primary},
		AdminListen: "127.0.0.1:0",
	})
	return s.AdminAddr().String()
}

// startSidecar starts a pgfly of cfg, closed when tb ends, once its monitor has looked at the
// servers.
func startSidecar(tb testing.TB, cfg sidecar.Config) *sidecar.Sidecar {
	tb.Helper()
	s, err := sidecar.New(cfg, zaptest.NewLogger(tb))
	if err != nil {
		tb.Fatal(err)
	}
	if err := s.Listen(); err != nil {
		tb.Fatal(err)
	}
	s.Start()
	tb.Cleanup(func() { s.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Ready(ctx); err != nil {
		tb.Fatal(err)
	}
	return s
}

// health reads /health from admin.
func health(tb testing.TB, admin string) (int, healthReport) {
	tb.Helper()
	code, body := get(tb, "http://"+admin+"/health")
	var h healthReport
	if err := json.Unmarshal([]byte(body), &h); err != nil {
		tb.Fatalf("/health: %v in %q", err, body)
	}
	return code, h
}

// gauge reads one unlabelled metric's value from admin's /metrics, "" when it is missing.
func gauge(tb testing.TB, admin, name string) string {
	tb.Helper()
	_, body := get(tb, "http://"+admin+"/metrics")
	for _, line := range strings.Split(body, "\n") {
		if value, ok := strings.CutPrefix(line, name+" "); ok {
			return value
		}
	}
	return ""
}

// get fetches url and returns its status and body.
func get(tb testing.TB, url string) (int, string) {
	tb.Helper()
	resp, err := http.Get(url)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return resp.StatusCode, string(body)
}
