package wire_test

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" database/sql driver

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

func TestDatabaseSQLClient(t *testing.T) {
	r := primaryRelay(t)
	db, err := sql.Open("pgx", r.url(pgcluster.RoleSCRAM))
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(3)
	ctx := boundedCtx(t, 30*time.Second)

	if _, err := db.ExecContext(ctx, "create table clients_sql (id int primary key, name text not null, n int)"); err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { db.ExecContext(context.Background(), "drop table clients_sql") })

	t.Run("CRUD", func(t *testing.T) {
		for i := 1; i <= 3; i++ {
			res, err := db.ExecContext(ctx, "insert into clients_sql values ($1, $2, $3)", i, fmt.Sprintf("name %d", i), i*10)
			if err != nil {
				t.Fatalf("insert %d: %v", i, err)
			}
			if n, _ := res.RowsAffected(); n != 1 {
				t.Errorf("insert %d: got %d rows affected, want 1", i, n)
			}
		}
		res, err := db.ExecContext(ctx, "update clients_sql set n = n + 1 where id >= $1", 2)
		if err != nil {
			t.Fatalf("update: %v", err)
		}
		if n, _ := res.RowsAffected(); n != 2 {
			t.Errorf("update: got %d rows affected, want 2", n)
		}
		if _, err := db.ExecContext(ctx, "delete from clients_sql where id = $1", 1); err != nil {
			t.Fatalf("delete: %v", err)
		}
		rows, err := db.QueryContext(ctx, "select id, name, n from clients_sql order by id")
		if err != nil {
			t.Fatalf("select: %v", err)
		}
		var got []string
		for rows.Next() {
			var id, n int
			var name string
			if err := rows.Scan(&id, &name, &n); err != nil {
				t.Fatalf("scan: %v", err)
			}
			got = append(got, fmt.Sprintf("%d/%s/%d", id, name, n))
		}
		if err := rows.Err(); err != nil {
			t.Fatalf("rows: %v", err)
		}
		if want := "2/name 2/21 3/name 3/31"; strings.Join(got, " ") != want {
			t.Errorf("rows: got %q, want %q", strings.Join(got, " "), want)
		}
		err = db.QueryRowContext(ctx, "select name from clients_sql where id = $1", 1).Scan(new(string))
		if !errors.Is(err, sql.ErrNoRows) {
			t.Errorf("deleted row: got %v, want sql.ErrNoRows", err)
		}
	})

	t.Run("transactions", func(t *testing.T) {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatalf("begin: %v", err)
		}
		if _, err := tx.ExecContext(ctx, "insert into clients_sql values (10, 'committed', 0)"); err != nil {
			t.Fatalf("insert in tx: %v", err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatalf("commit: %v", err)
		}
		tx, err = db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatalf("begin: %v", err)
		}
		if _, err := tx.ExecContext(ctx, "insert into clients_sql values (11, 'rolled back', 0)"); err != nil {
			t.Fatalf("insert in tx: %v", err)
		}
		var inside int
		if err := tx.QueryRowContext(ctx, "select count(*) from clients_sql where id = 11").Scan(&inside); err != nil || inside != 1 {
			t.Fatalf("count inside the tx: got %d, %v, want 1", inside, err)
		}
		if err := tx.Rollback(); err != nil {
			t.Fatalf("rollback: %v", err)
		}
		var names string
		err = db.QueryRowContext(ctx, "select string_agg(name, ',' order by id) from clients_sql where id >= 10").Scan(&names)
		if err != nil {
			t.Fatalf("select: %v", err)
		}
		if names != "committed" {
			t.Errorf("rows after commit and rollback: got %q, want %q", names, "committed")
		}
	})

	t.Run("prepared statement", func(t *testing.T) {
		stmt, err := db.PrepareContext(ctx, "select name, n * $2::int from clients_sql where id = $1")
		if err != nil {
			t.Fatalf("prepare: %v", err)
		}
		defer stmt.Close()
		for _, tc := range []struct{ id, mul, want int }{{2, 1, 21}, {3, 2, 62}, {2, 10, 210}} {
			var name string
			var got int
			if err := stmt.QueryRowContext(ctx, tc.id, tc.mul).Scan(&name, &got); err != nil {
				t.Fatalf("execute with %d, %d: %v", tc.id, tc.mul, err)
			}
			if got != tc.want || name != fmt.Sprintf("name %d", tc.id) {
				t.Errorf("execute with %d, %d: got %q %d, want %q %d", tc.id, tc.mul, name, got, fmt.Sprintf("name %d", tc.id), tc.want)
			}
		}
	})
}

