package lag_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
	"github.com/pgfly/pgfly/lag"
)

// fast polls quickly so tests see changes in milliseconds.
const fast = 20 * time.Millisecond

func TestNewRejectsBadConfig(t *testing.T) {
	good := monitorURL(cluster.Replica)
	for _, tt := range []struct {
		name string
		cfg  lag.Config
	}{
		{name: "no upstream", cfg: lag.Config{}},
		{name: "upstream not a URL", cfg: lag.Config{Upstream: "postgres://user:secret-pw@127.0.0.1:notaport/db"}},
		{name: "unknown sslmode", cfg: lag.Config{Upstream: good + "&sslmode=bogus"}},
		{name: "primary not a URL", cfg: lag.Config{Upstream: good, Primary: "postgres://user:secret-pw@127.0.0.1:notaport/db"}},
		{name: "negative interval", cfg: lag.Config{Upstream: good, Interval: -time.Second}},
		{name: "negative wait interval", cfg: lag.Config{Upstream: good, WaitInterval: -time.Millisecond}},
		{name: "negative down interval", cfg: lag.Config{Upstream: good, DownInterval: -time.Second}},
		{name: "negative query timeout", cfg: lag.Config{Upstream: good, QueryTimeout: -time.Second}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m, err := lag.New(tt.cfg, nil)
			if err == nil {
				m.Close()
				t.Fatalf("New(%+v) succeeded, want an error", tt.cfg)
			}
			if strings.Contains(err.Error(), "secret-pw") {
				t.Errorf("error %q shows the password", err)
			}
		})
	}
}

func TestUnreachableUpstream(t *testing.T) {
	// A port nobody listens on: New does not connect, the first poll fails.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	url := "postgres://" + pgcluster.RoleSCRAM.Name + ":" + pgcluster.RoleSCRAM.Password + "@" + addr + "/" + pgcluster.Database + "?sslmode=disable"
	m := startMonitor(t, lag.Config{Upstream: url, Interval: fast})

	st := m.Status()
	if st.UpstreamUp {
		t.Errorf("UpstreamUp = true, want false")
	}
	if st.UpstreamError == "" {
		t.Errorf("UpstreamError is empty, want the connection error")
	}
	if strings.Contains(st.UpstreamError, pgcluster.RoleSCRAM.Password) {
		t.Errorf("UpstreamError %q shows the password", st.UpstreamError)
	}
	if st.Role != lag.RoleUnknown || st.ReplayLSN != 0 || st.LagBytes != -1 || st.LagSeconds != -1 || st.CheckedAt.IsZero() {
		t.Errorf("got %+v, want role unknown, no LSN, lags -1 and a check time", st)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := m.WaitFor(ctx, 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitFor on a down upstream: got %v, want %v", err, context.DeadlineExceeded)
	}
	if _, err := m.PrimaryLSN(context.Background()); err == nil {
		t.Errorf("PrimaryLSN on a down upstream succeeded, want an error")
	}
}

func TestRole(t *testing.T) {
	for _, tt := range []struct {
		name   string
		server *pgcluster.Server
		want   lag.Status // the fields compared below
	}{
		{
			name:   "replica without primary",
			server: cluster.Replica,
			want:   lag.Status{Role: lag.RoleReplica, UpstreamUp: true, PrimaryUp: false, PrimaryLSN: 0, LagBytes: -1},
		},
		{
			name:   "primary",
			server: cluster.Primary,
			want:   lag.Status{Role: lag.RolePrimary, UpstreamUp: true, PrimaryUp: true, LagBytes: 0, LagSeconds: 0},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := startMonitor(t, lag.Config{Upstream: monitorURL(tt.server)})
			got := m.Status()
			if got.Role != tt.want.Role || got.UpstreamUp != tt.want.UpstreamUp || got.UpstreamError != "" ||
				got.PrimaryUp != tt.want.PrimaryUp || got.LagBytes != tt.want.LagBytes {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
			if got.ReplayLSN == 0 {
				t.Errorf("ReplayLSN = 0, want the server's position")
			}
			if got.CheckedAt.IsZero() {
				t.Errorf("CheckedAt is zero after Ready")
			}
			if tt.want.Role == lag.RolePrimary {
				if got.PrimaryLSN != got.ReplayLSN {
					t.Errorf("PrimaryLSN = %v, want ReplayLSN %v", got.PrimaryLSN, got.ReplayLSN)
				}
				if got.LagSeconds != 0 {
					t.Errorf("LagSeconds = %v, want 0", got.LagSeconds)
				}
			}
		})
	}
}

func TestLagBytesZeroOnceReplayed(t *testing.T) {
	m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary), Interval: fast})
	primary := connect(t, superuserURL(cluster.Primary), nil)
	write(t, primary)
	waitReplayed(t)
	target := queryLSN(t, primary, "SELECT pg_current_wal_lsn()::text")

	st := waitStatus(t, m, 10*time.Second, "lag 0 at the primary's position after the replica replayed it", func(st lag.Status) bool {
		return st.LagBytes == 0 && st.PrimaryLSN >= target && st.ReplayLSN >= target
	})
	if st.Role != lag.RoleReplica || !st.PrimaryUp || st.LagSeconds != 0 {
		t.Errorf("got %+v, want a replica, primary up, LagSeconds 0", st)
	}
}

