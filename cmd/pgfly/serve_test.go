package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

// These tests run the pgfly binary as a subprocess, as an operator would, against a real
// primary and replica.

// unreachableUpstream is a well-formed upstream URL for runs that must fail before they
// connect anywhere.
const unreachableUpstream = "postgres://postgres@127.0.0.1:1/pgfly?sslmode=disable"

func TestServeRejectsBadConfiguration(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  []string
		want []string // each must appear in stderr
		not  string   // must not appear in stderr, when set
	}{
		{"max message size not a number", []string{"--upstream=" + unreachableUpstream, "--max-message-size=abc"}, nil,
			[]string{"max-message-size", "abc"}, ""},
		{"max message size below the minimum", []string{"--upstream=" + unreachableUpstream, "--max-message-size=100"}, nil,
			[]string{"--max-message-size", "1024"}, ""},
		{"shutdown timeout not a duration", []string{"--upstream=" + unreachableUpstream, "--shutdown-timeout=x"}, nil,
			[]string{"shutdown-timeout"}, ""},
		{"negative shutdown timeout", []string{"--upstream=" + unreachableUpstream, "--shutdown-timeout=-1s"}, nil,
			[]string{"shutdown-timeout"}, ""},
		{"zero connect timeout", []string{"--upstream=" + unreachableUpstream, "--connect-timeout=0"}, nil,
			[]string{"--connect-timeout", "positive"}, ""},
		{"negative startup timeout", []string{"--upstream=" + unreachableUpstream, "--startup-timeout=-1s"}, nil,
			[]string{"--startup-timeout"}, ""},
		{"negative tcp user timeout", []string{"--upstream=" + unreachableUpstream, "--tcp-user-timeout=-1s"}, nil,
			[]string{"--tcp-user-timeout"}, ""},
		{"max client conn not a number", []string{"--upstream=" + unreachableUpstream}, []string{"PGFLY_MAX_CLIENT_CONN=many"},
			[]string{"PGFLY_MAX_CLIENT_CONN", "max-client-conn"}, ""},
		{"negative max client conn", []string{"--upstream=" + unreachableUpstream, "--max-client-conn=-5"}, nil,
			[]string{"--max-client-conn"}, ""},
		{"unknown consistency", []string{"--upstream=" + unreachableUpstream, "--http-listen=127.0.0.1:0", "--primary-region=iad", "--consistency=strong"}, nil,
			[]string{"--consistency", "PGFLY_CONSISTENCY", "strong"}, ""},
		{"unknown replay mode", []string{"--upstream=" + unreachableUpstream, "--http-listen=127.0.0.1:0", "--primary-region=iad", "--replay-mode=carrier-pigeon"}, nil,
			[]string{"--replay-mode", "carrier-pigeon"}, ""},
		{"proxy mode without its target", []string{"--upstream=" + unreachableUpstream, "--http-listen=127.0.0.1:0", "--primary-region=iad", "--replay-mode=proxy"}, nil,
			[]string{"--primary-http"}, ""},
		{"shim without a primary region", []string{"--upstream=" + unreachableUpstream, "--http-listen=127.0.0.1:0"}, nil,
			[]string{"--primary-region", "PRIMARY_REGION", "--http-listen="}, ""},
		{"negative consistency wait", []string{"--upstream=" + unreachableUpstream, "--http-listen=127.0.0.1:0", "--primary-region=iad", "--consistency-wait=-1s"}, nil,
			[]string{"--consistency-wait", "negative"}, ""},
		{"unparsable primary", []string{"--upstream=" + unreachableUpstream, "--primary=postgres://x:primary-secret@%zz/db"}, nil,
			[]string{"--primary"}, "primary-secret"},
		{"unknown log level", []string{"--upstream=" + unreachableUpstream, "--log-level=loud"}, nil,
			[]string{"log-level", "loud"}, ""},
		{"unknown flag", []string{"--upstream=" + unreachableUpstream, "--no-such-flag=1"}, nil,
			[]string{"no-such-flag"}, ""},
		{"stray argument", []string{"--upstream=" + unreachableUpstream, "extra"}, nil,
			[]string{`"extra"`}, ""},
		{"missing upstream", nil, nil,
			[]string{"--upstream"}, ""},
		{"unparsable upstream", []string{"--upstream=postgres://pgfly:upstream-secret@%zz/pgfly"}, nil,
			[]string{"upstream"}, "upstream-secret"},
		{"invalid sslmode in upstream", []string{"--upstream=host=127.0.0.1 password=upstream-secret sslmode=sometimes"}, nil,
			[]string{"upstream", "sslmode"}, "upstream-secret"},
		{"tls cert without key", []string{"--upstream=" + unreachableUpstream, "--tls-cert=cert.pem"}, nil,
			[]string{"--tls-cert", "--tls-key"}, ""},
		{"listen address unusable", []string{"--upstream=" + unreachableUpstream, "--listen=127.0.0.1:notaport"}, nil,
			[]string{"listen", "notaport"}, ""},
		{"replay route without a method", []string{"--upstream=" + unreachableUpstream, "--replay-routes=/posts/*"}, nil,
			[]string{"--replay-routes", "/posts/*", "METHOD /path"}, ""},
		{"local route with ** inside", []string{"--upstream=" + unreachableUpstream}, []string{"PGFLY_LOCAL_ROUTES=GET /a/**/b"},
			[]string{"--local-routes", "**"}, ""},
		{"learn routes not a bool", []string{"--upstream=" + unreachableUpstream, "--learn-routes=sometimes"}, nil,
			[]string{"learn-routes"}, ""},
		{"bad max message size in the environment", []string{"--upstream=" + unreachableUpstream}, []string{"PGFLY_MAX_MESSAGE_SIZE=abc"},
			[]string{"PGFLY_MAX_MESSAGE_SIZE", "max-message-size"}, ""},
		{"bad shutdown timeout in the environment", []string{"--upstream=" + unreachableUpstream}, []string{"PGFLY_SHUTDOWN_TIMEOUT=soon"},
			[]string{"PGFLY_SHUTDOWN_TIMEOUT", "shutdown-timeout"}, ""},
		{"negative http idle timeout", []string{"--upstream=" + unreachableUpstream, "--http-idle-timeout=-1s"}, nil,
			[]string{"--http-idle-timeout", "negative"}, ""},
		{"negative http body timeout", []string{"--upstream=" + unreachableUpstream, "--http-body-timeout=-1ms"}, nil,
			[]string{"--http-body-timeout", "negative"}, ""},
		{"negative app timeout", []string{"--upstream=" + unreachableUpstream, "--app-timeout=-30s"}, nil,
			[]string{"--app-timeout", "negative"}, ""},
		{"http body timeout not a duration", []string{"--upstream=" + unreachableUpstream, "--http-body-timeout=60"}, nil,
			[]string{"http-body-timeout", "60"}, ""},
		{"negative app timeout in the environment", []string{"--upstream=" + unreachableUpstream}, []string{"PGFLY_APP_TIMEOUT=-1m"},
			[]string{"--app-timeout", "negative"}, ""},
		{"bad http idle timeout in the environment", []string{"--upstream=" + unreachableUpstream}, []string{"PGFLY_HTTP_IDLE_TIMEOUT=forever"},
			[]string{"PGFLY_HTTP_IDLE_TIMEOUT", "http-idle-timeout"}, ""},
		{"jobs listener without a primary", []string{"--upstream=" + unreachableUpstream, "--jobs-listen=127.0.0.1:0"}, nil,
			[]string{"--jobs-listen", "--primary", "--forward=false"}, ""},
		{"jobs listener without a primary, from the environment", []string{"--upstream=" + unreachableUpstream}, []string{"PGFLY_JOBS_LISTEN=127.0.0.1:0"},
			[]string{"--jobs-listen", "--primary"}, ""},
		{"jobs listener on a relative directory", []string{"--upstream=" + unreachableUpstream, "--primary=" + unreachableUpstream, "--jobs-listen=tmp/jobs"}, nil,
			[]string{"flag --jobs-listen (or $PGFLY_JOBS_LISTEN)", "absolute"}, "flag --listen"},
		{"jobs listener in the directory of --listen", []string{"--upstream=" + unreachableUpstream, "--primary=" + unreachableUpstream, "--listen=/tmp", "--jobs-listen=/tmp/"}, nil,
			[]string{"--listen", "--jobs-listen", "/tmp"}, ""},
		{"negative max forwarded sessions", []string{"--upstream=" + unreachableUpstream, "--max-forwarded-sessions=-1"}, nil,
			[]string{"--max-forwarded-sessions", "negative"}, ""},
		{"max forwarded sessions not a number in the environment", []string{"--upstream=" + unreachableUpstream}, []string{"PGFLY_MAX_FORWARDED_SESSIONS=lots"},
			[]string{"PGFLY_MAX_FORWARDED_SESSIONS", "max-forwarded-sessions"}, ""},
		{"forward not a bool", []string{"--upstream=" + unreachableUpstream, "--forward=sometimes"}, nil,
			[]string{"forward"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			args := append([]string{"serve", "--listen=" + freeAddr(t), "--http-listen=", "--admin-listen="}, tt.args...)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, pgflyBin, args...)
			cmd.Env = append(pgflyFreeEnv(), tt.env...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			if ctx.Err() != nil {
				t.Fatalf("pgfly %s: still running after 20s, want it to refuse the configuration; stderr:\n%s", strings.Join(args, " "), stderr.String())
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("pgfly %s: got %v, want a non-zero exit; stderr:\n%s", strings.Join(args, " "), err, stderr.String())
			}
			for _, w := range tt.want {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr does not mention %q:\n%s", w, stderr.String())
				}
			}
			if tt.not != "" && strings.Contains(stderr.String(), tt.not) {
				t.Errorf("stderr contains %q:\n%s", tt.not, stderr.String())
			}
		})
	}
}

