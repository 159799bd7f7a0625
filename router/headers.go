package router

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"

	"github.com/pgfly/pgfly/internal/flyreplay"
)

// codeReadOnly is SQLSTATE read_only_sql_transaction: on a primary, the one refusal that means
// the primary itself is read-only.
const codeReadOnly = "25006"

// keepForwarded copies the X-Forwarded-* headers the edge set, which Rewrite drops, so that
// the app sees them as sent.
func keepForwarded(pr *httputil.ProxyRequest) {
	for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		if v, ok := pr.In.Header[h]; ok {
			pr.Out.Header[h] = v
		}
	}
}

// replayedByPgfly reports whether a request is a replay pgfly asked for (the loop guard), or
// one Fly could not deliver and so cannot replay again. A fly-replay-src value that cannot be
// read but names pgfly's state counts as a replay: this guard errs on the side of not
// replaying twice.
func replayedByPgfly(h http.Header) bool {
	if h.Get("Fly-Replay-Failed") != "" {
		return true
	}
	for _, v := range h.Values(flyreplay.SrcHeader) {
		for _, part := range flyreplay.SplitJoined(v) {
			src, err := flyreplay.ParseSrc(part)
			if (err != nil && strings.Contains(part, StatePrefix)) || strings.HasPrefix(src.State, StatePrefix) {
				return true
			}
		}
	}
	return false
}

// traceparentHeader is the W3C header in net/http's canonical form, so that reading it does
// not canonicalize (and allocate) a key on every request.
const traceparentHeader = "Traceparent"

// traceIDOf returns the trace id of a W3C traceparent header ("00-<32 hex>-<16 hex>-<2 hex>"),
// or "" when it is not one. A valid lowercase id is a substring of tp: nothing is allocated.
func traceIDOf(tp string) string {
	version, rest, ok1 := strings.Cut(strings.TrimSpace(tp), "-")
	id, rest, ok2 := strings.Cut(rest, "-")
	parent, _, ok3 := strings.Cut(rest, "-")
	if !ok1 || !ok2 || !ok3 || len(version) != 2 || len(id) != 32 || len(parent) != 16 {
		return ""
	}
	id = strings.ToLower(id)
	if !isHex(id) || strings.Trim(id, "0") == "" {
		return ""
	}
	return id
}

// isHex reports whether s is made of lowercase hex digits only.
func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

func newTraceparent() string {
	var b [24]byte
	rand.Read(b[:])
	return "00-" + hex.EncodeToString(b[:16]) + "-" + hex.EncodeToString(b[16:]) + "-01"
}

// copyBuffers lends ReverseProxy its body copy buffers, which it would otherwise allocate
// (32 KiB) for every request. The pool holds pointers to the buffers' arrays, so that Put
// does not box a slice header: a lent buffer costs no allocation at all.
type copyBuffers struct{}

const copyBufferSize = 32 << 10

var copyBufferPool = sync.Pool{New: func() any { return new([copyBufferSize]byte) }}

func (copyBuffers) Get() []byte { return copyBufferPool.Get().(*[copyBufferSize]byte)[:] }

func (copyBuffers) Put(b []byte) {
	if cap(b) < copyBufferSize {
		return // not one of ours
	}
	copyBufferPool.Put((*[copyBufferSize]byte)(b[:copyBufferSize]))
}
