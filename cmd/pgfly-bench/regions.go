package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/edge"
	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/internal/sampleapp"
)

// Region names, the same as the demo's and the tests'.
const (
	primaryRegion = regions.DefaultPrimaryRegion
	replicaRegion = regions.DefaultReplicaRegion
)

// twoRegions is three ways to run the sample app for users in the replica region, side by
// side on one cluster, each behind an edge of its own that stands where the users are:
//
//   - pgfly: internal/regions' setup, in each region the app behind pgfly (relay and shim);
//     the app in the replica region reads its replica, and a write request is replayed in
//     the primary region.
//   - DB-level routing: the app in the replica region only, with two database handles: the
//     local replica, and the remote primary for writes and the reads after them
//     (sampleapp.WithPrimary).
//   - everything in the primary region: the app beside the primary; every request crosses.
//
// Every cross-region connection crosses the setup's link (regions.Link): the edge to the
// primary region (pgfly's replays, and every request of the third setup), the replica-region
// app's connection to the primary (DB-level routing), the replica-region pgfly's connection
// to the primary (its lag monitor); and the WAL stream from the primary to the replica
// crosses a link of its own (Setup.WAL), so that section 5 can delay it alone.
type twoRegions struct {
	*regions.Setup
	closers []func() error // run in reverse order by Close, before the setup's own

	routedEdge, primaryEdge string // base URLs where the users of the other two setups send requests
}

// Close stops the two comparison setups, then the pgfly setup (its Close, which it shadows).
func (t *twoRegions) Close() error {
	var errs []error
	for i := len(t.closers) - 1; i >= 0; i-- {
		errs = append(errs, t.closers[i]())
	}
	return errors.Join(append(errs, t.Setup.Close())...)
}

// openDB opens a database/sql pool sized like internal/regions'.
func (t *twoRegions) openDB(dsn string) (*sql.DB, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(16)
	db.SetMaxIdleConns(16)
	t.closers = append(t.closers, db.Close)
	return db, nil
}

// serveApp serves h on a fresh loopback listener and returns its address.
func (t *twoRegions) serveApp(h http.Handler) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.closers = append(t.closers, func() error {
		srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	return ln.Addr().String(), nil
}

// startEdge starts a local edge that sends every request to the one region at addr.
func (t *twoRegions) startEdge(region, addr string) (string, error) {
	e, err := edge.New(edge.Config{Listen: "127.0.0.1:0", Regions: map[string]string{region: "http://" + addr}, Default: region}, zap.NewNop())
	if err != nil {
		return "", err
	}
	if err := e.Listen(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- e.Serve() }()
	t.closers = append(t.closers, func() error { return errors.Join(e.Close(), <-done) })
	return "http://" + e.Addr().String(), nil
}

func dsn(addr string) string {
	return fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", pgcluster.RoleSuperuser.Name, addr, pgcluster.Database)
}

// startTwoRegions builds the three setups on the bench's cluster with one-way delay d
// between the regions.
func (b *bench) startTwoRegions(ctx context.Context, d time.Duration) (_ *twoRegions, err error) {
	c := b.cluster
	s, err := regions.Start(ctx, regions.Options{Cluster: c, Link: &regions.LinkConfig{Delay: d, WAL: true}})
	if err != nil {
		return nil, err
	}
	t := &twoRegions{Setup: s}
	defer func() {
		if err != nil {
			t.Close()
		}
	}()
	su := pgcluster.RoleSuperuser.Name

	// DB-level routing: the app beside the replica reads it directly and sends writes, and
	// the reads after them, to the primary across the link.
	toPrimaryDB, err := s.Link.Forward(c.Primary.Addr())
	if err != nil {
		return nil, err
	}
	localDB, err := t.openDB(c.Replica.URL(su, "", pgcluster.Database))
	if err != nil {
		return nil, err
	}
	remoteDB, err := t.openDB(dsn(toPrimaryDB))
	if err != nil {
		return nil, err
	}
	appD, err := t.serveApp(sampleapp.New(localDB, replicaRegion, nil, sampleapp.WithPrimary(remoteDB)))
	if err != nil {
		return nil, err
	}
	if t.routedEdge, err = t.startEdge(replicaRegion, appD); err != nil {
		return nil, err
	}

	// Everything in the primary region: the app beside the primary, far from its users.
	primaryDB, err := t.openDB(c.Primary.URL(su, "", pgcluster.Database))
	if err != nil {
		return nil, err
	}
	appE, err := t.serveApp(sampleapp.New(primaryDB, primaryRegion, nil))
	if err != nil {
		return nil, err
	}
	toAppE, err := s.Link.Forward(appE)
	if err != nil {
		return nil, err
	}
	if t.primaryEdge, err = t.startEdge(primaryRegion, toAppE); err != nil {
		return nil, err
	}
	return t, nil
}