func TestLagWhileReplayPaused(t *testing.T) {
	m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary), Interval: fast})
	primary := connect(t, superuserURL(cluster.Primary), map[string]string{"synchronous_commit": "on"})
	write(t, primary)
	waitReplayed(t) // so the replica has a replayed commit to time from

	pauseReplay(t)
	id := write(t, primary)
	target := queryLSN(t, primary, "SELECT pg_current_wal_lsn()::text")
	// A status may join a primary poll after the write with an upstream
	// poll from before the pause; wait for one that has seen both.
	paused := waitStatus(t, m, 10*time.Second, "replay paused, lag in bytes and seconds", func(st lag.Status) bool {
		return st.ReplayPaused && st.PrimaryLSN >= target && st.LagBytes > 0 && st.LagSeconds > 0
	})
	if paused.ReplayLSN >= target {
		t.Errorf("ReplayLSN = %v with replay paused, want below %v", paused.ReplayLSN, target)
	}
	if want := int64(paused.PrimaryLSN - paused.ReplayLSN); paused.LagBytes != want {
		t.Errorf("LagBytes = %d, want PrimaryLSN - ReplayLSN = %d", paused.LagBytes, want)
	}
	replica := connect(t, superuserURL(cluster.Replica), nil)
	if visible(t, replica, id) {
		t.Fatalf("row %d is visible on the replica with replay paused; the test cannot tell lag from no lag", id)
	}

	resumeReplay(t)
	caughtUp := waitStatus(t, m, 10*time.Second, "no lag after replay resumed", func(st lag.Status) bool {
		return st.ReplayLSN >= target && st.LagBytes == 0
	})
	if caughtUp.LagSeconds != 0 {
		t.Errorf("LagSeconds = %v after catching up, want 0", caughtUp.LagSeconds)
	}
	if caughtUp.ReplayPaused {
		t.Errorf("ReplayPaused = true after replay resumed, want false")
	}
}

func TestPrimaryLSN(t *testing.T) {
	t.Run("from the primary, covers a write just committed", func(t *testing.T) {
		// The cluster commits asynchronously (synchronous_commit=off), so
		// the commit record may not be written when PrimaryLSN asks.
		m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary), Interval: fast})
		primary := connect(t, superuserURL(cluster.Primary), nil)
		replica := connect(t, superuserURL(cluster.Replica), nil)
		for range 20 {
			id := write(t, primary)
			lsn, err := m.PrimaryLSN(context.Background())
			if err != nil {
				t.Fatalf("PrimaryLSN: %v", err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			err = m.WaitFor(ctx, lsn)
			cancel()
			if err != nil {
				t.Fatalf("WaitFor(%v): %v", lsn, err)
			}
			if !visible(t, replica, id) {
				t.Fatalf("row %d not visible on the replica after WaitFor(%v) returned", id, lsn)
			}
		}
	})
	t.Run("from the upstream when it is the primary", func(t *testing.T) {
		m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Primary)})
		primary := connect(t, superuserURL(cluster.Primary), map[string]string{"synchronous_commit": "on"})
		write(t, primary)
		written := queryLSN(t, primary, "SELECT pg_current_wal_lsn()::text")
		got, err := m.PrimaryLSN(context.Background())
		if err != nil {
			t.Fatalf("PrimaryLSN: %v", err)
		}
		if got < written {
			t.Errorf("PrimaryLSN = %v, want at least %v", got, written)
		}
	})
	t.Run("no primary", func(t *testing.T) {
		m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica)})
		if got, err := m.PrimaryLSN(context.Background()); !errors.Is(err, lag.ErrNoPrimary) {
			t.Errorf("PrimaryLSN = %v, %v; want %v", got, err, lag.ErrNoPrimary)
		}
	})
}

