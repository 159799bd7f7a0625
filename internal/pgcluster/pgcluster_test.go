package pgcluster_test

import (
	"bytes"
	"context"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
)

func TestCluster(t *testing.T) {
	began := time.Now()
	c := pgtest.Start(t, pgcluster.Options{TLS: true})
	t.Logf("Start took %v", time.Since(began).Round(time.Millisecond))
	ctx := t.Context()

	primary := connect(t, c.Primary.URL("postgres", "", pgcluster.Database))
	mustExec(t, primary, "CREATE TABLE replicated (id int PRIMARY KEY, note text)")
	mustExec(t, primary, "INSERT INTO replicated VALUES (1, 'from primary')")
	if err := c.WaitReplayed(ctx); err != nil {
		t.Fatalf("WaitReplayed: %v", err)
	}

	t.Run("only the replica is in recovery", func(t *testing.T) {
		for _, tc := range []struct {
			server *pgcluster.Server
			want   bool
		}{
			{c.Primary, false},
			{c.Replica, true},
		} {
			conn := connect(t, tc.server.URL("postgres", "", pgcluster.Database))
			var got bool
			if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&got); err != nil {
				t.Fatalf("%s: pg_is_in_recovery: %v", tc.server.Name, err)
			}
			if got != tc.want {
				t.Errorf("%s: pg_is_in_recovery() = %v, want %v", tc.server.Name, got, tc.want)
			}
		}
	})

	t.Run("a row inserted on the primary is on the replica after WaitReplayed", func(t *testing.T) {
		replica := connect(t, c.Replica.URL("postgres", "", pgcluster.Database))
		var note string
		if err := replica.QueryRow(ctx, "SELECT note FROM replicated WHERE id = 1").Scan(&note); err != nil {
			t.Fatalf("select on replica: %v", err)
		}
		if note != "from primary" {
			t.Errorf("got note %q, want %q", note, "from primary")
		}
	})

	t.Run("the replica refuses writes with 25006", func(t *testing.T) {
		replica := connect(t, c.Replica.URL("postgres", "", pgcluster.Database))
		_, err := replica.Exec(ctx, "INSERT INTO replicated VALUES (2, 'from replica')")
		if got := sqlState(err); got != "25006" {
			t.Errorf("INSERT on replica: got SQLSTATE %q (err %v), want 25006", got, err)
		}
	})

	t.Run("every role logs in with its password and can create tables", func(t *testing.T) {
		for _, role := range pgcluster.Roles() {
			t.Run(role.Method, func(t *testing.T) {
				conn := connect(t, c.Primary.URL(role.Name, role.Password, pgcluster.Database))
				var user string
				if err := conn.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil {
					t.Fatalf("current_user: %v", err)
				}
				if user != role.Name {
					t.Errorf("got current_user %q, want %q", user, role.Name)
				}
				table := pgx.Identifier{"owned_by_" + role.Name}.Sanitize()
				mustExec(t, conn, "CREATE TABLE "+table+" (id int)")
				mustExec(t, conn, "INSERT INTO "+table+" VALUES (1)")
			})
		}
	})

	t.Run("the md5 role's password is stored as md5", func(t *testing.T) {
		var stored string
		err := primary.QueryRow(ctx, "SELECT rolpassword FROM pg_authid WHERE rolname = $1", pgcluster.RoleMD5.Name).Scan(&stored)
		if err != nil {
			t.Fatalf("read pg_authid: %v", err)
		}
		if !strings.HasPrefix(stored, "md5") {
			t.Errorf("got stored password %.10q..., want an md5 hash", stored)
		}
	})

	t.Run("a wrong password is rejected with 28P01", func(t *testing.T) {
		for _, role := range pgcluster.Roles() {
			if role.Password == "" {
				continue
			}
			t.Run(role.Method, func(t *testing.T) {
				conn, err := pgx.Connect(ctx, c.Primary.URL(role.Name, role.Password+"-wrong", pgcluster.Database))
				if err == nil {
					conn.Close(ctx)
					t.Fatal("connected with a wrong password")
				}
				if got := sqlState(err); got != "28P01" {
					t.Errorf("got SQLSTATE %q (err %v), want 28P01", got, err)
				}
			})
		}
	})

	t.Run("TLS with verify-full against CAFile", func(t *testing.T) {
		for _, s := range []*pgcluster.Server{c.Primary, c.Replica} {
			conn := connect(t, s.URL("postgres", "", pgcluster.Database, "sslmode=verify-full", "sslrootcert="+c.CAFile))
			var ssl bool
			if err := conn.QueryRow(ctx, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").Scan(&ssl); err != nil {
				t.Fatalf("%s: pg_stat_ssl: %v", s.Name, err)
			}
			if !ssl {
				t.Errorf("%s: got ssl = false, want true", s.Name)
			}
		}
	})

	t.Run("the replica stops and starts on the same port", func(t *testing.T) {
		port := c.Replica.Port
		if err := c.Replica.Stop(); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		if conn, err := pgx.Connect(ctx, c.Replica.URL("postgres", "", pgcluster.Database)); err == nil {
			conn.Close(ctx)
			t.Fatal("connected to a stopped replica")
		}
		if err := c.Replica.Start(); err != nil {
			t.Fatalf("Start: %v", err)
		}
		if c.Replica.Port != port {
			t.Errorf("got port %d after restart, want %d", c.Replica.Port, port)
		}
		if err := c.WaitStreaming(ctx); err != nil {
			t.Fatalf("WaitStreaming: %v", err)
		}
		mustExec(t, primary, "INSERT INTO replicated VALUES (3, 'after restart')")
		if err := c.WaitReplayed(ctx); err != nil {
			t.Fatalf("WaitReplayed: %v", err)
		}
		replica := connect(t, c.Replica.URL("postgres", "", pgcluster.Database))
		var n int
		if err := replica.QueryRow(ctx, "SELECT count(*) FROM replicated").Scan(&n); err != nil {
			t.Fatalf("count on replica: %v", err)
		}
		if n != 2 {
			t.Errorf("got %d rows on the replica, want 2", n)
		}
	})

	t.Run("the primary stops and starts and the replica streams again", func(t *testing.T) {
		primary.Close(ctx)
		if err := c.Primary.Stop(); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		if err := c.Primary.Start(); err != nil {
			t.Fatalf("Start: %v", err)
		}
		began := time.Now()
		if err := c.WaitStreaming(ctx); err != nil {
			t.Fatalf("WaitStreaming: %v", err)
		}
		t.Logf("replica streamed again %v after the primary restarted", time.Since(began).Round(time.Millisecond))
		conn := connect(t, c.Primary.URL("postgres", "", pgcluster.Database))
		mustExec(t, conn, "INSERT INTO replicated VALUES (4, 'after primary restart')")
		if err := c.WaitReplayed(ctx); err != nil {
			t.Fatalf("WaitReplayed: %v", err)
		}
	})

	t.Run("Close stops every server and removes Dir", func(t *testing.T) {
		if err := c.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if err := c.Close(); err != nil {
			t.Errorf("second Close: got %v, want nil", err)
		}
		// The postmaster's command line names its data directory; its
		// children's process titles name the cluster via cluster_name.
		if pids := processesMentioning(t, filepath.Base(c.Dir)); len(pids) > 0 {
			t.Errorf("got processes %v still running for %s, want none", pids, c.Dir)
		}
		if _, err := os.Stat(c.Dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("stat %s: got %v, want not exist", c.Dir, err)
		}
	})
}

