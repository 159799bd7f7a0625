package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/wire"
)

// DefaultShutdownTimeout is how long SIGTERM waits for open sessions to end on their own.
const DefaultShutdownTimeout = 30 * time.Second

// serveConfig is the sidecar's configuration, from flags and the environment.
type serveConfig struct {
	listen          string
	upstream        string
	logLevel        string
	tlsCert, tlsKey string
	maxMessageSize  byteSize
	shutdownTimeout time.Duration
}

func (c *serveConfig) register(fs *flagSet) {
	fs.StringVar(&c.listen, "listen", "127.0.0.1:5432", "Postgres address the app connects to")
	fs.bindEnv("listen", "PGFLY_LISTEN")
	fs.StringVar(&c.upstream, "upstream", "", "nearby Postgres URL sessions are relayed to (required; its sslmode is honoured)")
	fs.bindEnv("upstream", "PGFLY_UPSTREAM")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.bindEnv("log-level", "PGFLY_LOG_LEVEL")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "certificate file (PEM) offered to clients that ask for TLS")
	fs.bindEnv("tls-cert", "PGFLY_TLS_CERT")
	fs.StringVar(&c.tlsKey, "tls-key", "", "private key file (PEM) for --tls-cert")
	fs.bindEnv("tls-key", "PGFLY_TLS_KEY")
	c.maxMessageSize = wire.DefaultMaxMessageSize
	fs.Var(&c.maxMessageSize, "max-message-size", "largest Postgres message accepted, e.g. 64MiB")
	fs.bindEnv("max-message-size", "PGFLY_MAX_MESSAGE_SIZE")
	fs.DurationVar(&c.shutdownTimeout, "shutdown-timeout", DefaultShutdownTimeout, "on SIGTERM, how long open sessions may go on before they are closed")
	fs.bindEnv("shutdown-timeout", "PGFLY_SHUTDOWN_TIMEOUT")
}

func (c *serveConfig) validate() error {
	if c.upstream == "" {
		return errors.New("flag --upstream (or $PGFLY_UPSTREAM) is required")
	}
	if (c.tlsCert == "") != (c.tlsKey == "") {
		return errors.New("flags --tls-cert and --tls-key go together: set both or neither")
	}
	if c.shutdownTimeout < 0 {
		return fmt.Errorf("invalid value %v for flag --shutdown-timeout: must not be negative", c.shutdownTimeout)
	}
	return nil
}

func (c *serveConfig) wireConfig() (wire.Config, error) {
	wc := wire.Config{Listen: c.listen, Upstream: c.upstream, MaxMessageSize: int(c.maxMessageSize)}
	if c.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(c.tlsCert, c.tlsKey)
		if err != nil {
			return wc, fmt.Errorf("flags --tls-cert/--tls-key: %w", err)
		}
		wc.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	return wc, nil
}

func runServe(ctx context.Context, args []string, stderr io.Writer) error {
	var cfg serveConfig
	fs := newFlagSet("pgfly serve", stderr)
	cfg.register(fs)
	if err := fs.parse(args); err != nil {
		return err
	}
	if err := cfg.validate(); err != nil {
		return err
	}
	log, err := newLogger(cfg.logLevel, stderr)
	if err != nil {
		return err
	}
	defer log.Sync()
	wc, err := cfg.wireConfig()
	if err != nil {
		return err
	}
	relay, err := wire.NewServer(wc, &events{log: log.Named("events")}, log.Named("wire"))
	if err != nil {
		return fmt.Errorf("flag --upstream: %w", err)
	}
	if err := relay.Listen(); err != nil {
		return fmt.Errorf("flag --listen: %w", err)
	}

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	served := make(chan error, 1)
	go func() { served <- relay.Serve() }()

	select {
	case err := <-served:
		relay.Close()
		return err
	case <-ctx.Done():
		relay.Close()
		return ctx.Err()
	case sig := <-sigs:
		log.Info("shutting down: no new sessions, open ones may finish",
			zap.Stringer("signal", sig), zap.Duration("timeout", cfg.shutdownTimeout))
	}
	shutdown := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(context.Background(), cfg.shutdownTimeout)
		defer cancel()
		shutdown <- relay.Shutdown(sctx)
	}()
	select {
	case err := <-shutdown:
		if errors.Is(err, context.DeadlineExceeded) {
			log.Warn("shutdown timeout reached: closed the sessions still open")
		}
		log.Info("stopped")
		return nil
	case sig := <-sigs:
		log.Warn("second signal: exiting at once", zap.Stringer("signal", sig))
		return errInterrupted
	}
}