// TestForwardingConfig: which relays forward their sessions' writes to --primary, from the
// flags. The app's relay never does behind the shim: a write forwarded inside a request that is
// later replayed would run twice.
func TestForwardingConfig(t *testing.T) {
	const primary = "postgres://app:pw@primary.example:5432/app"
	const jobs = "127.0.0.1:6543"
	const noJobs = "(no jobs relay)"
	shim := []string{"--http-listen=127.0.0.1:0", "--primary-region=iad"}
	tests := []struct {
		name                string
		args                []string
		wantRelay, wantJobs string // each relay's Primary
		wantMax             int    // each relay's MaxForwarded
	}{
		{"the relay alone with --primary forwards", []string{"--http-listen=", "--primary=" + primary}, primary, noJobs, wire.DefaultMaxForwarded},
		{"the relay alone without --primary cannot", []string{"--http-listen="}, "", noJobs, wire.DefaultMaxForwarded},
		{"the relay alone and a jobs listener both forward", []string{"--http-listen=", "--primary=" + primary, "--jobs-listen=" + jobs}, primary, primary, wire.DefaultMaxForwarded},
		{"behind the shim only the jobs listener forwards", append([]string{"--primary=" + primary, "--jobs-listen=" + jobs}, shim...), "", primary, wire.DefaultMaxForwarded},
		{"behind the shim without a jobs listener nothing forwards", append([]string{"--primary=" + primary}, shim...), "", noJobs, wire.DefaultMaxForwarded},
		{"--forward=false: nothing forwards", []string{"--http-listen=", "--primary=" + primary, "--jobs-listen=" + jobs, "--forward=false"}, "", "", wire.DefaultMaxForwarded},
		{"--forward=false: a jobs listener needs no --primary", append([]string{"--jobs-listen=" + jobs, "--forward=false"}, shim...), "", "", wire.DefaultMaxForwarded},
		{"--max-forwarded-sessions=0 is no limit", []string{"--http-listen=", "--primary=" + primary, "--jobs-listen=" + jobs, "--max-forwarded-sessions=0"}, primary, primary, -1},
		{"--max-forwarded-sessions=7", []string{"--http-listen=", "--primary=" + primary, "--jobs-listen=" + jobs, "--max-forwarded-sessions=7"}, primary, primary, 7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := newFlagSet("pgfly serve", io.Discard)
			var cfg serveConfig
			cfg.register(fs)
			if err := fs.parse(append([]string{"--upstream=" + unreachableUpstream}, tt.args...)); err != nil {
				t.Fatal(err)
			}
			sc, err := cfg.sidecarConfig()
			if err != nil {
				t.Fatal(err)
			}
			gotJobs, gotJobsMax := noJobs, tt.wantMax
			if sc.Jobs != nil {
				gotJobs, gotJobsMax = sc.Jobs.Primary, sc.Jobs.MaxForwarded
				if sc.Jobs.Listen != jobs || sc.Jobs.Upstream != sc.Relay.Upstream {
					t.Errorf("the jobs relay listens on %q and relays to %q, want %q and the relay's upstream", sc.Jobs.Listen, sc.Jobs.Upstream, jobs)
				}
			}
			if sc.Relay.Primary != tt.wantRelay || gotJobs != tt.wantJobs {
				t.Errorf("Primary: got %q for the relay and %q for the jobs relay, want %q and %q", sc.Relay.Primary, gotJobs, tt.wantRelay, tt.wantJobs)
			}
			if sc.Relay.MaxForwarded != tt.wantMax || gotJobsMax != tt.wantMax {
				t.Errorf("MaxForwarded: got %d and %d, want %d", sc.Relay.MaxForwarded, gotJobsMax, tt.wantMax)
			}
		})
	}
}