func TestStartWithoutBinaries(t *testing.T) {
	dir := t.TempDir()
	_, err := pgcluster.Start(t.Context(), pgcluster.Options{BinDir: dir})
	if !errors.Is(err, pgcluster.ErrBinariesNotFound) {
		t.Fatalf("got error %v, want ErrBinariesNotFound", err)
	}
	for _, want := range []string{dir, "apt-get install -y postgresql", "PGFLY_PG_BIN"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("got error %q, want it to mention %q", err, want)
		}
	}
}

func TestServerURL(t *testing.T) {
	s := &pgcluster.Server{Name: "primary", Host: "127.0.0.1", Port: 5432}
	for _, tc := range []struct {
		name                     string
		user, password, database string
		params                   []string
		want                     string
	}{
		{
			name: "trust user",
			user: "postgres", database: "pgfly",
			want: "postgres://postgres@127.0.0.1:5432/pgfly?sslmode=disable",
		},
		{
			name: "password is escaped",
			user: "u", password: "p@ss/w:rd", database: "db",
			want: "postgres://u:p%40ss%2Fw%3Ard@127.0.0.1:5432/db?sslmode=disable",
		},
		{
			name: "params override sslmode and add keys",
			user: "u", database: "db",
			params: []string{"sslmode=verify-full", "sslrootcert=/tmp/ca.crt"},
			want:   "postgres://u@127.0.0.1:5432/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.crt",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := s.URL(tc.user, tc.password, tc.database, tc.params...)
			if got != tc.want {
				t.Errorf("got %s, want %s", got, tc.want)
			}
			if _, err := url.Parse(got); err != nil {
				t.Errorf("url.Parse(%s): %v", got, err)
			}
		})
	}
	if got, want := s.Addr(), "127.0.0.1:5432"; got != want {
		t.Errorf("Addr: got %s, want %s", got, want)
	}
}

// connect opens a pgx connection that the test closes.
func connect(tb testing.TB, connURL string) *pgx.Conn {
	tb.Helper()
	conn, err := pgx.Connect(tb.Context(), connURL)
	if err != nil {
		tb.Fatalf("connect: %v", err)
	}
	tb.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// mustExec runs sql or fails the test.
func mustExec(tb testing.TB, conn *pgx.Conn, sql string) {
	tb.Helper()
	if _, err := conn.Exec(tb.Context(), sql); err != nil {
		tb.Fatalf("%s: %v", sql, err)
	}
}

// sqlState returns the SQLSTATE of a server error, or "".
func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// processesMentioning lists live processes whose command line contains s.
func processesMentioning(tb testing.TB, s string) []string {
	tb.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		tb.Skipf("no /proc to look for processes: %v", err)
	}
	var found []string
	for _, e := range entries {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(s)) {
			continue
		}
		found = append(found, e.Name()+": "+string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '})))
	}
	return found
}
