package wire

// The fuzz targets live inside the package because the startup parser and the framer are
// unexported; everything else in this package's tests is black-box.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// FuzzStartup feeds arbitrary bytes to readStartup and, for a protocol 3 packet, to
// startupParams. Neither may panic; readStartup reads exactly one packet of at most
// maxStartup bytes and fails only with a protocolError or an end of input; startupParams
// agrees with pgproto3's decoder.
func FuzzStartup(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		src := &countingReader{r: bytes.NewReader(data)}
		p, err := readStartup(src)
		if err != nil {
			var pe *protocolError
			switch {
			case errors.As(err, &pe):
				if src.n != 4 {
					t.Fatalf("consumed %d bytes before rejecting the length, want 4", src.n)
				}
			case err == io.EOF:
				if len(data) != 0 {
					t.Fatalf("got io.EOF for %d bytes of input, want it only for none", len(data))
				}
			case err == io.ErrUnexpectedEOF:
			default:
				t.Fatalf("got error %T %v, want a *protocolError, io.EOF or io.ErrUnexpectedEOF", err, err)
			}
			return
		}
		n := int(binary.BigEndian.Uint32(data))
		if len(p.raw) != n || n < 8 || n > maxStartup {
			t.Fatalf("got a %d-byte packet for length field %d, want that length within [8, %d]", len(p.raw), n, maxStartup)
		}
		if cap(p.raw) > maxStartup {
			t.Fatalf("got a buffer of capacity %d, want at most %d", cap(p.raw), maxStartup)
		}
		if src.n != n {
			t.Fatalf("consumed %d bytes, want exactly the packet's %d", src.n, n)
		}
		if !bytes.Equal(p.raw, data[:n]) {
			t.Fatalf("got packet %q, want the input's first %d bytes %q", p.raw, n, data[:n])
		}
		if want := binary.BigEndian.Uint32(data[4:8]); p.code != want {
			t.Fatalf("got code %d, want %d", p.code, want)
		}
		if p.code>>16 != protoMajor3 {
			return
		}

		params, err := startupParams(p.raw)
		var pe *protocolError
		if err != nil && !errors.As(err, &pe) {
			t.Fatalf("got error %T %v, want a *protocolError", err, err)
		}
		if err == nil && params["user"] == "" {
			t.Fatalf("accepted params %q without a user", params)
		}
		if p.code != pgproto3.ProtocolVersion30 && p.code != pgproto3.ProtocolVersion32 {
			return
		}
		// Differential check against pgproto3, which accepts empty names and a missing user
		// where the server (and pgfly) does not.
		var sm pgproto3.StartupMessage
		derr := sm.Decode(p.raw[4:])
		if err == nil {
			if derr != nil {
				t.Fatalf("pgfly accepted params %q that pgproto3 rejects: %v", params, derr)
			}
			if !maps.Equal(params, sm.Parameters) {
				t.Fatalf("got params %q, want pgproto3's %q", params, sm.Parameters)
			}
		}
		_, emptyName := sm.Parameters[""]
		if derr == nil && sm.Parameters["user"] != "" && !emptyName && err != nil {
			t.Fatalf("pgfly rejected params %q that pgproto3 accepts: %v", sm.Parameters, err)
		}
	})
}

// Framing parameters of FuzzPump: a tiny buffer so that small inputs exercise the paths
// for messages larger than the buffer.
const (
	fuzzBufSize = 64
	fuzzMax     = 4096
)

// fuzzWatch is the types FuzzPump inspects, as one side of a session does: the server's
// side (readWhole) decodes 'R', 'K', 'E', 'C' and 'Z' and reads them whole; the client's
// side looks at 'Q' and streams it when large.
func fuzzWatch(readWhole bool) *[256]bool {
	if readWhole {
		return &fuzzServerWatch
	}
	return &fuzzClientWatch
}

