package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/delay"
	"github.com/pgfly/pgfly/internal/edge"
	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/internal/sampleapp"
	"github.com/pgfly/pgfly/internal/sidecar"
	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// Region names, the same as the demo's and the tests'.
const (
	primaryRegion = regions.DefaultPrimaryRegion
	replicaRegion = regions.DefaultReplicaRegion
)

// twoRegions is three ways to run the sample app for users in the replica region, side by
// side on one cluster, each behind an edge of its own that stands where the users are:
//
//   - pgfly: in each region the app behind pgfly (relay and shim); the app in the replica
//     region reads its replica, and a write request is replayed in the primary region.
//   - DB-level routing: the app in the replica region only, with two database handles: the
//     local replica, and the remote primary for writes and the reads after them
//     (sampleapp.WithPrimary).
//   - everything in the primary region: the app beside the primary; every request crosses.
//
// Every cross-region connection goes through a delay relay: the edge to the primary region
// (pgfly's replays, and every request of the third setup), the replica-region app's
// connection to the primary (DB-level routing), the replica-region pgfly's connection to
// the primary (its lag monitor), and the WAL stream from the primary to the replica.
//
// Section 6 builds the first setup alone (startPgfly on an empty twoRegions), without the
// relay on the WAL stream.
type twoRegions struct {
	relays  []*delay.Relay
	closers []func() error // run in reverse order by close

	pgflyEdge, routedEdge, primaryEdge string // base URLs where the users send requests
	replicaAdmin                       string // the replica-region pgfly's /metrics
	walRelay                           *delay.Relay
}

func (t *twoRegions) close() error {
	var errs []error
	for i := len(t.closers) - 1; i >= 0; i-- {
		errs = append(errs, t.closers[i]())
	}
	return errors.Join(errs...)
}

// relay starts a delay relay in front of target.
func (t *twoRegions) relay(target string, d time.Duration) (*delay.Relay, error) {
	r, err := delay.New(delay.Config{Target: target, Delay: d})
	if err != nil {
		return nil, err
	}
	if err := r.Listen(); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- r.Serve() }()
	t.relays = append(t.relays, r)
	t.closers = append(t.closers, func() error { return errors.Join(r.Close(), <-done) })
	return r, nil
}

