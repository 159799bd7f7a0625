package lag_test

import (
	"context"
	"fmt"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/lag"
)

// cluster is one real primary and streaming replica shared by the tests in
// this package. Tests run one at a time; a test that pauses or holds back
// replay lets it go on in its Cleanup, and none stops a shared server
// (TestServerDownAndBack starts its own cluster for that).
var cluster *pgcluster.Cluster

// writesTable is the table tests write to on the shared cluster's primary.
const writesTable = "lag_writes"

// holdTable is the table holdReplay locks on both servers; nothing writes to
// it.
const holdTable = "lag_hold"

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	c, err := pgcluster.Start(ctx, pgcluster.Options{})
	if err == nil {
		err = createTables(ctx, c)
	}
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lag tests need a real PostgreSQL cluster:", err)
		if c != nil {
			c.Close()
		}
		os.Exit(1)
	}
	cluster = c
	code := m.Run()
	if err := c.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "closing the test cluster:", err)
	}
	os.Exit(code)
}

// createTables creates writesTable and holdTable on c's primary and waits
// until the replica has them.
func createTables(ctx context.Context, c *pgcluster.Cluster) error {
	conn, err := pgx.Connect(ctx, superuserURL(c.Primary))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	for _, sql := range []string{
		"CREATE TABLE " + writesTable + " (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())",
		"CREATE TABLE " + holdTable + " ()",
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			return err
		}
	}
	return c.WaitReplayed(ctx)
}

// monitorURL is the URL a Monitor uses for s: an ordinary role with a
// password, as in production, and any query parameters ("key=value").
func monitorURL(s *pgcluster.Server, params ...string) string {
	return s.URL(pgcluster.RoleSCRAM.Name, pgcluster.RoleSCRAM.Password, pgcluster.Database, params...)
}

// superuserURL is the URL the tests themselves use to write, pause replay and
// look at s.
func superuserURL(s *pgcluster.Server) string {
	return s.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database)
}

