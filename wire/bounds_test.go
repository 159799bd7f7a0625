package wire_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgfly/pgfly/internal/netns"
	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

// freeze stops (SIGSTOP) the postmaster of srv until the returned thaw is called, or the
// test ends. The kernel still accepts connections into its listen queue and acknowledges
// what clients send: a login then waits on a server that never answers. Running backends are
// separate processes and go on.
func freeze(tb testing.TB, srv *pgcluster.Server) (thaw func()) {
	tb.Helper()
	data, err := os.ReadFile(filepath.Join(srv.DataDir, "postmaster.pid"))
	if err != nil {
		tb.Fatalf("postmaster.pid: %v", err)
	}
	first, _, _ := strings.Cut(string(data), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil {
		tb.Fatalf("postmaster.pid: %v", err)
	}
	return stopProcess(tb, pid)
}

// stopProcess sends SIGSTOP to pid and returns the function that sends SIGCONT, which the
// test's cleanup calls too.
func stopProcess(tb testing.TB, pid int) (resume func()) {
	tb.Helper()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		tb.Fatalf("SIGSTOP %d: %v", pid, err)
	}
	resumed := false
	resume = func() {
		if !resumed {
			resumed = true
			syscall.Kill(pid, syscall.SIGCONT)
		}
	}
	tb.Cleanup(resume)
	return resume
}

// wantLoginTimeout connects to url and expects pgfly's FATAL 08006 naming upstream and
// "timeout" well within bound, which is far beyond the timeout under test.
func wantLoginTimeout(t *testing.T, url, upstream string, bound time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err == nil {
		conn.Close(ctx)
		t.Fatal("connect through a relay whose upstream is frozen: got a session, want FATAL 08006")
	}
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		t.Fatalf("connect: got %v, want pgfly's FATAL 08006 within %v", err, bound)
	}
	if pe.Severity != "FATAL" || pe.Code != "08006" || !strings.Contains(pe.Message, upstream) || !strings.Contains(pe.Message, "timeout") {
		t.Fatalf("connect: got %s %s %q, want FATAL 08006 naming %s and saying timeout", pe.Severity, pe.Code, pe.Message, upstream)
	}
}

func TestLoginTimeoutOnAFrozenUpstream(t *testing.T) {
	upstream := cluster.Replica.Addr()
	short := startRelay(t, cluster.Replica.URL("", "", "", "sslmode=disable"), wire.Config{ConnectTimeout: 500 * time.Millisecond})
	// The URL's connect_timeout wins over a ConnectTimeout that would outlast the test.
	byURL := startRelay(t, cluster.Replica.URL("", "", "", "sslmode=disable", "connect_timeout=1"), wire.Config{ConnectTimeout: time.Hour})

	thaw := freeze(t, cluster.Replica)
	t.Run("ConnectTimeout", func(t *testing.T) {
		wantLoginTimeout(t, short.url(pgcluster.RoleSCRAM), upstream, 30*time.Second)
	})
	t.Run("the URL's connect_timeout", func(t *testing.T) {
		wantLoginTimeout(t, byURL.url(pgcluster.RoleSCRAM), upstream, 30*time.Second)
	})
	thaw()
	login(t, short.url(pgcluster.RoleSCRAM), pgcluster.RoleSCRAM.Name)
	waitFor(t, 10*time.Second, "the timed-out sessions to be closed", func() bool {
		n := 0
		for _, e := range short.events.Closed() {
			if e.Reason == "upstream login timeout" {
				n++
			}
		}
		return n == 1 && short.OpenSessions() == 1
	})
	if got := short.Stats().ConnectErrors; got != 1 {
		t.Errorf("ConnectErrors: got %d, want 1 (the login timeout)", got)
	}
	wantFailures(t, short.events, wire.FailLoginTimeout, false)
}

