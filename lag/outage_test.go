package lag_test

import (
	"sync"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
	"github.com/pgfly/pgfly/lag"
)

// idle is an Interval no test waits for: only SuspectDown, a waiter or an
// outage makes such a monitor poll again.
const idle = time.Hour

// TestSuspectDown freezes, stops and restarts a replica of its own and
// checks that SuspectDown, not the Interval, makes the monitor see it, that
// suspicions from many sessions cost few polls, and that a replica that is
// back is seen up again while the Interval is an hour.
func TestSuspectDown(t *testing.T) {
	c := pgtest.Start(t, pgcluster.Options{})
	const downInterval = 100 * time.Millisecond
	m := startMonitor(t, lag.Config{
		Upstream:     monitorURL(c.Replica),
		Primary:      monitorURL(c.Primary),
		Interval:     idle,
		DownInterval: downInterval,
		QueryTimeout: 500 * time.Millisecond, // a frozen server fails a poll this fast
	})
	if st := m.Status(); !st.UpstreamUp {
		t.Fatalf("got %+v, want the upstream up", st)
	}

	t.Run("suspicions from many sessions coalesce", func(t *testing.T) {
		before := m.Polls()
		began := time.Now()
		var wg sync.WaitGroup
		for range 1000 {
			wg.Go(m.SuspectDown)
		}
		wg.Wait()
		waitStatus(t, m, 10*time.Second, "a poll after a thousand suspicions", func(lag.Status) bool { return m.Polls() > before })
		// A storm: sessions failing in a loop for a while.
		stop := time.Now().Add(5 * downInterval)
		for range 4 {
			wg.Go(func() {
				for time.Now().Before(stop) {
					m.SuspectDown()
				}
			})
		}
		wg.Wait()
		time.Sleep(2 * downInterval) // let the last one be served
		elapsed := time.Since(began)
		polls := m.Polls() - before
		limit := uint64(elapsed/downInterval) + 2
		t.Logf("%d polls in %v of suspicions", polls, elapsed.Round(time.Millisecond))
		if polls > limit {
			t.Errorf("%d polls in %v of suspicions, want at most %d (one per %v)", polls, elapsed, limit, downInterval)
		}
		if st := m.Status(); !st.UpstreamUp {
			t.Errorf("got %+v after suspicions of an upstream that is up, want it up", st)
		}
	})

	// quiet waits until the monitor has stopped polling (the last suspicion
	// served), so that what follows sees only its own polls.
	quiet := func(t *testing.T) {
		t.Helper()
		for polls := m.Polls(); ; {
			time.Sleep(3 * downInterval)
			if now := m.Polls(); now == polls {
				return
			} else {
				polls = now
			}
		}
	}

	t.Run("a frozen replica is seen down once a session suspects it", func(t *testing.T) {
		quiet(t)
		if err := c.Replica.Freeze(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Replica.Thaw() })
		time.Sleep(2 * downInterval)
		if st := m.Status(); !st.UpstreamUp {
			t.Fatalf("got %+v before any suspicion, with an Interval of %v; want it still up (the test would prove nothing)", st, idle)
		}
		m.SuspectDown()
		down := waitStatus(t, m, 10*time.Second, "upstream down after SuspectDown", func(st lag.Status) bool { return !st.UpstreamUp })
		if down.UpstreamError == "" || down.Role != lag.RoleUnknown {
			t.Errorf("got %+v, want an error and role unknown", down)
		}
		if err := c.Replica.Thaw(); err != nil {
			t.Fatal(err)
		}
		waitStatus(t, m, 10*time.Second, "upstream up again after Thaw", func(st lag.Status) bool { return st.UpstreamUp })
	})

	t.Run("a stopped replica is seen down once a session suspects it, and up again once it is back", func(t *testing.T) {
		quiet(t)
		before := m.Status()
		if err := c.Replica.Stop(); err != nil {
			t.Fatal(err)
		}
		if st := m.Status(); !st.UpstreamUp {
			t.Fatalf("got %+v before any suspicion, with an Interval of %v; want it still up (the test would prove nothing)", st, idle)
		}
		m.SuspectDown()
		waitStatus(t, m, 10*time.Second, "upstream down after SuspectDown", func(st lag.Status) bool { return !st.UpstreamUp })
		// While it is down, suspicions change nothing: it is probed anyway.
		for range 100 {
			m.SuspectDown()
		}
		if err := c.Replica.Start(); err != nil {
			t.Fatal(err)
		}
		started := time.Now()
		up := waitStatus(t, m, 10*time.Second, "upstream up again", func(st lag.Status) bool { return st.UpstreamUp })
		t.Logf("up again %v after Start returned", time.Since(started).Round(time.Millisecond))
		if up.Role != lag.RoleReplica || up.UpstreamError != "" || up.SystemID == 0 || up.SystemID != before.SystemID {
			t.Errorf("got %+v, want a replica, no error and the system id of before (%d)", up, before.SystemID)
		}
	})
}