var fuzzServerWatch, fuzzClientWatch = func() (server, client [256]bool) {
	for _, t := range []byte{'R', 'K', 'E', 'C', 'Z'} {
		server[t] = true
	}
	client['Q'] = true
	return server, client
}()

// fuzzInspector decodes the watched types the way session does, for a pump that reads large
// messages whole or not. It is used both by the pump under test and by the reference model,
// so it must be deterministic.
func fuzzInspector(readWhole bool) inspectFunc {
	return func(typ byte, msg []byte, whole bool) ([]byte, error) { return fuzzInspect(typ, msg, whole, readWhole) }
}

func fuzzInspect(typ byte, msg []byte, whole, readWhole bool) ([]byte, error) {
	if len(msg) < headerLen || msg[0] != typ {
		return nil, fmt.Errorf("inspect got %q for type %q, want a message of that type", msg, typ)
	}
	n := int(binary.BigEndian.Uint32(msg[1:]))
	if whole && len(msg) != 1+n {
		return nil, fmt.Errorf("inspect got %d bytes of a whole message of length %d", len(msg), n)
	}
	if !whole && (len(msg) > 1+n || readWhole) {
		return nil, fmt.Errorf("inspect got a partial %q message of %d bytes, length %d", typ, len(msg), n)
	}
	body := msg[headerLen:]
	switch typ {
	case 'Z':
		if len(body) != 1 {
			return nil, &protocolError{"invalid ReadyForQuery"}
		}
	case 'K':
		if len(body) < 8 {
			return nil, &protocolError{"invalid BackendKeyData"}
		}
	case 'E':
		f := parseError(body)
		for _, v := range [][]byte{f.severity, f.code, f.message} {
			if bytes.IndexByte(v, 0) >= 0 {
				return nil, fmt.Errorf("parseError returned field %q with a NUL", v)
			}
		}
	case 'R':
		repl, err := stripChannelBinding(body)
		if err != nil || repl == nil {
			return nil, err
		}
		var sasl pgproto3.AuthenticationSASL
		if err := sasl.Decode(repl[headerLen:]); err != nil {
			return nil, fmt.Errorf("stripChannelBinding produced an invalid message %q: %v", repl, err)
		}
		for _, m := range sasl.AuthMechanisms {
			if m == "SCRAM-SHA-256-PLUS" {
				return nil, fmt.Errorf("stripChannelBinding kept %s in %q", m, repl)
			}
		}
		return repl, nil
	}
	return nil, nil
}

// FuzzPump runs the framer over arbitrary input, delivered in reads of at most chunk bytes,
// and compares what it forwards with a reference model that frames the whole input at once:
// on a clean end everything (with SCRAM-SHA-256-PLUS stripped) is forwarded; on a protocol
// error exactly the messages before the offending one; on a truncated input the complete
// messages, plus the partial one only when it was being streamed.
func FuzzPump(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8) {
		readWhole := chunk&0x80 != 0 // the server's side; the low bits are the read size
		var dst bytes.Buffer
		p := &pump{
			src:     &chunkReader{data: data, chunk: 1 + int(chunk&0x7f)},
			dst:     &dst,
			buf:     make([]byte, fuzzBufSize),
			max:     fuzzMax,
			watch:   fuzzWatch(readWhole),
			inspect: fuzzInspector(readWhole),
		}
		if readWhole {
			p.whole = p.watch
		}
		err := p.run()
		want := modelPump(data, readWhole)

		if p.n != int64(dst.Len()) {
			t.Fatalf("pump counted %d bytes, wrote %d", p.n, dst.Len())
		}
		if err == nil {
			t.Fatalf("run returned nil, want an error (the input always ends)")
		}
		var pe *protocolError
		switch {
		case err == io.EOF:
			if want.end != endClean {
				t.Fatalf("got io.EOF, want %v", want.end)
			}
		case err == io.ErrUnexpectedEOF:
			if want.end != endTruncated {
				t.Fatalf("got io.ErrUnexpectedEOF, want %v", want.end)
			}
		case errors.As(err, &pe):
			if want.end != endProtocol {
				t.Fatalf("got protocol error %q, want %v", pe.msg, want.end)
			}
		default:
			t.Fatalf("got error %T %v, want io.EOF, io.ErrUnexpectedEOF or a *protocolError", err, err)
		}
		wantOut := want.out
		if p.midMessage != want.streamed {
			t.Fatalf("got midMessage %v, want %v", p.midMessage, want.streamed)
		}
		if want.streamed {
			wantOut = append(wantOut, data[want.boundary:]...)
		}
		if !bytes.Equal(dst.Bytes(), wantOut) {
			t.Fatalf("forwarded %d bytes %q\nwant %d bytes %q", dst.Len(), dst.Bytes(), len(wantOut), wantOut)
		}
	})
}

