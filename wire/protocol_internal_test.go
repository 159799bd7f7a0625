package wire

// protocol is unexported and has no socket: these tests feed it hand-built messages and check
// what it says they mean. What a real server does with them is tested black-box through the
// relay (protocol_test.go, events_test.go).

import (
	"errors"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

const (
	traceA = "0af7651916cd43dd8448eb211c80319c"
	traceB = "4bf92f3577b34da6a3ce929d0e0e4736"
)

// traced is sql with a sqlcommenter traceparent comment of trace id.
func traced(sql, id string) string {
	return sql + " /*traceparent='00-" + id + "-b7ad6b7169203331-01'*/"
}

func encode(tb testing.TB, m pgproto3.Message) []byte {
	tb.Helper()
	b, err := m.Encode(nil)
	if err != nil {
		tb.Fatalf("encode %T: %v", m, err)
	}
	return b
}

// clientSends feeds p the client's msgs, whole, as inspectClient does.
func clientSends(tb testing.TB, p *protocol, msgs ...pgproto3.FrontendMessage) {
	tb.Helper()
	for _, m := range msgs {
		b := encode(tb, m)
		p.client(b[0], b[headerLen:], true)
	}
}

// serverSends feeds p the server's m, as inspectServer does, and returns what p says of it.
func serverSends(tb testing.TB, p *protocol, m pgproto3.BackendMessage) reply {
	tb.Helper()
	b := encode(tb, m)
	r, err := p.server(b[0], b[headerLen:])
	if err != nil {
		tb.Fatalf("server sends %T: %v, want no error", m, err)
	}
	return r
}

func ready(status TxStatus) *pgproto3.ReadyForQuery {
	return &pgproto3.ReadyForQuery{TxStatus: byte(status)}
}

func complete(tag string) *pgproto3.CommandComplete {
	return &pgproto3.CommandComplete{CommandTag: []byte(tag)}
}

func serverError(severity, code string) *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{Severity: severity, SeverityUnlocalized: severity, Code: code, Message: "message of " + code}
}

// loggedIn is a protocol past its login: the StartupMessage answered by ReadyForQuery idle.
func loggedIn(tb testing.TB) *protocol {
	tb.Helper()
	p := new(protocol)
	p.startup()
	if r := serverSends(tb, p, ready(TxIdle)); !r.idle {
		tb.Fatalf("login's ReadyForQuery: %+v, want idle", r)
	}
	return p
}

// query is one simple-protocol exchange: the client sends a Query, and the server answers with
// a CommandComplete per tag, an ERROR of errCode when set, and ReadyForQuery status.
type query struct {
	tags    []string
	errCode string
	status  TxStatus
	// committed: its ReadyForQuery ends a transaction that wrote.
	committed bool
}

func (q query) run(t *testing.T, p *protocol) reply {
	t.Helper()
	clientSends(t, p, &pgproto3.Query{String: "a statement"})
	if !p.busy() {
		t.Fatal("busy after a Query: false, want true")
	}
	for _, tag := range q.tags {
		serverSends(t, p, complete(tag))
	}
	if q.errCode != "" {
		serverSends(t, p, serverError("ERROR", q.errCode))
	}
	return serverSends(t, p, ready(q.status))
}

func TestProtocolLogin(t *testing.T) {
	p := new(protocol)
	if p.busy() {
		t.Fatal("busy before the startup: true, want false")
	}
	p.startup()
	if !p.busy() {
		t.Fatal("busy while logging in: false, want true (the StartupMessage waits for its ReadyForQuery)")
	}
	if got := p.status(); got != TxUnknown {
		t.Fatalf("status while logging in: %v, want %v", got, TxUnknown)
	}
	serverSends(t, p, &pgproto3.ParameterStatus{Name: "in_hot_standby", Value: "on"})
	r := serverSends(t, p, ready(TxIdle))
	if !r.idle || r.committed || p.busy() {
		t.Fatalf("login's ReadyForQuery: %+v, busy %v; want idle, not committed, not busy", r, p.busy())
	}
	if got := p.status(); got != TxIdle {
		t.Fatalf("status after login: %v, want %v", got, TxIdle)
	}
}

