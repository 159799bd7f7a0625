package wire

import (
	"bytes"
	"io"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// TestPumpThen: work an inspect leaves in then runs once, after the message it follows (and
// all read before it) has been written, and before the source is read again.
func TestPumpThen(t *testing.T) {
	var first, second []byte
	first, _ = (&pgproto3.CommandComplete{CommandTag: []byte("INSERT 0 1")}).Encode(first)
	first, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(first)
	second, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(second)
	src := &chunkReader{data: append(append([]byte(nil), first...), second...), chunk: len(first)}

	var dst bytes.Buffer
	var watch [256]bool
	watch['Z'] = true
	runs, seen, unread := 0, 0, 0
	p := &pump{src: src, dst: &dst, buf: make([]byte, 256), max: 1 << 20, watch: &watch}
	p.inspect = func(typ byte, msg []byte, whole bool) ([]byte, error) {
		if seen++; seen == 1 {
			p.then = func() error {
				runs++
				if !bytes.Equal(dst.Bytes(), first) {
					t.Errorf("then ran with %q written, want %q", dst.Bytes(), first)
				}
				unread = len(src.data)
				return nil
			}
		}
		return nil, nil
	}
	if err := p.run(); err != io.EOF {
		t.Fatalf("run: %v, want io.EOF", err)
	}
	if runs != 1 {
		t.Fatalf("then ran %d times, want once", runs)
	}
	if unread != len(second) {
		t.Fatalf("then ran with %d bytes of the source unread, want %d: the source was read before it", unread, len(second))
	}
	if !bytes.Equal(dst.Bytes(), append(first, second...)) {
		t.Fatalf("forwarded %q", dst.Bytes())
	}
}
