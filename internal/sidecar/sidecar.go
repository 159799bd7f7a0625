// Package sidecar assembles one pgfly instance: the Postgres relay, the HTTP shim, the lag
// monitor and the admin endpoints, with the relay's events wired to the shim and the metrics.
// `pgfly serve`, `pgfly run`, the demo and the end-to-end tests all start pgfly through it.
package sidecar

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// Config is one pgfly instance: each component's own configuration, which the component
// checks (a field it cannot take comes back as that package's ConfigError), and the admin
// side. New fills in what it wires between the components: the relays' Fence, the monitor's
// OnTwoPrimaries, and the shim's Replica, IsPrimary and UpstreamDown hooks. The shim's
// Observe and ObserveWait feed the metrics; one the caller set is told after them.
type Config struct {
	// Relay is the Postgres relay the app connects to. Its Upstream's credentials serve the
	// monitor too. Its Primary (forwarding) must be empty with the shim on: a write forwarded
	// inside an HTTP request that is later replayed would run twice.
	Relay wire.Config
	// Jobs, when set, is a second relay for sessions that no HTTP request can replay (job
	// runners inside the web process): its events never reach the shim, so that a job's
	// refusal or lost upstream taints no request. Its Primary makes it forward their writes.
	Jobs *wire.Config
	// Lag is the monitor; its Upstream is Relay.Upstream when empty.
	Lag lag.Config
	// Shim is the HTTP shim; nil runs the relay alone.
	Shim *router.Config

	// Admin side; AdminListen "" disables /health and /metrics.
	AdminListen string
	MaxLag      time.Duration // the lag beyond which /health answers 503; DefaultMaxLag when zero
}

// Sidecar is one running pgfly instance.
type Sidecar struct {
	cfg     Config
	log     *zap.Logger
	monitor *lag.Monitor
	relay   *wire.Server
	jobs    *wire.Server // nil when the jobs listener is off
	shim    *router.Shim // nil when the shim is off
	metrics *metrics
	admin   *http.Server // nil when the admin endpoints are off
	adminLn net.Listener

	done chan error // the first component that stopped on its own
}

// ErrJobsRelay marks an error of the jobs relay (Config.Jobs), beside the wire.ConfigError
// it wraps, so that a caller can tell the jobs relay's Listen from Relay's.
var ErrJobsRelay = errors.New("jobs relay")

// New builds the components; nothing listens or connects yet.
func New(cfg Config, log *zap.Logger) (*Sidecar, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.MaxLag == 0 {
		cfg.MaxLag = DefaultMaxLag
	}
	if cfg.Shim != nil && cfg.Relay.Primary != "" {
		return nil, errors.New("sidecar: Relay.Primary is set with the HTTP shim on: a write forwarded inside a request that is later replayed would run twice (forward from Jobs instead)")
	}
	s := &Sidecar{cfg: cfg, log: log, done: make(chan error, 4)}
	lc := cfg.Lag
	if lc.Upstream == "" {
		lc.Upstream = cfg.Relay.Upstream
	}
	lc.OnTwoPrimaries = func() {
		s.relay.Fenced()
		if s.jobs != nil {
			s.jobs.Fenced()
		}
	}
	monitor, err := lag.New(lc, log.Named("lag"))
	if err != nil {
		return nil, err
	}
	s.monitor = monitor
	if cfg.Shim != nil {
		rc := *cfg.Shim
		rc.Replica = monitor
		rc.IsPrimary = func() bool {
			st := monitor.Status()
			return st.Role == lag.RolePrimary && !st.TwoPrimaries // a fenced upstream replays like a standby
		}
		rc.UpstreamDown = func() bool {
			st := monitor.Status()
			return !st.UpstreamUp && !st.CheckedAt.IsZero() // not before the first poll
		}
		observe, observeWait := rc.Observe, rc.ObserveWait // the caller's, told after the metrics
		rc.Observe = func(d router.Decision) {
			s.metrics.decision(d)
			if observe != nil {
				observe(d)
			}
		}
		rc.ObserveWait = func(w router.Wait) {
			s.metrics.wait(w.Waited, w.Outcome)
			if observeWait != nil {
				observeWait(w)
			}
		}
		rc.ObserveRefusal = func(n int) { s.metrics.tainted.Observe(float64(n)) }
		rc.ObserveTimeout = func(t router.Timeout) { s.metrics.timeouts.WithLabelValues(string(t)).Inc() }
		if s.shim, err = router.New(rc, log.Named("router")); err != nil {
			return nil, err
		}
	}
	ev := &events{log: log.Named("events"), shim: s.shim, metrics: func() *metrics { return s.metrics },
		upstreamStandby: func() bool { return monitor.Status().Role == lag.RoleReplica },
		lastSeenStandby: func() bool { return monitor.Status().LastRole == lag.RoleReplica },
		kick:            monitor.SuspectDown}
	fence := func() bool { return monitor.Status().TwoPrimaries }
	wc := cfg.Relay
	wc.Fence = fence
	if s.relay, err = wire.NewServer(wc, ev, log.Named("wire")); err != nil {
		return nil, err
	}
	if cfg.Jobs != nil {
		jobsEv := *ev
		jobsEv.log, jobsEv.shim = log.Named("events.jobs"), nil // a job's events taint no request
		jc := *cfg.Jobs
		jc.Fence = fence
		if s.jobs, err = wire.NewServer(jc, &jobsEv, log.Named("wire.jobs")); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrJobsRelay, err)
		}
	}
	s.metrics = newMetrics(s.relays(), s.shim, monitor)
	if cfg.AdminListen != "" {
		s.admin = &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 10 * time.Second}
	}
	return s, nil
}