// runClientTool runs one of the PostgreSQL client programs with a bounded time and returns
// its combined output; a missing binary fails the test.
func runClientTool(tb testing.TB, stdin string, name string, args ...string) (string, error) {
	tb.Helper()
	path := "/usr/bin/" + name
	if _, err := os.Stat(path); err != nil {
		tb.Fatalf("%s is needed for this test (install postgresql-client): %v", path, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=10", "PGOPTIONS=", "PSQLRC=/dev/null")
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	return out.String(), err
}

func TestPsqlClient(t *testing.T) {
	r := primaryRelay(t)
	url := r.url(pgcluster.RoleSuperuser)

	t.Run("statements and copy from stdin", func(t *testing.T) {
		out, err := runClientTool(t, "1\tone\n2\ttwo, with a comma\n3\t\\N\n\\.\n", "psql", url,
			"-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
			"-c", "create temp table psql_t (id int, v text)",
			"-c", `\copy psql_t from stdin`,
			"-c", "select count(*), count(v), string_agg(v, '|' order by id) from psql_t",
			"-c", "begin; update psql_t set v = 'x' where id = 3; commit",
			"-c", "select v from psql_t where id = 3",
			"-c", `\copy (select id, v from psql_t order by id) to stdout with (format csv)`,
		)
		if err != nil {
			t.Fatalf("psql: %v\n%s", err, out)
		}
		want := "3|2|one|two, with a comma\nx\n1,one\n2,\"two, with a comma\"\n3,x\n"
		if out != want {
			t.Errorf("psql output: got %q, want %q", out, want)
		}
	})

	t.Run("error stops the script", func(t *testing.T) {
		out, err := runClientTool(t, "", "psql", url, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
			"-c", "select 'before'", "-c", "select 1/0", "-c", "select 'after'")
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("psql: got %v, want exit code 1\n%s", err, out)
		}
		if !strings.Contains(out, "before") || !strings.Contains(out, "division by zero") || strings.Contains(out, "after") {
			t.Errorf("psql output: got %q, want \"before\" and the error, not \"after\"", out)
		}
	})
}

func TestPgbenchClient(t *testing.T) {
	// A database of its own keeps pgbench's tables away from every other test.
	primary := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	mustExec(t, primary, "create database clients_pgbench")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := primary.Exec(ctx, "drop database clients_pgbench with (force)"); err != nil {
			t.Errorf("drop database: %v", err)
		}
	})
	r := primaryRelay(t)
	url := fmt.Sprintf("postgres://%s@%s/clients_pgbench?sslmode=disable", pgcluster.RoleSuperuser.Name, r.Addr())

	if out, err := runClientTool(t, "", "pgbench", "-i", "--scale=1", "-q", url); err != nil {
		t.Fatalf("pgbench -i: %v\n%s", err, out)
	}
	tests := []struct {
		name string
		args []string
	}{
		{"prepared", []string{"-M", "prepared"}},
		{"extended", []string{"-M", "extended"}},
		{"simple, select only", []string{"-M", "simple", "-S"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"-n", "-t", "50", "-c", "4", "-j", "2"}, tt.args...)
			out, err := runClientTool(t, "", "pgbench", append(args, url)...)
			if err != nil {
				t.Fatalf("pgbench: %v\n%s", err, out)
			}
			for _, want := range []string{"number of transactions actually processed: 200/200", "number of failed transactions: 0 "} {
				if !strings.Contains(out, want) {
					t.Errorf("pgbench output lacks %q:\n%s", want, out)
				}
			}
		})
	}
	// The runs changed the balances they were meant to: each TPC-B transaction adds its
	// delta to a branch and to the history table.
	var history, drift int
	bench := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", "clients_pgbench"))
	err := bench.QueryRow(boundedCtx(t, 10*time.Second),
		"select (select count(*) from pgbench_history), (select sum(bbalance) from pgbench_branches) - (select sum(delta) from pgbench_history)").
		Scan(&history, &drift)
	if err != nil {
		t.Fatalf("check balances: %v", err)
	}
	if history != 400 || drift != 0 {
		t.Errorf("history rows, branch balance drift: got %d, %d, want 400, 0", history, drift)
	}
}

// runNode runs script (in wire/testdata/node, where `npm ci` installed node-postgres, as
// .ci/run does) with env and returns its output.
func runNode(tb testing.TB, script string, env ...string) []byte {
	tb.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		tb.Fatalf("node is needed for this test (apt-get install -y nodejs): %v", err)
	}
	dir, _ := filepath.Abs(filepath.Join("testdata", "node"))
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "pg")); err != nil {
		tb.Fatalf("node-postgres is not installed in %s: run `npm ci --prefix %s` (.ci/run does): %v", dir, dir, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, filepath.Join(dir, script))
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		tb.Fatalf("node %s: %v\n%s", script, err, stderr)
	}
	return out
}

// TestNodePostgresClient runs node-postgres (wire/testdata/node, installed there by `npm ci`,
// which .ci/run does) through the relay over TCP and over a Unix socket, given as node-postgres
// takes one: the directory as the host.
func TestNodePostgresClient(t *testing.T) {
	socketDir := t.TempDir()
	tcp := primaryRelay(t)
	unix := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{Listen: socketDir, UnixPort: 6544})
	for name, c := range map[string]struct {
		relay *relay
		url   string
	}{
		"tcp":         {tcp, tcp.url(pgcluster.RoleSCRAM)},
		"unix socket": {unix, "postgres://" + pgcluster.RoleSuperuser.Name + "@/" + pgcluster.Database + "?host=" + socketDir + "&port=6544"},
	} {
		url := c.url
		t.Run(name, func(t *testing.T) {
			out := runNode(t, "client.js", "DATABASE_URL="+url)
			var got struct {
				Simple, Params, Named, NamedAgain, InTransaction, AfterError int
				Error                                                        string
			}
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("decode %q: %v", out, err)
			}
			if got.Simple != 42 || got.Params != 42 || got.Named != 42 || got.NamedAgain != 8 || got.InTransaction != 2 ||
				got.Error != "22012" || got.AfterError != 7 {
				t.Errorf("got %+v, want 42, 42, 42, 8, 2 rows, error 22012 (division by zero), then 7", got)
			}
			if n := len(c.relay.events.Opened()); n != 1 {
				t.Errorf("the relay saw %d sessions, want node-postgres's one", n)
			}
		})
	}
}
