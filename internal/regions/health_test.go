package regions_test

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
)

// TestMetrics scrapes both regions' /metrics around a replayed write and a read that waits
// for its bookmark.
func TestMetrics(t *testing.T) {
	w := start(t, regions.Options{})
	client := browser(t)

	fraBefore, iadBefore := scrape(t, w.Replica.AdminURL), scrape(t, w.Primary.AdminURL)
	item := createItem(t, client, w.EdgeURL, unique("metrics"))
	fraAfter, iadAfter := scrape(t, w.Replica.AdminURL), scrape(t, w.Primary.AdminURL)

	t.Run("a replayed write", func(t *testing.T) {
		for _, tc := range []struct {
			name          string
			before, after map[string]*dto.MetricFamily
			metric        string
			labels        map[string]string
			want          float64
		}{
			{"fra counts the violation", fraBefore, fraAfter, "pgfly_readonly_violations_total", nil, 1},
			{"fra counts the replay", fraBefore, fraAfter, "pgfly_replay_decisions_total",
				map[string]string{"reason": string(router.ReasonReadOnly), "outcome": "replayed"}, 1},
			{"iad replays nothing", iadBefore, iadAfter, "pgfly_replay_decisions_total", nil, 0},
			{"iad counts no violation", iadBefore, iadAfter, "pgfly_readonly_violations_total", nil, 0},
			{"fra did not serve it", fraBefore, fraAfter, "pgfly_http_served_here_total", nil, 0},
			{"iad served it", iadBefore, iadAfter, "pgfly_http_served_here_total", nil, 1},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if got := delta(tc.before, tc.after, tc.metric, tc.labels); got != tc.want {
					t.Fatalf("%s%v: got an increase of %v, want %v", tc.metric, tc.labels, got, tc.want)
				}
			})
		}
		if got := delta(iadBefore, iadAfter, "pgfly_writes_committed_total", nil); got < 1 {
			t.Errorf("iad's pgfly_writes_committed_total: got an increase of %v, want at least 1", got)
		}
		for _, tc := range []struct {
			metric string
			labels map[string]string
		}{
			{"pgfly_sessions_total", nil},
			{"pgfly_relay_bytes_total", map[string]string{"direction": "to_upstream"}},
			{"pgfly_relay_bytes_total", map[string]string{"direction": "to_client"}},
		} {
			for region, fams := range map[string]map[string]*dto.MetricFamily{"fra": fraAfter, "iad": iadAfter} {
				if got, ok := value(fams, tc.metric, tc.labels); !ok || got <= 0 {
					t.Errorf("%s's %s%v: got %v (present %v), want > 0", region, tc.metric, tc.labels, got, ok)
				}
			}
		}
	})

	t.Run("a read that waits for its bookmark", func(t *testing.T) {
		before := scrape(t, w.Replica.AdminURL)
		got := doWith(t, client, http.MethodGet, itemURL(w.EdgeURL, item.ID), nil, nil)
		wantReply(t, got, http.StatusOK, "fra", "fra")
		wantItem(t, got, item)
		after := scrape(t, w.Replica.AdminURL)
		if d := delta(before, after, "pgfly_bookmark_wait_seconds", map[string]string{"outcome": "caught_up"}); d != 1 {
			t.Fatalf("caught-up bookmark waits: got an increase of %v, want 1", d)
		}
		if d := delta(before, after, "pgfly_http_served_here_total", nil); d != 1 {
			t.Errorf("fra's pgfly_http_served_here_total: got an increase of %v, want 1: the read was kept local", d)
		}
	})

	t.Run("lag gauges", func(t *testing.T) {
		for _, tc := range []struct {
			region    *regions.Region
			isPrimary float64
		}{{w.Primary, 1}, {w.Replica, 0}} {
			t.Run(tc.region.Name, func(t *testing.T) {
				fams := scrape(t, tc.region.AdminURL)
				for _, name := range []string{"pgfly_replica_lag_bytes", "pgfly_replica_lag_seconds"} {
					if got, ok := value(fams, name, nil); !ok || got < 0 {
						t.Errorf("%s: got %v (present %v), want a known lag (>= 0)", name, got, ok)
					}
				}
				if got, _ := value(fams, "pgfly_upstream_up", nil); got != 1 {
					t.Errorf("pgfly_upstream_up: got %v, want 1", got)
				}
				if got, ok := value(fams, "pgfly_upstream_is_primary", nil); !ok || got != tc.isPrimary {
					t.Errorf("pgfly_upstream_is_primary: got %v (present %v), want %v", got, ok, tc.isPrimary)
				}
			})
		}
	})
}

