package lag

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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
	cfg   *pgx.ConnConfig
	slots chan struct{} // one token per connection in use

	mu     sync.Mutex
	idle   []*pgx.Conn
	closed bool
}

// newConns returns an empty pool of at most max connections to cfg's server.
func newConns(cfg *pgx.ConnConfig, max int) *conns {
	return &conns{cfg: cfg, slots: make(chan struct{}, max)}
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
	conn, err = pgx.ConnectConfig(ctx, p.cfg)
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
