package wire_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgfly/pgfly/internal/pgcluster"
)

// leakCycle is one way a client can come and go.
type leakCycle struct {
	name    string
	session bool // the relay opens an upstream session for it
	run     func(addr string, r *relay) error
}

var leakCycles = []leakCycle{
	{"startup and Terminate", true, func(addr string, _ *relay) error {
		c, err := leakLogin(addr)
		if err != nil {
			return err
		}
		defer c.Close()
		return leakWrite(c, (&pgproto3.Terminate{}).Encode)
	}},
	{"pgx connect and close", true, func(_ string, r *relay) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, r.url(pgcluster.RoleTrust))
		if err != nil {
			return err
		}
		return conn.Close(ctx)
	}},
	{"close after login without Terminate", true, func(addr string, _ *relay) error {
		c, err := leakLogin(addr)
		if err != nil {
			return err
		}
		return c.Close()
	}},
	{"close mid-startup", false, func(addr string, _ *relay) error {
		c, err := leakDial(addr)
		if err != nil {
			return err
		}
		defer c.Close()
		startup := leakStartup()
		_, err = c.Write(startup[:len(startup)/2])
		return err
	}},
	{"bad startup length", false, func(addr string, _ *relay) error {
		c, err := leakDial(addr)
		if err != nil {
			return err
		}
		defer c.Close()
		// Only the length, so that the relay has read everything when it closes and the
		// client sees EOF rather than a reset.
		if _, err := c.Write([]byte{0, 0, 0, 4}); err != nil {
			return err
		}
		return leakExpectFatal(c, "08P01")
	}},
	{"startup without user", false, func(addr string, _ *relay) error {
		c, err := leakDial(addr)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := leakWrite(c, (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
			Parameters: map[string]string{"database": pgcluster.Database}}).Encode); err != nil {
			return err
		}
		return leakExpectFatal(c, "08P01")
	}},
	{"SSLRequest then close", false, func(addr string, _ *relay) error {
		c, err := leakDial(addr)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := leakWrite(c, (&pgproto3.SSLRequest{}).Encode); err != nil {
			return err
		}
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return err
		}
		if b[0] != 'N' {
			return fmt.Errorf("SSLRequest: got %q, want 'N'", b[0])
		}
		return nil
	}},
	{"cancel with unknown key", false, func(addr string, _ *relay) error {
		c, err := leakDial(addr)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := leakWrite(c, (&pgproto3.CancelRequest{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}}).Encode); err != nil {
			return err
		}
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			return fmt.Errorf("after a CancelRequest: got %v, want the relay to close (EOF)", err)
		}
		return nil
	}},
}

// TestNoLeaksAfterManySessions opens and ends 1,000 client connections through a relay in
// every way a client can: clean, abrupt, mid-startup, rejected. Afterwards the relay holds
// no session, and the process no extra goroutine or file descriptor.
func TestNoLeaksAfterManySessions(t *testing.T) {
	const (
		cycles  = 1000
		workers = 4
		slack   = 2
	)
	r := primaryRelay(t)
	addr := r.Addr().String()

	// Warm up once per kind, so that lazily started runtime goroutines are in the baseline.
	for _, c := range leakCycles {
		if err := c.run(addr, r); err != nil {
			t.Fatalf("warm-up %s: %v", c.name, err)
		}
	}
	waitFor(t, 10*time.Second, "the warm-up sessions to close", func() bool { return r.OpenSessions() == 0 })
	wantSessions := len(r.events.Closed())
	for _, c := range leakCycles {
		if c.session {
			wantSessions += cycles / len(leakCycles)
		}
	}
	runtime.GC()
	baseG, baseFD := runtime.NumGoroutine(), openFDs(t)

	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < cycles/len(leakCycles)*len(leakCycles); i += workers {
				c := leakCycles[i%len(leakCycles)]
				if err := c.run(addr, r); err != nil {
					errs <- fmt.Errorf("cycle %d (%s): %w", i, c.name, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}

	var g, fds int
	deadline := time.Now().Add(5 * time.Second)
	for {
		runtime.GC()
		g, fds = runtime.NumGoroutine(), openFDs(t)
		if g <= baseG+slack && fds <= baseFD+slack && r.OpenSessions() == 0 {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Logf("goroutines:\n%s", buf[:runtime.Stack(buf, true)])
			t.Fatalf("after %d cycles: got %d goroutines, %d open fds, %d open sessions; want at most %d, %d, 0",
				cycles, g, fds, r.OpenSessions(), baseG+slack, baseFD+slack)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := len(r.events.Closed()); got != wantSessions {
		t.Errorf("sessions closed: got %d, want %d", got, wantSessions)
	}
	t.Logf("after %d cycles: %d goroutines (baseline %d), %d open fds (baseline %d)", cycles, g, baseG, fds, baseFD)
}

// openFDs counts the process's open file descriptors.
func openFDs(tb testing.TB) int {
	tb.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatalf("count open fds: %v", err)
	}
	return len(entries)
}

// The leak cycles run on worker goroutines, so their helpers return errors instead of
// failing the test.

func leakDial(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, nil
}

func leakStartup() []byte {
	b, err := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": pgcluster.RoleTrust.Name, "database": pgcluster.Database}}).Encode(nil)
	if err != nil {
		panic(err)
	}
	return b
}

func leakWrite(c net.Conn, encode func([]byte) ([]byte, error)) error {
	b, err := encode(nil)
	if err != nil {
		return err
	}
	_, err = c.Write(b)
	return err
}

// leakLogin connects as the trust role and reads until the first ReadyForQuery.
func leakLogin(addr string) (net.Conn, error) {
	c, err := leakDial(addr)
	if err != nil {
		return nil, err
	}
	if _, err := c.Write(leakStartup()); err != nil {
		c.Close()
		return nil, err
	}
	fe := pgproto3.NewFrontend(c, c)
	for range 100 {
		msg, err := fe.Receive()
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("login: %w", err)
		}
		switch m := msg.(type) {
		case *pgproto3.ReadyForQuery:
			return c, nil
		case *pgproto3.ErrorResponse:
			c.Close()
			return nil, fmt.Errorf("login: %s %s", m.Code, m.Message)
		}
	}
	c.Close()
	return nil, errors.New("login: no ReadyForQuery in 100 messages")
}

// leakExpectFatal reads one message and checks it is a FATAL error with code, then EOF.
func leakExpectFatal(c net.Conn, code string) error {
	var head [5]byte
	if _, err := io.ReadFull(c, head[:]); err != nil {
		return fmt.Errorf("read error response: %w", err)
	}
	body := make([]byte, binary.BigEndian.Uint32(head[1:])-4)
	if _, err := io.ReadFull(c, body); err != nil {
		return fmt.Errorf("read error response: %w", err)
	}
	var e pgproto3.ErrorResponse
	if head[0] != 'E' || e.Decode(body) != nil {
		return fmt.Errorf("got message %q %q, want an ErrorResponse", head[0], body)
	}
	if e.Severity != "FATAL" || e.Code != code {
		return fmt.Errorf("got %s %s %q, want FATAL %s", e.Severity, e.Code, e.Message, code)
	}
	if _, err := c.Read(head[:1]); err != io.EOF {
		return fmt.Errorf("after the error: got %v, want EOF", err)
	}
	return nil
}