// connect opens a connection to url with extra run-time parameters and closes
// it when the test ends.
func connect(tb testing.TB, url string, params map[string]string) *pgx.Conn {
	tb.Helper()
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		tb.Fatalf("parse %s: %v", url, err)
	}
	for k, v := range params {
		cfg.RuntimeParams[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		tb.Fatalf("connect to %s: %v", url, err)
	}
	tb.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// testLogger logs the monitor's events to the test output.
func testLogger(tb testing.TB) *zap.Logger {
	return zaptest.NewLogger(tb, zaptest.Level(zap.InfoLevel)).Named("lag")
}

// startMonitor starts a Monitor with cfg, waits for its first polls and
// closes it when the test ends.
func startMonitor(tb testing.TB, cfg lag.Config) *lag.Monitor {
	tb.Helper()
	return startMonitorLog(tb, cfg, testLogger(tb))
}

// startMonitorLog is startMonitor with a given logger.
func startMonitorLog(tb testing.TB, cfg lag.Config, log *zap.Logger) *lag.Monitor {
	tb.Helper()
	m, err := lag.New(cfg, log)
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	tb.Cleanup(func() {
		if err := m.Close(); err != nil {
			tb.Errorf("Close: %v", err)
		}
	})
	m.Start()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Ready(ctx); err != nil {
		tb.Fatalf("Ready: %v", err)
	}
	return m
}

// waitStatus polls m.Status() until cond holds and returns that status; it
// fails the test with the last status after timeout.
func waitStatus(tb testing.TB, m *lag.Monitor, timeout time.Duration, what string, cond func(lag.Status) bool) lag.Status {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st := m.Status()
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: not true after %v; last status %+v", what, timeout, st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// write commits one row on the primary through conn and returns its id.
func write(tb testing.TB, conn *pgx.Conn) int64 {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var id int64
	if err := conn.QueryRow(ctx, "INSERT INTO "+writesTable+" DEFAULT VALUES RETURNING id").Scan(&id); err != nil {
		tb.Fatalf("write on the primary: %v", err)
	}
	return id
}

// visible reports whether the row with id is visible through conn.
func visible(tb testing.TB, conn *pgx.Conn, id int64) bool {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var ok bool
	if err := conn.QueryRow(ctx, "SELECT exists (SELECT FROM "+writesTable+" WHERE id = $1)", id).Scan(&ok); err != nil {
		tb.Fatalf("look for row %d: %v", id, err)
	}
	return ok
}

// queryLSN runs a query returning one pg_lsn (as text) on conn.
func queryLSN(tb testing.TB, conn *pgx.Conn, sql string) lag.LSN {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var text string
	if err := conn.QueryRow(ctx, sql).Scan(&text); err != nil {
		tb.Fatalf("%s: %v", sql, err)
	}
	lsn, err := lag.ParseLSN(text)
	if err != nil {
		tb.Fatal(err)
	}
	return lsn
}

// waitReplayed waits until the shared replica has replayed everything the
// primary committed so far.
func waitReplayed(tb testing.TB) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := cluster.WaitReplayed(ctx); err != nil {
		tb.Fatal(err)
	}
}

// pauseReplay pauses WAL replay on the shared replica and resumes it when the
// test ends; resumeReplay resumes it earlier. WAL that arrives after the call
// is received but not replayed.
func pauseReplay(tb testing.TB) {
	tb.Helper()
	replica := connect(tb, superuserURL(cluster.Replica), nil)
	exec(tb, replica, "SELECT pg_wal_replay_pause()")
	tb.Cleanup(func() { resumeReplay(tb) })
}

// resumeReplay resumes WAL replay on the shared replica.
func resumeReplay(tb testing.TB) {
	tb.Helper()
	replica := connect(tb, superuserURL(cluster.Replica), nil)
	exec(tb, replica, "SELECT pg_wal_replay_resume()")
}

// holdReplay holds back WAL replay on the shared replica without pausing it,
// as a replica that is merely behind: a transaction on the replica holds a
// lock on holdTable and the primary then locks it exclusively, so replay
// waits at that lock (a replay conflict) until the returned release is
// called, or the test ends, or the replica's max_standby_streaming_delay
// (30s) cancels the holder. WAL written after the call is received but not
// replayed, and Status().ReplayPaused stays false. release may be called
// more than once.
func holdReplay(tb testing.TB) (release func()) {
	tb.Helper()
	replica := connect(tb, superuserURL(cluster.Replica), nil)
	exec(tb, replica, "BEGIN")
	exec(tb, replica, "LOCK TABLE "+holdTable+" IN ACCESS SHARE MODE")
	primary := connect(tb, superuserURL(cluster.Primary), nil)
	exec(tb, primary, "BEGIN; LOCK TABLE "+holdTable+" IN ACCESS EXCLUSIVE MODE; COMMIT")
	var once sync.Once
	release = func() { once.Do(func() { exec(tb, replica, "COMMIT") }) }
	tb.Cleanup(release)
	return release
}

// writeWAL makes the primary write about n bytes of WAL through conn (a
// logical decoding message, which needs no table and is a no-op to replay)
// and returns the primary's insert position after it.
func writeWAL(tb testing.TB, conn *pgx.Conn, n int) lag.LSN {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, "SELECT pg_logical_emit_message(false, 'pgfly-lag-test', repeat('x', $1))", n); err != nil {
		tb.Fatalf("write %d bytes of WAL: %v", n, err)
	}
	return queryLSN(tb, conn, "SELECT pg_current_wal_insert_lsn()::text")
}

// exec runs a statement on conn.
func exec(tb testing.TB, conn *pgx.Conn, sql string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, sql); err != nil {
		tb.Fatalf("%s: %v", sql, err)
	}
}

// percentiles formats the 50th and 99th percentiles and the maximum of ds.
func percentiles(ds []time.Duration) string {
	if len(ds) == 0 {
		return "no samples"
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	at := func(q float64) time.Duration { return s[int(q*float64(len(s)-1)+0.5)] }
	return fmt.Sprintf("p50 %v, p99 %v, max %v (n=%d)", at(0.50), at(0.99), s[len(s)-1], len(s))
}
