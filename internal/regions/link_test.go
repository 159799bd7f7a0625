package regions_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/regions"
)

// linkDelay is the one-way delay of these tests' links. Every timing below is a lower bound:
// a busy machine makes a round trip longer, never shorter.
const linkDelay = 50 * time.Millisecond

// stalled is how long a connection across a cut link is watched for an answer that must not
// come.
const stalled = 300 * time.Millisecond

// echoServer answers each connection on loopback with what it reads.
func echoServer(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// echoOnce sends msg on c and reads it back within d.
func echoOnce(c net.Conn, msg string, d time.Duration) error {
	c.SetDeadline(time.Now().Add(d))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	_, err := io.ReadFull(c, buf)
	return err
}

// echoFresh dials addr within d and sends one message back and forth.
func echoFresh(addr string, d time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, d)
	if err != nil {
		return err
	}
	defer c.Close()
	return echoOnce(c, "fresh", d)
}

func TestLinkDelaysCutsAndRestores(t *testing.T) {
	for _, tc := range []struct {
		name    string
		newLink func(time.Duration) (*regions.Link, error)
	}{
		{"as NewLink makes it", regions.NewLink},
		{"cut in userspace, as where namespaces are unavailable", regions.NewUserspaceLink},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := tc.newLink(linkDelay)
			if err != nil {
				t.Fatalf("new link: %v", err)
			}
			t.Cleanup(func() {
				if err := l.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			t.Logf("kernel cut: %v", l.KernelCut())
			testLink(t, l)
		})
	}
}

// testLink checks that l delays, cuts and restores a connection to an echo server.
func testLink(t *testing.T, l *regions.Link) {
	addr, err := l.Forward(echoServer(t))
	if err != nil {
		t.Fatalf("Forward: %v", err)
	}
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial across the link: %v", err)
	}
	defer c.Close()

	t.Run("a round trip takes at least the delay both ways", func(t *testing.T) {
		for i := range 3 {
			start := time.Now()
			if err := echoOnce(c, "ping", 10*time.Second); err != nil {
				t.Fatalf("round trip %d: %v", i, err)
			}
			if got := time.Since(start); got < 2*linkDelay {
				t.Errorf("round trip %d took %v, want at least %v", i, got, 2*linkDelay)
			}
		}
	})

	t.Run("SetDelay applies to open connections", func(t *testing.T) {
		l.SetDelay(2 * linkDelay)
		if got := l.Delay(); got != 2*linkDelay {
			t.Errorf("Delay() = %v, want %v", got, 2*linkDelay)
		}
		start := time.Now()
		if err := echoOnce(c, "pong", 10*time.Second); err != nil {
			t.Fatal(err)
		}
		if got := time.Since(start); got < 4*linkDelay {
			t.Errorf("round trip took %v, want at least %v", got, 4*linkDelay)
		}
		l.SetDelay(0)
	})

	t.Run("Cut stalls open and new connections, Restore brings them back", func(t *testing.T) {
		time.Sleep(2 * linkDelay) // what the longer delay still holds has gone
		if err := l.Cut(); err != nil {
			t.Fatalf("Cut: %v", err)
		}
		if err := echoOnce(c, "lost", stalled); err == nil {
			t.Fatal("an open connection got its answer across the cut link")
		}
		if err := echoFresh(addr, stalled); err == nil {
			t.Fatal("a new connection got its answer across the cut link")
		}
		if err := l.Restore(); err != nil {
			t.Fatalf("Restore: %v", err)
		}
		// The open connection gets what it sent before and during the cut, once TCP
		// retransmits it (a kernel cut) or the relay lets it go (a userspace one).
		c.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, len("lost"))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "lost" {
			t.Fatalf("the open connection after Restore: got %q, %v; want %q", buf, err, "lost")
		}
		if err := echoOnce(c, "back", 10*time.Second); err != nil {
			t.Fatalf("the open connection after Restore: %v", err)
		}
		if err := echoFresh(addr, 10*time.Second); err != nil {
			t.Fatalf("a new connection after Restore: %v", err)
		}
	})
}

// TestCrossRegionLink runs a setup whose regions, and WAL stream, are a delay apart: a write
// request pays the edge's hop to the primary region, a read stays local, and a cut link
// black-holes the primary region until it is restored.
func TestCrossRegionLink(t *testing.T) {
	w := start(t, regions.Options{Link: &regions.LinkConfig{Delay: linkDelay, WAL: true}})
	if w.Link == nil || w.WAL == nil {
		t.Fatalf("got Link %v and WAL %v, want both", w.Link, w.WAL)
	}
	client := &http.Client{Timeout: 10 * time.Second}
	write := func(c *http.Client) (reply, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		form := url.Values{"name": {unique("link")}}.Encode()
		return send(ctx, c, http.MethodPost, w.EdgeURL+"/items", strings.NewReader(form), formHeader())
	}

	t.Run("a write request crosses the link, at least once each way", func(t *testing.T) {
		start := time.Now()
		got, err := write(client)
		if err != nil {
			t.Fatal(err)
		}
		wantReply(t, got, http.StatusCreated, "iad", "fra>iad")
		if took := time.Since(start); took < 2*linkDelay {
			t.Errorf("the write request took %v, want at least %v", took, 2*linkDelay)
		}
	})

	t.Run("a read request stays in the replica region", func(t *testing.T) {
		got := doWith(t, client, http.MethodGet, w.EdgeURL+"/items", nil, nil)
		wantReply(t, got, http.StatusOK, "fra", "fra")
	})

	t.Run("a cut link black-holes the primary region until Restore", func(t *testing.T) {
		if err := w.Link.Cut(); err != nil {
			t.Fatalf("Cut: %v", err)
		}
		restored := false
		defer func() {
			if !restored {
				w.Link.Restore()
			}
		}()
		if got, err := write(&http.Client{Timeout: 2 * stalled}); err == nil && got.status == http.StatusCreated {
			t.Fatalf("a write request across the cut link succeeded: %+v", got)
		}
		if err := w.Link.Restore(); err != nil {
			t.Fatalf("Restore: %v", err)
		}
		restored = true
		var last error
		for range 20 { // bounded: the edge's connection may first have to give up on the cut
			got, err := write(client)
			if err == nil && got.status == http.StatusCreated {
				return
			}
			last = err
			if err == nil {
				last = fmt.Errorf("status %d, body %q", got.status, got.body)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("no write request succeeded after Restore; last: %v", last)
	})
}