// relays are the Postgres relays by the name of their listener in metrics: "app" and, when
// it is on, "jobs".
func (s *Sidecar) relays() map[string]*wire.Server {
	relays := map[string]*wire.Server{"app": s.relay}
	if s.jobs != nil {
		relays["jobs"] = s.jobs
	}
	return relays
}

// Listen binds every listener, so that ports are known before Start.
func (s *Sidecar) Listen() error {
	if err := s.relay.Listen(); err != nil {
		return fmt.Errorf("postgres listener (--listen): %w", err)
	}
	if s.jobs != nil {
		if err := s.jobs.Listen(); err != nil {
			s.relay.Close()
			return fmt.Errorf("jobs listener (--jobs-listen): %w", err)
		}
	}
	if s.shim != nil {
		if err := s.shim.Listen(); err != nil {
			s.Close()
			return fmt.Errorf("http listener (--http-listen): %w", err)
		}
	}
	if s.admin != nil {
		ln, err := net.Listen("tcp", s.cfg.AdminListen)
		if err != nil {
			s.Close()
			return fmt.Errorf("admin listener (--admin-listen): listen %s: %w", s.cfg.AdminListen, err)
		}
		s.adminLn = ln
	}
	return nil
}

// Start starts the monitor and serves in the background; Wait reports a component that
// stopped on its own.
func (s *Sidecar) Start() {
	s.monitor.Start()
	go func() { s.done <- stopped("postgres relay", s.relay.Serve()) }()
	if s.jobs != nil {
		go func() { s.done <- stopped("jobs relay", s.jobs.Serve()) }()
	}
	if s.shim != nil {
		go func() { s.done <- stopped("http shim", s.shim.Serve()) }()
	}
	if s.admin != nil {
		go func() {
			err := s.admin.Serve(s.adminLn)
			if errors.Is(err, http.ErrServerClosed) {
				err = nil
			}
			s.done <- stopped("admin server", err)
		}()
	}
}

func stopped(what string, err error) error {
	if err == nil {
		return fmt.Errorf("%s stopped", what)
	}
	return fmt.Errorf("%s stopped: %w", what, err)
}

// Wait blocks until a component stops on its own or ctx is done.
func (s *Sidecar) Wait(ctx context.Context) error {
	select {
	case err := <-s.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Ready waits until the monitor has looked at the upstream once, so Role and lag are known.
func (s *Sidecar) Ready(ctx context.Context) error { return s.monitor.Ready(ctx) }

// PostgresAddr is where the app connects.
func (s *Sidecar) PostgresAddr() net.Addr { return s.relay.Addr() }

// JobsAddr is where job runners connect; nil when the jobs listener is off.
func (s *Sidecar) JobsAddr() net.Addr {
	if s.jobs == nil {
		return nil
	}
	return s.jobs.Addr()
}

// HTTPAddr is where the edge sends HTTP; nil when the shim is off.
func (s *Sidecar) HTTPAddr() net.Addr {
	if s.shim == nil {
		return nil
	}
	return s.shim.Addr()
}

// AdminAddr serves /health and /metrics; nil when they are off.
func (s *Sidecar) AdminAddr() net.Addr {
	if s.adminLn == nil {
		return nil
	}
	return s.adminLn.Addr()
}

// Status is the monitor's latest view of the upstream.
func (s *Sidecar) Status() lag.Status { return s.monitor.Status() }

// Shutdown stops accepting, lets open requests and sessions finish until ctx is done, and
// then closes what is left, in the reverse order of Start: the admin endpoints, HTTP (requests
// in flight still need their sessions and bookmarks), both relays, and the monitor last.
func (s *Sidecar) Shutdown(ctx context.Context) error {
	errs := []error{s.closeAdmin()}
	if s.shim != nil {
		if err := s.shim.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("http shim: %w", err))
			s.shim.Close()
		}
	}
	// The two relays at once: each stops accepting now, and neither's sessions need the
	// other's, so that each has the whole of ctx.
	var jobs chan error
	if s.jobs != nil {
		jobs = make(chan error, 1)
		go func() { jobs <- s.jobs.Shutdown(ctx) }()
	}
	if err := s.relay.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("postgres relay: %w", err))
	}
	if jobs != nil {
		if err := <-jobs; err != nil {
			errs = append(errs, fmt.Errorf("jobs relay: %w", err))
		}
	}
	return errors.Join(append(errs, s.monitor.Close())...)
}

// Close stops everything at once, in the reverse order of Start. It is idempotent.
func (s *Sidecar) Close() error {
	errs := []error{s.closeAdmin()}
	if s.shim != nil {
		errs = append(errs, s.shim.Close())
	}
	if s.jobs != nil {
		errs = append(errs, s.jobs.Close())
	}
	return errors.Join(append(errs, s.relay.Close(), s.monitor.Close())...)
}

func (s *Sidecar) closeAdmin() error {
	if s.admin == nil || s.adminLn == nil {
		return nil
	}
	return s.admin.Close()
}