// TestProtocolTransactions: a ReadyForQuery idle after a transaction that wrote is a commit;
// a rollback, an error in an implicit transaction, or a statement that changed nothing is not.
func TestProtocolTransactions(t *testing.T) {
	for _, tc := range []struct {
		name    string
		queries []query
		// wrote: mayHaveWritten after the last query.
		wrote bool
	}{
		{"insert in an implicit transaction", []query{{tags: []string{"INSERT 0 1"}, status: TxIdle, committed: true}}, true},
		{"insert of no rows", []query{{tags: []string{"INSERT 0 0"}, status: TxIdle}}, false},
		{"update of no rows", []query{{tags: []string{"UPDATE 0"}, status: TxIdle}}, false},
		{"select", []query{{tags: []string{"SELECT 1"}, status: TxIdle}}, false},
		{"DDL", []query{{tags: []string{"CREATE TABLE"}, status: TxIdle, committed: true}}, true},
		{"block committed", []query{
			{tags: []string{"BEGIN"}, status: TxInBlock},
			{tags: []string{"DELETE 3"}, status: TxInBlock},
			{tags: []string{"COMMIT"}, status: TxIdle, committed: true},
		}, true},
		{"block rolled back", []query{
			{tags: []string{"BEGIN"}, status: TxInBlock},
			{tags: []string{"INSERT 0 1"}, status: TxInBlock},
			{tags: []string{"ROLLBACK"}, status: TxIdle},
		}, false},
		{"rollback to a savepoint keeps the writes before it", []query{
			{tags: []string{"BEGIN"}, status: TxInBlock},
			{tags: []string{"INSERT 0 1"}, status: TxInBlock},
			{tags: []string{"SAVEPOINT"}, status: TxInBlock},
			{tags: []string{"ROLLBACK"}, status: TxInBlock},
			{tags: []string{"COMMIT"}, status: TxIdle, committed: true},
		}, true},
		{"rollback to a savepoint and commit in one query", []query{
			{tags: []string{"BEGIN"}, status: TxInBlock},
			{tags: []string{"INSERT 0 1", "SAVEPOINT"}, status: TxInBlock},
			{tags: []string{"ROLLBACK", "COMMIT"}, status: TxIdle, committed: true},
		}, true},
		{"an error rolls an implicit transaction back", []query{
			{tags: []string{"INSERT 0 1"}, errCode: "22012", status: TxIdle},
		}, false},
		{"an error leaves a failed block's writes until its rollback", []query{
			{tags: []string{"BEGIN"}, status: TxInBlock},
			{tags: []string{"INSERT 0 1"}, status: TxInBlock},
			{errCode: "22012", status: TxFailed},
		}, true},
		{"a failed block rolled back", []query{
			{tags: []string{"BEGIN"}, status: TxInBlock},
			{tags: []string{"INSERT 0 1"}, status: TxInBlock},
			{errCode: "22012", status: TxFailed},
			{tags: []string{"ROLLBACK"}, status: TxIdle},
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := loggedIn(t)
			for i, q := range tc.queries {
				r := q.run(t, p)
				if !r.idle || r.committed != q.committed {
					t.Fatalf("query %d: ReadyForQuery %+v, want idle and committed %v", i, r, q.committed)
				}
				if got := p.status(); got != q.status {
					t.Fatalf("query %d: status %v, want %v", i, got, q.status)
				}
			}
			if got := p.mayHaveWritten(); got != tc.wrote {
				t.Fatalf("mayHaveWritten: %v, want %v", got, tc.wrote)
			}
		})
	}
}

