package delay_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/delay"
)

// wait bounds every blocking step of these tests; reaching it is a failure.
const wait = 10 * time.Second

// serve runs handle for every connection accepted on a fresh loopback listener and returns
// its address; Cleanup closes the listener and waits for the handlers.
func serve(tb testing.TB, handle func(net.Conn)) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(wait))
				handle(c)
			}()
		}
	}()
	tb.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

// echo writes back what it reads until EOF, then closes.
func echo(c net.Conn) { io.Copy(c, c) }

// startRelay starts a Relay to target on 127.0.0.1:0. Cleanup closes it and checks that
// Serve returned nil.
func startRelay(tb testing.TB, target string, d time.Duration) *delay.Relay {
	tb.Helper()
	r, err := delay.New(delay.Config{Target: target, Delay: d})
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	if err := r.Listen(); err != nil {
		tb.Fatalf("Listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- r.Serve() }()
	tb.Cleanup(func() {
		if err := r.Close(); err != nil {
			tb.Errorf("Close: %v", err)
		}
		select {
		case err := <-served:
			if err != nil {
				tb.Errorf("Serve returned %v, want nil after Close", err)
			}
		case <-time.After(wait):
			tb.Errorf("Serve did not return within %v of Close", wait)
		}
	})
	return r
}

// dial connects to r with a deadline of wait.
func dial(tb testing.TB, r *delay.Relay) *net.TCPConn {
	tb.Helper()
	c, err := net.DialTimeout("tcp", r.Addr().String(), wait)
	if err != nil {
		tb.Fatalf("dial relay: %v", err)
	}
	tb.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(wait))
	return c.(*net.TCPConn)
}

func TestRelayCarriesBytesInOrder(t *testing.T) {
	target := serve(t, echo)
	for _, tc := range []struct {
		name  string
		delay time.Duration
		size  int
		write int // bytes per Write
	}{
		{"no delay, many small writes", 0, 64 << 10, 7},
		{"delay, many small writes", 5 * time.Millisecond, 64 << 10, 100},
		{"delay, more than the queue holds", 2 * time.Millisecond, 12 << 20, 100 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := startRelay(t, target, tc.delay)
			c := dial(t, r)
			want := make([]byte, tc.size)
			rand.Read(want)
			wrote := make(chan error, 1)
			go func() {
				for p := want; len(p) > 0; {
					n := min(tc.write, len(p))
					if _, err := c.Write(p[:n]); err != nil {
						wrote <- err
						return
					}
					p = p[n:]
				}
				wrote <- c.CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read echo: %v", err)
			}
			if err := <-wrote; err != nil {
				t.Fatalf("write: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("got %d bytes back (first difference at %d), want the %d sent, in order",
					len(got), firstDiff(got, want), len(want))
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// The relay must never release bytes early: a round trip through it takes at least two
// delays. (A lower bound only: a slow machine makes it longer, never shorter.)
func TestRelayHoldsBytesBackByTheDelay(t *testing.T) {
	target := serve(t, echo)
	const d = 30 * time.Millisecond
	r := startRelay(t, target, d)
	c := dial(t, r)
	buf := make([]byte, 4)
	for i := range 3 {
		start := time.Now()
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		if got := time.Since(start); got < 2*d {
			t.Errorf("round trip %d took %v, want at least %v (twice the one-way delay)", i, got, 2*d)
		}
	}

	r.SetDelay(0)
	if got := r.Delay(); got != 0 {
		t.Errorf("Delay() after SetDelay(0) = %v, want 0", got)
	}
	if _, err := c.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	if string(buf) != "pong" {
		t.Errorf("got %q after SetDelay(0), want %q", buf, "pong")
	}
}

// A cut relay carries nothing, on open connections and on new ones, without refusing or
// resetting either; Restore delivers what was held, in order.
func TestCutStallsUntilRestore(t *testing.T) {
	target := serve(t, echo)
	r := startRelay(t, target, 0)
	open := dial(t, r)
	roundTrip(t, open, "before")

	r.Cut()
	r.Cut() // idempotent
	if _, err := open.Write([]byte("held")); err != nil {
		t.Fatalf("write into the cut: %v", err)
	}
	fresh := dial(t, r) // the kernel accepts it; the relay does not dial the target yet
	if _, err := fresh.Write([]byte("new!")); err != nil {
		t.Fatalf("write on a connection opened during the cut: %v", err)
	}
	buf := make([]byte, 4)
	for _, c := range []*net.TCPConn{open, fresh} {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if n, err := c.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read across the cut: got %d bytes, %v; want nothing until the deadline", n, err)
		}
		c.SetReadDeadline(time.Now().Add(wait))
	}

	r.Restore()
	r.Restore() // idempotent
	for _, tc := range []struct {
		c    *net.TCPConn
		want string
	}{{open, "held"}, {fresh, "new!"}} {
		if _, err := io.ReadFull(tc.c, buf); err != nil || string(buf) != tc.want {
			t.Fatalf("after Restore: got %q, %v; want %q, the bytes held", buf, err, tc.want)
		}
	}
	roundTrip(t, open, "after")
}

// Close ends a cut relay at once, held bytes and waiting dials included (startRelay's
// Cleanup checks that it returns).
func TestCloseWhileCut(t *testing.T) {
	r := startRelay(t, serve(t, echo), 0)
	open := dial(t, r)
	roundTrip(t, open, "before")
	r.Cut()
	if _, err := open.Write([]byte("held")); err != nil {
		t.Fatal(err)
	}
	dial(t, r).Write([]byte("new!"))
}

// roundTrip sends msg through an echo and checks it comes back.
func roundTrip(tb testing.TB, c net.Conn, msg string) {
	tb.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		tb.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		tb.Fatalf("round trip: got %q, %v; want %q", buf, err, msg)
	}
}

// A half-close travels like data: the target sees EOF, and can still answer.
func TestRelayPassesHalfClose(t *testing.T) {
	target := serve(t, func(c net.Conn) {
		got, err := io.ReadAll(c)
		if err != nil {
			return
		}
		c.Write(append([]byte("got "), got...))
	})
	r := startRelay(t, target, 5*time.Millisecond)
	c := dial(t, r)
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read answer: %v", err)
	}
	if string(got) != "got hello" {
		t.Errorf("got %q, want %q", got, "got hello")
	}
}

func TestRelayEndsConnections(t *testing.T) {
	for _, tc := range []struct {
		name string
		// setup returns the relay; end makes the relay end the client's connection.
		setup func(t *testing.T) (*delay.Relay, func())
	}{
		{"Close ends open connections", func(t *testing.T) (*delay.Relay, func()) {
			r := startRelay(t, serve(t, echo), time.Millisecond)
			return r, func() { r.Close() }
		}},
		{"unreachable target", func(t *testing.T) (*delay.Relay, func()) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			addr := ln.Addr().String()
			ln.Close()
			return startRelay(t, addr, time.Millisecond), func() {}
		}},
		{"target closes", func(t *testing.T) (*delay.Relay, func()) {
			return startRelay(t, serve(t, func(c net.Conn) {}), time.Millisecond), func() {}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, end := tc.setup(t)
			c := dial(t, r)
			c.Write([]byte("x")) // may fail once the relay has closed: what matters is the read
			end()
			buf := make([]byte, 16)
			var err error
			for err == nil {
				_, err = c.Read(buf)
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("connection still open after %v, want it closed", wait)
			}
		})
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  delay.Config
	}{
		{"no target", delay.Config{Delay: time.Millisecond}},
		{"negative delay", delay.Config{Target: "127.0.0.1:1", Delay: -time.Millisecond}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := delay.New(tc.cfg); err == nil {
				t.Errorf("New(%+v) = nil error, want one", tc.cfg)
			}
		})
	}
}
