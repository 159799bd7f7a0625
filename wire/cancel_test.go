package wire_test

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

func TestContextCancelStopsUpstreamQuery(t *testing.T) {
	admin := primaryAdmin(t)
	cert, _ := selfSignedCert(t)
	plain := primaryRelay(t)
	withTLS := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"),
		wire.Config{TLS: &tls.Config{Certificates: []tls.Certificate{cert}}})

	cancelRequest := func(pc *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: pc, DeadlineDelay: 10 * time.Second}
	}
	tests := []struct {
		name string
		url  string
		// handler is nil for pgx's default, which gives the connection up: it sends a
		// CancelRequest on a new connection and a Terminate on the old one.
		handler func(*pgconn.PgConn) ctxwatch.Handler
		// wantCode is the SQLSTATE the query fails with, "" when pgx gives up the connection.
		wantCode string
	}{
		{"CancelRequest", plain.url(pgcluster.RoleSuperuser), cancelRequest, "57014"},
		{"CancelRequest over TLS", withTLS.url(pgcluster.RoleSuperuser, "sslmode=require"), cancelRequest, "57014"},
		{"pgx default", plain.url(pgcluster.RoleSuperuser), nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := pgx.ParseConfig(tt.url)
			if err != nil {
				t.Fatalf("parse %s: %v", tt.url, err)
			}
			if tt.handler != nil {
				cfg.BuildContextWatcherHandler = tt.handler
			}
			conn := connectConfig(t, cfg)

			tag := "cancel-ctx-" + rand.Text()
			qctx, qcancel := context.WithCancel(context.Background())
			defer qcancel()
			done := execAsync(qctx, conn, "select pg_sleep(30) /* "+tag+" */")
			waitRunning(t, admin, tag)
			time.Sleep(200 * time.Millisecond) // let the statement be well under way
			qcancel()

			select {
			case err = <-done:
			case <-time.After(5 * time.Second):
				t.Fatalf("query still running 5s after its context was cancelled")
			}
			if err == nil {
				t.Fatalf("cancelled query: got no error, want one")
			}
			if got := pgCode(err); got != tt.wantCode {
				t.Fatalf("cancelled query: got %v (SQLSTATE %q), want SQLSTATE %q", err, got, tt.wantCode)
			}
			waitNotRunning(t, admin, tag)
			if tt.wantCode != "" {
				// A cancelled statement leaves the session usable.
				var one int
				if err := conn.QueryRow(context.Background(), "select 1").Scan(&one); err != nil {
					t.Fatalf("select 1 after the cancel: %v", err)
				}
			}
		})
	}
}

func TestPsqlInterruptCancelsQuery(t *testing.T) {
	psql, err := exec.LookPath("psql")
	if err != nil {
		t.Fatalf("psql is needed for this test: %v", err)
	}
	admin := primaryAdmin(t)
	r := primaryRelay(t)
	tag := "cancel-psql-" + rand.Text()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, psql, "-X", "-v", "ON_ERROR_STOP=1", r.url(pgcluster.RoleSuperuser),
		"-c", "select pg_sleep(30) /* "+tag+" */")
	cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=10")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start psql: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	waitRunning(t, admin, tag)
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatalf("interrupt psql: %v", err)
	}
	select {
	case err = <-exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("psql still running 10s after SIGINT; output so far: %s", out.String())
	}
	if err == nil {
		t.Fatalf("psql exited 0, want a failure for the cancelled statement; output: %s", out.String())
	}
	if !strings.Contains(out.String(), "canceling statement due to user request") {
		t.Fatalf("psql output: got %q, want it to report the cancelled statement", out.String())
	}
	waitNotRunning(t, admin, tag)
}

func TestCancelRequestNeedsALiveSessionKey(t *testing.T) {
	admin := primaryAdmin(t)
	logs, forwarded := observer.New(zap.DebugLevel)
	r := startRelayWithLog(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{},
		zap.New(zapcore.NewTee(testLogger(t).Core(), logs)))

	// Session 1 lives and ends: its key is stale from then on.
	s1 := r.connect(t)
	staleKey := cancelKey{pid: s1.PgConn().PID(), secret: append([]byte(nil), s1.PgConn().SecretKey()...)}
	s1Addr := s1.PgConn().Conn().LocalAddr().String()
	if err := s1.Close(context.Background()); err != nil {
		t.Fatalf("close session 1: %v", err)
	}
	closedFor(t, r, s1Addr)

	s2 := r.connect(t)
	liveKey := cancelKey{pid: s2.PgConn().PID(), secret: append([]byte(nil), s2.PgConn().SecretKey()...)}
	randomKey := cancelKey{pid: liveKey.pid, secret: []byte(rand.Text())[:len(liveKey.secret)]}
	// A backend the relay does not front: its key is valid upstream, so a relay that
	// forwarded any key would cancel it.
	direct := primaryAdmin(t)
	foreignKey := cancelKey{pid: direct.PgConn().PID(), secret: append([]byte(nil), direct.PgConn().SecretKey()...)}

	tests := []struct {
		name       string
		target     *pgx.Conn
		key        cancelKey
		wantCancel bool
	}{
		{"stale key of a closed session", s2, staleKey, false},
		{"random secret", s2, randomKey, false},
		{"key of a backend the relay does not front", direct, foreignKey, false},
		{"key of the live session", s2, liveKey, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tag := "cancel-key-" + rand.Text()
			done := execAsync(context.Background(), tt.target, "select pg_sleep(1) /* "+tag+" */")
			waitRunning(t, admin, tag)
			before := forwarded.FilterMessage("cancel request forwarded").Len()
			sendCancel(t, r.Addr().String(), tt.key)

			var err error
			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				t.Fatalf("pg_sleep(1) still running after 10s")
			}
			got := forwarded.FilterMessage("cancel request forwarded").Len() - before
			if tt.wantCancel {
				if pgCode(err) != "57014" {
					t.Fatalf("query: got %v, want SQLSTATE 57014", err)
				}
				if got != 1 {
					t.Fatalf("cancel requests forwarded: got %d, want 1", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("query: got %v, want it to complete", err)
			}
			if got != 0 {
				t.Fatalf("cancel requests forwarded: got %d, want 0", got)
			}
		})
	}
}