// setDelay changes the delay of every cross-region connection.
func (t *twoRegions) setDelay(d time.Duration) {
	for _, r := range t.relays {
		r.SetDelay(d)
	}
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

// serveApp serves h on ln.
func (t *twoRegions) serveApp(ln net.Listener, h http.Handler) {
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
}

// startSidecar starts one pgfly instance in process.
func (t *twoRegions) startSidecar(ctx context.Context, cfg sidecar.Config) (*sidecar.Sidecar, error) {
	s, err := sidecar.New(cfg, zap.NewNop())
	if err != nil {
		return nil, err
	}
	if err := s.Listen(); err != nil {
		return nil, err
	}
	s.Start()
	t.closers = append(t.closers, s.Close)
	if err := s.Ready(ctx); err != nil {
		return nil, fmt.Errorf("pgfly in %s: %w", cfg.Shim.Region, err)
	}
	return s, nil
}

// startEdge starts a local edge in front of regions.
func (t *twoRegions) startEdge(regions map[string]string, def string) (string, error) {
	e, err := edge.New(edge.Config{Listen: "127.0.0.1:0", Regions: regions, Default: def}, zap.NewNop())
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

func listenLocal() (net.Listener, string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	return ln, "http://" + ln.Addr().String(), nil
}

func dsn(addr string) string {
	return fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", pgcluster.RoleSuperuser.Name, addr, pgcluster.Database)
}

// startTwoRegions builds the three setups on c with one-way delay d between the regions.
func (b *bench) startTwoRegions(ctx context.Context, d time.Duration) (_ *twoRegions, err error) {
	c := b.cluster
	t := &twoRegions{}
	defer func() {
		if err != nil {
			t.close()
		}
	}()
	su := pgcluster.RoleSuperuser.Name
	primaryDB, err := t.openDB(c.Primary.URL(su, "", pgcluster.Database))
	if err != nil {
		return nil, err
	}
	if err := sampleapp.Migrate(ctx, primaryDB); err != nil {
		return nil, err
	}
	if err := c.WaitReplayed(ctx); err != nil {
		return nil, err
	}

	// The WAL stream crosses regions too: point the replica at the primary through a relay.
	if t.walRelay, err = t.relay(c.Primary.Addr(), d); err != nil {
		return nil, err
	}
	if err := b.streamThrough(ctx, t.walRelay); err != nil {
		return nil, err
	}
	t.closers = append(t.closers, func() error {
		// Back to the direct stream before the relay goes away.
		rctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return b.streamDirect(rctx)
	})

	// pgfly in each region.
	pgfly, err := t.startPgfly(ctx, c, d, pgflyOptions{})
	if err != nil {
		return nil, err
	}
	t.pgflyEdge, t.replicaAdmin = pgfly.edge, pgfly.replicaAdmin

	// DB-level routing: the app beside the replica reads it directly and sends writes, and
	// the reads after them, to the primary across the delay.
	toPrimaryDB, err := t.relay(c.Primary.Addr(), d)
	if err != nil {
		return nil, err
	}
	localDB, err := t.openDB(c.Replica.URL(su, "", pgcluster.Database))
	if err != nil {
		return nil, err
	}
	remoteDB, err := t.openDB(dsn(toPrimaryDB.Addr().String()))
	if err != nil {
		return nil, err
	}
	appDLn, appDURL, err := listenLocal()
	if err != nil {
		return nil, err
	}
	t.serveApp(appDLn, sampleapp.New(localDB, replicaRegion, nil, sampleapp.WithPrimary(remoteDB)))
	if t.routedEdge, err = t.startEdge(map[string]string{replicaRegion: appDURL}, replicaRegion); err != nil {
		return nil, err
	}

	// Everything in the primary region: the app beside the primary, far from its users.
	appELn, _, err := listenLocal()
	if err != nil {
		return nil, err
	}
	t.serveApp(appELn, sampleapp.New(primaryDB, primaryRegion, nil))
	toAppE, err := t.relay(appELn.Addr().String(), d)
	if err != nil {
		return nil, err
	}
	if t.primaryEdge, err = t.startEdge(map[string]string{primaryRegion: "http://" + toAppE.Addr().String()}, primaryRegion); err != nil {
		return nil, err
	}
	return t, nil
}

// pgflyOptions vary the pgfly setup between sections.
type pgflyOptions struct {
	disableLearning bool // the replica-region pgfly learns no write routes
	// wrapApp, when set, wraps the sample app's handler in each region.
	wrapApp func(region string, h http.Handler) http.Handler
}

// pgflySetup is the sample app behind pgfly in each region and an edge beside the users in the
// replica region.
type pgflySetup struct {
	edge         string // base URL where the users send requests
	replicaAdmin string // the replica-region pgfly's admin endpoints (/metrics, /routes)
}

// startPgfly starts the pgfly setup on c: in the primary region the app beside the primary,
// behind pgfly; in the replica region the app beside the replica, behind pgfly, whose lag
// monitor reaches the primary across a delay relay; and an edge that reaches the primary
// region's shim across another. What it starts is closed with t.
func (t *twoRegions) startPgfly(ctx context.Context, c *pgcluster.Cluster, d time.Duration, opts pgflyOptions) (pgflySetup, error) {
	su := pgcluster.RoleSuperuser.Name
	wrap := func(region string, h http.Handler) http.Handler {
		if opts.wrapApp == nil {
			return h
		}
		return opts.wrapApp(region, h)
	}

	// Primary region.
	appPLn, appPURL, err := listenLocal()
	if err != nil {
		return pgflySetup{}, err
	}
	appP, _ := url.Parse(appPURL)
	pgflyP, err := t.startSidecar(ctx, sidecar.Config{
		Relay: wire.Config{Listen: "127.0.0.1:0", Upstream: c.Primary.URL(su, "", pgcluster.Database)},
		Shim: &router.Config{Listen: "127.0.0.1:0", App: appP, Region: primaryRegion, PrimaryRegion: primaryRegion,
			Instance: primaryRegion + "-1", Mode: router.ModeFly},
		AdminListen: "127.0.0.1:0",
	})
	if err != nil {
		return pgflySetup{}, err
	}
	dbP, err := t.openDB(dsn(pgflyP.PostgresAddr().String()))
	if err != nil {
		return pgflySetup{}, err
	}
	t.serveApp(appPLn, wrap(primaryRegion, sampleapp.New(dbP, primaryRegion, nil)))

	// Replica region.
	toPrimaryMon, err := t.relay(c.Primary.Addr(), d)
	if err != nil {
		return pgflySetup{}, err
	}
	appRLn, appRURL, err := listenLocal()
	if err != nil {
		return pgflySetup{}, err
	}
	appR, _ := url.Parse(appRURL)
	pgflyR, err := t.startSidecar(ctx, sidecar.Config{
		Relay: wire.Config{Listen: "127.0.0.1:0", Upstream: c.Replica.URL(su, "", pgcluster.Database)},
		Lag:   lag.Config{Primary: dsn(toPrimaryMon.Addr().String())},
		Shim: &router.Config{Listen: "127.0.0.1:0", App: appR, Region: replicaRegion, PrimaryRegion: primaryRegion,
			Instance: replicaRegion + "-1", Mode: router.ModeFly, DisableLearning: opts.disableLearning},
		AdminListen: "127.0.0.1:0",
	})
	if err != nil {
		return pgflySetup{}, err
	}
	dbR, err := t.openDB(dsn(pgflyR.PostgresAddr().String()))
	if err != nil {
		return pgflySetup{}, err
	}
	t.serveApp(appRLn, wrap(replicaRegion, sampleapp.New(dbR, replicaRegion, nil)))

	// The edge, beside the users in the replica region.
	toShimP, err := t.relay(pgflyP.HTTPAddr().String(), d)
	if err != nil {
		return pgflySetup{}, err
	}
	edgeURL, err := t.startEdge(map[string]string{
		primaryRegion: "http://" + toShimP.Addr().String(),
		replicaRegion: "http://" + pgflyR.HTTPAddr().String(),
	}, replicaRegion)
	if err != nil {
		return pgflySetup{}, err
	}
	return pgflySetup{edge: edgeURL, replicaAdmin: "http://" + pgflyR.AdminAddr().String()}, nil
}

var portRE = regexp.MustCompile(`\bport=\d+`)

// streamThrough points the replica's WAL receiver at relay and waits until it streams
// through it.
func (b *bench) streamThrough(ctx context.Context, relay *delay.Relay) error {
	port := relay.Addr().(*net.TCPAddr).Port
	return b.setConninfoPort(ctx, port)
}

// streamDirect points the replica's WAL receiver back at the primary.
func (b *bench) streamDirect(ctx context.Context) error {
	return b.setConninfoPort(ctx, b.cluster.Primary.Port)
}

// setConninfoPort rewrites the port of the replica's primary_conninfo (ALTER SYSTEM and a
// reload, on which the WAL receiver reconnects) and waits until it streams from that port.
func (b *bench) setConninfoPort(ctx context.Context, port int) error {
	c := b.cluster
	conn, err := sql.Open("pgx", c.Replica.URL(pgcluster.RoleSuperuser.Name, "", "postgres"))
	if err != nil {
		return err
	}
	defer conn.Close()
	var info string
	if err := conn.QueryRowContext(ctx, "SHOW primary_conninfo").Scan(&info); err != nil {
		return fmt.Errorf("read the replica's primary_conninfo: %w", err)
	}
	if !portRE.MatchString(info) {
		return fmt.Errorf("the replica's primary_conninfo names no port: %q", info)
	}
	info = portRE.ReplaceAllString(info, "port="+strconv.Itoa(port))
	if _, err := conn.ExecContext(ctx, "ALTER SYSTEM SET primary_conninfo = '"+strings.ReplaceAll(info, "'", "''")+"'"); err != nil {
		return fmt.Errorf("set the replica's primary_conninfo: %w", err)
	}
	if _, err := conn.ExecContext(ctx, "SELECT pg_reload_conf()"); err != nil {
		return fmt.Errorf("reload the replica's configuration: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var sender int
		var status string
		err := conn.QueryRowContext(ctx, "SELECT coalesce(sender_port, 0), coalesce(status, '') FROM pg_stat_wal_receiver").Scan(&sender, &status)
		if err == nil && sender == port && status == "streaming" {
			return c.WaitReplayed(ctx)
		}
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the replica does not stream from port %d after 30s (sender port %d, status %q)", port, sender, status)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
