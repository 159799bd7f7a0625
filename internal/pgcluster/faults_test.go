package pgcluster_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
)

// TestFaults freezes, thaws and promotes the replica of a cluster of its own.
func TestFaults(t *testing.T) {
	c := pgtest.Start(t, pgcluster.Options{})
	ctx := t.Context()
	replicaURL := c.Replica.URL("postgres", "", pgcluster.Database)

	t.Run("a frozen replica does not answer until it is thawed", func(t *testing.T) {
		held := connect(t, replicaURL) // a session opened before the freeze
		if err := c.Replica.Freeze(); err != nil {
			t.Fatalf("Freeze: %v", err)
		}
		t.Cleanup(func() { c.Replica.Thaw() })
		for name, try := range map[string]func(context.Context) error{
			"a new connection": func(ctx context.Context) error {
				conn, err := pgx.Connect(ctx, replicaURL)
				if err == nil {
					conn.Close(context.Background())
				}
				return err
			},
			"a query on an open session": func(ctx context.Context) error {
				return held.QueryRow(ctx, "SELECT 1").Scan(new(int))
			},
		} {
			ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
			err := try(ctx)
			cancel()
			if err == nil {
				t.Errorf("%s to a frozen replica succeeded, want a timeout", name)
			}
		}
		if err := c.Replica.Thaw(); err != nil {
			t.Fatalf("Thaw: %v", err)
		}
		conn := connect(t, replicaURL)
		if err := conn.QueryRow(ctx, "SELECT 1").Scan(new(int)); err != nil {
			t.Errorf("query after Thaw: %v", err)
		}
	})

	t.Run("a promoted replica writes on a new timeline beside the primary", func(t *testing.T) {
		if err := c.Replica.Promote(ctx); err != nil {
			t.Fatalf("Promote: %v", err)
		}
		timeline := func(s *pgcluster.Server) string {
			t.Helper()
			conn := connect(t, s.URL("postgres", "", pgcluster.Database))
			mustExec(t, conn, "CREATE TABLE IF NOT EXISTS promoted_"+s.Name+" (id int)")
			var recovery bool
			var walfile string
			if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery(), pg_walfile_name(pg_current_wal_lsn())").Scan(&recovery, &walfile); err != nil {
				t.Fatalf("%s: %v", s.Name, err)
			}
			if recovery {
				t.Errorf("%s: pg_is_in_recovery() = true, want false", s.Name)
			}
			return walfile[:8]
		}
		if got, want := timeline(c.Replica), "00000002"; got != want {
			t.Errorf("promoted replica's timeline: got %s, want %s", got, want)
		}
		if got, want := timeline(c.Primary), "00000001"; got != want {
			t.Errorf("primary's timeline: got %s, want %s", got, want)
		}
	})
}