// TestHealth reads /health in both regions, with the replica lagging and with it down. It
// stops and restarts the shared replica, so it runs last in this file and leaves the cluster
// streaming with replay resumed.
func TestHealth(t *testing.T) {
	w := start(t, regions.Options{})

	t.Run("both regions are healthy and name their role", func(t *testing.T) {
		for _, tc := range []struct {
			region *regions.Region
			role   lag.Role
		}{{w.Primary, lag.RolePrimary}, {w.Replica, lag.RoleReplica}} {
			t.Run(tc.region.Name, func(t *testing.T) {
				code, h := health(t, tc.region.AdminURL)
				if code != http.StatusOK || h.Role != string(tc.role) || h.UpstreamUp == nil || !*h.UpstreamUp {
					t.Fatalf("got %d, role %q, upstream_up %v, want 200, %q, true (%+v)", code, h.Role, deref(h.UpstreamUp), tc.role, h)
				}
				if lsn, err := lag.ParseLSN(h.ReplayLSN); err != nil || lsn == 0 {
					t.Errorf("got replay_lsn %q (%v), want a WAL position", h.ReplayLSN, err)
				}
				if h.LagBytes == nil || h.LagSeconds == nil {
					t.Fatalf("got lag_bytes %v and lag_seconds %v, want both present", h.LagBytes, h.LagSeconds)
				}
				if *h.LagBytes < 0 || *h.LagSeconds < 0 {
					t.Errorf("got lag_bytes %d and lag_seconds %v, want both known (>= 0)", *h.LagBytes, *h.LagSeconds)
				}
			})
		}
	})

	t.Run("lag shows while replay is paused", func(t *testing.T) {
		replay := replayControl(t)
		replay.pause(t)
		insertOnPrimary(t, unique("health-lag"))
		h := waitHealth(t, w.Replica.AdminURL, "lag_bytes > 0 in fra", func(code int, h healthReport) bool {
			return h.LagBytes != nil && *h.LagBytes > 0
		})
		t.Logf("fra while paused: status %q, lag_bytes %d, lag_seconds %v", h.Status, *h.LagBytes, deref(h.LagSeconds))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := replay.set(ctx, false); err != nil {
			t.Fatal(err)
		}
		waitHealth(t, w.Replica.AdminURL, "fra to catch up (200, lag_bytes 0)", func(code int, h healthReport) bool {
			return code == http.StatusOK && h.LagBytes != nil && *h.LagBytes == 0
		})
	})

	t.Run("a stopped replica makes fra unhealthy until it is back", func(t *testing.T) {
		if err := cluster.Replica.Stop(); err != nil {
			t.Fatalf("stop the replica: %v", err)
		}
		stopped := true
		t.Cleanup(func() {
			if stopped {
				if err := cluster.Replica.Start(); err != nil {
					t.Errorf("start the replica again: %v", err)
				}
			}
		})
		h := waitHealth(t, w.Replica.AdminURL, "503 with upstream_up false in fra", func(code int, h healthReport) bool {
			return code == http.StatusServiceUnavailable && h.UpstreamUp != nil && !*h.UpstreamUp
		})
		t.Logf("fra with its replica down: status %q, upstream_error %q", h.Status, h.UpstreamError)
		if code, h := health(t, w.Primary.AdminURL); code != http.StatusOK {
			t.Errorf("iad with the replica down: got %d (%+v), want 200", code, h)
		}

		if err := cluster.Replica.Start(); err != nil {
			t.Fatalf("start the replica again: %v", err)
		}
		stopped = false
		waitHealth(t, w.Replica.AdminURL, "200 with upstream_up true in fra", func(code int, h healthReport) bool {
			return code == http.StatusOK && h.UpstreamUp != nil && *h.UpstreamUp && h.Role == string(lag.RoleReplica)
		})
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := cluster.WaitStreaming(ctx); err != nil {
			t.Fatalf("wait for the replica to stream: %v", err)
		}
		waitReplayed(t)
	})
}

// healthReport is the part of /health the tests read; pointers tell a missing field from a
// zero one.
type healthReport struct {
	Status        string   `json:"status"`
	Role          string   `json:"role"`
	ReplayLSN     string   `json:"replay_lsn"`
	LagBytes      *int64   `json:"lag_bytes"`
	LagSeconds    *float64 `json:"lag_seconds"`
	UpstreamUp    *bool    `json:"upstream_up"`
	UpstreamError string   `json:"upstream_error"`
}

