package sampleapp_test

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
	"github.com/pgfly/pgfly/internal/sampleapp"
)

// TestWork covers the benchmark's requests: GET /work reads, POST /work reads and writes, on
// the primary, on a replica (which refuses the write), and on a replica with DB-level routing
// (WithPrimary), which sends the write and what follows it to the primary.
func TestWork(t *testing.T) {
	cluster := pgtest.Start(t, pgcluster.Options{})
	su := pgcluster.RoleSuperuser.Name
	primaryDB := openDB(t, cluster.Primary.URL(su, "", pgcluster.Database))
	if err := sampleapp.Migrate(t.Context(), primaryDB); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	if err := cluster.WaitReplayed(t.Context()); err != nil {
		t.Fatal(err)
	}
	replicaDB := openDB(t, cluster.Replica.URL(su, "", pgcluster.Database))

	start := func(t *testing.T, h http.Handler) string {
		srv := httptest.NewServer(h)
		t.Cleanup(srv.Close)
		return srv.URL
	}
	for _, tc := range []struct {
		name        string
		app         func(t *testing.T) http.Handler
		wantWrite   int    // status of POST /work
		wantErrBody string // in the body of a failed POST /work
	}{
		{"primary", func(t *testing.T) http.Handler {
			return sampleapp.New(primaryDB, "iad", zaptest.NewLogger(t))
		}, http.StatusCreated, ""},
		{"replica refuses the write", func(t *testing.T) http.Handler {
			return sampleapp.New(replicaDB, "fra", zaptest.NewLogger(t))
		}, http.StatusInternalServerError, "read-only"},
		{"replica with DB-level routing", func(t *testing.T) http.Handler {
			return sampleapp.New(replicaDB, "fra", zaptest.NewLogger(t), sampleapp.WithPrimary(primaryDB))
		}, http.StatusCreated, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := start(t, tc.app(t))
			var read sampleapp.Work
			sendJSON(t, base, request{method: "GET", path: "/work"}, http.StatusOK, &read)
			if read.Reads != 3 || read.Writes != 0 {
				t.Errorf("GET /work: got %+v, want 3 reads and no writes", read)
			}

			if tc.wantWrite != http.StatusCreated {
				resp, body := send(t, base, request{method: "POST", path: "/work?name=" + url.QueryEscape(tc.name)})
				if resp.StatusCode != tc.wantWrite || !strings.Contains(body, tc.wantErrBody) {
					t.Errorf("POST /work: got %d %q, want %d containing %q", resp.StatusCode, body, tc.wantWrite, tc.wantErrBody)
				}
				if got := countNamed(t, primaryDB, tc.name); got != 0 {
					t.Errorf("items named %q on the primary: got %d, want 0", tc.name, got)
				}
				return
			}
			var wrote sampleapp.Work
			sendJSON(t, base, request{method: "POST", path: "/work?name=" + url.QueryEscape(tc.name)}, http.StatusCreated, &wrote)
			if wrote.ID <= 0 || wrote.Reads != 3 || wrote.Writes != 2 {
				t.Errorf("POST /work: got %+v, want a positive id, 3 reads and 2 writes", wrote)
			}
			var size int
			if err := primaryDB.QueryRowContext(t.Context(), "SELECT body_size FROM items WHERE id = $1 AND name = $2",
				wrote.ID, tc.name).Scan(&size); err != nil {
				t.Fatalf("read item %d on the primary: %v", wrote.ID, err)
			}
			if size != 1 {
				t.Errorf("body_size of item %d after its update: got %d, want 1", wrote.ID, size)
			}
		})
	}
}
