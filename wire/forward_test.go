package wire_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

// forwardingRelay fronts the replica and forwards to the primary, whose URL carries role's
// password (the common case on Fly: one DATABASE_URL).
func forwardingRelay(tb testing.TB, role pgcluster.Role, cfg wire.Config) *relay {
	tb.Helper()
	cfg.Primary = cluster.Primary.URL(role.Name, role.Password, pgcluster.Database, "sslmode=disable")
	return startRelay(tb, cluster.Replica.URL("", "", "", "sslmode=disable"), cfg)
}

// forwardTable creates a table on the primary, waits for the replica to have it, and drops it
// when the test ends.
func forwardTable(tb testing.TB, name, columns string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := connectURL(tb, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	if _, err := p.Exec(ctx, fmt.Sprintf("DROP TABLE IF EXISTS %s; CREATE TABLE %s (%s); GRANT ALL ON %s TO PUBLIC", name, name, columns, name)); err != nil {
		tb.Fatal(err)
	}
	if err := cluster.WaitReplayed(ctx); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		p := connectURL(tb, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
		p.Exec(context.Background(), "DROP TABLE IF EXISTS "+name)
	})
}

// onPrimary counts rows on the primary itself.
func onPrimary(tb testing.TB, sql string, args ...any) int {
	tb.Helper()
	p := connectURL(tb, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	var n int
	if err := p.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		tb.Fatalf("%s: %v", sql, err)
	}
	return n
}

func outcomes(fs []wire.Forward) []string {
	var out []string
	for _, f := range fs {
		out = append(out, f.Outcome)
	}
	return out
}

// moves are the forward events but the moves back to the replica.
func moves(fs []wire.Forward) []wire.Forward {
	var out []wire.Forward
	for _, f := range fs {
		if f.Outcome != wire.ForwardBack {
			out = append(out, f)
		}
	}
	return out
}

// backOnReplica runs a read on c until it answers from the replica: the session has moved
// back. It fails the test after 30 seconds.
func backOnReplica(t *testing.T, c *pgx.Conn) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var recovery bool
		if err := c.QueryRow(context.Background(), "SELECT pg_is_in_recovery()").Scan(&recovery); err != nil {
			t.Fatal(err)
		}
		if recovery {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the session is still on the primary 30s after its write, want it back on the replica")
		}
	}
}

// An autocommit write through a replica-region relay runs once on the primary, in every
// protocol mode pgx has, and the session then sees it wherever it runs: its named prepared
// statements, prepared on the replica before the move, still work; and once the replica has
// the write, the session is back there with its settings.
func TestForwardAutocommitWrite(t *testing.T) {
	forwardTable(t, "fwd_auto", "id int PRIMARY KEY, mode text")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	for i, mode := range []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeExec, pgx.QueryExecModeSimpleProtocol} {
		t.Run(mode.String(), func(t *testing.T) {
			cfg, _ := pgx.ParseConfig(r.url(pgcluster.RoleSCRAM))
			cfg.DefaultQueryExecMode = mode
			c := connectConfig(t, cfg)
			if _, err := c.Exec(ctx, "SET application_name = 'forward-test'"); err != nil {
				t.Fatal(err)
			}
			var before int
			if err := c.QueryRow(ctx, "SELECT count(*) FROM fwd_auto WHERE id = $1", i).Scan(&before); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Prepare(ctx, "named_read", "SELECT count(*) FROM fwd_auto WHERE mode = $1"); err != nil {
				t.Fatal(err)
			}
			tag, err := c.Exec(ctx, "INSERT INTO fwd_auto VALUES ($1, $2)", i, mode.String())
			if err != nil {
				t.Fatalf("insert through the forwarding relay: %v", err)
			}
			if tag.RowsAffected() != 1 {
				t.Fatalf("insert: %s", tag)
			}
			if n := onPrimary(t, "SELECT count(*) FROM fwd_auto WHERE id = $1", i); n != 1 {
				t.Fatalf("the primary has %d rows with id %d, want exactly 1", n, i)
			}
			// On the primary, or back on the replica that has replayed it: its own write is
			// visible at once, through the statement prepared on the replica.
			var n int
			if err := c.QueryRow(ctx, "named_read", mode.String()).Scan(&n); err != nil || n != 1 {
				t.Fatalf("the prepared statement after the move: %d rows, %v; want 1", n, err)
			}
			backOnReplica(t, c)
			var app string
			if err := c.QueryRow(ctx, "SELECT current_setting('application_name')").Scan(&app); err != nil || app != "forward-test" {
				t.Fatalf("back on the replica: application_name %q, %v; want forward-test", app, err)
			}
			if err := c.QueryRow(ctx, "named_read", mode.String()).Scan(&n); err != nil || n != 1 {
				t.Fatalf("the prepared statement back on the replica: %d rows, %v; want 1", n, err)
			}
		})
	}
	if got := outcomes(r.events.Forwards()); strings.Join(got, ",") != "moved,back,moved,back,moved,back" {
		t.Errorf("forward outcomes %v, want three moves, each followed by a move back", got)
	}
	if v := r.events.Violations(); len(v) != 0 {
		t.Errorf("a forwarding relay reported %d read-only violations; it has no HTTP request to replay", len(v))
	}
}

