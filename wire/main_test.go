package wire_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

// cluster is one real primary and streaming replica (with TLS on) shared by every test in
// this package; tests must not stop its servers, and should use their own tables.
var cluster *pgcluster.Cluster

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	c, err := pgcluster.Start(ctx, pgcluster.Options{TLS: true})
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "wire tests need a real PostgreSQL cluster:", err)
		os.Exit(1)
	}
	cluster = c
	code := m.Run()
	if err := c.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "closing the test cluster:", err)
	}
	os.Exit(code)
}

// relay is a running wire.Server in front of one of the cluster's servers.
type relay struct {
	*wire.Server
	events *recorder
}

// startRelay starts a relay on 127.0.0.1:0 (or cfg's Listen) in front of upstream (a Postgres
// URL) and closes it when the test ends. cfg's Upstream is filled in. It logs to the test's output.
func startRelay(tb testing.TB, upstream string, cfg wire.Config) *relay {
	tb.Helper()
	return startRelayWithLog(tb, upstream, cfg, testLogger(tb))
}

// startRelayWithLog is startRelay with the caller's logger, for tests that read the logs.
func startRelayWithLog(tb testing.TB, upstream string, cfg wire.Config, log *zap.Logger) *relay {
	tb.Helper()
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	cfg.Upstream = upstream
	rec := &recorder{}
	srv, err := wire.NewServer(cfg, rec, log)
	if err != nil {
		tb.Fatalf("NewServer: %v", err)
	}
	if err := srv.Listen(); err != nil {
		tb.Fatalf("Listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve() }()
	tb.Cleanup(func() {
		if err := srv.Close(); err != nil {
			tb.Errorf("Close: %v", err)
		}
		if err := <-served; err != nil {
			tb.Errorf("Serve: %v", err)
		}
	})
	return &relay{Server: srv, events: rec}
}

// replicaRelay and primaryRelay front the cluster's servers without upstream TLS.
func replicaRelay(tb testing.TB) *relay {
	tb.Helper()
	return startRelay(tb, cluster.Replica.URL("", "", "", "sslmode=disable"), wire.Config{})
}

func primaryRelay(tb testing.TB) *relay {
	tb.Helper()
	return startRelay(tb, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{})
}

// url is a client URL for role through the relay.
func (r *relay) url(role pgcluster.Role, params ...string) string {
	if len(params) == 0 {
		params = []string{"sslmode=disable"}
	}
	return fmt.Sprintf("postgres://%s:%s@%s/%s?%s", role.Name, role.Password, r.Addr(), pgcluster.Database, join(params))
}

func join(params []string) string {
	s := ""
	for i, p := range params {
		if i > 0 {
			s += "&"
		}
		s += p
	}
	return s
}

// connect opens a pgx connection through the relay as the superuser and closes it at the end.
func (r *relay) connect(tb testing.TB, params ...string) *pgx.Conn {
	tb.Helper()
	return connectURL(tb, r.url(pgcluster.RoleSuperuser, params...))
}

// connectURL opens a pgx connection to url and closes it when the test ends.
func connectURL(tb testing.TB, url string) *pgx.Conn {
	tb.Helper()
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		tb.Fatalf("connect %s: %v", url, err)
	}
	return connectConfig(tb, cfg)
}

// connectConfig opens a pgx connection with cfg and closes it when the test ends.
func connectConfig(tb testing.TB, cfg *pgx.ConnConfig) *pgx.Conn {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		tb.Fatalf("connect %s: %v", cfg.ConnString(), err)
	}
	tb.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// connectErr connects to url expecting to be refused, and returns the error. If it
// connects, it fails the test with "<what>: got no error, want <want>".
func connectErr(tb testing.TB, url, what, want string) error {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err == nil {
		conn.Close(ctx)
		tb.Fatalf("%s: got no error, want %s", what, want)
	}
	return err
}

// testLogger logs to the test's output at debug level, so failures come with the relay's view.
func testLogger(tb testing.TB) *zap.Logger {
	if _, ok := tb.(*testing.B); ok {
		return zap.NewNop()
	}
	return zaptest.NewLogger(tb, zaptest.Level(zap.DebugLevel))
}

// recorder is a wire.Observer that keeps every event.
type recorder struct {
	mu         sync.Mutex
	opened     []wire.SessionInfo
	closed     []wire.SessionEnd
	violations []wire.ReadOnlyViolation
	writes     []wire.WriteCommitted
	failures   []wire.UpstreamFailure
	forwards   []wire.Forward
	// onReadOnly, when set, is called from ReadOnly, on the session's goroutine.
	onReadOnly func(wire.ReadOnlyViolation)
}

func (r *recorder) SessionOpened(s wire.SessionInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.opened = append(r.opened, s)
}

func (r *recorder) SessionClosed(s wire.SessionEnd) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = append(r.closed, s)
}

func (r *recorder) ReadOnly(v wire.ReadOnlyViolation) {
	r.mu.Lock()
	r.violations = append(r.violations, v)
	hook := r.onReadOnly
	r.mu.Unlock()
	if hook != nil {
		hook(v)
	}
}

func (r *recorder) UpstreamFailed(f wire.UpstreamFailure) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failures = append(r.failures, f)
}

func (r *recorder) Forwarded(f wire.Forward) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.forwards = append(r.forwards, f)
}

// Forwards returns a copy of the forwarding decisions seen so far.
func (r *recorder) Forwards() []wire.Forward {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]wire.Forward(nil), r.forwards...)
}

// Failures returns a copy of the upstream failures seen so far.
func (r *recorder) Failures() []wire.UpstreamFailure {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]wire.UpstreamFailure(nil), r.failures...)
}

func (r *recorder) WriteCommitted(w wire.WriteCommitted) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.writes = append(r.writes, w)
}

// Violations returns a copy of the read-only violations seen so far.
func (r *recorder) Violations() []wire.ReadOnlyViolation {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]wire.ReadOnlyViolation(nil), r.violations...)
}

// Writes returns a copy of the committed writes seen so far.
func (r *recorder) Writes() []wire.WriteCommitted {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]wire.WriteCommitted(nil), r.writes...)
}

// Closed returns a copy of the session ends seen so far.
func (r *recorder) Closed() []wire.SessionEnd {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]wire.SessionEnd(nil), r.closed...)
}

// waitFor polls cond every 10 ms until it holds or timeout passes, then fails the test.
func waitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Opened returns a copy of the sessions opened so far.
func (r *recorder) Opened() []wire.SessionInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]wire.SessionInfo(nil), r.opened...)
}

// execAsync runs sql on conn in a goroutine and returns the channel its error arrives on.
func execAsync(ctx context.Context, conn *pgx.Conn, sql string) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := conn.Exec(ctx, sql)
		done <- err
	}()
	return done
}