// wantFailures checks that every upstream failure rec saw has cause and wrote, and that there
// was at least one.
func wantFailures(t *testing.T, rec *recorder, cause string, wrote bool) {
	t.Helper()
	got := rec.Failures()
	if len(got) == 0 {
		t.Fatalf("no upstream failure reported, want %q", cause)
	}
	for _, f := range got {
		if f.Cause != cause || f.Wrote != wrote || f.Code != "08006" || f.Time.IsZero() {
			t.Errorf("upstream failure: got %+v, want cause %q, wrote %v, code 08006", f, cause, wrote)
		}
	}
}

// slowPassword delays each password message ('p') the client sends by delay: a person typing.
type slowPassword struct {
	net.Conn
	delay time.Duration
}

func (c *slowPassword) Write(b []byte) (int, error) {
	if len(b) > 0 && b[0] == 'p' {
		time.Sleep(c.delay)
	}
	return c.Conn.Write(b)
}

func TestLoginTimeoutDoesNotCountTheClientsTurn(t *testing.T) {
	r := startRelay(t, cluster.Replica.URL("", "", "", "sslmode=disable"), wire.Config{ConnectTimeout: 200 * time.Millisecond})
	for _, role := range []pgcluster.Role{pgcluster.RolePassword, pgcluster.RoleSCRAM} {
		t.Run(role.Name, func(t *testing.T) {
			cfg, err := pgx.ParseConfig(r.url(role))
			if err != nil {
				t.Fatal(err)
			}
			var d net.Dialer
			cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := d.DialContext(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return &slowPassword{Conn: c, delay: time.Second}, nil
			}
			conn := connectConfig(t, cfg)
			var user string
			if err := conn.QueryRow(context.Background(), "select current_user").Scan(&user); err != nil || user != role.Name {
				t.Fatalf("select current_user: got %q, %v; want %q", user, err, role.Name)
			}
		})
	}
}

func TestNoTimeoutOnARunningQuery(t *testing.T) {
	r := startRelay(t, cluster.Replica.URL("", "", "", "sslmode=disable"), wire.Config{ConnectTimeout: 200 * time.Millisecond})
	conn := r.connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, "select pg_sleep(1)"); err != nil {
		t.Fatalf("a query five times as long as the connect timeout: %v", err)
	}
	// A backend that stops answering after login is a running query too.
	var pid int
	if err := conn.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	resume := stopProcess(t, pid)
	done := execAsync(ctx, conn, "select 1")
	time.Sleep(time.Second)
	resume()
	if err := <-done; err != nil {
		t.Fatalf("a query on a backend frozen for a second after login: %v", err)
	}
}

func TestMaxClientConn(t *testing.T) {
	r := startRelay(t, cluster.Replica.URL("", "", "", "sslmode=disable"), wire.Config{MaxClientConn: 2})
	a := r.connect(t)
	b := r.connect(t)
	err := connectErr(t, r.url(pgcluster.RoleSuperuser), "a third connection past MaxClientConn 2", "FATAL 53300")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "53300" || pe.Severity != "FATAL" {
		t.Fatalf("third connection: got %v, want FATAL 53300", err)
	}
	if got := r.Stats().Refused; got != 1 {
		t.Errorf("Refused: got %d, want 1", got)
	}

	// Cancel requests still pass: they are how a client stops its own running query.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	running := execAsync(ctx, a, "select pg_sleep(30)")
	waitFor(t, 10*time.Second, "the query to run", func() bool {
		var n int
		b.QueryRow(ctx, "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'").Scan(&n)
		return n == 1
	})
	if err := a.PgConn().CancelRequest(ctx); err != nil {
		t.Fatalf("cancel request at the limit: %v", err)
	}
	if err := <-running; err == nil || !strings.Contains(err.Error(), "57014") {
		t.Fatalf("cancelled query: got %v, want 57014", err)
	}

	b.Close(ctx)
	waitFor(t, 10*time.Second, "a slot to free", func() bool { return r.OpenSessions() == 1 })
	r.connect(t)
}