// pgx's describe-exec mode prepares the unnamed statement in one request (Parse, Describe,
// Sync) and runs it in the next (Bind, Execute, Sync), and pgfly's own requests between the
// two (a move's, a move back's) drop or replace it: it is prepared again on the backend the
// session goes on with. A write refused on the replica runs once on the primary; a write
// after a move back that carried a setting (with pgfly's own set_config statement) runs
// itself, not that statement.
func TestForwardUnnamedStatement(t *testing.T) {
	forwardTable(t, "fwd_unnamed", "k text, v text")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	cfg, _ := pgx.ParseConfig(r.url(pgcluster.RoleSCRAM))
	cfg.DefaultQueryExecMode = pgx.QueryExecModeDescribeExec
	c := connectConfig(t, cfg)
	resume := pauseReplay(t) // the session stays on the primary, and sets something there
	if _, err := c.Exec(ctx, "INSERT INTO fwd_unnamed VALUES ($1, $2)", "refused", "v"); err != nil {
		t.Fatalf("a describe-exec write refused on the replica: %v", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_unnamed WHERE k = 'refused'"); n != 1 {
		t.Fatalf("the primary has %d rows of the refused write, want 1", n)
	}
	if _, err := c.Exec(ctx, "SET application_name = 'fwd-unnamed'", pgx.QueryExecModeSimpleProtocol); err != nil {
		t.Fatal(err)
	}
	var n int
	for i := range 2 { // each read is a move back tried and given up: the replica is behind
		time.Sleep(1100 * time.Millisecond) // past the recheck
		if err := c.QueryRow(ctx, "SELECT count(*) FROM fwd_unnamed WHERE k = $1", "refused").Scan(&n); err != nil || n != 1 {
			t.Fatalf("describe-exec read %d on the primary: %d, %v; want 1", i, n, err)
		}
	}
	resume()
	time.Sleep(1200 * time.Millisecond) // past the recheck: the next idle point moves back
	for i := range 3 {
		k := fmt.Sprintf("after-%d", i)
		tag, err := c.Exec(ctx, "INSERT INTO fwd_unnamed VALUES ($1, $2)", k, "v")
		if err != nil || tag.String() != "INSERT 0 1" {
			t.Fatalf("write %d: %q, %v; want INSERT 0 1", i, tag, err)
		}
		if n := onPrimary(t, "SELECT count(*) FROM fwd_unnamed WHERE k = $1", k); n != 1 {
			t.Fatalf("write %d answered %q, and the primary has %d rows of it, want 1", i, tag, n)
		}
		backOnReplica(t, c)
	}
	var app string
	if err := c.QueryRow(ctx, "SELECT current_setting('application_name')").Scan(&app); err != nil || app != "fwd-unnamed" {
		t.Fatalf("back on the replica: application_name %q, %v; want fwd-unnamed", app, err)
	}
	if got := outcomes(r.events.Forwards()); !slices.Contains(got, "back") {
		t.Errorf("forward outcomes %v: the session never moved back, and the test tested nothing of it", got)
	}
}

// A session's primary backend, kept idle while it is back on the replica, ends (a restart,
// idle_session_timeout, pg_terminate_backend): its next write gets another one.
func TestForwardKeptPrimaryBackendEnded(t *testing.T) {
	forwardTable(t, "fwd_kept", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	cfg, _ := pgx.ParseConfig(r.url(pgcluster.RoleSCRAM))
	cfg.RuntimeParams["application_name"] = "fwd-kept"
	cfg.DefaultQueryExecMode = pgx.QueryExecModeExec // nothing to carry: the kept backend would not be asked anything
	c := connectConfig(t, cfg)
	if _, err := c.Exec(ctx, "INSERT INTO fwd_kept VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	backOnReplica(t, c)
	if n := onPrimary(t, "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'fwd-kept'"); n != 1 {
		t.Fatalf("terminated %d primary backends, want the session's 1", n)
	}
	for deadline := time.Now().Add(30 * time.Second); onPrimary(t, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fwd-kept'") != 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the terminated backend is still there after 30s")
		}
	}
	if _, err := c.Exec(ctx, "INSERT INTO fwd_kept VALUES (2)"); err != nil {
		t.Fatalf("a write after the kept primary backend ended: %v", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_kept"); n != 2 {
		t.Fatalf("the primary has %d rows, want 2", n)
	}
	if n := r.ForwardedSessions(); n != 1 {
		t.Errorf("%d forwarded sessions counted, want 1", n)
	}
}

// A transaction that read, then writes: re-run on the primary and, its reads being the same
// there, carried on transparently and committed once.
func TestForwardTransaction(t *testing.T) {
	forwardTable(t, "fwd_tx", "id int PRIMARY KEY, note text")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		var n int
		if err := tx.QueryRow(ctx, "SELECT count(*) FROM fwd_tx").Scan(&n); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO fwd_tx VALUES (1, $1)", fmt.Sprint(n)); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "INSERT INTO fwd_tx VALUES (2, 'second')")
		return err
	})
	if err != nil {
		t.Fatalf("transaction through the forwarding relay: %v", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_tx"); n != 2 {
		t.Fatalf("the primary has %d rows, want 2", n)
	}
	if got := outcomes(moves(r.events.Forwards())); strings.Join(got, ",") != "moved" {
		t.Errorf("forward outcomes %v, want one move", got)
	}
}

// A moved session stays on the primary while the replica lacks its write, and goes back once
// the replica has it, taking what it set up on the primary along: a setting, a prepared
// statement. Its next write moves it again, to the primary backend it had.
func TestForwardMovesBack(t *testing.T) {
	forwardTable(t, "fwd_back", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	resume := pauseReplay(t)
	if _, err := c.Exec(ctx, "INSERT INTO fwd_back VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	var recovery bool
	if err := c.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&recovery); err != nil || recovery {
		t.Fatalf("with the replica's replay paused after the write: in recovery %v, %v; want the session on the primary", recovery, err)
	}
	if _, err := c.Exec(ctx, "SET application_name = 'fwd-moved-back'"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Prepare(ctx, "fwd_back_count", "SELECT count(*) FROM fwd_back"); err != nil {
		t.Fatal(err)
	}
	primaryBackend := func() []int {
		p := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
		rows, err := p.Query(ctx, "SELECT pid FROM pg_stat_activity WHERE application_name = 'fwd-moved-back'")
		if err != nil {
			t.Fatal(err)
		}
		pids, err := pgx.CollectRows(rows, pgx.RowTo[int])
		if err != nil {
			t.Fatal(err)
		}
		return pids
	}
	before := primaryBackend()
	if len(before) != 1 {
		t.Fatalf("the primary has backends %v for the session, want one", before)
	}
	resume()
	backOnReplica(t, c)
	var app string
	if err := c.QueryRow(ctx, "SELECT current_setting('application_name')").Scan(&app); err != nil || app != "fwd-moved-back" {
		t.Fatalf("back on the replica: application_name %q, %v; want the one set on the primary", app, err)
	}
	var n int
	if err := c.QueryRow(ctx, "fwd_back_count").Scan(&n); err != nil || n != 1 {
		t.Fatalf("back on the replica, the statement prepared on the primary: %d rows, %v; want 1", n, err)
	}
	if _, err := c.Exec(ctx, "INSERT INTO fwd_back VALUES (2)"); err != nil {
		t.Fatal(err)
	}
	if after := primaryBackend(); len(after) != 1 || after[0] != before[0] {
		t.Fatalf("after the second write the primary has backends %v for the session, want the first one, %v", after, before)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_back"); n != 2 {
		t.Fatalf("the primary has %d rows, want 2", n)
	}
	if got := outcomes(r.events.Forwards()); len(got) < 3 || strings.Join(got[:3], ",") != "moved,back,moved" {
		t.Fatalf("forward outcomes %v, want a move, a move back and a move", got)
	}
	if r.ForwardedSessions() != 1 {
		t.Fatalf("ForwardedSessions = %d, want 1: the session's primary backend", r.ForwardedSessions())
	}
}

// A session lives on either server, and idles on the other, longer than pgfly's own bound on
// an exchange with them (connect_timeout, here 1s): none of those bounds outlives its exchange.
func TestForwardOutlivesItsExchanges(t *testing.T) {
	forwardTable(t, "fwd_long", "id int")
	role := pgcluster.RoleSCRAM
	r := startRelay(t, cluster.Replica.URL("", "", "", "sslmode=disable", "connect_timeout=1"), wire.Config{
		Primary: cluster.Primary.URL(role.Name, role.Password, pgcluster.Database, "sslmode=disable", "connect_timeout=1")})
	ctx := context.Background()
	c := connectURL(t, r.url(role))
	resume := pauseReplay(t)
	if _, err := c.Exec(ctx, "INSERT INTO fwd_long VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	var recovery bool
	if err := c.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&recovery); err != nil || recovery {
		t.Fatalf("on the primary after 1.5s: in recovery %v, %v; want the session there and well", recovery, err)
	}
	resume()
	backOnReplica(t, c)
	time.Sleep(1500 * time.Millisecond)
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM fwd_long").Scan(&n); err != nil || n != 1 {
		t.Fatalf("on the replica after 1.5s: %d rows, %v; want 1", n, err)
	}
	if _, err := c.Exec(ctx, "INSERT INTO fwd_long VALUES (2)"); err != nil {
		t.Fatalf("a write through the primary backend kept idle for 1.5s: %v", err)
	}
	if got := outcomes(r.events.Forwards()); len(got) < 3 || strings.Join(got[:3], ",") != "moved,back,moved" {
		t.Fatalf("forward outcomes %v, want a move, a move back and a move", got)
	}
}

// A session as a user the primary URL has no password for gets the standby's own refusal,
// and the relay's other sessions carry on.
func TestForwardWithoutCredentials(t *testing.T) {
	forwardTable(t, "fwd_creds", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleMD5))
	_, err := c.Exec(ctx, "INSERT INTO fwd_creds VALUES (1)")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "25006" {
		t.Fatalf("insert as a user pgfly cannot log in to the primary as: %v, want the standby's 25006", err)
	}
	var one int
	if err := c.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		t.Fatalf("the session after the refusal: %v", err)
	}
	ok := connectURL(t, r.url(pgcluster.RoleSCRAM))
	if _, err := ok.Exec(ctx, "INSERT INTO fwd_creds VALUES (2)"); err != nil {
		t.Fatalf("another user's write: %v", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_creds"); n != 1 {
		t.Fatalf("the primary has %d rows, want 1", n)
	}
	got := moves(r.events.Forwards())
	if len(got) != 2 || got[0].Outcome != wire.ForwardRefused || !strings.Contains(got[0].Reason, "log in") {
		t.Fatalf("forward events %+v, want a refusal naming the login, then a move", got)
	}
}

// pauseReplay pauses the replica's replay until resume is called or the test ends.
func pauseReplay(tb testing.TB) (resume func()) {
	tb.Helper()
	rep := connectURL(tb, cluster.Replica.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	if _, err := rep.Exec(context.Background(), "SELECT pg_wal_replay_pause()"); err != nil {
		tb.Fatal(err)
	}
	var once sync.Once
	resume = func() {
		once.Do(func() {
			if _, err := rep.Exec(context.Background(), "SELECT pg_wal_replay_resume()"); err != nil {
				tb.Errorf("resume replay: %v", err)
			}
		})
	}
	tb.Cleanup(resume)
	return resume
}

func sqlstate(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// A transaction whose earlier read is stale on the replica (replay paused, the row changed
// on the primary) must not commit on the primary: the client gets 40001 and nothing changes;
// its retry runs on the primary, sees the new row, and commits once.
func TestForwardStaleTransactionIs40001(t *testing.T) {
	forwardTable(t, "fwd_stale", "id int PRIMARY KEY, balance int")
	p := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	ctx := context.Background()
	if _, err := p.Exec(ctx, "INSERT INTO fwd_stale VALUES (1, 100)"); err != nil {
		t.Fatal(err)
	}
	if err := cluster.WaitReplayed(ctx); err != nil {
		t.Fatal(err)
	}
	pauseReplay(t)
	if _, err := p.Exec(ctx, "UPDATE fwd_stale SET balance = 50"); err != nil {
		t.Fatal(err)
	}
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	transfer := func(tx pgx.Tx) error {
		var balance int
		if err := tx.QueryRow(ctx, "SELECT balance FROM fwd_stale WHERE id = 1").Scan(&balance); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "INSERT INTO fwd_stale VALUES (2, $1)", balance)
		return err
	}
	err := pgx.BeginFunc(ctx, c, transfer)
	if sqlstate(err) != "40001" {
		t.Fatalf("a transaction whose read is stale: %v, want 40001", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_stale WHERE id = 2"); n != 0 {
		t.Fatalf("the stale transaction wrote %d rows on the primary", n)
	}
	if err := pgx.BeginFunc(ctx, c, transfer); err != nil {
		t.Fatalf("the retry: %v", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_stale WHERE id = 2 AND balance = 50"); n != 1 {
		t.Fatalf("the retry wrote %d rows with the primary's balance, want 1", n)
	}
	got := moves(r.events.Forwards())
	if len(got) != 1 || got[0].Outcome != wire.ForwardRetry || !strings.Contains(got[0].Reason, "different results") {
		t.Fatalf("forward events %+v, want one 40001 naming the different results", got)
	}
}

// LISTEN is refused on a standby: the session moves, and hears a NOTIFY sent on the primary.
func TestForwardListen(t *testing.T) {
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	if _, err := c.Exec(ctx, "LISTEN fwd_channel"); err != nil {
		t.Fatalf("LISTEN through the forwarding relay: %v", err)
	}
	p := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	if _, err := p.Exec(ctx, "NOTIFY fwd_channel, 'hello'"); err != nil {
		t.Fatal(err)
	}
	n, err := c.WaitForNotification(ctx)
	if err != nil || n.Channel != "fwd_channel" || n.Payload != "hello" {
		t.Fatalf("notification: %+v, %v", n, err)
	}
}

// A session holding what cannot move (a cursor WITH HOLD) gets the standby's own refusal,
// and keeps its cursor.
func TestForwardKeepsWhatCannotMove(t *testing.T) {
	forwardTable(t, "fwd_hold", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	if _, err := c.Exec(ctx, "DECLARE fwd_cursor CURSOR WITH HOLD FOR SELECT 42"); err != nil {
		t.Fatal(err)
	}
	_, err := c.Exec(ctx, "INSERT INTO fwd_hold VALUES (1)")
	if sqlstate(err) != "25006" {
		t.Fatalf("insert with a cursor WITH HOLD open: %v, want the standby's 25006", err)
	}
	var v int
	if err := c.QueryRow(ctx, "FETCH fwd_cursor").Scan(&v); err != nil || v != 42 {
		t.Fatalf("the cursor after the refusal: %d, %v", v, err)
	}
	got := r.events.Forwards()
	if len(got) != 1 || got[0].Outcome != wire.ForwardRefused || !strings.Contains(got[0].Reason, "WITH HOLD") {
		t.Fatalf("forward events %+v, want a refusal naming the cursor", got)
	}
}

// Past MaxForwarded sessions on the primary, a refused write is answered 53300, clearly, and
// the sessions already there are unharmed; a session back on the replica gives up its idle
// primary backend to another session's write.
func TestForwardLimit(t *testing.T) {
	forwardTable(t, "fwd_limit", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{MaxForwarded: 1})
	ctx := context.Background()
	first := connectURL(t, r.url(pgcluster.RoleSCRAM))
	resume := pauseReplay(t) // the first session stays on the primary
	if _, err := first.Exec(ctx, "INSERT INTO fwd_limit VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	second := connectURL(t, r.url(pgcluster.RoleSCRAM))
	_, err := second.Exec(ctx, "INSERT INTO fwd_limit VALUES (2)")
	if sqlstate(err) != "53300" || !strings.Contains(err.Error(), "--max-forwarded-sessions") {
		t.Fatalf("a second forwarded session past the limit: %v, want 53300 naming the flag", err)
	}
	if _, err := first.Exec(ctx, "INSERT INTO fwd_limit VALUES (3)"); err != nil {
		t.Fatal(err)
	}
	if r.ForwardedSessions() != 1 {
		t.Fatalf("ForwardedSessions = %d, want 1", r.ForwardedSessions())
	}
	resume()
	backOnReplica(t, first)
	if _, err := second.Exec(ctx, "INSERT INTO fwd_limit VALUES (2)"); err != nil {
		t.Fatalf("once the first session is back on the replica: %v", err)
	}
	backOnReplica(t, second)
	if _, err := first.Exec(ctx, "INSERT INTO fwd_limit VALUES (4)"); err != nil {
		t.Fatalf("the first session's next write, with the second back on the replica: %v", err)
	}
	if r.ForwardedSessions() != 1 {
		t.Fatalf("ForwardedSessions = %d, want 1", r.ForwardedSessions())
	}
	first.Close(ctx)
	deadline := time.Now().Add(time.Minute)
	for r.ForwardedSessions() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if r.ForwardedSessions() != 0 {
		t.Fatalf("ForwardedSessions = %d a minute after the only session on the primary closed, want 0", r.ForwardedSessions())
	}
	if _, err := second.Exec(ctx, "INSERT INTO fwd_limit VALUES (5)"); err != nil {
		t.Fatalf("once the first session closed: %v", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_limit"); n != 5 {
		t.Fatalf("the primary has %d rows, want 5", n)
	}
}

// Two autocommit writes pipelined, each with its own Sync: the first is refused while the
// second is in flight, and answered 40001; the second's move must not re-run the first, which
// the client will retry: each runs on the primary once, the retries included. The session then
// goes back to the replica like any other.
func TestForwardPipelinedWrites(t *testing.T) {
	forwardTable(t, "fwd_pipe", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := c.PgConn().StartPipeline(ctx)
	for id := 1; id <= 2; id++ {
		p.SendQueryParams(fmt.Sprintf("INSERT INTO fwd_pipe VALUES (%d)", id), nil, nil, nil, nil)
		p.SendPipelineSync()
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	var errs [2]error
	for i := range errs {
		errs[i] = pipelineResult(t, p).Err
		pipelineSync(t, p)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	for i, err := range errs {
		id := i + 1
		n := onPrimary(t, "SELECT count(*) FROM fwd_pipe WHERE id = $1", id)
		switch {
		case err == nil && n != 1:
			t.Fatalf("INSERT %d succeeded, and the primary has %d rows of it, want 1", id, n)
		case err != nil && sqlstate(err) != "40001":
			t.Fatalf("INSERT %d: %v, want success or 40001", id, err)
		case err != nil && n != 0:
			t.Fatalf("INSERT %d was answered 40001, and the primary has %d rows of it, want 0: its retry would write it twice", id, n)
		case err != nil: // the client's retry, on the primary
			if _, err := c.Exec(ctx, fmt.Sprintf("INSERT INTO fwd_pipe VALUES (%d)", id)); err != nil {
				t.Fatalf("the retry of INSERT %d: %v", id, err)
			}
		}
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_pipe"); n != 2 {
		t.Fatalf("the primary has %d rows after the retries, want 2", n)
	}
	backOnReplica(t, c)
}

// A transaction block whose refused write is answered an error (40001 because an earlier
// read differs on the primary, or the standby's refusal because a cursor WITH HOLD keeps the
// session where it is) is told it is in a failed block, and stays in one wherever pgfly left
// it: its next statement fails with 25P02 until its ROLLBACK, as on PostgreSQL, rather than
// commit on its own. Its retry then commits once.
func TestForwardFailedBlockStaysFailed(t *testing.T) {
	for _, tc := range []struct {
		name, setup, read, wantCode string
	}{
		{"answered 40001", "", "SELECT clock_timestamp()", "40001"},
		{"answered the refusal", "DECLARE fwd_failed_cursor CURSOR WITH HOLD FOR SELECT 1", "SELECT 1", "25006"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forwardTable(t, "fwd_failed", "id int")
			r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
			ctx := context.Background()
			pc := connectURL(t, r.url(pgcluster.RoleSCRAM)).PgConn()
			exec := func(sql string) error { _, err := pc.Exec(ctx, sql).ReadAll(); return err }
			for _, sql := range []string{tc.setup, "BEGIN", tc.read} {
				if sql == "" {
					continue
				}
				if err := exec(sql); err != nil {
					t.Fatalf("%s: %v", sql, err)
				}
			}
			if err := exec("INSERT INTO fwd_failed VALUES (1)"); sqlstate(err) != tc.wantCode || pc.TxStatus() != 'E' {
				t.Fatalf("the refused write: %v, status %q; want %s in a failed block", err, pc.TxStatus(), tc.wantCode)
			}
			if err := exec("INSERT INTO fwd_failed VALUES (2)"); sqlstate(err) != "25P02" || pc.TxStatus() != 'E' {
				t.Fatalf("the next write in the failed block: %v, status %q; want 25P02, still failed", err, pc.TxStatus())
			}
			if err := exec("ROLLBACK"); err != nil || pc.TxStatus() != 'I' {
				t.Fatalf("ROLLBACK: %v, status %q", err, pc.TxStatus())
			}
			if n := onPrimary(t, "SELECT count(*) FROM fwd_failed"); n != 0 {
				t.Fatalf("the primary has %d rows of a transaction the client rolled back, want 0", n)
			}
			if tc.setup != "" {
				if err := exec("CLOSE fwd_failed_cursor"); err != nil {
					t.Fatal(err)
				}
			}
			for _, sql := range []string{"BEGIN", "INSERT INTO fwd_failed VALUES (3)", "COMMIT"} {
				if err := exec(sql); err != nil {
					t.Fatalf("the retry: %s: %v", sql, err)
				}
			}
			if n := onPrimary(t, "SELECT count(*) FROM fwd_failed"); n != 1 {
				t.Fatalf("the primary has %d rows after the retry, want 1", n)
			}
		})
	}
}

// After a refused write's Sync the client prepares its next statement and waits on a Flush
// (Parse, Describe, Flush: no Sync): that is in flight too, and its answers reach the client,
// not pgfly's own reads on the replica. The table the statement names is locked (replayed from
// the primary) so that the replica answers it late, after the refusal's ReadyForQuery.
func TestForwardPreparedAfterRefusalIsAnswered(t *testing.T) {
	forwardTable(t, "fwd_late_lock", "id int")
	forwardTable(t, "fwd_late_ins", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	p := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	tx, err := p.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "LOCK TABLE fwd_late_lock IN ACCESS EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	if err := cluster.WaitReplayed(ctx); err != nil {
		t.Fatal(err)
	}
	committed := make(chan struct{})
	go func() {
		defer close(committed)
		time.Sleep(500 * time.Millisecond)
		tx.Commit(ctx)
	}()
	defer func() { <-committed }() // before p is closed
	fe := c.PgConn().Frontend()
	fe.Send(&pgproto3.Parse{Query: "INSERT INTO fwd_late_ins VALUES (1)"})
	fe.Send(&pgproto3.Bind{})
	fe.Send(&pgproto3.Execute{})
	fe.Send(&pgproto3.Sync{})
	fe.Send(&pgproto3.Parse{Name: "fwd_late", Query: "SELECT count(*) FROM fwd_late_lock"})
	fe.Send(&pgproto3.Describe{ObjectType: 'S', Name: "fwd_late"})
	fe.Send(&pgproto3.Flush{})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	c.PgConn().Conn().SetReadDeadline(time.Now().Add(20 * time.Second))
	var got []string
	for len(got) < 7 {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("after %v: %v; want the write's answers, then the statement's ParseComplete, ParameterDescription, RowDescription", got, err)
		}
		got = append(got, fmt.Sprintf("%T", m))
	}
	if got[4] != "*pgproto3.ParseComplete" || got[5] != "*pgproto3.ParameterDescription" || got[6] != "*pgproto3.RowDescription" {
		t.Fatalf("answers %v; want the write's four, then ParseComplete, ParameterDescription, RowDescription", got)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_late_ins"); n > 1 {
		t.Fatalf("the primary has %d rows of the write, want at most 1", n)
	}
}

// A move owed at an idle point (a refusal answered 40001 before its Sync) whose exchange with
// the replica times out (connect_timeout=1; the client's unnamed statement, prepared again
// there after pgfly's state read, waits on a lock the primary holds) ends the session, as the
// same failure does in tryMove: otherwise what the replica still owes pgfly would reach the
// client as the answer to its next request.
func TestForwardOwedMoveTimeoutEndsTheSession(t *testing.T) {
	forwardTable(t, "fwd_owed_lock", "id int")
	forwardTable(t, "fwd_owed_ins", "id int")
	role := pgcluster.RoleSCRAM
	r := startRelay(t, cluster.Replica.URL("", "", "", "sslmode=disable", "connect_timeout=1"), wire.Config{
		Primary: cluster.Primary.URL(role.Name, role.Password, pgcluster.Database, "sslmode=disable", "connect_timeout=1")})
	ctx := context.Background()
	c := connectURL(t, r.url(role))
	fe := c.PgConn().Frontend()
	recv := func(what string, until byte) []string {
		t.Helper()
		var got []string
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				m, err := fe.Receive()
				if err != nil {
					got = append(got, "error: "+err.Error())
					return
				}
				s := fmt.Sprintf("%T", m)
				if e, ok := m.(*pgproto3.ErrorResponse); ok {
					s += " " + e.Code
				}
				if d, ok := m.(*pgproto3.DataRow); ok {
					s += " " + string(d.Values[0])
				}
				got = append(got, s)
				if s[len("*pgproto3."):][0] == until {
					return
				}
			}
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no answer after 10s, got %v", what, got)
		}
		t.Logf("%s: %v", what, got)
		return got
	}
	// The client's unnamed statement, which names the table to be locked.
	fe.Send(&pgproto3.Parse{Query: "SELECT count(*) FROM fwd_owed_lock"})
	fe.Send(&pgproto3.Sync{})
	fe.Flush()
	recv("unnamed parse", 'R')
	// The primary locks the table; the replica replays the lock.
	p := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	tx, err := p.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "LOCK TABLE fwd_owed_lock IN ACCESS EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	if err := cluster.WaitReplayed(ctx); err != nil {
		t.Fatal(err)
	}
	// A write refused before its Sync: 40001 at once, and a move owed at the idle point.
	fe.Send(&pgproto3.Parse{Name: "ins", Query: "INSERT INTO fwd_owed_ins VALUES (1)"})
	fe.Send(&pgproto3.Bind{PreparedStatement: "ins"})
	fe.Send(&pgproto3.Execute{})
	fe.Send(&pgproto3.Flush{})
	fe.Flush()
	recv("write before its Sync", 'E')
	fe.Send(&pgproto3.Sync{})
	fe.Flush()
	recv("its Sync", 'R')
	time.Sleep(2 * time.Second) // the move's exchange with the replica times out
	tx.Commit(ctx)              // the replica's backend gets on with pgfly's request
	time.Sleep(500 * time.Millisecond)
	fe.Send(&pgproto3.Query{String: "SELECT 42"})
	fe.Flush()
	got := recv("SELECT 42", 'R')
	ended := len(got) > 0 && strings.HasPrefix(got[len(got)-1], "error: ")
	if !ended && (len(got) != 4 || got[1] != "*pgproto3.DataRow 42") {
		t.Fatalf("SELECT 42 answered %v, want its own answer (RowDescription, DataRow 42, CommandComplete, ReadyForQuery) or the session ended", got)
	}
	if !ended {
		t.Fatalf("SELECT 42 answered %v; want the session ended, its move's exchange having timed out", got)
	}
}

// A COPY FROM STDIN refused by the replica while its client is inside a CopyData message (it
// sent the COPY and the first half of the message, the second comes a second later): pgfly's
// own requests wait for the message's end rather than land inside it, and the session goes
// on.
func TestForwardCopyDataInFlight(t *testing.T) {
	forwardTable(t, "fwd_midcopy", "v text")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pc := connectURL(t, r.url(pgcluster.RoleSCRAM)).PgConn()
	conn := pc.Conn()
	query, _ := (&pgproto3.Query{String: "COPY fwd_midcopy FROM STDIN"}).Encode(nil)
	body := []byte(strings.Repeat("x", 100000) + "\n")
	data, _ := (&pgproto3.CopyData{Data: body}).Encode(nil)
	done, _ := (&pgproto3.CopyDone{}).Encode(nil)
	if _, err := conn.Write(append(query, data[:50000]...)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // the replica refuses; pgfly acts on its ReadyForQuery
	start := time.Now()
	if _, err := conn.Write(append(data[50000:], done...)); err != nil {
		t.Fatal(err)
	}
	fe := pc.Frontend()
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	var got []string
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("after %v (%v): %v", got, time.Since(start), err)
		}
		s := fmt.Sprintf("%T", m)
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			s += " " + e.Severity + " " + e.Code + " " + e.Message
		}
		got = append(got, s)
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	if len(got) < 2 || !strings.HasPrefix(got[len(got)-2], "*pgproto3.ErrorResponse ERROR") {
		t.Fatalf("answers %v, want an ERROR for the COPY, then ReadyForQuery", got)
	}
	conn.SetReadDeadline(time.Time{})
	if _, err := pc.Exec(ctx, "SELECT 1").ReadAll(); err != nil {
		t.Fatalf("the session after the COPY (%v): %v", time.Since(start), err)
	}
}

// A named statement the client prepared in the epoch (pgx's statement cache, inside a block)
// exists on the backend the session is moved to by a move owed at an idle point.
func TestForwardCachedStatementAfter40001(t *testing.T) {
	forwardTable(t, "fwd_cache", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM fwd_cache WHERE id = $1", 1).Scan(&n); err != nil {
		t.Fatal(err)
	}
	_, err = tx.Exec(ctx, "SELECT 1; INSERT INTO fwd_cache VALUES (1)")
	if sqlstate(err) != "40001" {
		t.Fatalf("a write after results in a block: %v, want 40001", err)
	}
	tx.Rollback(ctx)
	if err := c.QueryRow(ctx, "SELECT count(*) FROM fwd_cache WHERE id = $1", 1).Scan(&n); err != nil {
		t.Fatalf("the cached statement after the move: %v", err)
	}
}

// A pipelined batch whose write follows a read that already returned rows cannot be re-run
// unseen: 40001, nothing written, and the retry runs on the primary.
func TestForwardBatchAfterResultsIs40001(t *testing.T) {
	forwardTable(t, "fwd_batch", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	run := func() error {
		b := &pgx.Batch{}
		b.Queue("SELECT count(*) FROM fwd_batch")
		b.Queue("INSERT INTO fwd_batch VALUES (1)")
		return c.SendBatch(ctx, b).Close()
	}
	if err := run(); sqlstate(err) != "40001" {
		t.Fatalf("a batch whose write follows results: %v, want 40001", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_batch"); n != 0 {
		t.Fatalf("the primary has %d rows after the 40001, want 0", n)
	}
	if err := run(); err != nil {
		t.Fatalf("the retry: %v", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_batch"); n != 1 {
		t.Fatalf("the primary has %d rows, want 1", n)
	}
}

// A moved session's CancelRequest reaches its backend on the primary.
func TestForwardCancelReachesThePrimary(t *testing.T) {
	forwardTable(t, "fwd_cancel", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	if _, err := c.Exec(context.Background(), "INSERT INTO fwd_cancel VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan struct{})
	go func() { // until the sleep ends: a cancel that comes before it starts cancels nothing
		for {
			select {
			case <-done:
				return
			case <-time.After(100 * time.Millisecond):
				c.PgConn().CancelRequest(ctx) // on its own connection, with the key the client knows
			}
		}
	}()
	_, err := c.Exec(ctx, "SELECT pg_sleep(30)")
	close(done)
	if sqlstate(err) != "57014" {
		t.Fatalf("a cancelled sleep on the primary: %v, want 57014 (query_canceled)", err)
	}
}

// With the upstream unreachable, a forwarding relay relays new sessions to the primary, reads
// and writes alike; the client logs in there itself.
func TestForwardDirectWhenTheReplicaIsDown(t *testing.T) {
	forwardTable(t, "fwd_direct", "id int")
	cfg := wire.Config{Primary: cluster.Primary.URL(pgcluster.RoleSCRAM.Name, pgcluster.RoleSCRAM.Password, pgcluster.Database)}
	r := startRelay(t, "postgres://127.0.0.1:1/?sslmode=disable", cfg)
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleMD5))
	if _, err := c.Exec(ctx, "INSERT INTO fwd_direct VALUES (1)"); err != nil {
		t.Fatalf("a write with the replica down: %v", err)
	}
	var recovery bool
	if err := c.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&recovery); err != nil || recovery {
		t.Fatalf("read with the replica down: in recovery %v, %v", recovery, err)
	}
	if got := outcomes(r.events.Forwards()); strings.Join(got, ",") != "direct" {
		t.Fatalf("forward outcomes %v, want direct", got)
	}
	if len(r.events.Failures()) != 0 {
		t.Fatalf("a session served by the primary was reported as failed: %+v", r.events.Failures())
	}
}

// psql's autocommit INSERT, simple protocol, runs once on the primary.
func TestForwardPsql(t *testing.T) {
	forwardTable(t, "fwd_psql", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	out, err := runClientTool(t, "", "psql", "-X", "-v", "ON_ERROR_STOP=1", "-c", "INSERT INTO fwd_psql VALUES (1)", r.url(pgcluster.RoleSCRAM))
	if err != nil || !strings.Contains(out, "INSERT 0 1") {
		t.Fatalf("psql: %v\n%s", err, out)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_psql"); n != 1 {
		t.Fatalf("the primary has %d rows, want 1", n)
	}
}

// node-postgres: a job's transaction (read, write, commit) through the forwarding relay is
// written exactly once, and its named prepared statement works before and after the move.
func TestForwardNodePostgres(t *testing.T) {
	forwardTable(t, "fwd_node", "id serial PRIMARY KEY, job text")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	out := runNode(t, "forward.js", "DATABASE_URL="+r.url(pgcluster.RoleSCRAM), "JOB=node-1")
	var got struct{ Before, Seen, After int }
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	if got.Before != 0 || got.After != 1 {
		t.Fatalf("got %+v, want 0 before, 1 after", got)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_node WHERE job = 'node-1'"); n != 1 {
		t.Fatalf("the primary has %d rows for the job, want 1", n)
	}
}

// An error at the primary's COMMIT (a deferred constraint) reaches the client as itself;
// pgfly does not retry it, and nothing is written.
func TestForwardCommitErrorIsTheClients(t *testing.T) {
	forwardTable(t, "fwd_commit", "id int, CONSTRAINT fwd_commit_once UNIQUE (id) DEFERRABLE INITIALLY DEFERRED")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		var n int
		if err := tx.QueryRow(ctx, "SELECT count(*) FROM fwd_commit").Scan(&n); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO fwd_commit VALUES (1)"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "INSERT INTO fwd_commit VALUES (1)") // checked at COMMIT
		return err
	})
	if sqlstate(err) != "23505" {
		t.Fatalf("a transaction whose COMMIT fails on the primary: %v, want its own 23505", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_commit"); n != 0 {
		t.Fatalf("the primary has %d rows, want 0", n)
	}
	if got := outcomes(moves(r.events.Forwards())); strings.Join(got, ",") != "moved" {
		t.Fatalf("forward outcomes %v, want one move and no retry", got)
	}
}

// A temporary table cannot exist on a standby: CREATE TEMP TABLE is itself a refusal, so the
// session moves and has its table on the primary.
func TestForwardTemporaryTable(t *testing.T) {
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	if _, err := c.Exec(ctx, "CREATE TEMP TABLE fwd_scratch (x int)"); err != nil {
		t.Fatalf("CREATE TEMP TABLE through the forwarding relay: %v", err)
	}
	if _, err := c.Exec(ctx, "INSERT INTO fwd_scratch VALUES (1), (2)"); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM fwd_scratch").Scan(&n); err != nil || n != 2 {
		t.Fatalf("the temporary table: %d rows, %v", n, err)
	}
}

// A job runner's load through a forwarding relay, on a cluster of its own: 8 workers, 200
// jobs, each a transaction that reads and then writes its job's id, retried up to 3 times as
// job runners do; each worker reconnects every 5 jobs. The replica is stopped after 50 jobs
// and started again after 100. Every job that reported success wrote exactly once; none that
// failed in the end wrote at all.
func TestForwardJobRunnerLoad(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, pgcluster.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	admin := connectURL(t, c.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	if _, err := admin.Exec(ctx, "CREATE TABLE jobs_done (job int, worker int); GRANT ALL ON jobs_done TO PUBLIC"); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitReplayed(ctx); err != nil {
		t.Fatal(err)
	}
	role := pgcluster.RoleSCRAM
	r := startRelay(t, c.Replica.URL("", "", ""), wire.Config{
		Primary: c.Primary.URL(role.Name, role.Password, pgcluster.Database), ConnectTimeout: 2 * time.Second})
	url := r.url(role)

	const jobs, workers, attempts = 200, 8, 3
	queue := make(chan int, jobs)
	for j := range jobs {
		queue <- j
	}
	close(queue)
	var mu sync.Mutex
	succeeded := map[int]bool{}
	done := 0
	replicaDown := make(chan struct{})
	replicaUp := make(chan struct{})
	runJob := func(conn *pgx.Conn, job, worker int) error {
		return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			var n int
			if err := tx.QueryRow(ctx, "SELECT count(*) FROM jobs_done WHERE job = $1", job).Scan(&n); err != nil {
				return err
			}
			if err := tx.QueryRow(ctx, "SELECT count(*) FROM jobs_done WHERE worker = $1 AND job > $2", worker, job).Scan(&n); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "INSERT INTO jobs_done VALUES ($1, $2)", job, worker)
			return err
		})
	}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var conn *pgx.Conn
			used := 0
			for job := range queue {
				ok := false
				for range attempts {
					if conn == nil || conn.IsClosed() || used == 5 {
						if conn != nil {
							conn.Close(ctx)
						}
						c, err := pgx.Connect(ctx, url)
						if err != nil {
							conn, used = nil, 0
							continue
						}
						conn, used = c, 0
					}
					used++
					if runJob(conn, job, w) == nil {
						ok = true
						break
					}
				}
				mu.Lock()
				succeeded[job] = ok
				done++
				switch done {
				case 50:
					close(replicaDown)
				case 100:
					close(replicaUp)
				}
				mu.Unlock()
			}
			if conn != nil {
				conn.Close(ctx)
			}
		}()
	}
	<-replicaDown
	if err := c.Replica.Stop(); err != nil {
		t.Fatal(err)
	}
	<-replicaUp
	if err := c.Replica.Start(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()

	rows := map[int]int{}
	res, err := admin.Query(ctx, "SELECT job, count(*) FROM jobs_done GROUP BY job")
	if err != nil {
		t.Fatal(err)
	}
	for res.Next() {
		var job, n int
		if err := res.Scan(&job, &n); err != nil {
			t.Fatal(err)
		}
		rows[job] = n
	}
	if err := res.Err(); err != nil {
		t.Fatal(err)
	}
	ok := 0
	for job := range jobs {
		switch {
		case succeeded[job] && rows[job] != 1:
			t.Errorf("job %d reported success and wrote %d rows, want exactly 1", job, rows[job])
		case !succeeded[job] && rows[job] != 0:
			t.Errorf("job %d failed and wrote %d rows, want 0", job, rows[job])
		}
		if succeeded[job] {
			ok++
		}
	}
	count := map[string]int{}
	for _, f := range r.events.Forwards() {
		count[f.Outcome]++
	}
	t.Logf("%d of %d jobs succeeded; forward outcomes %v", ok, jobs, count)
	if ok < jobs*9/10 {
		t.Errorf("only %d of %d jobs succeeded in %d attempts", ok, jobs, attempts)
	}
	if count[wire.ForwardMoved] == 0 || count[wire.ForwardDirect] == 0 {
		t.Errorf("forward outcomes %v: want sessions moved, and sessions relayed to the primary while the replica was down", count)
	}
}

// A replica that refuses the startup with 57P03 (starting up, shutting down: a real one does so
// only for a moment) is down for a forwarding session: the client, sent nothing yet, logs in to
// the primary instead. A scripted server plays the replica.
func TestForwardDirectWhenTheReplicaCannotAcceptConnections(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			be := pgproto3.NewBackend(c, c)
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := be.ReceiveStartupMessage(); err == nil {
				be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "57P03", Message: "the database system is shutting down"})
				be.Flush()
			}
			c.Close()
		}
	}()
	cfg := wire.Config{Primary: cluster.Primary.URL(pgcluster.RoleSCRAM.Name, pgcluster.RoleSCRAM.Password, pgcluster.Database)}
	r := startRelay(t, "postgres://"+ln.Addr().String()+"/?sslmode=disable", cfg)
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	var recovery bool
	if err := c.QueryRow(context.Background(), "SELECT pg_is_in_recovery()").Scan(&recovery); err != nil || recovery {
		t.Fatalf("a session whose replica is shutting down: in recovery %v, %v; want the primary", recovery, err)
	}
	if got := outcomes(r.events.Forwards()); strings.Join(got, ",") != "direct" {
		t.Fatalf("forward outcomes %v, want direct", got)
	}
}