type pumpEnd int

const (
	endClean pumpEnd = iota
	endTruncated
	endProtocol
)

func (e pumpEnd) String() string {
	return [...]string{"a clean end", "a truncated message", "a protocol error"}[e]
}

// pumpModel is what the pump should have done with an input.
type pumpModel struct {
	out      []byte  // forwarded complete messages, replacements applied
	end      pumpEnd // how the run ends
	boundary int     // offset in the input where the first message not in out starts
	streamed bool    // the truncated message is large and not read whole, so it is streamed
}

// modelPump frames the whole input at once with the pump's rules.
func modelPump(data []byte, readWhole bool) pumpModel {
	var m pumpModel
	pos := 0
	for {
		m.boundary = pos
		rest := data[pos:]
		if len(rest) == 0 {
			m.end = endClean
			return m
		}
		if len(rest) < headerLen {
			m.end = endTruncated
			return m
		}
		typ := rest[0]
		n := int(binary.BigEndian.Uint32(rest[1:]))
		if n < 4 || n > fuzzMax {
			m.end = endProtocol
			return m
		}
		if len(rest) < 1+n {
			m.end = endTruncated
			m.streamed = 1+n > fuzzBufSize && !(fuzzWatch(readWhole)[typ] && readWhole)
			return m
		}
		msg := rest[:1+n]
		// A large message of a type not read whole is inspected by its head only, which
		// fuzzInspect accepts; any other watched message is inspected whole.
		var repl []byte
		if fuzzWatch(readWhole)[typ] && (1+n <= fuzzBufSize || readWhole) {
			var err error
			if repl, err = fuzzInspect(typ, msg, true, readWhole); err != nil {
				m.end = endProtocol
				return m
			}
		}
		if repl != nil {
			msg = repl
		}
		m.out = append(m.out, msg...)
		pos += 1 + n
	}
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += n
	return n, err
}

// chunkReader returns at most chunk bytes per Read, and io.EOF together with the last ones,
// as a network connection may.
type chunkReader struct {
	data  []byte
	chunk int
}

func (c *chunkReader) Read(b []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := copy(b, c.data[:min(c.chunk, len(c.data))])
	c.data = c.data[n:]
	if len(c.data) == 0 {
		return n, io.EOF
	}
	return n, nil
}

func TestWithParam(t *testing.T) {
	raw := encodeStartup(map[string]string{"user": "app", "default_transaction_read_only": "off", "database": "db"})
	got, err := startupParams(withParam(raw, "default_transaction_read_only", "on"))
	if err != nil {
		t.Fatalf("startupParams of the rewritten packet: %v", err)
	}
	want := map[string]string{"user": "app", "database": "db", "default_transaction_read_only": "on"}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

// encodeStartup encodes a protocol 3.0 StartupMessage with params.
func encodeStartup(params map[string]string) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint32(b[4:8], protoMajor3<<16)
	for k, v := range params {
		b = append(append(append(append(b, k...), 0), v...), 0)
	}
	b = append(b, 0)
	binary.BigEndian.PutUint32(b[0:4], uint32(len(b)))
	return b
}