func TestWaitFor(t *testing.T) {
	m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary)})
	primary := connect(t, superuserURL(cluster.Primary), nil)

	t.Run("already replayed returns at once", func(t *testing.T) {
		replayed := m.Status().ReplayLSN
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // only an immediate answer can be nil
		if err := m.WaitFor(ctx, replayed); err != nil {
			t.Errorf("WaitFor(%v) with ReplayLSN %v: got %v, want nil", replayed, replayed, err)
		}
		if err := m.WaitFor(ctx, replayed+1<<40); !errors.Is(err, context.Canceled) {
			t.Errorf("WaitFor far ahead with a cancelled context: got %v, want %v", err, context.Canceled)
		}
	})

	t.Run("times out while replay is behind and returns once it catches up", func(t *testing.T) {
		release := holdReplay(t)
		id := write(t, primary)
		lsn, err := m.PrimaryLSN(context.Background())
		if err != nil {
			t.Fatalf("PrimaryLSN: %v", err)
		}

		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err = m.WaitFor(ctx, lsn)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("WaitFor(%v) with replay held back: got %v, want %v", lsn, err, context.DeadlineExceeded)
		}

		ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- m.WaitFor(ctx, lsn) }()
		time.Sleep(50 * time.Millisecond) // let it poll a few times with nothing to find
		select {
		case err := <-done:
			t.Fatalf("WaitFor(%v) returned %v before replay went on", lsn, err)
		default:
		}
		release()
		if err := <-done; err != nil {
			t.Fatalf("WaitFor(%v) after replay went on: got %v, want nil", lsn, err)
		}
		if st := m.Status(); st.ReplayLSN < lsn {
			t.Errorf("ReplayLSN = %v after WaitFor(%v) returned", st.ReplayLSN, lsn)
		}
		replica := connect(t, superuserURL(cluster.Replica), nil)
		if !visible(t, replica, id) {
			t.Errorf("row %d not visible on the replica after WaitFor returned", id)
		}
	})
}

// unreachableBound is how soon a WaitFor with a 5s deadline must answer
// ErrUnreachable in these tests: well before the deadline, generously (the
// rate rule needs a second of history, and tests do not assert speed).
const unreachableBound = 2500 * time.Millisecond

// waitUnreachable runs WaitFor(lsn) with a 5s deadline and fails the test
// unless it answers ErrUnreachable before the deadline.
func waitUnreachable(tb testing.TB, m *lag.Monitor, lsn lag.LSN) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	began := time.Now()
	err := m.WaitFor(ctx, lsn)
	took := time.Since(began)
	if !errors.Is(err, lag.ErrUnreachable) {
		tb.Fatalf("WaitFor(%v): got %v after %v, want %v", lsn, err, took, lag.ErrUnreachable)
	}
	if ctx.Err() != nil || took > unreachableBound {
		tb.Errorf("WaitFor(%v) answered %v after %v, want it well before the 5s deadline", lsn, err, took)
	}
	tb.Logf("WaitFor(%v) answered %v after %v", lsn, err, took.Round(10*time.Microsecond))
}