// TestProtocolStandbyRefusal: an error a standby raises is matched to the request it answers,
// with that request's trace id and the transaction status before it; other errors are not.
func TestProtocolStandbyRefusal(t *testing.T) {
	for _, tc := range []struct {
		code    string
		refusal bool
	}{
		{codeReadOnlyTransaction, true},
		{codeFeatureUnsupported, true},
		{codeNotInPrerequisiteState, true},
		{"23505", false}, // unique_violation
		{"42601", false}, // syntax_error
	} {
		t.Run(tc.code, func(t *testing.T) {
			p := loggedIn(t)
			clientSends(t, p, &pgproto3.Query{String: traced("insert into t values (1)", traceA)})
			r := serverSends(t, p, serverError("ERROR", tc.code))
			if r.refusal != tc.refusal || r.shutdown || r.hold {
				t.Fatalf("ERROR %s: %+v, want refusal %v and no shutdown", tc.code, r, tc.refusal)
			}
			if string(r.err.code) != tc.code || string(r.err.message) != "message of "+tc.code {
				t.Fatalf("error fields: code %q message %q, want %q and %q", r.err.code, r.err.message, tc.code, "message of "+tc.code)
			}
			if !tc.refusal {
				return
			}
			if !r.unit.hasTrace || string(r.unit.trace[:]) != traceA || r.unit.sent.IsZero() {
				t.Fatalf("refusal's unit: %+v, want the Query's, with trace %s and a send time", r.unit, traceA)
			}
			if r.status != TxIdle {
				t.Fatalf("refusal's status: %v, want %v", r.status, TxIdle)
			}
			if r := serverSends(t, p, ready(TxIdle)); !r.idle {
				t.Fatalf("ReadyForQuery after the refusal: %+v, want idle", r)
			}
		})
	}

	t.Run("in a block", func(t *testing.T) {
		p := loggedIn(t)
		query{tags: []string{"BEGIN"}, status: TxInBlock}.run(t, p)
		clientSends(t, p, &pgproto3.Query{String: "select nextval('s')"})
		r := serverSends(t, p, serverError("ERROR", codeReadOnlyTransaction))
		if !r.refusal || r.status != TxInBlock || r.unit.hasTrace {
			t.Fatalf("refusal in a block: %+v, want a refusal at status %v without a trace", r, TxInBlock)
		}
	})

	t.Run("a query too large to buffer", func(t *testing.T) {
		p := loggedIn(t)
		b := encode(t, &pgproto3.Query{String: traced("insert into t values (1)", traceA)})
		p.client(b[0], b[headerLen:headerLen+8], false) // its comment is out of reach
		if r := serverSends(t, p, serverError("ERROR", codeReadOnlyTransaction)); !r.refusal || r.unit.hasTrace {
			t.Fatalf("refusal of a streamed query: %+v, want a refusal without a trace", r)
		}
	})

	t.Run("severity without its unlocalized field", func(t *testing.T) {
		p := loggedIn(t)
		clientSends(t, p, &pgproto3.Query{String: "insert into t values (1)"})
		r := serverSends(t, p, &pgproto3.ErrorResponse{Severity: "ERROR", Code: codeReadOnlyTransaction})
		if !r.refusal || string(r.err.severity) != "ERROR" {
			t.Fatalf("pre-9.6 error: %+v, want a refusal of severity ERROR", r)
		}
	})
}

