package wire_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

func TestUnreachableUpstreamIsAFatal08006(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	closedAddr := ln.Addr().String()
	ln.Close()
	dead := startRelay(t, "postgres://"+closedAddr+"/?sslmode=disable", wire.Config{})

	refused := func(t *testing.T) {
		t.Helper()
		err := connectErr(t, dead.url(pgcluster.RoleSuperuser), "connect through a relay whose upstream is down", "08006")
		var pe *pgconn.PgError
		if !errors.As(err, &pe) {
			t.Fatalf("connect: got %v, want a server error", err)
		}
		if pe.Severity != "FATAL" || pe.Code != "08006" {
			t.Fatalf("connect: got %s %s, want FATAL 08006", pe.Severity, pe.Code)
		}
		if !strings.Contains(pe.Message, closedAddr) || !strings.Contains(pe.Message, "connection refused") {
			t.Fatalf("message: got %q, want it to name %s and say connection refused", pe.Message, closedAddr)
		}
	}
	refused(t)
	refused(t) // still accepting, still answering

	// Relays are independent: one with a live upstream works meanwhile.
	login(t, primaryRelay(t).url(pgcluster.RoleSuperuser), pgcluster.RoleSuperuser.Name)
	refused(t)
}

func TestMalformedStartupPackets(t *testing.T) {
	r := primaryRelay(t)
	bystander := r.connect(t)

	tests := []struct {
		name string
		send []byte
		// halfClose ends the client's side of the connection after send.
		halfClose bool
		// answers are the single-byte answers expected before the error.
		answers string
		// code is the SQLSTATE of the FATAL expected; "" means the relay just closes.
		code    string
		message string
	}{
		{name: "length below 8", send: be32(4), code: "08P01", message: "invalid length of startup packet"},
		{name: "length above 10000", send: be32(10001), code: "08P01", message: "invalid length of startup packet"},
		{name: "no user", send: encode(t, &pgproto3.StartupMessage{
			ProtocolVersion: pgproto3.ProtocolVersion30,
			Parameters:      map[string]string{"database": pgcluster.Database},
		}), code: "08P01", message: "no PostgreSQL user name"},
		{name: "random garbage", send: garbage(64), code: "08P01", message: "invalid length of startup packet"},
		{name: "unterminated parameters", send: unterminatedStartup(64), code: "08P01", message: "invalid startup packet layout"},
		{name: "too many requests", send: bytes.Repeat(requestPacket(gssEncRequestCode), 4),
			answers: "NNNN", code: "08P01", message: "too many startup packets"},
		{name: "short cancel request", send: append(be32(12), append(be32(cancelRequestCode), 0, 0, 0, 1)...),
			code: "08P01", message: "invalid length of cancel request packet"},
		{name: "truncated", send: append(be32(100), make([]byte, 16)...), halfClose: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, r.Addr().String())
			c.write(t, tt.send)
			if tt.halfClose {
				if err := c.conn.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatalf("close the client's side: %v", err)
				}
			}
			got := c.readAll(t)
			if !bytes.HasPrefix(got, []byte(tt.answers)) {
				t.Fatalf("answers: got %q, want them to start with %q", got, tt.answers)
			}
			got = got[len(tt.answers):]
			if tt.code == "" {
				if len(got) != 0 {
					t.Fatalf("after a truncated packet: got %q, want the connection closed without a word", got)
				}
			} else if e := wantFatal(t, got, tt.code); !strings.Contains(e.Message, tt.message) {
				t.Fatalf("message: got %q, want it to contain %q", e.Message, tt.message)
			}

			var one int
			if err := bystander.QueryRow(context.Background(), "select 1").Scan(&one); err != nil {
				t.Fatalf("a session opened before the bad packet: %v", err)
			}
		})
	}
}

func TestMalformedMessagesAfterStartup(t *testing.T) {
	const limit = 1 << 20
	r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{MaxMessageSize: limit})
	bystander := r.connect(t)

	tests := []struct {
		name    string
		length  uint32
		message string
	}{
		{"length below 4", 2, "invalid message length 2"},
		{"length over the limit", 1 << 24, "limit " + strconv.Itoa(limit)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, r.Addr().String())
			c.login(t, pgcluster.RoleSuperuser)
			c.write(t, append([]byte{'Q'}, be32(tt.length)...))
			e := wantFatal(t, c.readAll(t), "08P01")
			if !strings.Contains(e.Message, tt.message) {
				t.Fatalf("message: got %q, want it to contain %q", e.Message, tt.message)
			}
			if end := closedFor(t, r, c.conn.LocalAddr().String()); !end.ProtocolError {
				t.Fatalf("session end: got %+v, want a protocol error", end)
			}

			var one int
			if err := bystander.QueryRow(context.Background(), "select 1").Scan(&one); err != nil {
				t.Fatalf("another session after the bad message: %v", err)
			}
		})
	}
}

