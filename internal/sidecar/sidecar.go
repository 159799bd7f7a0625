// Package sidecar assembles one pgfly instance: the Postgres relay, the HTTP shim and the
// admin endpoints, with the relay's events wired to the shim. `pgfly serve`, `pgfly run`,
// the demo and the end-to-end tests all start pgfly through it.
package sidecar

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// Config is everything one pgfly instance needs to know.
type Config struct {
	// Postgres side.
	Listen         string      // where the app connects, e.g. 127.0.0.1:5432
	Upstream       string      // the nearby Postgres URL
	Primary        string      // the primary's Postgres URL, optional
	TLS            *tls.Config // offered to clients that ask for TLS; nil answers 'N'
	MaxMessageSize int

	// HTTP side; HTTPListen "" disables the shim.
	HTTPListen        string
	App               *url.URL
	Region            string
	PrimaryRegion     string
	Instance          string
	ReplayMode        router.Mode
	PrimaryHTTP       *url.URL
	MaxReplayBody     int64
	InjectTraceparent bool
}

// Sidecar is one running pgfly instance.
type Sidecar struct {
	cfg   Config
	log   *zap.Logger
	relay *wire.Server
	shim  *router.Shim // nil when the shim is disabled

	relayDone, shimDone chan error
}

// New builds the components; nothing listens yet.
func New(cfg Config, log *zap.Logger) (*Sidecar, error) {
	if log == nil {
		log = zap.NewNop()
	}
	s := &Sidecar{cfg: cfg, log: log}
	if cfg.HTTPListen != "" {
		shim, err := router.New(router.Config{
			Listen:            cfg.HTTPListen,
			App:               cfg.App,
			Region:            cfg.Region,
			PrimaryRegion:     cfg.PrimaryRegion,
			Instance:          cfg.Instance,
			Mode:              cfg.ReplayMode,
			PrimaryHTTP:       cfg.PrimaryHTTP,
			MaxReplayBody:     cfg.MaxReplayBody,
			InjectTraceparent: cfg.InjectTraceparent,
		}, log.Named("router"))
		if err != nil {
			return nil, err
		}
		s.shim = shim
	}
	relay, err := wire.NewServer(wire.Config{
		Listen:         cfg.Listen,
		Upstream:       cfg.Upstream,
		TLS:            cfg.TLS,
		MaxMessageSize: cfg.MaxMessageSize,
	}, &events{log: log.Named("events"), shim: s.shim}, log.Named("wire"))
	if err != nil {
		return nil, fmt.Errorf("upstream: %w", err)
	}
	s.relay = relay
	return s, nil
}

// Listen binds every listener, so that ports are known before Serve.
func (s *Sidecar) Listen() error {
	if err := s.relay.Listen(); err != nil {
		return err
	}
	if s.shim != nil {
		if err := s.shim.Listen(); err != nil {
			s.relay.Close()
			return err
		}
	}
	return nil
}

// Start serves in the background; Done reports the first component that stopped.
func (s *Sidecar) Start() {
	s.relayDone = make(chan error, 1)
	go func() { s.relayDone <- s.relay.Serve() }()
	if s.shim != nil {
		s.shimDone = make(chan error, 1)
		go func() { s.shimDone <- s.shim.Serve() }()
	}
}

// Wait blocks until a component stops on its own (an error) or ctx is done.
func (s *Sidecar) Wait(ctx context.Context) error {
	select {
	case err := <-s.relayDone:
		return fmt.Errorf("postgres relay stopped: %w", errOrClosed(err))
	case err := <-s.shimDone: // nil channel when the shim is off: never ready
		return fmt.Errorf("http shim stopped: %w", errOrClosed(err))
	case <-ctx.Done():
		return ctx.Err()
	}
}

func errOrClosed(err error) error {
	if err == nil {
		return errors.New("closed")
	}
	return err
}

// PostgresAddr is where the app connects.
func (s *Sidecar) PostgresAddr() net.Addr { return s.relay.Addr() }

// HTTPAddr is where the edge sends HTTP; nil when the shim is off.
func (s *Sidecar) HTTPAddr() net.Addr {
	if s.shim == nil {
		return nil
	}
	return s.shim.Addr()
}

// Shutdown stops accepting, lets open requests and sessions finish until ctx is done, and
// then closes what is left. HTTP goes first: requests in flight still need their sessions.
func (s *Sidecar) Shutdown(ctx context.Context) error {
	var errs []error
	if s.shim != nil {
		if err := s.shim.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("http shim: %w", err))
			s.shim.Close()
		}
	}
	if err := s.relay.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("postgres relay: %w", err))
	}
	return errors.Join(errs...)
}

// Close stops everything at once, in reverse order of start. It is idempotent.
func (s *Sidecar) Close() error {
	var errs []error
	if s.shim != nil {
		errs = append(errs, s.shim.Close())
	}
	errs = append(errs, s.relay.Close())
	return errors.Join(errs...)
}

// ShutdownTimeout bounds a graceful stop when the caller gives none.
const ShutdownTimeout = 30 * time.Second
