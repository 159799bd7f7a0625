package wire

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync/atomic"
)

// headerLen is the size of a message header: a type byte and a 4-byte length that counts
// itself but not the type byte.
const headerLen = 5

// DefaultBufferSize is the per-direction buffer a session holds for its whole life.
const DefaultBufferSize = 8 << 10

// largeBufferSize is the buffer a pump borrows while it streams a message larger than its
// own buffer.
const largeBufferSize = 64 << 10

// largeBuffers keeps a few large buffers for reuse. A channel rather than a sync.Pool: a Pool
// may drop what it is given (the race detector makes it do so on purpose), and a dropped
// buffer is an allocation on the hot path of every large row.
var largeBuffers = make(chan []byte, 32)

func getLargeBuffer() []byte {
	select {
	case b := <-largeBuffers:
		return b
	default:
		return make([]byte, largeBufferSize)
	}
}

func putLargeBuffer(b []byte) {
	select {
	case largeBuffers <- b:
	default: // enough are kept; let this one go
	}
}

// inspectFunc looks at one message before it is forwarded. msg is the whole message, header
// included, when whole is true; otherwise it is the header and a prefix of the body (the
// message was too large to buffer and its type does not need its body). msg is only valid
// during the call. A non-nil replacement is forwarded instead of msg. An error ends the pump
// before msg or anything after it is forwarded.
type inspectFunc func(typ byte, msg []byte, whole bool) (replacement []byte, err error)

// pump copies the messages of one direction of a session from src to dst.
//
// It peeks each 5-byte header, forwards raw bytes, and writes every complete message it has
// buffered in one Write. Only types marked in watch are passed to inspect; a watched message
// larger than the buffer is read whole only when its type is marked in whole, and everything
// else larger than the buffer is streamed through without being held.
type pump struct {
	src   io.Reader
	dst   io.Writer
	buf   []byte // owned by the pump for its whole life
	max   int    // largest accepted value of a message's length field
	watch *[256]bool
	// whole is set on the server's side, whose watched types are small and rare. The client's
	// side streams (nil): reading a large message whole would let a client make the relay
	// allocate whatever its length field declares (up to max) with a 5-byte header.
	whole   *[256]bool
	inspect inspectFunc
	// tap, when set, sees the rest of each message streamed through after inspect saw its
	// prefix (a forwarding session hashes what its client received).
	tap   func([]byte)
	total *atomic.Uint64 // the server's running byte count for this direction

	// after is how many bytes were read beyond the message being inspected: for an inspect
	// that must know whether the peer said more.
	after int
	// then, when an inspect sets it, runs once what was read so far has been written to dst,
	// before src is read again: for work that must not hold back the message it follows.
	then func() error

	// Written by run, read by the session after run has returned.
	n          int64 // bytes written to dst
	midMessage bool  // dst has received part of a message and not its end
}

// protocolError is a peer's breach of the message framing.
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return e.msg }

// run forwards messages until src or dst fails or inspect returns an error. It returns io.EOF
// when src ended cleanly between messages and io.ErrUnexpectedEOF when it ended inside one.
func (p *pump) run() error {
	r, w := 0, 0 // p.buf[r:w] has been read and not yet forwarded
	for {
		pos := r
		for w-pos >= headerLen {
			typ := p.buf[pos]
			n := int(binary.BigEndian.Uint32(p.buf[pos+1:]))
			if n < 4 || n > p.max {
				if err := p.write(p.buf[r:pos]); err != nil {
					return err
				}
				return &protocolError{fmt.Sprintf("invalid message length %d for message type %q (limit %d)", n, typ, p.max)}
			}
			end := pos + 1 + n
			if end > w {
				if 1+n <= len(p.buf) {
					break // fits once more is read
				}
				if err := p.write(p.buf[r:pos]); err != nil {
					return err
				}
				if err := p.large(typ, pos, w, 1+n); err != nil {
					return err
				}
				r, w, pos = 0, 0, 0
				continue
			}
			if p.watch[typ] {
				p.after = w - end
				repl, err := p.inspect(typ, p.buf[pos:end], true)
				if err != nil {
					if werr := p.write(p.buf[r:pos]); werr != nil {
						return werr
					}
					return err
				}
				if repl != nil {
					if err := p.write(p.buf[r:pos]); err != nil {
						return err
					}
					if err := p.write(repl); err != nil {
						return err
					}
					r = end
				}
			}
			pos = end
		}
		if err := p.write(p.buf[r:pos]); err != nil {
			return err
		}
		if then := p.then; then != nil {
			p.then = nil
			if err := then(); err != nil {
				return err
			}
		}
		r = pos
		if r > 0 { // keep the unfinished message at the front, so the buffer has room
			w = copy(p.buf, p.buf[r:w])
			r = 0
		}
		nr, err := p.src.Read(p.buf[w:])
		w += nr
		if err != nil && nr == 0 {
			if err == io.EOF && r < w {
				return io.ErrUnexpectedEOF
			}
			return err
		}
	}
}

// large forwards a message of size bytes that does not fit in the buffer. Its first
// p.buf[pos:w] bytes are buffered and nothing before them is pending.
func (p *pump) large(typ byte, pos, w, size int) error {
	head := p.buf[pos:w]
	p.after = 0
	if p.watch[typ] && p.whole != nil && p.whole[typ] {
		msg := make([]byte, size) // bounded by p.max, and only for rare message types
		copy(msg, head)
		if _, err := io.ReadFull(p.src, msg[len(head):]); err != nil {
			return unexpected(err)
		}
		repl, err := p.inspect(typ, msg, true)
		if err != nil {
			return err
		}
		if repl != nil {
			msg = repl
		}
		return p.write(msg)
	}
	read := len(head) // of the message: what inspect gives back may have more before it
	if p.watch[typ] {
		repl, err := p.inspect(typ, head, false)
		if err != nil {
			return err
		}
		if repl != nil { // what inspect held back, then the prefix
			head = repl
		}
	}
	if err := p.write(head); err != nil {
		return err
	}
	p.midMessage = true
	// The rest goes through a larger buffer borrowed for this message only: sessions stay
	// small while idle, and big values move in few syscalls. A plain loop, because
	// io.CopyBuffer would need a LimitedReader and a writer wrapper, two allocations.
	buf := getLargeBuffer()
	defer putLargeBuffer(buf)
	for rest := size - read; rest > 0; {
		nr, err := p.src.Read(buf[:min(rest, len(buf))])
		if nr > 0 {
			if p.tap != nil {
				p.tap(buf[:nr])
			}
			if werr := p.write(buf[:nr]); werr != nil {
				return werr
			}
			rest -= nr
		}
		if err != nil && rest > 0 {
			return unexpected(err)
		}
	}
	p.midMessage = false
	return nil
}

func (p *pump) write(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	n, err := p.dst.Write(b)
	p.count(int64(n))
	if err != nil && n > 0 && n < len(b) {
		p.midMessage = true // the peer may hold part of a message: nothing may follow it
	}
	if err != nil {
		return &writeError{err}
	}
	return nil
}

// writeError is a pump's failure to write to dst, as opposed to reading src: it tells which
// of a session's two connections failed.
type writeError struct{ err error }

func (e *writeError) Error() string { return e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

func (p *pump) count(n int64) {
	p.n += n
	if p.total != nil {
		p.total.Add(uint64(n))
	}
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