// TestProtocolPipeline: an extended-protocol sequence is one request up to its Sync; pipelined
// requests are answered, and their errors matched, oldest first.
func TestProtocolPipeline(t *testing.T) {
	p := loggedIn(t)
	clientSends(t, p,
		&pgproto3.Parse{Name: "s1", Query: traced("insert into t values ($1)", traceA)},
		&pgproto3.Parse{Name: "s2", Query: traced("update t set v = $1", traceB)},
		&pgproto3.Bind{PreparedStatement: "s1"}, &pgproto3.Execute{}, &pgproto3.Sync{},
		&pgproto3.Bind{PreparedStatement: "s2"}, &pgproto3.Execute{}, &pgproto3.Sync{},
	)
	if got := p.pending.Load(); got != 2 || p.unsynced.Load() {
		t.Fatalf("after two Syncs: pending %d, unsynced %v; want 2, false", got, p.unsynced.Load())
	}
	for i, want := range []string{traceA, traceB} {
		r := serverSends(t, p, serverError("ERROR", codeReadOnlyTransaction))
		if !r.refusal || !r.unit.hasTrace || string(r.unit.trace[:]) != want {
			t.Fatalf("error %d: %+v, want a refusal of trace %s", i, r, want)
		}
		last := i == 1
		if r := serverSends(t, p, ready(TxIdle)); r.idle != last || p.busy() != !last {
			t.Fatalf("ReadyForQuery %d: %+v, busy %v; want idle %v", i, r, p.busy(), last)
		}
	}

	// Execute then Flush, no Sync yet: busy with no ReadyForQuery owed, and an error answers
	// the open request.
	clientSends(t, p, &pgproto3.Bind{PreparedStatement: "s1"}, &pgproto3.Execute{}, &pgproto3.Flush{})
	if got := p.pending.Load(); got != 0 || !p.busy() {
		t.Fatalf("after an Execute without Sync: pending %d, busy %v; want 0, true", got, p.busy())
	}
	if r := serverSends(t, p, serverError("ERROR", codeReadOnlyTransaction)); !r.refusal || string(r.unit.trace[:]) != traceA || r.unit.sent.IsZero() {
		t.Fatalf("error before the Sync: %+v, want the open request's refusal, trace %s, with a send time", r, traceA)
	}
	clientSends(t, p, &pgproto3.Sync{})
	if r := serverSends(t, p, ready(TxIdle)); !r.idle || p.busy() {
		t.Fatalf("ReadyForQuery after the Sync: %+v, busy %v; want idle", r, p.busy())
	}

	// Two statements of different traces in one request: ambiguous. A closed statement's
	// trace is forgotten.
	clientSends(t, p,
		&pgproto3.Bind{PreparedStatement: "s1"}, &pgproto3.Execute{},
		&pgproto3.Bind{PreparedStatement: "s2"}, &pgproto3.Execute{}, &pgproto3.Sync{},
		&pgproto3.Close{ObjectType: 'S', Name: "s1"},
		&pgproto3.Bind{PreparedStatement: "s1"}, &pgproto3.Execute{}, &pgproto3.Sync{},
	)
	for i, name := range []string{"two traces in one request", "a closed statement"} {
		if r := serverSends(t, p, serverError("ERROR", codeReadOnlyTransaction)); !r.refusal || r.unit.hasTrace {
			t.Fatalf("%s (error %d): %+v, want a refusal without a trace", name, i, r)
		}
		serverSends(t, p, ready(TxIdle))
	}

	// A FunctionCall is a request of its own.
	clientSends(t, p, &pgproto3.FunctionCall{Function: 1})
	if !p.busy() {
		t.Fatal("busy after a FunctionCall: false, want true")
	}
	if r := serverSends(t, p, ready(TxIdle)); !r.idle {
		t.Fatalf("ReadyForQuery after a FunctionCall: %+v, want idle", r)
	}
}

