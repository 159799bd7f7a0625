// Package regions starts a whole two-region pgfly setup on one machine: a real primary and
// streaming replica, in each region the sample app behind its own pgfly, and the local edge in
// front. The demo, the end-to-end tests and the benchmarks all use it.
package regions

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver
	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/edge"
	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/sampleapp"
	"github.com/pgfly/pgfly/internal/sidecar"
	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// Default region names: the primary in iad, the replica in fra.
const (
	DefaultPrimaryRegion = "iad"
	DefaultReplicaRegion = "fra"
)

// Options shape the setup. The zero value is a fly-mode setup with bookmarks on.
type Options struct {
	// Cluster to use; nil starts one, which Close stops.
	Cluster *pgcluster.Cluster
	// PrimaryRegion and ReplicaRegion name the regions.
	PrimaryRegion, ReplicaRegion string
	// Mode is how pgfly replays: router.ModeFly through the edge, or router.ModeProxy.
	Mode              router.Mode
	InjectTraceparent bool
	Consistency       router.Consistency
	ConsistencyWait   time.Duration
	// ReplayRoutes, LocalRoutes and DisableLearning are pgfly's route settings in both regions.
	ReplayRoutes, LocalRoutes router.RoutePatterns
	DisableLearning           bool
	// App builds each region's app on its database handle (through pgfly); nil runs the
	// sample app. The handler should set sampleapp.RegionHeader so tests can tell who answered.
	App func(db *sql.DB, region string) http.Handler
	// Listen is the edge's address; "" picks a free loopback port.
	Listen string
	// Log receives every component's logs; nil discards them.
	Log *zap.Logger
	// Observe, when set, is told what each region's pgfly decided and each hop of the edge, as
	// it happens. It must be quick.
	Observe func(Event)
	// Link, when set, puts every cross-region connection on a Link (Setup.Link, and
	// Setup.WAL for the WAL stream) that can be delayed and cut; nil connects the regions
	// over plain loopback.
	Link *LinkConfig
}

// Event is one thing that happened to a request: exactly one of Decision, Wait and Hop is set.
type Event struct {
	Time     time.Time
	Region   string           // whose pgfly decided or waited; "" for the edge's hops
	Decision *router.Decision // what a region's pgfly did about a request or refusal
	Wait     *router.Wait     // a bookmark wait in a region
	Hop      *edge.Hop        // a request the edge sent to a region
}

// observe tells opts.Observe of an event, if anyone listens.
func (o *Options) observe(ev Event) {
	if o.Observe != nil {
		ev.Time = time.Now()
		o.Observe(ev)
	}
}

// Setup is a running two-region setup.
type Setup struct {
	Cluster *pgcluster.Cluster
	Primary *Region // the primary region: pgfly's upstream is the primary
	Replica *Region // the replica region: pgfly's upstream is the replica
	Edge    *edge.Edge
	// EdgeURL is where clients send HTTP, as they would to Fly.
	EdgeURL string
	// Link carries the connections from the replica region to the primary region, nil
	// without Options.Link; WAL carries the replica's WAL stream, nil unless
	// Options.Link.WAL. Cut both to isolate the regions entirely.
	Link, WAL *Link

	ownCluster bool
	edgeDone   chan error
}

// Region is one region: the app and pgfly beside it.
type Region struct {
	Name    string
	Sidecar *sidecar.Sidecar
	// AppURL reaches the app directly; ShimURL reaches it through pgfly; AdminURL serves
	// pgfly's /health and /metrics.
	AppURL, ShimURL, AdminURL string
	// DB is the app's database handle, through pgfly.
	DB *sql.DB

	app     *http.Server
	appLn   net.Listener
	appDone chan error
}

