package lag

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// closeTimeout bounds the goodbye (a Terminate message) when a connection is
// closed.
const closeTimeout = time.Second

// conns is a small pool of connections to one server, so queries reuse a
// connection instead of dialling one per call. It holds at most cap(slots)
// connections, dials lazily, and drops a connection after any error that is
// not an ordinary server error. pgxpool would do, but it needs a module this
// repository does not require.
type conns struct {
	dial  *dialer
	slots chan struct{} // one token per connection in use

	mu     sync.Mutex
	idle   []*pgx.Conn
	closed bool
}

// newConns returns an empty pool of at most max connections dialled by d.
func newConns(d *dialer, max int) *conns {
	return &conns{dial: d, slots: make(chan struct{}, max)}
}

// queryRow runs a single-row query on a pooled connection and scans it into
// dest. When a connection that sat idle turns out to be broken (the server
// restarted since it was last used), it drops every idle connection and tries
// once more on a fresh one; the queries this package runs are read-only, so a
// second attempt is always safe.
func (p *conns) queryRow(ctx context.Context, sql string, dest ...any) error {
	for attempt := 0; ; attempt++ {
		conn, reused, err := p.acquire(ctx)
		if err != nil {
			return err
		}
		err = conn.QueryRow(ctx, sql).Scan(dest...)
		healthy := err == nil || isServerError(err) && !conn.IsClosed()
		p.release(conn, healthy)
		if healthy || !reused || attempt > 0 || ctx.Err() != nil {
			return err
		}
		p.dropIdle()
	}
}

// acquire returns an idle connection (reused is true) or dials a new one,
// waiting for a free slot while max connections are in use.
func (p *conns) acquire(ctx context.Context) (conn *pgx.Conn, reused bool, err error) {
	select {
	case p.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		<-p.slots
		return nil, false, ErrClosed
	}
	if n := len(p.idle); n > 0 {
		conn = p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		return conn, true, nil
	}
	p.mu.Unlock()
	conn, err = p.dial.connect(ctx)
	if err != nil {
		<-p.slots
		return nil, false, err
	}
	return conn, false, nil
}

// release returns conn to the pool, or closes it when it is not healthy or
// the pool is closed, and frees its slot.
func (p *conns) release(conn *pgx.Conn, healthy bool) {
	p.mu.Lock()
	if healthy && !p.closed && !conn.IsClosed() {
		p.idle = append(p.idle, conn)
		conn = nil
	}
	p.mu.Unlock()
	if conn != nil {
		closeConn(conn)
	}
	<-p.slots
}

// dropIdle closes every idle connection.
func (p *conns) dropIdle() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, conn := range idle {
		closeConn(conn)
	}
}

// close closes the idle connections and makes the pool refuse new work;
// connections in use are closed when they are released. It returns the first
// error.
func (p *conns) close() error {
	p.mu.Lock()
	p.closed = true
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	var first error
	for _, conn := range idle {
		if err := closeConn(conn); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// closeConn says goodbye to the server and closes conn.
func closeConn(conn *pgx.Conn) error {
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	return conn.Close(ctx)
}

// isServerError reports whether err is an error the server sent
// (ErrorResponse) for the statement, after which the connection is still
// usable. A FATAL or PANIC error, such as the one a server that is shutting
// down leaves on an idle connection, ends the session and does not count.
func isServerError(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Severity != "FATAL" && pgErr.Severity != "PANIC"
}

// dialer connects to one server for the pools that use it, and remembers the
// run-time parameters the server refused so that later connections go
// without them.
type dialer struct {
	log *zap.Logger

	mu  sync.Mutex
	cfg *pgx.ConnConfig // replaced, never modified, once a parameter is refused
}

// newDialer returns a dialer for cfg, which it owns from now on. log names
// the server in its fields.
func newDialer(cfg *pgx.ConnConfig, log *zap.Logger) *dialer {
	return &dialer{cfg: cfg, log: log}
}

// config returns the configuration connections are made with now.
func (d *dialer) config() *pgx.ConnConfig {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cfg
}

// connect opens a connection. When the server refuses a run-time parameter
// (see refusedParams) it connects once more without the parameters named,
// and again for each further one the server refuses, so each attempt drops
// at least one parameter and there are never more attempts than parameters.
// What was dropped is logged and kept out of later connections.
func (d *dialer) connect(ctx context.Context) (*pgx.Conn, error) {
	cfg := d.config()
	for {
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err == nil {
			return conn, nil
		}
		drop := refusedParams(err, cfg.RuntimeParams)
		if len(drop) == 0 || ctx.Err() != nil {
			return nil, err
		}
		cfg = cfg.Copy()
		for _, name := range drop {
			delete(cfg.RuntimeParams, name)
		}
		d.forget(drop, err)
	}
}

// forget makes later connections go without the run-time parameters in drop,
// which the server refused with err, and logs them unless another connection
// forgot them first.
func (d *dialer) forget(drop []string, err error) {
	d.mu.Lock()
	var fresh []string
	for _, name := range drop {
		if _, ok := d.cfg.RuntimeParams[name]; ok {
			fresh = append(fresh, name)
		}
	}
	if len(fresh) > 0 {
		next := d.cfg.Copy()
		for _, name := range fresh {
			delete(next.RuntimeParams, name)
		}
		d.cfg = next
	}
	d.mu.Unlock()
	if len(fresh) > 0 {
		d.log.Warn("server refused a run-time parameter from the URL; connecting without it",
			zap.Strings("dropped", fresh), zap.Error(err))
	}
}