func TestTLSClientGetsTheFatalInsideTLS(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := ln.Addr().String()
	ln.Close()
	cert, _ := selfSignedCert(t)
	r := startRelay(t, "postgres://"+closedAddr+"/?sslmode=disable", wire.Config{TLS: &tls.Config{Certificates: []tls.Certificate{cert}}})
	err = connectErr(t, r.url(pgcluster.RoleSuperuser, "sslmode=require"), "connect over TLS with the upstream down", "FATAL 08006")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "08006" || !strings.Contains(pe.Message, closedAddr) {
		t.Fatalf("connect over TLS: got %v, want FATAL 08006 naming %s, read inside TLS", err, closedAddr)
	}
	wantFailures(t, r.events, wire.FailConnect, false)
}

func TestBlackHoledUpstreamFreesSessions(t *testing.T) {
	if err := netns.Available(); err != nil {
		t.Skip(err) // CI runs as root, where this never skips
	}
	link, err := netns.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { link.Close() })
	far, err := link.Forward(cluster.Replica.Addr())
	if err != nil {
		t.Fatal(err)
	}
	farPrimary, err := link.Forward(cluster.Primary.Addr())
	if err != nil {
		t.Fatal(err)
	}
	r := startRelay(t, "postgres://"+far+"/?sslmode=disable", wire.Config{TCPUserTimeout: 2 * time.Second})
	rw := startRelay(t, "postgres://"+farPrimary+"/?sslmode=disable", wire.Config{TCPUserTimeout: 2 * time.Second})
	idle := r.connect(t)
	busy := r.connect(t)
	writer := rw.connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := idle.Exec(ctx, "begin"); err != nil { // idle in a transaction block
		t.Fatal(err)
	}
	if _, err := writer.Exec(ctx, "create temporary table black_hole_wrote (x int)"); err != nil {
		t.Fatal(err)
	}

	if err := link.Cut(); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	// busy's query is sent into the black hole and never acknowledged; idle sends nothing,
	// so only keepalive probes notice.
	done := execAsync(ctx, busy, "select 1")
	waitFor(t, time.Minute, "the three sessions to end", func() bool { return r.OpenSessions()+rw.OpenSessions() == 0 })
	t.Logf("the sessions were freed %v after the cut (TCPUserTimeout 2s)", time.Since(cut).Round(100*time.Millisecond))
	if err := <-done; err == nil {
		t.Fatal("query into a black hole: got an answer, want pgfly's 08006 or a closed connection")
	}
	// The idle ones learn of it when they next speak, which is when the failure is reported:
	// the request that uses a pooled connection next is the one in flight then.
	if len(rw.events.Failures()) != 0 {
		t.Fatalf("failures of idle sessions reported before their clients spoke: %+v", rw.events.Failures())
	}
	for _, c := range []*pgx.Conn{idle, writer} {
		var pe *pgconn.PgError
		if _, err := c.Exec(ctx, "select 1"); !errors.As(err, &pe) || pe.Code != "08006" {
			t.Errorf("next query on an idle session whose upstream was lost: got %v, want pgfly's FATAL 08006", err)
		}
	}
	for _, e := range append(r.events.Closed(), rw.events.Closed()...) {
		if !strings.HasPrefix(e.Reason, "upstream connection lost") {
			t.Errorf("session %d ended with %q, want upstream connection lost", e.ID, e.Reason)
		}
	}
	// The relay knows the replica's sessions wrote nothing, and that the primary's did.
	wantFailures(t, r.events, wire.FailLost, false)
	wantFailures(t, rw.events, wire.FailLost, true)
	// Only a session inside a transaction block begun on the standby is known to have run
	// read-only (PostgreSQL 14 and later report in_hot_standby): the idle one in its block.
	// Outside a block the next statement may have run on a server promoted since.
	for _, f := range append(r.events.Failures(), rw.events.Failures()...) {
		want := ""
		if f.Code == "08006" && !f.Busy && !f.Wrote {
			want = "on" // the replica's idle session, in its block
		}
		if f.InHotStandby != want {
			t.Errorf("failure %+v: InHotStandby %q, want %q", f, f.InHotStandby, want)
		}
	}
}