// TestProtocolCopy: a COPY FROM STDIN writes and a COPY TO STDOUT does not; the Syncs a client
// sent ahead of an extended-protocol COPY FROM STDIN are ignored by the server, and owed no
// ReadyForQuery.
func TestProtocolCopy(t *testing.T) {
	t.Run("from stdin", func(t *testing.T) {
		p := loggedIn(t)
		clientSends(t, p, &pgproto3.Query{String: "copy t from stdin"})
		serverSends(t, p, &pgproto3.CopyInResponse{})
		clientSends(t, p, &pgproto3.CopyData{Data: []byte("1\n")}, &pgproto3.CopyDone{})
		serverSends(t, p, complete("COPY 1"))
		if r := serverSends(t, p, ready(TxIdle)); !r.idle || !r.committed {
			t.Fatalf("ReadyForQuery after COPY FROM STDIN: %+v, want idle and committed", r)
		}
	})
	t.Run("to stdout", func(t *testing.T) {
		p := loggedIn(t)
		clientSends(t, p, &pgproto3.Query{String: "copy t to stdout"})
		serverSends(t, p, &pgproto3.CopyOutResponse{})
		serverSends(t, p, complete("COPY 1"))
		if r := serverSends(t, p, ready(TxIdle)); !r.idle || r.committed {
			t.Fatalf("ReadyForQuery after COPY TO STDOUT: %+v, want idle, not committed", r)
		}
	})
	for _, end := range []pgproto3.FrontendMessage{&pgproto3.CopyDone{}, &pgproto3.CopyFail{Message: "no"}} {
		t.Run("extended, Sync sent ahead, ended by "+string(encode(t, end)[:1]), func(t *testing.T) {
			p := loggedIn(t)
			clientSends(t, p, &pgproto3.Parse{Query: "copy t from stdin"}, &pgproto3.Bind{},
				&pgproto3.Execute{}, &pgproto3.Sync{})
			serverSends(t, p, &pgproto3.CopyInResponse{})
			clientSends(t, p, &pgproto3.CopyData{Data: []byte("1\n")}, end)
			if got, units := p.pending.Load(), p.units.n; got != 0 || units != 0 {
				t.Fatalf("after the COPY's end: pending %d, units %d; want 0, 0 (the Sync sent during it is ignored)", got, units)
			}
			clientSends(t, p, &pgproto3.Sync{})
			if _, fail := end.(*pgproto3.CopyFail); fail {
				serverSends(t, p, serverError("ERROR", "57014"))
			} else {
				serverSends(t, p, complete("COPY 1"))
			}
			r := serverSends(t, p, ready(TxIdle))
			if _, fail := end.(*pgproto3.CopyFail); !r.idle || r.committed == fail || p.busy() {
				t.Fatalf("ReadyForQuery after the COPY: %+v, busy %v; want idle, committed %v", r, p.busy(), !fail)
			}
		})
	}
}

// TestProtocolShutdown: a FATAL saying the server goes away is held back from an idle session
// and told at once to a busy one; other FATALs and PANICs only mark the session's end.
func TestProtocolShutdown(t *testing.T) {
	for _, tc := range []struct {
		name           string
		severity, code string
		busy           bool // a Query that inserted a row is in flight
		shutdown, hold bool
		fatal          bool
	}{
		{"admin shutdown, idle", "FATAL", "57P01", false, true, true, true},
		{"admin shutdown, busy", "FATAL", "57P01", true, true, false, true},
		{"crash shutdown, idle", "FATAL", "57P02", false, true, true, true},
		{"cannot connect now, busy", "FATAL", "57P03", true, true, false, true},
		{"crash as a PANIC, idle", "PANIC", "57P02", false, true, true, true},
		{"idle session timeout", "FATAL", "57P05", false, false, false, true},
		{"database dropped", "FATAL", "57P04", true, false, false, true},
		{"admin shutdown as an ERROR", "ERROR", "57P01", true, false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := loggedIn(t)
			if tc.busy {
				clientSends(t, p, &pgproto3.Query{String: "insert into t values (1); select pg_sleep(10)"})
				serverSends(t, p, complete("INSERT 0 1"))
			}
			r := serverSends(t, p, serverError(tc.severity, tc.code))
			if r.shutdown != tc.shutdown || r.hold != tc.hold || r.refusal {
				t.Fatalf("%s %s: %+v, want shutdown %v, hold %v, no refusal", tc.severity, tc.code, r, tc.shutdown, tc.hold)
			}
			if p.fatal != tc.fatal {
				t.Fatalf("fatal: %v, want %v", p.fatal, tc.fatal)
			}
			if r.shutdown && r.wrote != tc.busy {
				t.Fatalf("shutdown's wrote: %v, want %v (as it stood before the error)", r.wrote, tc.busy)
			}
			if p.mayHaveWritten() {
				t.Fatal("mayHaveWritten after the error: true, want false (the implicit transaction rolled back)")
			}
		})
	}

	t.Run("while logging in", func(t *testing.T) {
		p := new(protocol)
		p.startup()
		if r := serverSends(t, p, serverError("FATAL", "57P03")); !r.shutdown || r.hold {
			t.Fatalf("57P03 during login: %+v, want a shutdown told at once (the login waits for it)", r)
		}
	})
}

