package wire

import (
	"testing"
	"time"
)

// TestUnits: errors are matched to the oldest unanswered unit, and a client that pipelines past
// the queue's bound gets the earliest send time and no trace id, never another unit's.
func TestUnits(t *testing.T) {
	id := func(c byte) traceID {
		var x traceID
		for i := range x {
			x[i] = c
		}
		return x
	}
	var u units
	u.query(id('a'), true)
	first := u.current()
	if !first.hasTrace || first.trace != id('a') {
		t.Fatalf("current after one query: %+v, want trace a", first)
	}

	// Extended protocol: Parse, Bind, Execute, Sync is one unit; it is answered after the query.
	u.extended()
	u.bind(id('b'), true)
	u.extended()
	u.sync()
	if got := u.current(); got.trace != id('a') {
		t.Fatalf("current with two queued: trace %q, want the oldest (a)", got.trace)
	}
	u.answered()
	if got := u.current(); !got.hasTrace || got.trace != id('b') {
		t.Fatalf("current after one answer: %+v, want trace b", got)
	}
	u.answered()

	// Two binds with different ids in one unit: ambiguous.
	u.bind(id('c'), true)
	u.bind(id('d'), true)
	if got := u.current(); got.hasTrace {
		t.Fatalf("open unit with two ids: %+v, want no trace", got)
	}
	u.sync()
	u.answered()
	// A bind without an id after one with an id: ambiguous too.
	u.bind(id('c'), true)
	u.bind(traceID{}, false)
	u.sync()
	if got := u.current(); got.hasTrace {
		t.Fatalf("unit binding a statement with and one without an id: %+v, want no trace", got)
	}
	u.answered()
	if got := u.current(); !got.sent.IsZero() {
		t.Fatalf("current with nothing sent: %+v, want zero", got)
	}

	// Overflow: the units past the bound fold into the last, which loses its trace id; every
	// ReadyForQuery still answers one unit.
	start := time.Now()
	for i := range maxUnits + 5 {
		u.query(id(byte('a'+i%26)), true)
	}
	for i := range maxUnits + 5 {
		got := u.current()
		if got.sent.Before(start) {
			t.Fatalf("unit %d: sent %v before the test began", i, got.sent)
		}
		if i < maxUnits-1 && (!got.hasTrace || got.trace != id(byte('a'+i%26))) {
			t.Fatalf("unit %d: %+v, want its own trace", i, got)
		}
		if i >= maxUnits-1 && got.hasTrace {
			t.Fatalf("folded unit %d: %+v, want no trace", i, got)
		}
		u.answered()
	}
	if u.n != 0 {
		t.Fatalf("%d units left after every answer", u.n)
	}

	// A folded unit takes the latest send time: never earlier than any statement in it.
	for range maxUnits {
		u.query(traceID{}, false)
	}
	before := u.q[(u.head+u.n-1)%maxUnits].sent
	time.Sleep(time.Millisecond)
	u.query(traceID{}, false)
	if last := u.q[(u.head+u.n-1)%maxUnits]; !last.sent.After(before) || last.merged != 1 {
		t.Fatalf("folded unit: %+v, want merged 1 and sent after %v", last, before)
	}
	// Syncs the server ignored during a COPY are dropped from the newest end.
	u.ignored(2)
	if u.n != maxUnits-1 {
		t.Fatalf("after dropping 2 ignored Syncs: %d units, want %d", u.n, maxUnits-1)
	}
	for u.n > 0 {
		u.answered()
	}

	// An error before the Sync answers the open unit, sent no later than the error.
	u.extended()
	u.bind(id('e'), true)
	if got := u.current(); got.sent.IsZero() || got.trace != id('e') {
		t.Fatalf("open unit: %+v, want trace e and a send time", got)
	}
}

func TestStatementTraces(t *testing.T) {
	var st statementTraces
	var a traceID
	copy(a[:], "0af7651916cd43dd8448eb211c80319c")
	st.parsed([]byte("s1"), a, true)
	if got, ok := st.lookup([]byte("s1")); !ok || got != a {
		t.Fatalf("lookup s1: %q %v", got, ok)
	}
	st.parsed([]byte("s1"), traceID{}, false) // re-parsed without a comment
	if _, ok := st.lookup([]byte("s1")); ok {
		t.Fatal("s1 kept a stale trace id after a Parse without one")
	}
	for i := range maxStatementTraces + 10 {
		st.parsed([]byte{byte(i), byte(i >> 8), 'x'}, a, true)
	}
	if len(st) > maxStatementTraces {
		t.Fatalf("%d statements kept, bound %d", len(st), maxStatementTraces)
	}
	st.parsed([]byte{0, 0, 'x'}, a, true) // a re-Parse of a known name
	if allocs := testing.AllocsPerRun(100, func() { st.parsed([]byte{0, 0, 'x'}, a, true) }); allocs != 0 {
		t.Errorf("a re-Parse allocates %v times, want 0", allocs)
	}
	st.closed([]byte{0, 0, 'x'})
	if _, ok := st.lookup([]byte{0, 0, 'x'}); ok {
		t.Fatal("a closed statement kept its trace id")
	}
	st.forget()
	if _, ok := st.lookup([]byte{1, 0, 'x'}); ok || len(st) != 0 {
		t.Fatal("forget kept trace ids")
	}
}

// BenchmarkUnitBookkeeping is what the relay adds per extended-protocol query to match errors
// to statements: Parse's and Bind's notes, the Sync, and the ReadyForQuery that answers it.
func BenchmarkUnitBookkeeping(b *testing.B) {
	var u units
	var st statementTraces
	var id traceID
	copy(id[:], "0af7651916cd43dd8448eb211c80319c")
	st.parsed([]byte("stmtcache_1"), id, true)
	b.ReportAllocs()
	for b.Loop() {
		got, ok := st.lookup([]byte("stmtcache_1"))
		u.bind(got, ok)
		u.extended() // Execute
		u.sync()
		u.answered()
	}
}