func TestFenceStartsSessionsReadOnly(t *testing.T) {
	var fenced atomic.Bool
	r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{Fence: fenced.Load})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	table := fmt.Sprintf("fence_%d", time.Now().UnixNano())
	open := r.connect(t)
	if _, err := open.Exec(ctx, "create table "+table+" (x int)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { open.Exec(context.Background(), "drop table "+table) })

	fenced.Store(true)
	// The client asks for read-write itself: the fence wins.
	conn := r.connect(t, "sslmode=disable", "default_transaction_read_only=off", "application_name=fenced")
	_, err := conn.Exec(ctx, "insert into "+table+" values (1)")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "25006" {
		t.Fatalf("insert on a fenced session: got %v, want 25006", err)
	}
	if v := r.events.Violations(); len(v) != 1 || v[0].Code != "25006" {
		t.Fatalf("violations: got %+v, want the one 25006, reported like a standby's", v)
	}
	var app string
	if err := conn.QueryRow(ctx, "show application_name").Scan(&app); err != nil || app != "fenced" {
		t.Fatalf("the client's other parameters: application_name %q, %v; want fenced", app, err)
	}
	// Fenced ends the sessions opened before the fence, saying whether each wrote.
	third := r.connect(t) // opened while fenced, and ended too: Fenced does not tell them apart
	r.Fenced()
	waitFor(t, 10*time.Second, "the open sessions to end", func() bool { return r.OpenSessions() == 0 })
	for _, c := range []*pgx.Conn{open, conn, third} { // idle: each learns of it when it speaks
		if _, err := c.Exec(ctx, "insert into "+table+" values (2)"); !errors.As(err, &pe) || pe.Code != "57P01" {
			t.Fatalf("insert on a session ended by Fenced: got %v, want FATAL 57P01", err)
		}
	}
	wrote := map[bool]int{}
	for _, f := range r.events.Failures() {
		if f.Cause != wire.FailFenced || f.Code != "57P01" {
			t.Errorf("failure: got %+v, want cause fenced, 57P01", f)
		}
		wrote[f.Wrote]++
	}
	if wrote[true] != 1 || wrote[false] != 2 {
		t.Errorf("fenced sessions that wrote: got %v, want 1 (the one that created the table) and 2 that did not", wrote)
	}
	fenced.Store(false)
	if _, err := r.connect(t).Exec(ctx, "insert into "+table+" values (3)"); err != nil {
		t.Fatalf("insert once the fence is lifted: %v", err)
	}
}

// copyRows is COPY text input: n rows of a key and 200 bytes.
type copyRows struct {
	i, n int
	buf  []byte
}

func (r *copyRows) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.i >= r.n {
			return 0, io.EOF
		}
		r.i++
		r.buf = fmt.Appendf(nil, "%d\t%s\n", r.i, strings.Repeat("y", 200))
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

func TestALiveServerThatStopsReadingIsNotADeadLink(t *testing.T) {
	// A COPY that waits on a row lock stops the server reading: the link's window closes,
	// but the server's kernel answers every probe. That is a running query, not a dead link.
	r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{TCPUserTimeout: time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := primaryRelay(t).connect(t)
	table := fmt.Sprintf("copy_lock_%d", time.Now().UnixNano())
	if _, err := admin.Exec(ctx, "create table "+table+" (k int primary key, v text)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Exec(context.Background(), "drop table "+table) })
	tx, err := admin.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "insert into "+table+" values (1, 'x')"); err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(4 * time.Second); tx.Rollback(context.Background()) }()
	tag, err := r.connect(t).PgConn().CopyFrom(ctx, &copyRows{n: 200000}, "copy "+table+" from stdin")
	if err != nil || tag.RowsAffected() != 200000 {
		t.Fatalf("COPY that waited 4s on a lock, with TCPUserTimeout 1s: got %v, %v; want 200000 rows", tag, err)
	}
}