func TestVanishingClientsQueryIsCancelled(t *testing.T) {
	admin := primaryAdmin(t)
	r := primaryRelay(t)

	tests := []struct {
		name string
		// start sends a long statement holding tag on c, without waiting for its result.
		start func(t *testing.T, c *rawClient, tag string)
	}{
		{"simple query", func(t *testing.T, c *rawClient, tag string) {
			c.send(t, &pgproto3.Query{String: "select pg_sleep(30) /* " + tag + " */"})
		}},
		{"extended query without Sync", func(t *testing.T, c *rawClient, tag string) {
			c.send(t,
				&pgproto3.Parse{Query: "select pg_sleep(30) /* " + tag + " */"},
				&pgproto3.Bind{},
				&pgproto3.Execute{},
				&pgproto3.Flush{})
		}},
		{"extended query with Sync", func(t *testing.T, c *rawClient, tag string) {
			c.send(t,
				&pgproto3.Parse{Query: "select pg_sleep(30) /* " + tag + " */"},
				&pgproto3.Bind{},
				&pgproto3.Execute{},
				&pgproto3.Sync{})
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, r.Addr().String())
			c.login(t, pgcluster.RoleSuperuser)
			tag := "vanish-" + rand.Text()
			tt.start(t, c, tag)
			waitRunning(t, admin, tag)
			addr := c.conn.LocalAddr().String()
			c.conn.Close() // no Terminate

			waitNotRunning(t, admin, tag)
			if end := closedFor(t, r, addr); end.Reason != "client disconnected" {
				t.Fatalf("session end reason: got %q, want %q", end.Reason, "client disconnected")
			}
		})
	}

	t.Run("pgx socket closed", func(t *testing.T) {
		// pgx sends a CancelRequest of its own when its socket fails; refusing it any
		// connection but the first leaves the relay as the only one that can cancel.
		cfg, err := pgx.ParseConfig(r.url(pgcluster.RoleSuperuser))
		if err != nil {
			t.Fatalf("parse config: %v", err)
		}
		var dialed atomic.Bool
		cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if dialed.Swap(true) {
				return nil, errors.New("this test allows one connection")
			}
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}
		conn := connectConfig(t, cfg)
		tag := "vanish-" + rand.Text()
		done := execAsync(context.Background(), conn, "select pg_sleep(30) /* "+tag+" */")
		waitRunning(t, admin, tag)
		addr := conn.PgConn().Conn().LocalAddr().String()
		conn.PgConn().Conn().Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("pgx query still waiting 10s after its socket was closed")
		}
		waitNotRunning(t, admin, tag)
		if end := closedFor(t, r, addr); end.Reason != "client disconnected" {
			t.Fatalf("session end reason: got %q, want %q", end.Reason, "client disconnected")
		}
	})
}

// cancelKey is a session's BackendKeyData.
type cancelKey struct {
	pid    uint32
	secret []byte
}

// sendCancel sends a CancelRequest for key to addr and waits until the relay closes the
// connection, which it does once the request has been dealt with.
func sendCancel(tb testing.TB, addr string, key cancelKey) {
	tb.Helper()
	c := dialRaw(tb, addr)
	b := make([]byte, 12+len(key.secret))
	binary.BigEndian.PutUint32(b[0:4], uint32(len(b)))
	binary.BigEndian.PutUint32(b[4:8], cancelRequestCode)
	binary.BigEndian.PutUint32(b[8:12], key.pid)
	copy(b[12:], key.secret)
	c.write(tb, b)
	c.conn.SetReadDeadline(time.Now().Add(rawTimeout))
	n, err := c.conn.Read(make([]byte, 1))
	if n != 0 || !errors.Is(err, io.EOF) {
		tb.Fatalf("after a CancelRequest: got %d bytes, %v, want the connection closed", n, err)
	}
}
