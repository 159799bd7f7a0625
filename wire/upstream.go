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
	"syscall"
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
// userTimeout is TCP_USER_TIMEOUT for TCP targets; negative leaves the kernel's defaults.
func parseUpstream(connString string, connectTimeout, userTimeout time.Duration) (*upstream, error) {
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	if cfg.SSLNegotiation == "direct" {
		return nil, errors.New("sslnegotiation=direct is not supported")
	}
	u := &upstream{timeout: connectTimeout, dialer: upstreamDialer(userTimeout)}
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

// upstreamDialer sets TCP keepalive and TCP_USER_TIMEOUT on the sockets it opens, so that a
// link that went dead (a black hole: nothing refused, nothing acknowledged) ends its
// sessions after about userTimeout. TCP_USER_TIMEOUT bounds data left unacknowledged, a
// session waiting for its answer; the keepalive probes, sent after a third of it idle,
// give an idle session's link something to acknowledge, and the same bound ends it.
// Negative userTimeout leaves the kernel's defaults (Go's 15 s keepalive, and about
// 15 minutes of retransmissions).
func upstreamDialer(userTimeout time.Duration) net.Dialer {
	if userTimeout < 0 {
		return net.Dialer{}
	}
	probe := max(userTimeout/3, time.Second)
	return net.Dialer{
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: probe, Interval: probe, Count: 3},
		Control: func(network, _ string, rc syscall.RawConn) error {
			if network != "tcp4" && network != "tcp6" && network != "tcp" {
				return nil
			}
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(userTimeout.Milliseconds()))
			})
			if err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("setting TCP_USER_TIMEOUT: %w", serr)
			}
			return nil
		},
	}
}