func TestWaitForReplayPaused(t *testing.T) {
	cfg := lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary), Interval: fast}
	m := startMonitor(t, cfg)
	primary := connect(t, superuserURL(cluster.Primary), nil)
	replica := connect(t, superuserURL(cluster.Replica), nil)
	t.Cleanup(func() { resumeReplay(t) }) // the pause spans the subtests

	var lsn lag.LSN
	var id int64
	if !t.Run("a pending waiter is woken when replay pauses", func(t *testing.T) {
		release := holdReplay(t) // behind but not paused: the waiter waits
		id = write(t, primary)
		var err error
		if lsn, err = m.PrimaryLSN(context.Background()); err != nil {
			t.Fatalf("PrimaryLSN: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- m.WaitFor(ctx, lsn) }()
		time.Sleep(100 * time.Millisecond)
		select {
		case err := <-done:
			t.Fatalf("WaitFor(%v) returned %v before replay paused", lsn, err)
		default:
		}
		pausedAt := time.Now()
		exec(t, replica, "SELECT pg_wal_replay_pause()")
		err = <-done
		took := time.Since(pausedAt)
		if !errors.Is(err, lag.ErrUnreachable) {
			t.Fatalf("WaitFor(%v) once replay paused: got %v after %v, want %v", lsn, err, took, lag.ErrUnreachable)
		}
		if ctx.Err() != nil || took > unreachableBound {
			t.Errorf("WaitFor(%v) answered %v %v after the pause, want it well before the 5s deadline", lsn, err, took)
		}
		if st := m.Status(); !st.ReplayPaused || st.ReplayLSN >= lsn {
			t.Errorf("got %+v, want ReplayPaused and ReplayLSN below %v", st, lsn)
		}
		release() // replay stays paused
	}) {
		return
	}

	t.Run("answers at once from the last poll", func(t *testing.T) {
		// An hour's interval: only waiters make this monitor poll.
		idleCfg := cfg
		idleCfg.Interval = time.Hour
		idle := startMonitor(t, idleCfg) // its first poll sees the pause
		if !idle.Status().ReplayPaused {
			t.Errorf("ReplayPaused = false after a poll with replay paused, want true")
		}
		polls := idle.Polls()
		waitUnreachable(t, idle, lsn)
		if got := idle.Polls(); got != polls {
			t.Errorf("Polls went from %d to %d, want the answer from the last poll", polls, got)
		}
	})

	t.Run("without a deadline too", func(t *testing.T) {
		if err := m.WaitFor(context.Background(), lsn); !errors.Is(err, lag.ErrUnreachable) {
			t.Errorf("WaitFor(%v) without a deadline while paused: got %v, want %v", lsn, err, lag.ErrUnreachable)
		}
	})

	t.Run("an LSN already replayed is no wait", func(t *testing.T) {
		replayed := m.Status().ReplayLSN
		if err := m.WaitFor(context.Background(), replayed); err != nil {
			t.Errorf("WaitFor(%v) with ReplayLSN %v while paused: got %v, want nil", replayed, replayed, err)
		}
	})

	t.Run("waits again once replay resumes", func(t *testing.T) {
		resumeReplay(t)
		waitStatus(t, m, 10*time.Second, "replay no longer paused", func(st lag.Status) bool { return !st.ReplayPaused })
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := m.WaitFor(ctx, lsn); err != nil {
			t.Fatalf("WaitFor(%v) after replay resumed: got %v, want nil", lsn, err)
		}
		if !visible(t, replica, id) {
			t.Errorf("row %d not visible on the replica after WaitFor returned", id)
		}
	})
}

func TestWaitForFarBehind(t *testing.T) {
	m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary)})
	primary := connect(t, superuserURL(cluster.Primary), nil)
	release := holdReplay(t) // no replay at all: a rate of 0 with WAL to replay

	t.Run("a small gap waits out the deadline", func(t *testing.T) {
		write(t, primary)
		lsn, err := m.PrimaryLSN(context.Background())
		if err != nil {
			t.Fatalf("PrimaryLSN: %v", err)
		}
		// Longer than the rate rule's window, so it has a rate to judge by.
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		defer cancel()
		if err := m.WaitFor(ctx, lsn); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("WaitFor(%v) a few bytes behind a stalled replay: got %v, want %v", lsn, err, context.DeadlineExceeded)
		}
	})

	var lsn lag.LSN
	if !t.Run("a large gap is unreachable before the deadline", func(t *testing.T) {
		lsn = writeWAL(t, primary, 32<<20)
		waitUnreachable(t, m, lsn) // from the last poll and the second before it
		if st := m.Status(); st.ReplayPaused {
			t.Errorf("ReplayPaused = true with replay only held back, want false")
		}
		// A monitor with no history yet waits until its polls have
		// measured a second of replay, then wakes the waiter.
		fresh := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary)})
		waitUnreachable(t, fresh, lsn)
	}) {
		return
	}

	t.Run("reachable once replay goes on", func(t *testing.T) {
		release()
		// Right after the release the last second's rate is still about 0,
		// so an early answer may be ErrUnreachable; it must turn into nil.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := m.WaitFor(ctx, lsn)
		for errors.Is(err, lag.ErrUnreachable) {
			time.Sleep(10 * time.Millisecond)
			err = m.WaitFor(ctx, lsn)
		}
		if err != nil {
			t.Fatalf("WaitFor(%v) after replay went on: got %v, want nil", lsn, err)
		}
	})

	t.Run("a primary upstream only waits", func(t *testing.T) {
		pm := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Primary)})
		far := pm.Status().ReplayLSN + 1<<40
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if err := pm.WaitFor(ctx, far); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("WaitFor(%v) on a primary: got %v, want %v", far, err, context.DeadlineExceeded)
		}
	})
}