// health fetches and decodes one /health.
func health(tb testing.TB, adminURL string) (int, healthReport) {
	tb.Helper()
	got := do(tb, http.MethodGet, adminURL+"/health", nil, nil)
	if ct := got.header.Get("Content-Type"); ct != "application/json" {
		tb.Fatalf("got Content-Type %q, want application/json", ct)
	}
	var h healthReport
	if err := json.Unmarshal([]byte(got.body), &h); err != nil {
		tb.Fatalf("decode /health %q: %v", got.body, err)
	}
	return got.status, h
}

// waitHealth polls /health until cond holds, for up to 30 s.
func waitHealth(tb testing.TB, adminURL, what string, cond func(int, healthReport) bool) healthReport {
	tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, h := health(tb, adminURL)
		if cond(code, h) {
			return h
		}
		if time.Now().After(deadline) {
			tb.Fatalf("waited 30s for %s; last /health: %d %+v", what, code, h)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// insertOnPrimary commits a row on the primary directly, flushing its WAL so the replica
// receives it at once.
func insertOnPrimary(tb testing.TB, name string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn := connectTo(tb, cluster.Primary, "synchronous_commit=on")
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "insert into items (name, region) values ($1, 'iad')", name); err != nil {
		tb.Fatalf("insert on the primary: %v", err)
	}
}

// scrape fetches and parses one /metrics.
func scrape(tb testing.TB, adminURL string) map[string]*dto.MetricFamily {
	tb.Helper()
	got := do(tb, http.MethodGet, adminURL+"/metrics", nil, http.Header{"Accept": {"text/plain; version=0.0.4"}})
	if got.status != http.StatusOK {
		tb.Fatalf("GET /metrics: got %d %q, want 200", got.status, got.body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(got.body))
	if err != nil {
		tb.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// value sums the series of a metric whose labels include labels: counter, gauge or untyped
// values, a histogram's or summary's sample count. ok is false when no series matches.
func value(fams map[string]*dto.MetricFamily, name string, labels map[string]string) (v float64, ok bool) {
	fam := fams[name]
	if fam == nil {
		return 0, false
	}
	for _, m := range fam.GetMetric() {
		if !hasLabels(m, labels) {
			continue
		}
		ok = true
		switch {
		case m.Counter != nil:
			v += m.GetCounter().GetValue()
		case m.Gauge != nil:
			v += m.GetGauge().GetValue()
		case m.Untyped != nil:
			v += m.GetUntyped().GetValue()
		case m.Histogram != nil:
			v += float64(m.GetHistogram().GetSampleCount())
		case m.Summary != nil:
			v += float64(m.GetSummary().GetSampleCount())
		}
	}
	return v, ok
}

func hasLabels(m *dto.Metric, want map[string]string) bool {
	n := 0
	for _, lp := range m.GetLabel() {
		if v, ok := want[lp.GetName()]; ok {
			if v != lp.GetValue() {
				return false
			}
			n++
		}
	}
	return n == len(want)
}

// delta is how much a metric grew between two scrapes; a series missing from a scrape
// counts as zero.
func delta(before, after map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	b, _ := value(before, name, labels)
	a, _ := value(after, name, labels)
	return a - b
}

// TestGrafanaDashboard: the dashboard in deploy/grafana has the panels an operator looks at
// first, and every metric its queries name is one pgfly serves.
func TestGrafanaDashboard(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "grafana", "pgfly-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("deploy/grafana/pgfly-dashboard.json: %v", err)
	}
	w := start(t, regions.Options{})
	served := scrape(t, w.Replica.AdminURL)
	metricName := regexp.MustCompile(`\bpgfly_[a-z_]+`)
	titles := make(map[string]bool)
	for _, p := range dash.Panels {
		titles[p.Title] = true
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			for _, name := range metricName.FindAllString(tg.Expr, -1) {
				family := name
				for _, suffix := range []string{"_bucket", "_count", "_sum"} {
					if f := strings.TrimSuffix(name, suffix); f != name && served[f] != nil {
						family = f
					}
				}
				if served[family] == nil {
					t.Errorf("panel %q queries %s, which pgfly's /metrics does not serve", p.Title, name)
				}
			}
		}
	}
	for _, want := range []string{"Replays by reason", "Reads kept local", "Bookmark waits", "Replica lag", "Sessions", "Upstream errors"} {
		if !titles[want] {
			t.Errorf("no %q panel", want)
		}
	}
}
