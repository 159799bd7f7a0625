package wire_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

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

// An autocommit write through a replica-region relay runs once on the primary, in every
// protocol mode pgx has, and the session then carries on there: its named prepared
// statements, prepared on the replica before the move, still work.
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
			// Now on the primary: its own write is visible at once, through the statement
			// prepared on the replica, and the SET came along.
			var n int
			if err := c.QueryRow(ctx, "named_read", mode.String()).Scan(&n); err != nil || n != 1 {
				t.Fatalf("the prepared statement after the move: %d rows, %v; want 1", n, err)
			}
			var app string
			var recovery bool
			if err := c.QueryRow(ctx, "SELECT current_setting('application_name'), pg_is_in_recovery()").Scan(&app, &recovery); err != nil {
				t.Fatal(err)
			}
			if app != "forward-test" || recovery {
				t.Fatalf("after the move: application_name %q, in recovery %v; want forward-test on the primary", app, recovery)
			}
		})
	}
	if got := outcomes(r.events.Forwards()); strings.Join(got, ",") != "moved,moved,moved" {
		t.Errorf("forward outcomes %v, want three moves", got)
	}
	if v := r.events.Violations(); len(v) != 0 {
		t.Errorf("a forwarding relay reported %d read-only violations; it has no HTTP request to replay", len(v))
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
	if got := outcomes(r.events.Forwards()); strings.Join(got, ",") != "moved" {
		t.Errorf("forward outcomes %v, want one move", got)
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
	got := r.events.Forwards()
	if len(got) != 2 || got[0].Outcome != wire.ForwardRefused || !strings.Contains(got[0].Reason, "log in") {
		t.Fatalf("forward events %+v, want a refusal naming the login, then a move", got)
	}
}
