package lag_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/lag"
)

// refusedMsg is the warning a Monitor logs when the server refuses a
// run-time parameter from its URL.
const refusedMsg = "server refused a run-time parameter from the URL; connecting without it"

// observedLogger logs to the test output and to the returned observer.
func observedLogger(tb testing.TB) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zap.DebugLevel)
	return zap.New(zapcore.NewTee(testLogger(tb).Core(), core)).Named("lag"), logs
}

// sessions counts the sessions of the monitor's role named app on s.
func sessions(tb testing.TB, s *pgcluster.Server, app string) int {
	tb.Helper()
	conn := connect(tb, superuserURL(s), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var n int
	err := conn.QueryRow(ctx, "select count(*) from pg_stat_activity where usename = $1 and application_name = $2",
		pgcluster.RoleSCRAM.Name, app).Scan(&n)
	if err != nil {
		tb.Fatalf("count the monitor's sessions: %v", err)
	}
	return n
}

// assertNoSecrets fails the test if a log entry holds the monitor role's
// password.
func assertNoSecrets(tb testing.TB, logs *observer.ObservedLogs) {
	tb.Helper()
	for _, e := range logs.All() {
		line := fmt.Sprint(e.Message, e.ContextMap())
		if strings.Contains(line, pgcluster.RoleSCRAM.Password) {
			tb.Errorf("log entry holds the password: %s", line)
		}
	}
}

// stringsOf is a logged zap.Strings field as a []string.
func stringsOf(v any) []string {
	var out []string
	vs, _ := v.([]any)
	for _, s := range vs {
		out = append(out, fmt.Sprint(s))
	}
	return out
}

// TestMonitorFrameworkURL runs a Monitor on URLs written for Rails and
// Django: the frameworks' parameters never reach the server, the rest do.
func TestMonitorFrameworkURL(t *testing.T) {
	const app = "pgfly-lag-framework-url"
	framework := []string{"pool=5", "timeout=3000", "prepared_statements=false", "conn_max_age=600", "application_name=" + app}
	for _, tt := range []struct {
		name     string
		cfg      lag.Config
		wantRole lag.Role
	}{
		{
			name:     "a primary",
			cfg:      lag.Config{Upstream: monitorURL(cluster.Primary, framework...)},
			wantRole: lag.RolePrimary,
		},
		{
			name:     "a replica and its primary",
			cfg:      lag.Config{Upstream: monitorURL(cluster.Replica, framework...), Primary: monitorURL(cluster.Primary, framework...)},
			wantRole: lag.RoleReplica,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			log, logs := observedLogger(t)
			m := startMonitorLog(t, tt.cfg, log)
			st := m.Status()
			if !st.UpstreamUp || st.Role != tt.wantRole || !st.PrimaryUp {
				t.Fatalf("status: got up %v role %s primary up %v (error %q), want up, %s, primary up",
					st.UpstreamUp, st.Role, st.PrimaryUp, st.UpstreamError, tt.wantRole)
			}
			if _, err := m.PrimaryLSN(context.Background()); err != nil {
				t.Errorf("PrimaryLSN (a bookmark): got %v, want an LSN", err)
			}
			server := cluster.Primary
			if tt.wantRole == lag.RoleReplica {
				server = cluster.Replica
			}
			if n := sessions(t, server, app); n == 0 {
				t.Errorf("sessions named %q on the upstream: got 0, want the monitor's (application_name is sent)", app)
			}
			if got := logs.FilterMessage(refusedMsg).Len(); got != 0 {
				t.Errorf("%q warnings: got %d, want 0 (nothing refused)", refusedMsg, got)
			}
			ignored := logs.FilterMessageSnippet("ignoring application framework parameters").All()
			if len(ignored) == 0 {
				t.Fatalf("got no log of the ignored parameters")
			}
			want := []string{"conn_max_age", "pool", "prepared_statements", "timeout"}
			if got := stringsOf(ignored[0].ContextMap()["params"]); !slices.Equal(got, want) {
				t.Errorf("ignored parameters logged: got %v, want %v", got, want)
			}
			assertNoSecrets(t, logs)
		})
	}
}

// TestMonitorRefusedParam runs a Monitor on a URL with a parameter no
// framework and no server knows: the server refuses it, the Monitor connects
// again without it, says which it dropped, and later connections go without
// it from the start.
func TestMonitorRefusedParam(t *testing.T) {
	const app = "pgfly-lag-refused-param"
	log, logs := observedLogger(t)
	m := startMonitorLog(t, lag.Config{
		Upstream: monitorURL(cluster.Replica, "not_a_guc_xyz=1", "application_name="+app),
		Interval: fast,
	}, log)
	if st := m.Status(); !st.UpstreamUp || st.Role != lag.RoleReplica {
		t.Fatalf("status: got up %v role %s (error %q), want an up replica", st.UpstreamUp, st.Role, st.UpstreamError)
	}
	refused := logs.FilterMessage(refusedMsg).All()
	if len(refused) != 1 {
		t.Fatalf("%q warnings: got %d, want 1", refusedMsg, len(refused))
	}
	if e := refused[0]; e.Level != zap.WarnLevel || !slices.Equal(stringsOf(e.ContextMap()["dropped"]), []string{"not_a_guc_xyz"}) ||
		e.ContextMap()["upstream"] != cluster.Replica.Addr() {
		t.Errorf("warning: got level %s fields %v, want warn, dropped [not_a_guc_xyz], upstream %s",
			e.Level, e.ContextMap(), cluster.Replica.Addr())
	}

	// Bookmarks dial more connections to the same server; a restart of the
	// monitor's session makes the poll dial again. Neither is refused.
	if _, err := m.PrimaryLSN(context.Background()); !errors.Is(err, lag.ErrNoPrimary) {
		t.Errorf("PrimaryLSN on a replica: got %v, want %v", err, lag.ErrNoPrimary)
	}
	replica := connect(t, superuserURL(cluster.Replica), nil)
	exec(t, replica, "select pg_terminate_backend(pid) from pg_stat_activity where application_name = '"+app+"'")
	before := m.Polls()
	waitStatus(t, m, 10*time.Second, "polled again, up", func(st lag.Status) bool {
		return m.Polls() > before+5 && st.UpstreamUp
	})
	if n := sessions(t, cluster.Replica, app); n == 0 {
		t.Errorf("sessions named %q after the restart: got 0, want the monitor's new one", app)
	}
	if got := logs.FilterMessage(refusedMsg).Len(); got != 1 {
		t.Errorf("%q warnings after reconnecting: got %d, want still 1", refusedMsg, got)
	}
	assertNoSecrets(t, logs)
}

// TestMonitorSendsSettings shows that real settings from the URL reach the
// server, on their own or in options: a value the server rejects (work_mem
// below its minimum, 22023) keeps the upstream down and is not dropped.
func TestMonitorSendsSettings(t *testing.T) {
	for _, tt := range []struct {
		name  string
		param string
	}{
		{name: "a setting", param: "work_mem=1"},
		{name: "options", param: "options=-c work_mem=1"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			log, logs := observedLogger(t)
			m := startMonitorLog(t, lag.Config{Upstream: monitorURL(cluster.Primary, "pool=5", tt.param)}, log)
			st := m.Status()
			if st.UpstreamUp || !strings.Contains(st.UpstreamError, "work_mem") {
				t.Errorf("status: got up %v error %q, want down with the server's complaint about work_mem", st.UpstreamUp, st.UpstreamError)
			}
			if got := logs.FilterMessage(refusedMsg).Len(); got != 0 {
				t.Errorf("%q warnings: got %d, want 0", refusedMsg, got)
			}
		})
	}
}
