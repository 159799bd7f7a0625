package wire

import (
	"bytes"
	"sync"
	"time"
)

// traceID is the hex trace id of a sqlcommenter-style traceparent comment.
type traceID [32]byte

// unit is one request of the client that the server answers with one ReadyForQuery: a Query,
// a FunctionCall, or the extended-protocol messages up to a Sync. An error the server sends
// answers the oldest unit not yet answered, so the relay can tell when the failing statement
// was sent and which trace it belongs to.
type unit struct {
	sent     time.Time // when its last message was forwarded (its Query or Sync)
	trace    traceID
	hasTrace bool
	merged   int // further units folded into this one when the queue was full
}

// maxUnits bounds the units a session remembers. A client that pipelines more than this
// (rare: pgx batches are one unit) has the newest folded into the last one, which takes the
// latest send time and no trace id: a less precise answer, never a wrong one (a send time later
// than the failing statement's only keeps more requests as candidates).
const maxUnits = 16

// units is the queue of a session's unanswered units. The client-to-upstream goroutine adds to
// it and the upstream-to-client goroutine reads and removes, so it has its own mutex, held for
// a few instructions per unit.
type units struct {
	mu     sync.Mutex
	q      [maxUnits]unit
	head   int
	n      int
	open   unit // extended-protocol messages since the last Sync
	opened bool
	bound  bool // a Bind has set open's trace
}

// extended notes an extended-protocol message: it opens a unit if none is open. The unit's
// time is taken at its Sync (or, for an error before the Sync, when the error arrives), so that
// it is never earlier than its failing message.
func (u *units) extended() {
	u.mu.Lock()
	if !u.opened {
		u.open, u.opened = unit{}, true
	}
	u.mu.Unlock()
}

// bind sets the open unit's trace id from the statement a Bind refers to. Two
// different ids in one unit are ambiguous, so the unit keeps none.
func (u *units) bind(id traceID, ok bool) {
	u.mu.Lock()
	if !u.opened {
		u.open, u.opened = unit{}, true
	}
	if !u.bound {
		u.open.trace, u.open.hasTrace, u.bound = id, ok, true
	} else if u.open.hasTrace && (!ok || u.open.trace != id) {
		u.open.hasTrace = false
	}
	u.mu.Unlock()
}

// sync ends the open unit (a Sync alone is a unit too) and queues it.
func (u *units) sync() {
	now := time.Now()
	u.mu.Lock()
	if !u.opened {
		u.open = unit{}
	}
	u.open.sent = now
	u.push(u.open)
	u.opened, u.bound = false, false
	u.mu.Unlock()
}

// query queues a Query or FunctionCall, a unit by itself.
func (u *units) query(id traceID, ok bool) {
	now := time.Now()
	u.mu.Lock()
	u.push(unit{sent: now, trace: id, hasTrace: ok})
	u.mu.Unlock()
}

func (u *units) push(x unit) {
	if u.n == maxUnits {
		last := &u.q[(u.head+u.n-1)%maxUnits]
		last.merged += 1 + x.merged
		last.hasTrace = false
		last.sent = x.sent
		return
	}
	u.q[(u.head+u.n)%maxUnits] = x
	u.n++
}

// answered drops the oldest unit: a ReadyForQuery has answered it.
func (u *units) answered() {
	u.mu.Lock()
	if u.n > 0 {
		first := &u.q[u.head]
		if first.merged > 0 {
			first.merged--
		} else {
			u.head = (u.head + 1) % maxUnits
			u.n--
		}
	}
	u.mu.Unlock()
}

// ignored drops the newest n units: Syncs the server ignored because they came during an
// extended-protocol COPY FROM STDIN, which no ReadyForQuery will answer.
func (u *units) ignored(n int) {
	u.mu.Lock()
	for ; n > 0 && u.n > 0; n-- {
		last := &u.q[(u.head+u.n-1)%maxUnits]
		if last.merged > 0 {
			last.merged--
		} else {
			u.n--
		}
	}
	u.mu.Unlock()
}

// current is the unit an error the server sends now answers: the oldest queued one, or the
// open one (an error can come before the Sync, after a Flush), sent no later than now.
func (u *units) current() unit {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch {
	case u.n > 0:
		return u.q[u.head]
	case u.opened:
		open := u.open
		open.sent = time.Now()
		return open
	}
	return unit{}
}

var traceparentKey = []byte("traceparent='00-")

// findTraceID finds the trace id of a sqlcommenter-style comment in a statement,
// /*traceparent='00-<32 hex trace id>-<16 hex span id>-<2 hex flags>'*/.
func findTraceID(sql []byte) (id traceID, ok bool) {
	i := bytes.Index(sql, traceparentKey)
	if i < 0 {
		return id, false
	}
	hex := sql[i+len(traceparentKey):]
	if len(hex) < len(id) || !isLowerHex(hex[:len(id)]) {
		return id, false
	}
	copy(id[:], hex)
	return id, true
}

func isLowerHex(b []byte) bool {
	for _, c := range b {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// maxStatementTraces bounds the prepared statements whose trace ids a session keeps; past it,
// new statements get none (their refusals fall back to overlap).
const maxStatementTraces = 1024

// statementTraces maps prepared statement names to the trace ids their Parse carried. The
// trace comment is parsed once, at Parse; a Bind takes the id of the statement it names.
// Owned by the client-to-upstream goroutine.
type statementTraces map[string]*traceID

// parsed records the trace id of statement name, or forgets it when the statement has none,
// so that a statement never inherits a stale id.
func (st *statementTraces) parsed(name []byte, id traceID, ok bool) {
	if !ok {
		delete(*st, string(name)) // the compiler does not allocate for this conversion
		return
	}
	if p := (*st)[string(name)]; p != nil { // a re-Parse: no allocation
		*p = id
		return
	}
	if *st == nil {
		*st = make(statementTraces)
	}
	if len(*st) >= maxStatementTraces {
		return
	}
	p := new(traceID)
	*p = id
	(*st)[string(name)] = p
}

// forget drops every statement's trace id: for a Parse whose name could not be read.
func (st *statementTraces) forget() { *st = nil }

func (st statementTraces) lookup(name []byte) (traceID, bool) {
	if p := st[string(name)]; p != nil {
		return *p, true
	}
	return traceID{}, false
}

func (st statementTraces) closed(name []byte) { delete(st, string(name)) }

// cbytes returns the NUL-terminated string at the start of b, without copying it, and what
// follows it; ok is false when b holds no NUL.
func cbytes(b []byte) (s, rest []byte, ok bool) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return nil, nil, false
	}
	return b[:i], b[i+1:], true
}

// isOpen reports whether extended-protocol messages were sent since the last Sync.
func (u *units) isOpen() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.opened
}

// sealed reports whether a request is queued: the server owes a ReadyForQuery, and so more
// messages, whatever it has sent so far.
func (u *units) sealed() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.n > 0
}
