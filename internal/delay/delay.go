// Package delay is a userspace TCP relay that holds every chunk of bytes back by a one-way
// delay before it forwards it, in order, so that a loopback connection behaves like one
// between two regions. The benchmarks put one on every cross-region hop.
//
// It is a measuring instrument, not a network emulator: it adds latency only (no bandwidth
// limit, no loss, no jitter), it trusts both ends, and it must never face untrusted clients.
// A FIN is delayed like data (a half-close reaches the other side after the delay); a reset
// or any other read error closes both connections once the bytes read before it have gone.
//
// Cut stalls the relay as a dead path would, in userspace: nothing is refused and nothing
// arrives until Restore. The sender's kernel still acknowledges what it sent, so a sender's
// TCP_USER_TIMEOUT or unacknowledged-bytes watch cannot see the cut; a kernel black hole
// (internal/netns) can.
package delay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for Config.
const (
	// DefaultListen is the address Listen binds when Config.Listen is empty.
	DefaultListen = "127.0.0.1:0"
	// DefaultDialTimeout bounds the connection to the target.
	DefaultDialTimeout = 5 * time.Second
)

// chunkSize is the largest chunk read at once; queueLen is how many chunks one direction
// holds back before it stops reading (back-pressure, like a TCP window of queueLen*chunkSize).
const (
	chunkSize = 32 << 10
	queueLen  = 256
)

var chunks = sync.Pool{New: func() any {
	b := make([]byte, chunkSize)
	return &b
}}

// Config configures a Relay.
type Config struct {
	// Listen is the address Listen binds; DefaultListen when empty.
	Listen string
	// Target is the host:port every accepted connection is relayed to.
	Target string
	// Delay is the one-way delay applied to each direction; SetDelay changes it later.
	Delay time.Duration
	// DialTimeout bounds the connection to the target; DefaultDialTimeout when zero.
	DialTimeout time.Duration
}

// Relay accepts connections and relays each one to the target with the delay. Its lifecycle
// is New, Listen, Serve, Close.
type Relay struct {
	cfg   Config
	delay atomic.Int64 // nanoseconds

	mu       sync.Mutex
	ln       net.Listener
	conns    map[net.Conn]struct{}
	closed   bool
	done     chan struct{} // closed by Close
	restored chan struct{} // nil unless cut; closed by Restore
	wg       sync.WaitGroup
}

// New checks cfg and returns a Relay that is not listening yet.
func New(cfg Config) (*Relay, error) {
	if cfg.Target == "" {
		return nil, errors.New("delay: a target address is required")
	}
	if cfg.Delay < 0 {
		return nil, fmt.Errorf("delay: negative delay %v", cfg.Delay)
	}
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	r := &Relay{cfg: cfg, conns: make(map[net.Conn]struct{}), done: make(chan struct{})}
	r.delay.Store(int64(cfg.Delay))
	return r, nil
}

// Listen binds Config.Listen, so that Addr is known before Serve.
func (r *Relay) Listen() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return errors.New("delay: relay closed")
	}
	ln, err := net.Listen("tcp", r.cfg.Listen)
	if err != nil {
		return fmt.Errorf("delay: listen %s: %w", r.cfg.Listen, err)
	}
	r.ln = ln
	return nil
}

// Addr is the bound address, nil before Listen.
func (r *Relay) Addr() net.Addr {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ln == nil {
		return nil
	}
	return r.ln.Addr()
}

// Delay is the current one-way delay.
func (r *Relay) Delay() time.Duration { return time.Duration(r.delay.Load()) }

// SetDelay changes the one-way delay for bytes read from now on, on open connections too.
// Bytes never overtake each other: a shorter delay waits for the bytes already held back.
func (r *Relay) SetDelay(d time.Duration) {
	r.delay.Store(int64(max(d, 0)))
}

// Cut stalls every connection, open or new, until Restore: bytes read are held back (the
// delay's queue fills, then the relay stops reading), and a connection accepted while cut
// dials the target only once restored. Nothing is refused or reset, as on a dead network
// path that TCP keeps retrying; after Restore the held bytes go at once, in order.
func (r *Relay) Cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.restored == nil {
		r.restored = make(chan struct{})
	}
}