// An idle session whose replica backend is terminated (FATAL 57P01, held back) is reported
// only when its client next speaks, on a forwarding relay as on a plain one: nothing of this
// session has to do with forwarding.
func TestForwardIdleFailureIsHeldUntilTheClientSpeaks(t *testing.T) {
	for _, forwarding := range []bool{false, true} {
		name := map[bool]string{false: "plain", true: "forwarding"}[forwarding]
		t.Run(name, func(t *testing.T) {
			var r *relay
			if forwarding {
				r = forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
			} else {
				r = startRelay(t, cluster.Replica.URL("", "", "", "sslmode=disable"), wire.Config{})
			}
			ctx := context.Background()
			cfg, _ := pgx.ParseConfig(r.url(pgcluster.RoleSCRAM))
			cfg.RuntimeParams["application_name"] = "review-hold-" + name
			c := connectConfig(t, cfg)
			if _, err := c.Exec(ctx, "SELECT 1"); err != nil {
				t.Fatal(err)
			}
			rep := connectURL(t, cluster.Replica.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
			var n int
			if err := rep.QueryRow(ctx, "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", cfg.RuntimeParams["application_name"]).Scan(&n); err != nil || n != 1 {
				t.Fatalf("terminated %d replica backends (%v), want 1", n, err)
			}
			waitFor(t, 10*time.Second, "the session to end", func() bool { return r.OpenSessions() == 0 })
			time.Sleep(500 * time.Millisecond)
			if f := r.events.Failures(); len(f) != 0 {
				t.Errorf("the idle session's failure was reported before its client spoke: %+v", f)
			}
			var pe *pgconn.PgError
			if _, err := c.Exec(ctx, "SELECT 1"); !errors.As(err, &pe) || pe.Code != "57P01" {
				t.Errorf("the next query: %v, want the held FATAL 57P01", err)
			}
			waitFor(t, 10*time.Second, "the failure report", func() bool { return len(r.events.Failures()) == 1 })
		})
	}
}

// A session that SET ROLE on the replica, then writes: the write is refused there and re-sent
// to the primary, where it runs as the role the client set, as it would on a primary (role and
// session_authorization are not in pg_settings, and were once not carried: the write ran with
// the login's rights).
func TestForwardSetRoleIsCarried(t *testing.T) {
	ctx := context.Background()
	admin := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	for _, sql := range []string{
		"DROP TABLE IF EXISTS fwd_role", "DROP ROLE IF EXISTS fwd_tenant",
		"CREATE ROLE fwd_tenant NOLOGIN", "GRANT fwd_tenant TO " + pgcluster.RoleSCRAM.Name,
		// the login role may write; the role the client switches to may not
		"CREATE TABLE fwd_role (who text)", "GRANT ALL ON fwd_role TO " + pgcluster.RoleSCRAM.Name,
		"GRANT SELECT ON fwd_role TO fwd_tenant",
	} {
		if _, err := admin.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	t.Cleanup(func() {
		a := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
		a.Exec(context.Background(), "DROP TABLE IF EXISTS fwd_role")
		a.Exec(context.Background(), "DROP ROLE IF EXISTS fwd_tenant")
	})
	if err := cluster.WaitReplayed(ctx); err != nil {
		t.Fatal(err)
	}
	// What PostgreSQL itself answers, on the primary.
	direct := connectURL(t, cluster.Primary.URL(pgcluster.RoleSCRAM.Name, pgcluster.RoleSCRAM.Password, pgcluster.Database))
	direct.Exec(ctx, "SET ROLE fwd_tenant")
	if _, err := direct.Exec(ctx, "INSERT INTO fwd_role VALUES (current_user)"); sqlstate(err) != "42501" {
		t.Fatalf("on the primary directly, as fwd_tenant: %v, want 42501 (the test's setup is wrong)", err)
	}

	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	if _, err := c.Exec(ctx, "SET ROLE fwd_tenant"); err != nil {
		t.Fatal(err)
	}
	var who string
	if err := c.QueryRow(ctx, "SELECT current_user").Scan(&who); err != nil || who != "fwd_tenant" {
		t.Fatalf("current_user on the replica: %q, %v", who, err)
	}
	pauseReplay(t) // the session stays on the primary after the move
	_, err := c.Exec(ctx, "INSERT INTO fwd_role VALUES (current_user)")
	if err := c.QueryRow(ctx, "SELECT current_user").Scan(&who); err != nil {
		t.Fatal(err)
	}
	n := onPrimary(t, "SELECT count(*) FROM fwd_role")
	if who != "fwd_tenant" || n != 0 || sqlstate(err) != "42501" {
		t.Fatalf("the client SET ROLE fwd_tenant, which may not INSERT: after the move current_user is %q, the INSERT answered %v, "+
			"and the primary has %d rows; want fwd_tenant, 42501, 0", who, err, n)
	}
}

// The other way: a session that SET ROLE on the primary after a move goes back to the replica
// with that role, not as its login.
func TestForwardSetRoleGoesBack(t *testing.T) {
	ctx := context.Background()
	admin := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	for _, sql := range []string{"DROP ROLE IF EXISTS fwd_tenant2", "CREATE ROLE fwd_tenant2 NOLOGIN", "GRANT fwd_tenant2 TO " + pgcluster.RoleSCRAM.Name} {
		if _, err := admin.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	t.Cleanup(func() {
		connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database)).Exec(context.Background(), "DROP ROLE IF EXISTS fwd_tenant2")
	})
	forwardTable(t, "fwd_role2", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	resume := pauseReplay(t)
	if _, err := c.Exec(ctx, "INSERT INTO fwd_role2 VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "SET ROLE fwd_tenant2"); err != nil {
		t.Fatal(err)
	}
	resume()
	backOnReplica(t, c)
	var who string
	if err := c.QueryRow(ctx, "SELECT current_user").Scan(&who); err != nil || who != "fwd_tenant2" {
		t.Fatalf("back on the replica after SET ROLE fwd_tenant2 on the primary: current_user %q, %v; want fwd_tenant2", who, err)
	}
}

// A statement made by SQL PREPARE is not carried: pg_prepared_statements shows the whole Query
// it came in, writes included, which pgfly would run again. It keeps the session where it is
// (the client gets the refusal) until it is deallocated; nothing is written twice.
func TestForwardSQLPrepareIsNotCarried(t *testing.T) {
	ctx := context.Background()
	forwardTable(t, "fwd_sqlprep", "id int")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	pauseReplay(t)
	_, err := c.PgConn().Exec(ctx, "PREPARE fwd_p AS SELECT 1; INSERT INTO fwd_sqlprep VALUES (1)").ReadAll()
	if n := onPrimary(t, "SELECT count(*) FROM fwd_sqlprep WHERE id = 1"); err == nil && n != 1 || err != nil && n != 0 {
		t.Fatalf("a Query that PREPAREs and INSERTs: the client got %v, and the primary has %d rows of it", err, n)
	}
	_, err = c.Exec(ctx, "INSERT INTO fwd_sqlprep VALUES (2)")
	if n := onPrimary(t, "SELECT count(*) FROM fwd_sqlprep WHERE id = 1"); n > 1 || sqlstate(err) != "25006" {
		t.Fatalf("the next write, with fwd_p prepared: %v (want the refusal), and %d rows of the first INSERT on the primary", err, n)
	}
	if _, err := c.Exec(ctx, "DEALLOCATE fwd_p"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "INSERT INTO fwd_sqlprep VALUES (3)"); err != nil {
		t.Fatalf("a write once fwd_p is gone: %v", err)
	}
	if n := onPrimary(t, "SELECT count(*) FROM fwd_sqlprep WHERE id = 1"); n > 1 {
		t.Fatalf("the primary has %d rows of the first INSERT", n)
	}
}

// A custom setting (SET app.tenant) is not in pg_settings, so pgfly cannot carry it: a session
// that may have set one is not moved (the client gets the refusal), rather than have its write
// run on the primary without it.
func TestForwardCustomSettingIsNotLost(t *testing.T) {
	ctx := context.Background()
	forwardTable(t, "fwd_guc", "tenant text")
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	if _, err := c.Exec(ctx, "SET app.tenant = 'acme'"); err != nil {
		t.Fatal(err)
	}
	_, err := c.Exec(ctx, "INSERT INTO fwd_guc VALUES (current_setting('app.tenant', true))")
	acme, all := onPrimary(t, "SELECT count(*) FROM fwd_guc WHERE tenant = 'acme'"), onPrimary(t, "SELECT count(*) FROM fwd_guc")
	if err == nil && (acme != 1 || all != 1) || err != nil && (sqlstate(err) != "25006" || all != 0) {
		t.Fatalf("after SET app.tenant = 'acme' the write answered %v, and the primary has %d rows, %d of tenant acme", err, all, acme)
	}
}

// SET SESSION AUTHORIZATION resets the role: a move sets the role again after it, even when the
// kept backend's role was the same (it had been skipped, and the write ran as the session user).
func TestForwardSessionAuthorizationThenSameRole(t *testing.T) {
	ctx := context.Background()
	admin := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	for _, sql := range []string{
		"DROP TABLE IF EXISTS fwd_rv_sa", "DROP ROLE IF EXISTS fwd_rv_alice", "DROP ROLE IF EXISTS fwd_rv_bob", "DROP ROLE IF EXISTS fwd_rv_carol",
		"CREATE ROLE fwd_rv_alice NOLOGIN", "CREATE ROLE fwd_rv_bob NOLOGIN", "CREATE ROLE fwd_rv_carol NOLOGIN",
		"GRANT fwd_rv_alice TO fwd_rv_bob", "GRANT fwd_rv_alice TO fwd_rv_carol",
		"CREATE TABLE fwd_rv_sa (who text)", "GRANT ALL ON fwd_rv_sa TO fwd_rv_alice",
	} {
		if _, err := admin.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	t.Cleanup(func() {
		a := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
		for _, sql := range []string{"DROP TABLE IF EXISTS fwd_rv_sa", "DROP ROLE IF EXISTS fwd_rv_alice", "DROP ROLE IF EXISTS fwd_rv_bob", "DROP ROLE IF EXISTS fwd_rv_carol"} {
			a.Exec(context.Background(), sql)
		}
	})
	if err := cluster.WaitReplayed(ctx); err != nil {
		t.Fatal(err)
	}
	r := forwardingRelay(t, pgcluster.RoleSuperuser, wire.Config{})
	c := connectURL(t, r.url(pgcluster.RoleSuperuser))
	exec := func(sql string) {
		t.Helper()
		if _, err := c.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	exec("SET SESSION AUTHORIZATION fwd_rv_bob")
	exec("SET ROLE fwd_rv_alice")
	resume := pauseReplay(t)
	exec("INSERT INTO fwd_rv_sa VALUES ('first:' || current_user)") // moves; the primary backend is bob/alice
	resume()
	backOnReplica(t, c) // the primary backend is kept, holding session_authorization bob, role alice
	exec("SET SESSION AUTHORIZATION fwd_rv_carol")
	exec("SET ROLE fwd_rv_alice")
	pauseReplay(t)
	_, err := c.Exec(ctx, "INSERT INTO fwd_rv_sa VALUES (current_user)")
	var who, sess string
	c.QueryRow(ctx, "SELECT current_user, session_user").Scan(&who, &sess)
	if err != nil || who != "fwd_rv_alice" {
		t.Fatalf("the client's role is fwd_rv_alice (session user fwd_rv_carol): after the move current_user is %q, session_user %q, the INSERT answered %v; want fwd_rv_alice and no error", who, sess, err)
	}
}

// A row larger than the relay's buffer, first of its answer: what the forwarder held back (the
// RowDescription) goes out before it, and the row is still relayed whole, in both protocols.
func TestForwardLargeRow(t *testing.T) {
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	ctx := context.Background()
	c := connectURL(t, r.url(pgcluster.RoleSCRAM))
	want := strings.Repeat("x", 9000)
	res, err := c.PgConn().Exec(ctx, "SELECT repeat('x', 9000)").ReadAll()
	if err != nil || len(res) != 1 || len(res[0].Rows) != 1 || string(res[0].Rows[0][0]) != want {
		t.Fatalf("a 9000-byte row, simple protocol: %v", err)
	}
	var got string
	if err := c.QueryRow(ctx, "SELECT repeat($1, 9000)", "x").Scan(&got); err != nil || got != want {
		t.Fatalf("a 9000-byte row, extended protocol: %d bytes, %v", len(got), err)
	}
}

// A notice larger than the relay's buffer, sent while the forwarder holds a request's metadata
// back (BindComplete, RowDescription): it streams through after what is held, and the answer
// is whole, in both protocols.
func TestForwardLargeNotice(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	if _, err := p.Exec(ctx, `CREATE OR REPLACE FUNCTION fwd_noisy(n int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN RAISE NOTICE '%', repeat('x', n); RETURN n; END $$`); err != nil {
		t.Fatal(err)
	}
	if err := cluster.WaitReplayed(ctx); err != nil {
		t.Fatal(err)
	}
	r := forwardingRelay(t, pgcluster.RoleSCRAM, wire.Config{})
	var notices []int
	cfg, _ := pgx.ParseConfig(r.url(pgcluster.RoleSCRAM))
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices = append(notices, len(n.Message)) }
	c := connectConfig(t, cfg)
	var got int
	if err := c.QueryRow(ctx, "SELECT fwd_noisy($1)", 20000).Scan(&got); err != nil || got != 20000 {
		t.Fatalf("extended protocol: %d, %v", got, err)
	}
	if res, err := c.PgConn().Exec(ctx, "SELECT fwd_noisy(20000)").ReadAll(); err != nil || len(res) != 1 || string(res[0].Rows[0][0]) != "20000" {
		t.Fatalf("simple protocol: %v", err)
	}
	if len(notices) != 2 || notices[0] != 20000 || notices[1] != 20000 {
		t.Fatalf("notices of %v bytes, want two of 20000", notices)
	}
}
