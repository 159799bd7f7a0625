package lag_test

import (
	"context"
	"testing"
	"time"

	"github.com/pgfly/pgfly/lag"
)

// TestWaitForWakeLatency measures, and only logs, how soon WaitFor returns.
// It makes no timing assertion: the figures depend on the machine.
func TestWaitForWakeLatency(t *testing.T) {
	m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary)})
	t.Logf("WaitInterval %v", lag.DefaultWaitInterval)

	t.Run("after the replica replays", func(t *testing.T) {
		// Hold replay back (a paused replay would make WaitFor answer
		// ErrUnreachable), write, start a waiter, let replay go on and
		// watch the replica in a tight loop: the wake-up latency is roughly
		// when WaitFor returned minus when the loop first saw the LSN
		// replayed (negative when the monitor saw it first).
		const rounds = 20
		primary := connect(t, superuserURL(cluster.Primary), nil)
		replica := connect(t, superuserURL(cluster.Replica), nil)
		var lags []time.Duration
		for range rounds {
			release := holdReplay(t)
			write(t, primary)
			lsn, err := m.PrimaryLSN(context.Background())
			if err != nil {
				t.Fatalf("PrimaryLSN: %v", err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			returned := make(chan time.Time, 1)
			go func() {
				if err := m.WaitFor(ctx, lsn); err != nil {
					t.Errorf("WaitFor(%v): %v", lsn, err)
				}
				returned <- time.Now()
			}()
			release()
			var seen time.Time
			for seen.IsZero() && ctx.Err() == nil {
				var done bool
				if err := replica.QueryRow(ctx, "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)", lsn.String()).Scan(&done); err != nil {
					t.Fatalf("watch the replica: %v", err)
				}
				if done {
					seen = time.Now()
				}
			}
			lags = append(lags, (<-returned).Sub(seen))
			cancel()
		}
		t.Logf("WaitFor returned after the replica replayed: %s", percentiles(lags))
	})

	for _, tt := range []struct {
		name              string
		synchronousCommit string
	}{
		{name: "write to wake, synchronous commit", synchronousCommit: "on"},
		{name: "write to wake, asynchronous commit", synchronousCommit: "off"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// Replay running: write, ask the primary for its LSN, time
			// WaitFor. This includes shipping and replaying the WAL; with
			// asynchronous commit also the WAL writer's delay (10ms here).
			const writes = 50
			primary := connect(t, superuserURL(cluster.Primary), map[string]string{"synchronous_commit": tt.synchronousCommit})
			var took []time.Duration
			for range writes {
				write(t, primary)
				lsn, err := m.PrimaryLSN(context.Background())
				if err != nil {
					t.Fatalf("PrimaryLSN: %v", err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				began := time.Now()
				err = m.WaitFor(ctx, lsn)
				took = append(took, time.Since(began))
				cancel()
				if err != nil {
					t.Fatalf("WaitFor(%v): %v", lsn, err)
				}
			}
			t.Logf("WaitFor after a write: %s", percentiles(took))
		})
	}
}

// BenchmarkWaitFor times WaitFor for the primary's LSN right after a
// synchronous commit there, with replay running: shipping, replay and the
// monitor's wake-up. The write and PrimaryLSN are not timed.
func BenchmarkWaitFor(b *testing.B) {
	m := startMonitor(b, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary)})
	primary := connect(b, superuserURL(cluster.Primary), map[string]string{"synchronous_commit": "on"})
	ctx := context.Background()
	polls := m.Polls()
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		write(b, primary)
		lsn, err := m.PrimaryLSN(ctx)
		if err != nil {
			b.Fatalf("PrimaryLSN: %v", err)
		}
		b.StartTimer()
		if err := m.WaitFor(ctx, lsn); err != nil {
			b.Fatalf("WaitFor(%v): %v", lsn, err)
		}
	}
	b.ReportMetric(float64(m.Polls()-polls)/float64(b.N), "polls/op")
}
