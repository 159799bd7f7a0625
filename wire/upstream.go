package wire

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sys/unix"
)

// upstream is where sessions are relayed to: the hosts of a Postgres URL, each with the TLS
// settings its sslmode asks for, tried in order (sslmode=prefer is TLS, then plain).
type upstream struct {
	name    string // host:port of the first target, for logs and errors
	targets []target
	// timeout bounds dialling, TLS, and each wait for the server while a session logs in:
	// the URL's connect_timeout, else Config.ConnectTimeout.
	timeout time.Duration
	dialer  net.Dialer
}

type target struct {
	network, addr string
	tls           *tls.Config // nil: plain
}

// errTLSRefused is returned when the server answers an SSLRequest with 'N'.
var errTLSRefused = errors.New("server does not support TLS")

// parseUpstream reads a Postgres URL or keyword/value string. Only the address and the TLS
// settings are used: user and password belong to the clients.
// linkTimeout tunes keepalive on TCP targets (see upstreamDialer).
func parseUpstream(connString string, connectTimeout, linkTimeout time.Duration) (*upstream, error) {
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	if cfg.SSLNegotiation == "direct" {
		return nil, errors.New("sslnegotiation=direct is not supported")
	}
	u := &upstream{timeout: connectTimeout, dialer: upstreamDialer(linkTimeout)}
	if cfg.ConnectTimeout > 0 {
		u.timeout = cfg.ConnectTimeout
	}
	add := func(host string, port uint16, t *tls.Config) {
		network, addr := pgconn.NetworkAddress(host, port)
		u.targets = append(u.targets, target{network: network, addr: addr, tls: t})
	}
	add(cfg.Host, cfg.Port, cfg.TLSConfig)
	for _, f := range cfg.Fallbacks {
		add(f.Host, f.Port, f.TLSConfig)
	}
	u.name = net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
	return u, nil
}

// dial connects to the first target that accepts, negotiating TLS where the target wants it.
func (u *upstream) dial(ctx context.Context) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, u.timeout)
	defer cancel()
	var errs []error
	for _, t := range u.targets {
		c, err := t.dial(ctx, &u.dialer)
		if err == nil {
			return c, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

func (t target) dial(ctx context.Context, d *net.Dialer) (net.Conn, error) {
	c, err := d.DialContext(ctx, t.network, t.addr)
	if err != nil {
		return nil, err
	}
	if t.tls == nil {
		return c, nil
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
		defer c.SetDeadline(time.Time{})
	}
	var req [8]byte
	binary.BigEndian.PutUint32(req[0:4], 8)
	binary.BigEndian.PutUint32(req[4:8], codeSSL)
	var resp [1]byte
	_, err = c.Write(req[:])
	if err == nil {
		_, err = io.ReadFull(c, resp[:])
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("ssl request to %s: %w", t.addr, err)
	}
	if resp[0] != 'S' {
		c.Close()
		return nil, fmt.Errorf("%s: %w", t.addr, errTLSRefused)
	}
	tc := tls.Client(c, t.tls)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", t.addr, err)
	}
	return tc, nil
}

// upstreamDialer sets TCP keepalive on the sockets it opens, tuned so that an idle link that
// went dead (a black hole: nothing refused, nothing acknowledged) ends its sessions after about
// linkTimeout: probes after half of it idle, three more a sixth of it apart. A busy link is
// watched by the relay instead (see Server.watchLinks). Negative linkTimeout leaves Go's
// defaults (15 s idle, then 9 probes 15 s apart).
func upstreamDialer(linkTimeout time.Duration) net.Dialer {
	if linkTimeout < 0 {
		return net.Dialer{}
	}
	return net.Dialer{KeepAliveConfig: net.KeepAliveConfig{Enable: true,
		Idle: max(linkTimeout/2, time.Second), Interval: max(linkTimeout/6, time.Second), Count: 3}}
}

// unackedSilence reports, for a TCP connection with data sent and not yet acknowledged, how
// long ago the peer last acknowledged anything; ok is false when nothing is outstanding or c
// is not TCP. A server that stops reading (a COPY waiting on a lock) still answers the
// kernel's window probes, so only a dead link stays silent: unlike TCP_USER_TIMEOUT, which
// counts a zero window as failure and would end that running query.
func unackedSilence(c net.Conn) (silence time.Duration, ok bool) {
	if tc, isTLS := c.(*tls.Conn); isTLS {
		c = tc.NetConn()
	}
	sc, isTCP := c.(*net.TCPConn)
	if !isTCP {
		return 0, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var info *unix.TCPInfo
	rc.Control(func(fd uintptr) {
		info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	})
	if err != nil || info == nil || info.Unacked == 0 {
		return 0, false
	}
	return time.Duration(info.Last_ack_recv) * time.Millisecond, true
}