func TestServeReadsEnvironment(t *testing.T) {
	c := testCluster(t)
	listen := freeAddr(t)
	p := startProc(t, []string{
		"PGFLY_LISTEN=" + listen,
		"PGFLY_UPSTREAM=" + c.Replica.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database),
		"PGFLY_HTTP_LISTEN=",
		"PGFLY_ADMIN_LISTEN=",
	}, pgflyBin, "serve")
	p.waitListening(t, listen)

	conn := connect(t, clientURL(listen, pgcluster.RoleTrust))
	var inRecovery bool
	if err := conn.QueryRow(boundedCtx(t), "select pg_is_in_recovery()").Scan(&inRecovery); err != nil {
		t.Fatalf("select pg_is_in_recovery(): %v", err)
	}
	if !inRecovery {
		t.Errorf("pg_is_in_recovery() through pgfly: got false, want true (the replica from $PGFLY_UPSTREAM)")
	}
}

func TestServeLogs(t *testing.T) {
	c := testCluster(t)
	const (
		table = "serve_logs"
		param = "param-value-3e9c0d7f" // must never be logged
	)
	primary := connect(t, c.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	if _, err := primary.Exec(boundedCtx(t), "create table if not exists "+table+" (v text)"); err != nil {
		t.Fatalf("create table: %v", err)
	}
	if err := c.WaitReplayed(boundedCtx(t)); err != nil {
		t.Fatalf("wait for the replica: %v", err)
	}

	// pgfly's own credentials (for its monitoring queries) must not be logged either.
	listen := freeAddr(t)
	p := startProc(t, nil, pgflyBin, "serve", "--listen="+listen, "--http-listen=", "--admin-listen=", "--log-level=debug",
		"--upstream="+c.Replica.URL(pgcluster.RoleMD5.Name, pgcluster.RoleMD5.Password, pgcluster.Database))
	p.waitListening(t, listen)

	conn := connect(t, clientURL(listen, pgcluster.RoleSCRAM))
	client := conn.PgConn().Conn().LocalAddr().String()
	var got string
	if err := conn.QueryRow(boundedCtx(t), "select $1::text", param).Scan(&got); err != nil {
		t.Fatalf("select $1: %v", err)
	}
	if got != param {
		t.Fatalf("select $1: got %q, want %q", got, param)
	}
	_, err := conn.Exec(boundedCtx(t), "insert into "+table+" (v) values ($1)", param)
	if code := pgCode(err); code != "25006" {
		t.Fatalf("insert on the replica: got error %v (SQLSTATE %q), want SQLSTATE 25006", err, code)
	}
	if err := conn.Close(boundedCtx(t)); err != nil {
		t.Fatalf("close: %v", err)
	}
	p.waitLine(t, 10*time.Second, "session closed", func(l logEntry) bool { return l.Msg == "session closed" })
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 10*time.Second); code != 0 {
		t.Errorf("exit status after SIGTERM: got %d, want 0", code)
	}

	lines := p.lines()
	for _, l := range lines {
		if l.err != nil {
			t.Errorf("stderr line is not JSON (%v): %s", l.err, l.raw)
			continue
		}
		for _, secret := range []string{pgcluster.RoleSCRAM.Password, pgcluster.RoleMD5.Password, param} {
			if strings.Contains(l.raw, secret) {
				t.Errorf("log line contains %q: %s", secret, l.raw)
			}
		}
	}

	opened := filterLines(lines, "session opened")
	closed := filterLines(lines, "session closed")
	if len(opened) != 1 || len(closed) != 1 {
		t.Fatalf("got %d \"session opened\" and %d \"session closed\" lines, want 1 and 1", len(opened), len(closed))
	}
	for _, l := range []logEntry{opened[0], closed[0]} {
		for field, want := range map[string]any{
			"client":   client,
			"user":     pgcluster.RoleSCRAM.Name,
			"database": pgcluster.Database,
			"upstream": c.Replica.Addr(),
		} {
			if got := l.fields[field]; got != want {
				t.Errorf("%q line: field %s: got %v, want %v", l.Msg, field, got, want)
			}
		}
	}
	for _, field := range []string{"duration", "bytes_in", "bytes_out"} {
		if n, ok := closed[0].fields[field].(float64); !ok || n <= 0 {
			t.Errorf("\"session closed\" line: field %s: got %v, want a positive number", field, closed[0].fields[field])
		}
	}
	if r, ok := closed[0].fields["reason"].(string); !ok || r == "" {
		t.Errorf("\"session closed\" line: field reason: got %v, want a non-empty string", closed[0].fields["reason"])
	}

	violations := filterLines(lines, "standby refusal")
	if len(violations) != 1 {
		t.Fatalf("got %d \"read-only violation\" lines, want 1", len(violations))
	}
	if v := violations[0]; v.Level != "warn" || v.fields["sqlstate"] != "25006" {
		t.Errorf("read-only violation line: got level %q sqlstate %v, want warn 25006: %s", v.Level, v.fields["sqlstate"], v.raw)
	}
}