// Start brings the whole setup up and returns once every part answers.
func Start(ctx context.Context, opts Options) (_ *Setup, err error) {
	if opts.PrimaryRegion == "" {
		opts.PrimaryRegion = DefaultPrimaryRegion
	}
	if opts.ReplicaRegion == "" {
		opts.ReplicaRegion = DefaultReplicaRegion
	}
	if opts.Mode == "" {
		opts.Mode = router.ModeFly
	}
	if opts.Listen == "" {
		opts.Listen = "127.0.0.1:0"
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	s := &Setup{Cluster: opts.Cluster}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if s.Cluster == nil {
		if s.Cluster, err = pgcluster.Start(ctx, pgcluster.Options{}); err != nil {
			return nil, err
		}
		s.ownCluster = true
	}
	if err := migrate(ctx, s.Cluster); err != nil {
		return nil, err
	}
	if opts.Link != nil {
		if s.Link, err = NewLink(opts.Link.Delay); err != nil {
			return nil, err
		}
		if opts.Link.WAL {
			if s.WAL, err = streamWALAcross(ctx, s.Cluster, opts.Link.Delay); err != nil {
				return nil, err
			}
		}
	}
	if s.Primary, err = startRegion(ctx, opts, opts.PrimaryRegion, s.Cluster.Primary, "", nil); err != nil {
		return nil, err
	}
	// What the replica region reaches in the primary region, across the link if there is one.
	primaryShim, err := s.crossRegion(s.Primary.ShimURL)
	if err != nil {
		return nil, err
	}
	primaryHTTP, _ := url.Parse(primaryShim)
	primaryPG, err := s.crossRegion(s.Cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	if err != nil {
		return nil, err
	}
	if s.Replica, err = startRegion(ctx, opts, opts.ReplicaRegion, s.Cluster.Replica, primaryPG, primaryHTTP); err != nil {
		return nil, err
	}
	s.Edge, err = edge.New(edge.Config{
		Listen:  opts.Listen,
		Regions: map[string]string{opts.PrimaryRegion: primaryShim, opts.ReplicaRegion: s.Replica.ShimURL},
		Default: opts.ReplicaRegion,
		OnHop:   func(h edge.Hop) { opts.observe(Event{Hop: &h}) },
	}, opts.Log.Named("edge"))
	if err != nil {
		return nil, err
	}
	if err := s.Edge.Listen(); err != nil {
		s.Edge = nil
		return nil, err
	}
	s.EdgeURL = "http://" + s.Edge.Addr().String()
	s.edgeDone = make(chan error, 1)
	go func() { s.edgeDone <- s.Edge.Serve() }()
	return s, nil
}

// migrate creates the sample app's tables on the primary and waits for the replica to have them.
func migrate(ctx context.Context, c *pgcluster.Cluster) error {
	db, err := sql.Open("pgx", c.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	if err != nil {
		return err
	}
	defer db.Close()
	if err := sampleapp.Migrate(ctx, db); err != nil {
		return fmt.Errorf("migrate the sample app: %w", err)
	}
	return c.WaitReplayed(ctx)
}

// startRegion starts the app and pgfly of one region. primaryPG (the primary's URL, for lag)
// and primaryHTTP (the primary region's shim, for proxy mode) are empty in the primary region.
func startRegion(ctx context.Context, opts Options, name string, upstream *pgcluster.Server, primaryPG string, primaryHTTP *url.URL) (_ *Region, err error) {
	log := opts.Log.With(zap.String("region", name))
	r := &Region{Name: name}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if r.appLn, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	r.AppURL = "http://" + r.appLn.Addr().String()
	app, _ := url.Parse(r.AppURL)
	mode := opts.Mode
	if name == opts.PrimaryRegion {
		if mode == router.ModeProxy {
			// Nothing is ever replayed from the primary region; its shim needs no target.
			mode = router.ModeFly
		}
	}
	r.Sidecar, err = sidecar.New(sidecar.Config{
		Relay: wire.Config{Listen: "127.0.0.1:0", Upstream: upstream.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database)},
		Lag:   lag.Config{Primary: primaryPG},
		Shim: &router.Config{
			Listen:            "127.0.0.1:0",
			App:               app,
			Region:            name,
			PrimaryRegion:     opts.PrimaryRegion,
			Instance:          name + "-1",
			Mode:              mode,
			PrimaryHTTP:       primaryHTTP,
			InjectTraceparent: opts.InjectTraceparent,
			Consistency:       opts.Consistency,
			ConsistencyWait:   opts.ConsistencyWait,
			ReplayRoutes:      opts.ReplayRoutes,
			LocalRoutes:       opts.LocalRoutes,
			DisableLearning:   opts.DisableLearning,
			Observe:           func(d router.Decision) { opts.observe(Event{Region: name, Decision: &d}) },
			ObserveWait:       func(w router.Wait) { opts.observe(Event{Region: name, Wait: &w}) },
		},
		AdminListen: "127.0.0.1:0",
	}, log.Named("pgfly"))
	if err != nil {
		return nil, err
	}
	if err := r.Sidecar.Listen(); err != nil {
		r.Sidecar = nil
		return nil, err
	}
	r.Sidecar.Start()
	r.ShimURL = "http://" + r.Sidecar.HTTPAddr().String()
	r.AdminURL = "http://" + r.Sidecar.AdminAddr().String()
	dsn := fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", pgcluster.RoleSuperuser.Name, r.Sidecar.PostgresAddr(), pgcluster.Database)
	if r.DB, err = sql.Open("pgx", dsn); err != nil {
		return nil, err
	}
	r.DB.SetMaxOpenConns(16)
	r.DB.SetMaxIdleConns(16)
	handler := http.Handler(nil)
	if opts.App != nil {
		handler = opts.App(r.DB, name)
	} else {
		handler = sampleapp.New(r.DB, name, log.Named("app"))
	}
	r.app = &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	r.appDone = make(chan error, 1)
	go func() { r.appDone <- r.app.Serve(r.appLn) }()
	if err := r.Sidecar.Ready(ctx); err != nil {
		return nil, fmt.Errorf("region %s: %w", name, err)
	}
	return r, nil
}

// Close stops everything: the edge, both regions, and the cluster if Start started it.
func (s *Setup) Close() error {
	var errs []error
	if s.Edge != nil {
		errs = append(errs, s.Edge.Close())
		<-s.edgeDone
	}
	for _, r := range []*Region{s.Replica, s.Primary} {
		if r != nil {
			errs = append(errs, r.close())
		}
	}
	errs = append(errs, s.closeLinks())
	if s.ownCluster && s.Cluster != nil {
		errs = append(errs, s.Cluster.Close())
	}
	return errors.Join(errs...)
}

func (r *Region) close() error {
	var errs []error
	// pgfly first: it drops its idle connections to the app, which the app's Shutdown would
	// otherwise wait for.
	if r.Sidecar != nil {
		errs = append(errs, r.Sidecar.Close())
	}
	if r.app != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := r.app.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("region %s: stop the app: %w", r.Name, err))
		}
		cancel()
		<-r.appDone
	} else if r.appLn != nil {
		r.appLn.Close()
	}
	if r.DB != nil {
		errs = append(errs, r.DB.Close())
	}
	return errors.Join(errs...)
}