func TestAClientThatHangsUpIsNotAnUpstreamFailure(t *testing.T) {
	r := replicaRelay(t)
	for range 5 {
		c := r.connect(t)
		hj, err := c.PgConn().Hijack()
		if err != nil {
			t.Fatal(err)
		}
		b, _ := (&pgproto3.Query{String: "select repeat('x', 1000) from generate_series(1, 1000000)"}).Encode(nil)
		hj.Conn.Write(b)
		hj.Conn.Read(make([]byte, 1<<16)) // the rows are coming
		hj.Conn.Close()
	}
	waitFor(t, 30*time.Second, "the sessions to end", func() bool { return r.OpenSessions() == 0 })
	if f := r.events.Failures(); len(f) != 0 {
		t.Errorf("clients that hung up mid-result were reported as upstream failures: %+v", f)
	}
	for _, e := range r.events.Closed() {
		if !strings.HasPrefix(e.Reason, "client disconnected") {
			t.Errorf("session %d ended with %q, want client disconnected", e.ID, e.Reason)
		}
	}
}

func TestFencedWaitsForTheStatementInFlight(t *testing.T) {
	var fenced atomic.Bool
	r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{Fence: fenced.Load})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin := primaryRelay(t).connect(t)
	table := fmt.Sprintf("fence_busy_%d", time.Now().UnixNano())
	if _, err := admin.Exec(ctx, "create table "+table+" (x int)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Exec(context.Background(), "drop table "+table) })
	c := r.connect(t)
	done := execAsync(ctx, c, "insert into "+table+" select 1 from pg_sleep(1)")
	waitFor(t, 10*time.Second, "the insert to run", func() bool {
		var n int
		admin.QueryRow(ctx, "select count(*) from pg_stat_activity where query like 'insert into "+table+"%' and state = 'active'").Scan(&n)
		return n == 1
	})
	fenced.Store(true)
	r.Fenced()
	if err := <-done; err != nil {
		t.Fatalf("the insert running when Fenced came: got %v, want its answer", err)
	}
	var pe *pgconn.PgError
	if _, err := c.Exec(ctx, "select 1"); !errors.As(err, &pe) || pe.Code != "57P01" {
		t.Fatalf("the next statement: got %v, want FATAL 57P01", err)
	}
	if f := r.events.Failures(); len(f) != 1 || f[0].Cause != wire.FailFenced || !f[0].Wrote {
		t.Fatalf("failures: got %+v, want one fenced session that wrote", f)
	}
}

func TestAHeldFatalSurvivesAReset(t *testing.T) {
	// An idle session is told FATAL 57P01, held back from its client; the client's next query
	// reaches the backend before it exits, so the link ends with a reset, not a clean close.
	// The client still gets the FATAL, and the failure is reported.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		be := pgproto3.NewBackend(c, c)
		be.ReceiveStartupMessage()
		be.Send(&pgproto3.AuthenticationOk{})
		be.Send(&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}})
		be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		be.Flush()
		time.Sleep(200 * time.Millisecond)
		c.Write(errorResponse(false, "SFATAL", "C57P01", "Mterminating connection due to administrator command"))
		time.Sleep(500 * time.Millisecond) // the backend's exit; the query arrives meanwhile
		c.Close()                          // with unread data: a reset
	}()
	r := startRelay(t, fmt.Sprintf("postgres://%s/?sslmode=disable", ln.Addr()), wire.Config{})
	ctx := boundedCtx(t, 10*time.Second)
	conn, err := pgconn.Connect(ctx, fmt.Sprintf("postgres://app@%s/app?sslmode=disable", r.Addr()))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	time.Sleep(400 * time.Millisecond)
	_, err = conn.Exec(ctx, "select 1").ReadAll()
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P01" {
		t.Fatalf("the next query: got %v, want the held FATAL 57P01", err)
	}
	waitFor(t, 10*time.Second, "the failure report", func() bool { return len(r.events.Failures()) == 1 })
	if f := r.events.Failures()[0]; f.Cause != wire.FailShutdown || f.Code != "57P01" {
		t.Errorf("failure: got %+v, want the shutdown's 57P01", f)
	}
}