func TestServeShutdown(t *testing.T) {
	c := testCluster(t)
	upstream := c.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database)
	start := func(t *testing.T, timeout string) (*proc, string) {
		t.Helper()
		listen := freeAddr(t)
		p := startProc(t, nil, pgflyBin, "serve", "--listen="+listen, "--http-listen=", "--admin-listen=",
			"--upstream="+upstream, "--shutdown-timeout="+timeout)
		p.waitListening(t, listen)
		return p, listen
	}
	shuttingDown := func(l logEntry) bool { return strings.HasPrefix(l.Msg, "shutting down") }

	t.Run("open session finishes, then pgfly exits", func(t *testing.T) {
		// The timeout is long, so that an exit within the bounded wait below is the session's
		// doing, not the timeout's.
		p, listen := start(t, "60s")
		conn := connect(t, clientURL(listen, pgcluster.RoleTrust))
		assertSelect1(t, conn)

		p.signal(t, syscall.SIGTERM)
		p.waitLine(t, 10*time.Second, "the shutdown to begin", shuttingDown)
		if c, err := net.DialTimeout("tcp", listen, 2*time.Second); err == nil {
			c.Close()
			t.Errorf("dial %s during shutdown: connected, want refused", listen)
		}
		assertSelect1(t, conn)
		assertSelect1(t, conn)
		if p.exited() {
			t.Fatalf("pgfly exited while a session was open")
		}

		if err := conn.Close(boundedCtx(t)); err != nil {
			t.Fatalf("close: %v", err)
		}
		if code := p.wait(t, 10*time.Second); code != 0 {
			t.Errorf("exit status: got %d, want 0", code)
		}
		if ls := filterLines(p.lines(), "shutdown timeout reached: closed what was still open"); len(ls) != 0 {
			t.Errorf("pgfly reports the shutdown timeout, want the session to have ended first: %s", ls[0].raw)
		}
	})

	t.Run("session still open at the timeout is closed", func(t *testing.T) {
		p, listen := start(t, "2s")
		client := rawLogin(t, listen)

		p.signal(t, syscall.SIGTERM)
		p.waitLine(t, 10*time.Second, "the shutdown to begin", shuttingDown)
		if got := client.query(t, "select 1"); got != "SELECT 1" {
			t.Fatalf("query during shutdown: got %q, want SELECT 1", got)
		}
		// The client sends nothing more: pgfly must close the session itself and say why.
		client.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		msg, err := client.fe.Receive()
		if err != nil {
			t.Fatalf("waiting for pgfly to close the session: %v", err)
		}
		e, ok := msg.(*pgproto3.ErrorResponse)
		if !ok || e.Severity != "FATAL" || e.Code != "57P01" {
			t.Fatalf("got %#v, want a FATAL 57P01 ErrorResponse", msg)
		}
		if _, err := client.fe.Receive(); !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("after the FATAL: got %v, want the connection closed", err)
		}
		if code := p.wait(t, 10*time.Second); code != 0 {
			t.Errorf("exit status: got %d, want 0", code)
		}
	})

	t.Run("second signal exits at once", func(t *testing.T) {
		for _, second := range []struct {
			name string
			sig  syscall.Signal
		}{{"SIGTERM", syscall.SIGTERM}, {"SIGINT", syscall.SIGINT}} {
			t.Run(second.name, func(t *testing.T) {
				p, listen := start(t, "60s")
				rawLogin(t, listen) // keeps the shutdown waiting

				p.signal(t, syscall.SIGTERM)
				p.waitLine(t, 10*time.Second, "the shutdown to begin", shuttingDown)
				p.signal(t, second.sig)
				if code := p.wait(t, 5*time.Second); code == 0 {
					t.Errorf("exit status after a second signal: got 0, want non-zero")
				}
			})
		}
	})
}

