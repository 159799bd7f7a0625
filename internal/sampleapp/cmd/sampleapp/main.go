// Command sampleapp runs the sample guestbook app (package sampleapp) on
// 127.0.0.1:$PORT against $DATABASE_URL, as the app pgfly carries in the
// end-to-end tests and the demo.
//
// Environment: PORT (default 3000), DATABASE_URL (required), FLY_REGION
// (written into rows and the X-App-Region header). The -migrate flag creates
// the items table before serving. SIGINT or SIGTERM shut it down gracefully.
package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/sampleapp"
)

// shutdownTimeout bounds the wait for in-flight requests on a signal.
const shutdownTimeout = 10 * time.Second

// migrateTimeout bounds -migrate.
const migrateTimeout = 30 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Getenv)
	switch {
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case err != nil:
		fmt.Fprintln(os.Stderr, "sampleapp:", err)
		os.Exit(1)
	}
}

// run serves until ctx ends, then shuts down gracefully.
func run(ctx context.Context, args []string, getenv func(string) string) error {
	fs := flag.NewFlagSet("sampleapp", flag.ContinueOnError)
	migrate := fs.Bool("migrate", false, "create the items table before serving")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	port := getenv("PORT")
	if port == "" {
		port = "3000"
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("PORT=%q: want a port number", port)
	}
	dsn := getenv("DATABASE_URL")
	if dsn == "" {
		return errors.New("DATABASE_URL is required")
	}
	region := getenv("FLY_REGION")

	log, err := zap.NewProduction()
	if err != nil {
		return fmt.Errorf("logger: %w", err)
	}
	defer log.Sync() //nolint:errcheck // nothing to do about it at exit
	log = log.With(zap.String("region", region))

	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return fmt.Errorf("open database: %w", err)
	}
	defer db.Close()
	if *migrate {
		mctx, cancel := context.WithTimeout(ctx, migrateTimeout)
		err := sampleapp.Migrate(mctx, db)
		cancel()
		if err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
	}

	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{
		Handler:           sampleapp.New(db, region, log),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          zap.NewStdLog(log),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.Info("listening", zap.String("addr", ln.Addr().String()))

	select {
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
		return fmt.Errorf("shutdown: %w", err)
	}
	<-served // http.ErrServerClosed
	return nil
}