// TestProtocolInHotStandby: the backend's in_hot_standby counts only inside a transaction
// block.
func TestProtocolInHotStandby(t *testing.T) {
	p := new(protocol)
	p.startup()
	serverSends(t, p, &pgproto3.ParameterStatus{Name: "in_hot_standby", Value: "on"})
	serverSends(t, p, ready(TxIdle))
	for _, step := range []struct {
		q    query
		want string
	}{
		{query{tags: []string{"SELECT 1"}, status: TxIdle}, ""},
		{query{tags: []string{"BEGIN"}, status: TxInBlock}, "on"},
		{query{errCode: "22012", status: TxFailed}, "on"},
		{query{tags: []string{"ROLLBACK"}, status: TxIdle}, ""},
	} {
		step.q.run(t, p)
		if got := p.standbyInBlock(); got != step.want {
			t.Fatalf("at status %v: standbyInBlock %q, want %q", p.status(), got, step.want)
		}
	}
	query{tags: []string{"BEGIN"}, status: TxInBlock}.run(t, p)
	serverSends(t, p, &pgproto3.ParameterStatus{Name: "in_hot_standby", Value: "off"}) // promoted
	if got := p.standbyInBlock(); got != "off" {
		t.Fatalf("after a ParameterStatus off: %q, want %q", got, "off")
	}
}

func TestProtocolInvalidReadyForQuery(t *testing.T) {
	p := loggedIn(t)
	_, err := p.server('Z', []byte("II"))
	var pe *protocolError
	if !errors.As(err, &pe) {
		t.Fatalf("ReadyForQuery of two bytes: error %v, want a *protocolError", err)
	}
}

// TestProtocolAllocs: following a request allocates nothing in steady state.
func TestProtocolAllocs(t *testing.T) {
	p := loggedIn(t)
	var client, server [][]byte
	for _, m := range []pgproto3.FrontendMessage{
		&pgproto3.Parse{Name: "stmtcache_1", Query: traced("select v from t where k = $1", traceA)},
		&pgproto3.Bind{PreparedStatement: "stmtcache_1"}, &pgproto3.Execute{}, &pgproto3.Sync{},
		&pgproto3.Query{String: traced("select 1", traceB)},
	} {
		client = append(client, encode(t, m))
	}
	for _, m := range []pgproto3.BackendMessage{
		complete("SELECT 1"), ready(TxIdle), complete("SELECT 1"), ready(TxIdle),
	} {
		server = append(server, encode(t, m))
	}
	run := func() {
		for _, b := range client {
			p.client(b[0], b[headerLen:], true)
		}
		for _, b := range server {
			if _, err := p.server(b[0], b[headerLen:]); err != nil {
				t.Fatal(err)
			}
		}
	}
	run() // the first Parse of a name allocates its entry
	if allocs := testing.AllocsPerRun(100, run); allocs != 0 {
		t.Errorf("a request and its answer allocate %v times, want 0", allocs)
	}
	if p.busy() {
		t.Fatal("busy after every request was answered")
	}
}