func clientURL(addr string, role pgcluster.Role) string {
	return fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", role.Name, role.Password, addr, pgcluster.Database)
}

func boundedCtx(tb testing.TB) context.Context {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

// connect opens a pgx connection and closes it when the test ends.
func connect(tb testing.TB, url string) *pgx.Conn {
	tb.Helper()
	conn, err := pgx.Connect(boundedCtx(tb), url)
	if err != nil {
		tb.Fatalf("connect %s: %v", url, err)
	}
	tb.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func assertSelect1(tb testing.TB, conn *pgx.Conn) {
	tb.Helper()
	var n int
	if err := conn.QueryRow(boundedCtx(tb), "select 1").Scan(&n); err != nil {
		tb.Fatalf("select 1: %v", err)
	}
	if n != 1 {
		tb.Fatalf("select 1: got %d, want 1", n)
	}
}

func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// rawClient is a protocol-level client, for reading exactly what pgfly sends.
type rawClient struct {
	conn net.Conn
	fe   *pgproto3.Frontend
}

// rawLogin logs in as the trust role and reads up to the first ReadyForQuery.
func rawLogin(tb testing.TB, addr string) *rawClient {
	tb.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		tb.Fatalf("dial %s: %v", addr, err)
	}
	tb.Cleanup(func() { conn.Close() })
	c := &rawClient{conn: conn, fe: pgproto3.NewFrontend(conn, conn)}
	c.fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": pgcluster.RoleTrust.Name, "database": pgcluster.Database}})
	if err := c.fe.Flush(); err != nil {
		tb.Fatalf("send startup: %v", err)
	}
	c.readUntilReady(tb)
	return c
}

// query runs a simple query and returns its command tag.
func (c *rawClient) query(tb testing.TB, sql string) string {
	tb.Helper()
	c.fe.Send(&pgproto3.Query{String: sql})
	if err := c.fe.Flush(); err != nil {
		tb.Fatalf("send %s: %v", sql, err)
	}
	return c.readUntilReady(tb)
}

// readUntilReady reads up to a ReadyForQuery and returns the last command tag seen.
func (c *rawClient) readUntilReady(tb testing.TB) string {
	tb.Helper()
	c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.conn.SetReadDeadline(time.Time{})
	var tag string
	for range 1000 {
		msg, err := c.fe.Receive()
		if err != nil {
			tb.Fatalf("receive: %v", err)
		}
		switch m := msg.(type) {
		case *pgproto3.CommandComplete:
			tag = string(m.CommandTag)
		case *pgproto3.ErrorResponse:
			tb.Fatalf("got error %s %s: %s", m.Severity, m.Code, m.Message)
		case *pgproto3.ReadyForQuery:
			return tag
		}
	}
	tb.Fatalf("no ReadyForQuery in 1000 messages")
	return ""
}

// TestServeShimTimeouts runs pgfly serve in front of an app on loopback and checks that the
// shim's timeout flags reach it and act, with generous bounds.
func TestServeShimTimeouts(t *testing.T) {
	start := func(t *testing.T, app string, flags ...string) (p *proc, shim, admin string) {
		t.Helper()
		shim, admin = freeAddr(t), freeAddr(t)
		args := append([]string{"serve", "--listen=" + freeAddr(t), "--http-listen=" + shim, "--admin-listen=" + admin,
			"--upstream=" + unreachableUpstream, "--region=iad", "--primary-region=iad", "--app=http://" + app}, flags...)
		p = startProc(t, nil, pgflyBin, args...)
		p.waitListening(t, shim)
		return p, shim, admin
	}
	// shimLine is the shim's "listening" line, which reports its timeouts in milliseconds.
	shimLine := func(t *testing.T, p *proc, shim string) logEntry {
		return p.waitLine(t, 10*time.Second, "the shim's listening line", func(l logEntry) bool {
			return l.Msg == "listening" && l.fields["addr"] == shim
		})
	}

	t.Run("flags reach the shim", func(t *testing.T) {
		for _, tc := range []struct {
			name            string
			flags           []string
			env             []string
			idle, body, app float64 // milliseconds, 0 for none
		}{
			{"defaults", nil, nil, 120000, 60000, 60000},
			{"set", []string{"--http-idle-timeout=5s", "--http-body-timeout=7s", "--app-timeout=90s"}, nil, 5000, 7000, 90000},
			{"from the environment", nil, []string{"PGFLY_HTTP_IDLE_TIMEOUT=3s", "PGFLY_HTTP_BODY_TIMEOUT=4s", "PGFLY_APP_TIMEOUT=2m"}, 3000, 4000, 120000},
			{"0 disables", []string{"--http-idle-timeout=0", "--http-body-timeout=0s", "--app-timeout=0"}, nil, 0, 0, 0},
		} {
			t.Run(tc.name, func(t *testing.T) {
				shim := freeAddr(t)
				args := append([]string{"serve", "--listen=" + freeAddr(t), "--http-listen=" + shim, "--admin-listen=",
					"--upstream=" + unreachableUpstream, "--primary-region=iad"}, tc.flags...)
				p := startProc(t, tc.env, pgflyBin, args...)
				l := shimLine(t, p, shim)
				for field, want := range map[string]float64{"idle_timeout": tc.idle, "body_timeout": tc.body, "app_timeout": tc.app} {
					if got := l.fields[field]; got != want {
						t.Errorf("listening line: %s: got %v, want %v ms", field, got, want)
					}
				}
			})
		}
	})

	t.Run("they act", func(t *testing.T) {
		const events = 10
		appCancelled := make(chan bool, 1)
		app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/slow":
				select {
				case <-r.Context().Done():
					appCancelled <- true
				case <-time.After(20 * time.Second):
					appCancelled <- false
				}
			case "/events":
				io.Copy(io.Discard, r.Body)
				for i := range events {
					fmt.Fprintf(w, "data: %d\n\n", i)
					http.NewResponseController(w).Flush()
					time.Sleep(150 * time.Millisecond)
				}
			default:
				io.Copy(io.Discard, r.Body)
				io.WriteString(w, "ok")
			}
		}))
		t.Cleanup(app.Close)
		p, shim, admin := start(t, app.Listener.Addr().String(),
			"--http-idle-timeout=300ms", "--http-body-timeout=300ms", "--app-timeout=300ms")
		shimLine(t, p, shim)

		// A connection per request: the shim closes an idle one after 300 ms, and a POST sent
		// on a kept-alive connection just as the shim closes it fails and is not retried.
		client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
		get := func(t *testing.T, method, url, body string) (int, string) {
			t.Helper()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("%s %s: %v", method, url, err)
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatalf("%s %s: read the answer: %v", method, url, err)
			}
			return resp.StatusCode, string(b)
		}

		t.Run("an idle keep-alive is closed", func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", shim, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			br := bufio.NewReader(conn)
			io.WriteString(conn, "GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("first request: %v", err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			_, err = io.Copy(io.Discard, br)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the idle connection is still open after 10s, want it closed after --http-idle-timeout=300ms")
			}
		})

		t.Run("a body trickling in gets 408 or its connection closed", func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", shim, 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			io.WriteString(conn, "POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Length: 100\r\n\r\n")
			stop := make(chan struct{})
			defer close(stop)
			go func() {
				for {
					select {
					case <-stop:
						return
					case <-time.After(100 * time.Millisecond): // 10 bytes/s: no gap near the deadline
					}
					if _, err := io.WriteString(conn, "x"); err != nil {
						return
					}
				}
			}()
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusRequestTimeout {
					t.Fatalf("got %d %q, want 408", resp.StatusCode, b)
				}
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("no answer and the connection still open after 10s, want 408 after --http-body-timeout=300ms")
			}
		})

		t.Run("a slow app gets 504", func(t *testing.T) {
			status, body := get(t, http.MethodGet, "http://"+shim+"/slow", "")
			if status != http.StatusGatewayTimeout || !strings.Contains(body, "--app-timeout") || !strings.Contains(body, app.URL) {
				t.Fatalf("got %d %q, want 504 naming %s and --app-timeout", status, body, app.URL)
			}
			select {
			case c := <-appCancelled:
				if !c {
					t.Error("the app's request was not cancelled, want it cancelled at the timeout")
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the app's handler did not return")
			}
		})

		t.Run("server-sent events outlive the timeouts", func(t *testing.T) {
			// With a body (the deadline is lifted when it has arrived) and without (no deadline:
			// net/http watches the connection, and a deadline ending that watch would cancel
			// the request).
			for _, method := range []string{http.MethodPost, http.MethodGet} {
				body := ""
				if method == http.MethodPost {
					body = "subscribe=1"
				}
				status, got := get(t, method, "http://"+shim+"/events", body)
				if n := strings.Count(got, "data: "); status != http.StatusOK || n != events {
					t.Fatalf("%s: got %d with %d events, want 200 with all %d: %q", method, status, n, events, got)
				}
			}
		})

		t.Run("the timeouts are counted", func(t *testing.T) {
			p.waitFor(t, 10*time.Second, "both timeouts in /metrics", func() bool {
				_, m := get(t, http.MethodGet, "http://"+admin+"/metrics", "")
				return strings.Contains(m, `pgfly_http_timeouts_total{timeout="app"} 1`) &&
					strings.Contains(m, `pgfly_http_timeouts_total{timeout="body"} 1`)
			})
		})
	})
}