// Restore undoes Cut; it does nothing on a relay that is not cut.
func (r *Relay) Restore() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.restored != nil {
		close(r.restored)
		r.restored = nil
	}
}

// passable waits while the relay is cut; false when Close ended the wait.
func (r *Relay) passable() bool {
	r.mu.Lock()
	restored := r.restored
	r.mu.Unlock()
	if restored == nil {
		return true
	}
	select {
	case <-restored:
		return true
	case <-r.done:
		return false
	}
}

// Serve accepts connections until Close, then returns nil.
func (r *Relay) Serve() error {
	r.mu.Lock()
	ln := r.ln
	r.mu.Unlock()
	if ln == nil {
		return errors.New("delay: Serve called before Listen")
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			select {
			case <-r.done:
				return nil
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("delay: accept: %w", err)
		}
		if !r.track(c) {
			c.Close()
			return nil
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			defer r.untrack(c)
			r.relay(c)
		}()
	}
}

// Close stops accepting, closes every connection at once and waits for their goroutines. It
// is idempotent.
func (r *Relay) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	close(r.done)
	var err error
	if r.ln != nil {
		if cerr := r.ln.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) {
			err = fmt.Errorf("delay: close listener: %w", cerr)
		}
	}
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
	return err
}

// track registers an open connection so that Close can end it; false once closed.
func (r *Relay) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	r.conns[c] = struct{}{}
	return true
}

func (r *Relay) untrack(c net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.conns, c)
}

// relay connects client to the target and runs both directions until both have ended.
func (r *Relay) relay(client net.Conn) {
	defer client.Close()
	if !r.passable() {
		return
	}
	d := net.Dialer{Timeout: r.cfg.DialTimeout}
	target, err := d.Dial("tcp", r.cfg.Target)
	if err != nil {
		return // the client sees its connection closed, as with an unreachable server
	}
	defer target.Close()
	if !r.track(target) {
		return
	}
	defer r.untrack(target)

	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); r.direction(client, target) }()
	go func() { defer wg.Done(); r.direction(target, client) }()
	wg.Wait()
}

// chunk is bytes read at one moment, to be written at release. A chunk without buf marks the
// end of the source: eof for a clean end (half-close the destination), else an abort.
type chunk struct {
	buf     *[]byte // from chunks; owned by the queue until the writer puts it back
	n       int
	release time.Time
	eof     bool
}

// direction copies src to dst, each chunk held back by the delay at the moment it was read.
// The reader fills a bounded queue; the writer sleeps until each chunk's release time. When
// the writer fails it closes both connections, which ends the reader, and then drains.
func (r *Relay) direction(src, dst net.Conn) {
	q := make(chan chunk, queueLen)
	go func() {
		defer close(q)
		var last time.Time
		for {
			bp := chunks.Get().(*[]byte)
			n, err := src.Read(*bp)
			if n > 0 {
				last = r.releaseTime(last)
				q <- chunk{buf: bp, n: n, release: last}
			} else {
				chunks.Put(bp)
			}
			if err != nil {
				q <- chunk{release: r.releaseTime(last), eof: errors.Is(err, io.EOF)}
				return
			}
		}
	}()

	timer := time.NewTimer(0)
	<-timer.C
	defer timer.Stop()
	failed := false
	for c := range q {
		if !failed {
			if wait := time.Until(c.release); wait > 0 {
				timer.Reset(wait)
				select {
				case <-timer.C:
				case <-r.done:
					failed = true
				}
			}
			if !failed && !r.passable() {
				failed = true
			}
		}
		switch {
		case failed:
		case c.buf == nil && c.eof:
			if tc, ok := dst.(*net.TCPConn); ok {
				tc.CloseWrite()
			} else {
				dst.Close()
			}
		case c.buf == nil:
			failed = true
		default:
			if _, err := dst.Write((*c.buf)[:c.n]); err != nil {
				failed = true
			}
		}
		if failed {
			src.Close()
			dst.Close()
		}
		if c.buf != nil {
			chunks.Put(c.buf)
		}
	}
}

// releaseTime is when bytes read now may be written: now plus the delay, but never before
// the bytes read earlier.
func (r *Relay) releaseTime(last time.Time) time.Time {
	t := time.Now().Add(r.Delay())
	if t.Before(last) {
		return last
	}
	return t
}