func TestLargeDeclaredLengthIsNotAllocated(t *testing.T) {
	// With the default limit (1 GiB), a client may declare a huge message. The relay must
	// stream it, not allocate the declared size: otherwise a few headers exhaust its memory.
	const declared = 1 << 28
	r := primaryRelay(t)
	bystander := r.connect(t)

	tests := []struct {
		name string
		typ  byte
	}{
		{"Query", 'Q'},
		{"Parse", 'P'},
		{"Execute", 'E'},
		{"Bind", 'B'},
		{"CopyData", 'd'},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, r.Addr().String())
			c.login(t, pgcluster.RoleSuperuser)
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			c.write(t, append(append([]byte{tt.typ}, be32(declared)...), make([]byte, 1024)...))
			addr := c.conn.LocalAddr().String()
			c.conn.Close()
			closedFor(t, r, addr)
			runtime.ReadMemStats(&after)
			// TotalAlloc only grows, so a collection in between cannot hide an allocation.
			if grew := after.TotalAlloc - before.TotalAlloc; grew > declared/4 {
				t.Fatalf("bytes allocated while relaying a message declared as %d bytes: got %d, want far fewer", declared, grew)
			}

			var one int
			if err := bystander.QueryRow(context.Background(), "select 1").Scan(&one); err != nil {
				t.Fatalf("another session after the large message: %v", err)
			}
		})
	}
}

func TestQueryLargerThanBufferStreams(t *testing.T) {
	r := primaryRelay(t)
	c := dialRaw(t, r.Addr().String())
	c.login(t, pgcluster.RoleSuperuser)
	const n = 1 << 20
	got := c.query(t, "select length('"+strings.Repeat("x", n)+"')")
	if got != strconv.Itoa(n) {
		t.Fatalf("length of a %d-byte literal: got %s, want %d", n, got, n)
	}
	if got := c.query(t, "select 'still in sync'"); got != "still in sync" {
		t.Fatalf("next query: got %q, want %q", got, "still in sync")
	}
}

// be32 is n as 4 big-endian bytes.
func be32(n uint32) []byte {
	return binary.BigEndian.AppendUint32(nil, n)
}

func encode(tb testing.TB, msg pgproto3.FrontendMessage) []byte {
	tb.Helper()
	b, err := msg.Encode(nil)
	if err != nil {
		tb.Fatalf("encode %T: %v", msg, err)
	}
	return b
}

// garbage is n random bytes whose first four, read as a startup packet's length, are out of
// range, as random bytes almost always are.
func garbage(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	b[0] |= 0x80
	return b
}

// unterminatedStartup is a protocol 3.0 startup packet of n bytes whose parameters are random
// bytes without a single NUL.
func unterminatedStartup(n int) []byte {
	b := append(be32(uint32(n)), be32(pgproto3.ProtocolVersion30)...)
	rest := make([]byte, n-len(b))
	rand.Read(rest)
	for i := range rest {
		if rest[i] == 0 {
			rest[i] = 'x'
		}
	}
	return append(b, rest...)
}

func TestUpstreamThatHangsUpOnSSLRequest(t *testing.T) {
	// A fake: no real server can be made to close the connection on an SSLRequest.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for range 4 { // bounded: the test connects once; the rest is slack
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var req [8]byte
			c.Read(req[:])
			c.Close()
		}
	}()
	r := startRelay(t, "postgres://"+ln.Addr().String()+"/?sslmode=require", wire.Config{})

	err = connectErr(t, r.url(pgcluster.RoleSuperuser), "connect through a relay whose upstream hangs up on SSLRequest", "08006")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		t.Fatalf("connect: got %v, want a server error", err)
	}
	if !strings.Contains(pe.Message, "ssl request") || strings.Contains(pe.Message, "does not support TLS") {
		t.Fatalf("message: got %q, want the failed ssl request, not a refusal of TLS", pe.Message)
	}
}

func TestShutdownDoesNotWaitForAClientInStartup(t *testing.T) {
	r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{StartupTimeout: time.Minute})
	c, err := net.Dial("tcp", r.Addr().String())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	// An answered SSLRequest shows the relay is in this client's startup; then it goes silent.
	if _, err := c.Write(requestPacket(sslRequestCode)); err != nil {
		t.Fatalf("write SSLRequest: %v", err)
	}
	var answer [1]byte
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, answer[:]); err != nil || answer[0] != 'N' {
		t.Fatalf("SSLRequest answer: got %q, %v, want N", answer[:], err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- r.Shutdown(ctx) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown: got %v, want %v", err, context.DeadlineExceeded)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("Shutdown still waiting for a silent client in its startup after 20s (StartupTimeout is a minute)")
	}
}
