// Package pgtest starts a pgcluster.Cluster for one test and stops it when
// the test ends. It must never be imported by non-test code.
package pgtest

import (
	"testing"

	"github.com/pgfly/pgfly/internal/pgcluster"
)

// Start starts a primary and a streaming replica for tb, fails tb with the
// reason (including how to install PostgreSQL) when that is impossible, and
// closes the cluster in tb's Cleanup. Progress goes to tb.Logf unless
// opts.Logf is set.
func Start(tb testing.TB, opts pgcluster.Options) *pgcluster.Cluster {
	tb.Helper()
	if opts.Logf == nil {
		opts.Logf = tb.Logf
	}
	c, err := pgcluster.Start(tb.Context(), opts)
	if err != nil {
		tb.Fatalf("start PostgreSQL primary and replica: %v", err)
	}
	tb.Cleanup(func() {
		if err := c.Close(); err != nil {
			tb.Errorf("close PostgreSQL cluster: %v", err)
		}
	})
	return c
}