func TestWaitForManyWaiters(t *testing.T) {
	const waiters = 100
	waitInterval := 20 * time.Millisecond // long enough that a query per waiter would stand out
	m := startMonitor(t, lag.Config{
		Upstream:     monitorURL(cluster.Replica),
		Primary:      monitorURL(cluster.Primary),
		WaitInterval: waitInterval,
	})
	primary := connect(t, superuserURL(cluster.Primary), nil)

	release := holdReplay(t)
	lsns := make([]lag.LSN, waiters)
	for i := range lsns {
		write(t, primary)
		lsn, err := m.PrimaryLSN(context.Background())
		if err != nil {
			t.Fatalf("PrimaryLSN: %v", err)
		}
		if i > 0 && lsn <= lsns[i-1] {
			t.Fatalf("LSN %d is %v, not after %v", i, lsn, lsns[i-1])
		}
		lsns[i] = lsn
	}
	if st := m.Status(); st.ReplayLSN >= lsns[0] {
		t.Fatalf("ReplayLSN %v already covers the first LSN %v with replay held back", st.ReplayLSN, lsns[0])
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pollsBefore := m.Polls()
	began := time.Now()
	var returned atomic.Int64
	errs := make([]error, waiters)
	var wg sync.WaitGroup
	for i, lsn := range lsns {
		wg.Go(func() {
			errs[i] = m.WaitFor(ctx, lsn)
			returned.Add(1)
		})
	}
	time.Sleep(100 * time.Millisecond)
	if n := returned.Load(); n != 0 {
		t.Fatalf("%d waiters returned before replay went on", n)
	}
	release()
	wg.Wait()
	elapsed := time.Since(began)
	polls := m.Polls() - pollsBefore

	for i, err := range errs {
		if err != nil {
			t.Errorf("waiter %d for %v: got %v, want nil", i, lsns[i], err)
		}
	}
	// One loop polls at most once per WaitInterval, however many wait.
	limit := uint64(elapsed/waitInterval) + 3
	t.Logf("%d waiters served by %d polls in %v", waiters, polls, elapsed.Round(time.Millisecond))
	if polls > limit {
		t.Errorf("%d polls while %d waiters waited %v, want at most %d (one per %v)", polls, waiters, elapsed, limit, waitInterval)
	}
}

func TestClose(t *testing.T) {
	m, err := lag.New(lag.Config{Upstream: monitorURL(cluster.Replica)}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	m.Start()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Ready(ctx); err != nil {
		t.Fatalf("Ready: %v", err)
	}
	pending := make(chan error, 1)
	go func() { pending <- m.WaitFor(ctx, m.Status().ReplayLSN+1<<40) }()
	time.Sleep(20 * time.Millisecond) // let it start waiting

	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-pending; !errors.Is(err, lag.ErrClosed) {
		t.Errorf("pending WaitFor: got %v, want %v", err, lag.ErrClosed)
	}
	if err := m.WaitFor(ctx, m.Status().ReplayLSN+1); !errors.Is(err, lag.ErrClosed) {
		t.Errorf("WaitFor after Close: got %v, want %v", err, lag.ErrClosed)
	}
	if _, err := m.PrimaryLSN(ctx); !errors.Is(err, lag.ErrClosed) {
		t.Errorf("PrimaryLSN after Close: got %v, want %v", err, lag.ErrClosed)
	}
	polls := m.Polls()
	time.Sleep(50 * time.Millisecond)
	if got := m.Polls(); got != polls {
		t.Errorf("Polls went from %d to %d after Close", polls, got)
	}
	if err := m.Close(); err != nil {
		t.Errorf("second Close: got %v, want nil", err)
	}

	unstarted, err := lag.New(lag.Config{Upstream: monitorURL(cluster.Replica)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := unstarted.Close(); err != nil {
		t.Fatalf("Close before Start: %v", err)
	}
	if err := unstarted.Ready(ctx); !errors.Is(err, lag.ErrClosed) {
		t.Errorf("Ready after Close: got %v, want %v", err, lag.ErrClosed)
	}
}

// TestServerDownAndBack stops and restarts servers, so it has a cluster of
// its own.
func TestServerDownAndBack(t *testing.T) {
	c := pgtest.Start(t, pgcluster.Options{})

	t.Run("upstream", func(t *testing.T) {
		core, logs := observer.New(zap.InfoLevel)
		log := zap.New(zapcore.NewTee(core, testLogger(t).Core()))
		m := startMonitorLog(t, lag.Config{
			Upstream:     monitorURL(c.Replica),
			Primary:      monitorURL(c.Primary),
			Interval:     fast,
			DownInterval: 200 * time.Millisecond,
		}, log)
		waitStatus(t, m, 10*time.Second, "upstream up", func(st lag.Status) bool { return st.UpstreamUp })

		if err := c.Replica.Stop(); err != nil {
			t.Fatal(err)
		}
		down := waitStatus(t, m, 10*time.Second, "upstream down", func(st lag.Status) bool { return !st.UpstreamUp })
		if down.UpstreamError == "" || down.Role != lag.RoleUnknown || down.ReplayLSN != 0 || down.LagBytes != -1 || down.LagSeconds != -1 {
			t.Errorf("got %+v, want an error, role unknown, no LSN, lags -1", down)
		}
		if !down.PrimaryUp {
			t.Errorf("PrimaryUp = false, want true: only the replica is down")
		}
		// Several failed polls, one warning.
		polls := m.Polls()
		waitStatus(t, m, 10*time.Second, "three more failed polls", func(lag.Status) bool { return m.Polls() >= polls+3 })
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := m.WaitFor(ctx, 1); !errors.Is(err, context.Canceled) {
			t.Errorf("WaitFor while the upstream is down: got %v, want %v", err, context.Canceled)
		}

		if err := c.Replica.Start(); err != nil {
			t.Fatal(err)
		}
		up := waitStatus(t, m, 15*time.Second, "upstream up again", func(st lag.Status) bool { return st.UpstreamUp })
		if up.Role != lag.RoleReplica || up.ReplayLSN == 0 || up.UpstreamError != "" {
			t.Errorf("got %+v, want a replica with a replay LSN and no error", up)
		}
		if n := logs.FilterMessage("upstream down").FilterLevelExact(zap.WarnLevel).Len(); n != 1 {
			t.Errorf("%d \"upstream down\" warnings, want 1", n)
		}
		if n := logs.FilterMessage("upstream up again").FilterLevelExact(zap.InfoLevel).Len(); n != 1 {
			t.Errorf("%d \"upstream up again\" lines, want 1", n)
		}
	})

	t.Run("primary restarted between two PrimaryLSN calls", func(t *testing.T) {
		// An hour's interval: only PrimaryLSN touches its connections.
		m := startMonitor(t, lag.Config{Upstream: monitorURL(c.Replica), Primary: monitorURL(c.Primary), Interval: time.Hour})
		before, err := m.PrimaryLSN(context.Background())
		if err != nil {
			t.Fatalf("PrimaryLSN: %v", err)
		}
		if err := c.Primary.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := c.Primary.Start(); err != nil {
			t.Fatal(err)
		}
		after, err := m.PrimaryLSN(context.Background())
		if err != nil {
			t.Fatalf("first PrimaryLSN after the primary restarted: %v", err)
		}
		if after < before {
			t.Errorf("PrimaryLSN went back from %v to %v", before, after)
		}
	})
}
