package netns_test

import (
	"bufio"
	"net"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/netns"
)

// echo serves one line back per connection on loopback.
func echo(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					c.Write([]byte(line))
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestLinkForwardsCutsAndRestores(t *testing.T) {
	if err := netns.Available(); err != nil {
		t.Skip(err) // CI runs as root, where this never skips
	}
	l, err := netns.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	addr, err := l.Forward(echo(t))
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial across the link: %v", err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	roundTrip := func(msg string, wait time.Duration) error {
		c.SetDeadline(time.Now().Add(wait))
		if _, err := c.Write([]byte(msg + "\n")); err != nil {
			return err
		}
		got, err := r.ReadString('\n')
		if err == nil && got != msg+"\n" {
			t.Fatalf("echo: got %q, want %q", got, msg)
		}
		return err
	}
	if err := roundTrip("before", 5*time.Second); err != nil {
		t.Fatalf("round trip before the cut: %v", err)
	}
	if err := l.Cut(); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip("during", 500*time.Millisecond); err == nil {
		t.Fatalf("round trip across a cut link: got an answer, want a timeout")
	}
	if err := l.Restore(); err != nil {
		t.Fatal(err)
	}
	// TCP retransmits what the cut dropped; the echo of "during" arrives, then "after".
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if got, err := r.ReadString('\n'); err != nil || got != "during\n" {
		t.Fatalf("after Restore: got %q, %v; want the retransmitted %q", got, err, "during")
	}
	if err := roundTrip("after", 30*time.Second); err != nil {
		t.Fatalf("round trip after Restore: %v", err)
	}
}
