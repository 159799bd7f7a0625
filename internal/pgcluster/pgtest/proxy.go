package pgtest

import (
	"io"
	"net"
	"testing"
)

// Proxy forwards TCP connections from a loopback address of its own to addr
// until tb ends, and returns its host:port: one server reached by a second
// address, as a Fly Postgres member is through HAProxy beside its own port.
func Proxy(tb testing.TB, addr string) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("proxy to %s: %v", addr, err)
	}
	tb.Cleanup(func() { l.Close() })
	go func() {
		for {
			client, err := l.Accept()
			if err != nil {
				return // closed by Cleanup
			}
			go forward(client, addr)
		}
	}()
	return l.Addr().String()
}

// forward copies between client and a new connection to addr until either
// side ends, then closes both.
func forward(client net.Conn, addr string) {
	defer client.Close()
	server, err := net.Dial("tcp", addr)
	if err != nil {
		return
	}
	defer server.Close()
	done := make(chan struct{}, 2)
	go func() { io.Copy(server, client); done <- struct{}{} }()
	go func() { io.Copy(client, server); done <- struct{}{} }()
	<-done
}
