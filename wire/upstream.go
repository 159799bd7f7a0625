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
)

// upstream is where sessions are relayed to: the hosts of a Postgres URL, each with the TLS
// settings its sslmode asks for, tried in order (sslmode=prefer is TLS, then plain).
type upstream struct {
	name    string // host:port of the first target, for logs and errors
	targets []target
	timeout time.Duration
}

type target struct {
	network, addr string
	tls           *tls.Config // nil: plain
}

// errTLSRefused is returned when the server answers an SSLRequest with 'N'.
var errTLSRefused = errors.New("server does not support TLS")

// parseUpstream reads a Postgres URL or keyword/value string. Only the address and the TLS
// settings are used: user and password belong to the clients.
func parseUpstream(connString string, dialTimeout time.Duration) (*upstream, error) {
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	if cfg.SSLNegotiation == "direct" {
		return nil, errors.New("sslnegotiation=direct is not supported")
	}
	u := &upstream{timeout: dialTimeout}
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
		c, err := t.dial(ctx)
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

func (t target) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
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
