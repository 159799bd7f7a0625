package lag_test

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
	"github.com/pgfly/pgfly/lag"
)

// TestTwoPrimaries promotes the replica of a cluster of its own while the
// primary runs, under monitors started before the promotion.
func TestTwoPrimaries(t *testing.T) {
	c := pgtest.Start(t, pgcluster.Options{})
	// The primary through another address, as Fly's HAProxy in front of the
	// leader beside the member's own port.
	viaProxy := strings.Replace(monitorURL(c.Primary), c.Primary.Addr(), pgtest.Proxy(t, c.Primary.Addr()), 1)

	core, logs := observer.New(zap.InfoLevel)
	split := startMonitorLog(t, lag.Config{Upstream: monitorURL(c.Replica), Primary: monitorURL(c.Primary), Interval: fast},
		zap.New(zapcore.NewTee(core, testLogger(t).Core())))
	same := startMonitor(t, lag.Config{Upstream: monitorURL(c.Primary), Primary: viaProxy, Interval: fast})

	t.Run("before the promotion", func(t *testing.T) {
		st := waitStatus(t, split, 10*time.Second, "replica and primary up", func(st lag.Status) bool { return st.UpstreamUp && st.PrimaryUp })
		if st.TwoPrimaries || st.TwoPrimariesReason != "" {
			t.Errorf("a replica and its primary: got %+v, want no two primaries", st)
		}
		if st.SystemID == 0 || st.SystemID != st.PrimarySystemID || st.Timeline != 1 || st.PrimaryTimeline != 1 {
			t.Errorf("got system ids %d and %d, timelines %d and %d; want one system id, timelines 1 and 1",
				st.SystemID, st.PrimarySystemID, st.Timeline, st.PrimaryTimeline)
		}
		st = waitStatus(t, same, 10*time.Second, "primary up by two addresses", func(st lag.Status) bool { return st.UpstreamUp && st.PrimaryUp })
		if st.TwoPrimaries || st.Role != lag.RolePrimary || st.SystemID != st.PrimarySystemID || st.Timeline != st.PrimaryTimeline {
			t.Errorf("one primary by two addresses: got %+v, want a primary, the same ids and no two primaries", st)
		}
	})

	if err := c.Replica.Promote(t.Context()); err != nil {
		t.Fatal(err)
	}

	t.Run("a promoted replica beside the running primary is two primaries", func(t *testing.T) {
		st := waitStatus(t, split, 15*time.Second, "two primaries", func(st lag.Status) bool { return st.TwoPrimaries })
		if st.Role != lag.RolePrimary || st.TwoPrimariesReason == "" {
			t.Errorf("got %+v, want an upstream that is a primary and a reason", st)
		}
		if st.SystemID != st.PrimarySystemID || st.Timeline != 2 || st.PrimaryTimeline != 1 {
			t.Errorf("got system ids %d and %d, timelines %d and %d; want one system id, timelines 2 and 1",
				st.SystemID, st.PrimarySystemID, st.Timeline, st.PrimaryTimeline)
		}
		for _, want := range []string{c.Replica.Addr(), c.Primary.Addr(), "timelines 2 and 1"} {
			if !strings.Contains(st.TwoPrimariesReason, want) {
				t.Errorf("reason %q does not mention %q", st.TwoPrimariesReason, want)
			}
		}
		// Many polls later, still one error.
		polls := split.Polls()
		waitStatus(t, split, 10*time.Second, "20 more polls", func(lag.Status) bool { return split.Polls() >= polls+20 })
		if st := split.Status(); !st.TwoPrimaries {
			t.Errorf("got %+v 20 polls later, want two primaries still", st)
		}
		if n := logs.FilterMessageSnippet("two primaries").FilterLevelExact(zap.ErrorLevel).Len(); n != 1 {
			t.Errorf("%d two-primaries errors logged, want 1", n)
		}
	})

	t.Run("one primary by two addresses is not two primaries", func(t *testing.T) {
		polls := same.Polls()
		waitStatus(t, same, 10*time.Second, "20 more polls", func(lag.Status) bool { return same.Polls() >= polls+20 })
		if st := same.Status(); st.TwoPrimaries || !st.UpstreamUp || !st.PrimaryUp {
			t.Errorf("got %+v, want both up and no two primaries", st)
		}
	})

	t.Run("two primaries hold while the other primary is unreachable", func(t *testing.T) {
		if err := c.Primary.Stop(); err != nil {
			t.Fatal(err)
		}
		// PrimaryUp stays true: the upstream is a primary itself.
		waitStatus(t, split, 10*time.Second, "primary down", func(lag.Status) bool {
			return logs.FilterMessage("primary down").Len() > 0
		})
		polls := split.Polls()
		waitStatus(t, split, 10*time.Second, "20 more polls", func(lag.Status) bool { return split.Polls() >= polls+20 })
		if st := split.Status(); !st.TwoPrimaries || st.PrimarySystemID != 0 {
			t.Errorf("got %+v, want two primaries still: an unreachable primary may still take writes", st)
		}
	})
}

// TestSystemIDHidden revokes pg_control_system() from the monitor's role on the shared cluster
// (and gives it back): polls still succeed, without a system identifier, and one warning says
// so.
func TestSystemIDHidden(t *testing.T) {
	primary := connect(t, superuserURL(cluster.Primary), nil)
	exec(t, primary, "REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
	t.Cleanup(func() {
		exec(t, primary, "GRANT EXECUTE ON FUNCTION pg_control_system() TO PUBLIC")
		waitReplayed(t)
	})
	waitReplayed(t)

	core, logs := observer.New(zap.InfoLevel)
	m := startMonitorLog(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary), Interval: fast},
		zap.New(zapcore.NewTee(core, testLogger(t).Core())))
	polls := m.Polls()
	waitStatus(t, m, 10*time.Second, "20 more polls", func(lag.Status) bool { return m.Polls() >= polls+20 })
	st := m.Status()
	if !st.UpstreamUp || !st.PrimaryUp || st.UpstreamError != "" {
		t.Errorf("got %+v, want both servers up", st)
	}
	if st.SystemID != 0 || st.PrimarySystemID != 0 || st.PrimaryTimeline != 1 || st.TwoPrimaries {
		t.Errorf("got %+v, want no system ids, the primary's timeline 1 and no two primaries", st)
	}
	if n := logs.FilterMessageSnippet("cannot read the system identifier").Len(); n != 2 {
		t.Errorf("%d warnings about the system identifier, want 2 (one per server)", n)
	}
}
