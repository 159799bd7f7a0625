package wire_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

// replicatedTable creates table name (id int primary key, v text) and a sequence name_seq on
// the primary, waits until the replica has them, and drops both when the test ends.
func replicatedTable(tb testing.TB, name string) {
	tb.Helper()
	primary := connectURL(tb, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	mustExec(tb, primary, fmt.Sprintf("create table %s (id int primary key, v text); create sequence %[1]s_seq", name))
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := primary.Exec(ctx, fmt.Sprintf("drop table %s; drop sequence %[1]s_seq", name)); err != nil {
			tb.Errorf("drop %s: %v", name, err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := cluster.WaitReplayed(ctx); err != nil {
		tb.Fatalf("wait for the replica: %v", err)
	}
}

// setReadOnlyHook installs fn as the recorder's onReadOnly hook.
func (r *recorder) setReadOnlyHook(fn func(wire.ReadOnlyViolation)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.onReadOnly = fn
}

func TestReadOnlyViolationEvents(t *testing.T) {
	replicatedTable(t, "events_ro")
	tests := []struct {
		name      string
		setup     []string
		sql       string
		args      []any
		wantCode  string
		wantMsg   string // "" when no event is expected
		wantTxSt  wire.TxStatus
		wantEvent bool
	}{
		{name: "insert in a read-only transaction", sql: "insert into events_ro values (1, 'a')",
			wantCode: "25006", wantMsg: "cannot execute INSERT in a read-only transaction", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "insert with parameters, extended protocol", sql: "insert into events_ro values ($1, $2)", args: []any{1, "a"},
			wantCode: "25006", wantMsg: "cannot execute INSERT in a read-only transaction", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "update inside a transaction block", setup: []string{"begin"}, sql: "update events_ro set v = 'b'",
			wantCode: "25006", wantMsg: "cannot execute UPDATE in a read-only transaction", wantTxSt: wire.TxInBlock, wantEvent: true},
		{name: "nextval", sql: "select nextval('events_ro_seq')",
			wantCode: "25006", wantMsg: "cannot execute nextval() in a read-only transaction", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "txid_current during recovery", sql: "select txid_current()",
			wantCode: "25006", wantMsg: "cannot execute pg_current_xact_id() during recovery", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "notify during recovery", sql: "notify events_chan",
			wantCode: "25006", wantMsg: "cannot execute NOTIFY during recovery", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "set transaction read write during recovery", setup: []string{"begin"}, sql: "set transaction read write",
			wantCode: "0A000", wantMsg: "cannot set transaction read-write mode during recovery", wantTxSt: wire.TxInBlock, wantEvent: true},
		{name: "begin read write", sql: "begin read write",
			wantCode: "0A000", wantMsg: "cannot set transaction read-write mode during recovery", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "serializable transaction", setup: []string{"begin"}, sql: "set transaction isolation level serializable",
			wantCode: "0A000", wantMsg: "cannot use serializable mode in a hot standby", wantTxSt: wire.TxInBlock, wantEvent: true},
		{name: "select for update", sql: "select * from events_ro for update",
			wantCode: "25006", wantMsg: "cannot execute SELECT FOR UPDATE in a read-only transaction", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "listen during recovery", sql: "listen events_chan",
			wantCode: "25006", wantMsg: "cannot execute LISTEN during recovery", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "lock table", setup: []string{"begin"}, sql: "lock table events_ro",
			wantCode: "25006", wantMsg: "cannot execute LOCK TABLE during recovery", wantTxSt: wire.TxInBlock, wantEvent: true},
		{name: "temporary table", sql: "create temporary table events_tmp (x int)",
			wantCode: "25006", wantMsg: "cannot execute CREATE TABLE in a read-only transaction", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "copy from", sql: "copy events_ro from stdin",
			wantCode: "25006", wantMsg: "cannot execute COPY during recovery", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "current wal position during recovery", sql: "select pg_current_wal_lsn()",
			wantCode: "55000", wantMsg: "recovery is in progress", wantTxSt: wire.TxIdle, wantEvent: true},
		{name: "restore point during recovery", sql: "select pg_create_restore_point('x')",
			wantCode: "55000", wantMsg: "recovery is in progress", wantTxSt: wire.TxIdle, wantEvent: true},
		// Reported by SQLSTATE alone: the relay cannot tell this 55000 from a standby's without
		// reading the message, and the observer decides (replaying it costs one wasted replay).
		{name: "currval before nextval", sql: "select currval('events_ro_seq')",
			wantCode: "55000", wantMsg: `currval of sequence "events_ro_seq" is not yet defined in this session`, wantTxSt: wire.TxIdle, wantEvent: true},

		{name: "division by zero", sql: "select 1/0", wantCode: "22012"},
		{name: "undefined table", sql: "insert into events_no_such_table values (1)", wantCode: "42P01"},
		{name: "a read: no error, no event", sql: "select 1 where false", wantCode: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := replicaRelay(t)
			conn := r.connect(t)
			ctx := boundedCtx(t, 10*time.Second)
			for _, s := range tt.setup {
				mustExec(t, conn, s)
			}
			before := time.Now()
			_, err := conn.Exec(ctx, tt.sql, tt.args...)
			after := time.Now()
			var pe *pgconn.PgError
			if tt.wantCode == "" {
				if err != nil {
					t.Fatalf("%s: %v", tt.sql, err)
				}
			} else if !errors.As(err, &pe) || pe.Code != tt.wantCode {
				t.Fatalf("%s: got error %v, want SQLSTATE %s", tt.sql, err, tt.wantCode)
			}

			got := r.events.Violations()
			if !tt.wantEvent {
				if len(got) != 0 {
					t.Fatalf("events: got %+v, want none", got)
				}
				return
			}
			if len(got) != 1 {
				t.Fatalf("events: got %d (%+v), want 1", len(got), got)
			}
			v := got[0]
			opened := r.events.Opened()
			if len(opened) != 1 || opened[0].ID == 0 {
				t.Fatalf("opened sessions: got %+v, want 1 with a non-zero ID", opened)
			}
			if v.SessionID != opened[0].ID {
				t.Errorf("SessionID: got %d, want %d", v.SessionID, opened[0].ID)
			}
			if v.Code != tt.wantCode {
				t.Errorf("Code: got %q, want %q", v.Code, tt.wantCode)
			}
			if v.Message != tt.wantMsg || v.Message != pe.Message {
				t.Errorf("Message: got %q, want %q (the client saw %q)", v.Message, tt.wantMsg, pe.Message)
			}
			if v.Time.Before(before) || v.Time.After(after) {
				t.Errorf("Time: got %v, want between %v and %v", v.Time, before, after)
			}
			if v.SentAt.Before(before) || v.SentAt.After(v.Time) {
				t.Errorf("SentAt: got %v, want between %v (the statement's start) and %v (the error)", v.SentAt, before, v.Time)
			}
			if v.TxStatus != tt.wantTxSt {
				t.Errorf("TxStatus: got %v, want %v", v.TxStatus, tt.wantTxSt)
			}
			if v.TraceID != "" {
				t.Errorf("TraceID: got %q, want none", v.TraceID)
			}
			if st := conn.PgConn().TxStatus(); tt.wantTxSt == wire.TxInBlock && st != 'E' {
				t.Errorf("client's status after the error: got %q, want 'E'", st)
			}
		})
	}
}

// TestReadOnlyEventPrecedesError proves the order the shim relies on: while the observer
// holds the event, the client has not received the error.
func TestReadOnlyEventPrecedesError(t *testing.T) {
	replicatedTable(t, "events_order")
	r := replicaRelay(t)
	entered := make(chan wire.ReadOnlyViolation, 1)
	release := make(chan struct{})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unblock) // runs before the relay's cleanup, so a failing test cannot hang it
	r.events.setReadOnlyHook(func(v wire.ReadOnlyViolation) {
		entered <- v
		<-release
	})
	conn := r.connect(t)

	returned := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := conn.Exec(ctx, "insert into events_order values (1, 'x')")
		returned <- err
	}()

	select {
	case v := <-entered:
		if v.Code != "25006" {
			t.Errorf("event code: got %q, want 25006", v.Code)
		}
	case err := <-returned:
		unblock()
		t.Fatalf("the client got %v before the observer saw an event", err)
	case <-time.After(10 * time.Second):
		unblock()
		t.Fatal("timed out waiting for the read-only event")
	}
	select {
	case err := <-returned:
		unblock()
		t.Fatalf("the client got %v while the observer still held the event", err)
	case <-time.After(100 * time.Millisecond):
	}

	unblock()
	select {
	case err := <-returned:
		if got := sqlState(err); got != "25006" {
			t.Fatalf("client error: got %v (SQLSTATE %q), want SQLSTATE 25006", err, got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for the client's error after the observer returned")
	}
	assertUsable(t, conn)
}

func TestReadOnlyEventTraceID(t *testing.T) {
	replicatedTable(t, "events_trace")
	const traceID = "0af7651916cd43dd8448eb211c80319c"
	const comment = "/*traceparent='00-" + traceID + "-b7ad6b7169203331-01'*/"
	tests := []struct {
		name string
		sql  string
		args []any
		want string
	}{
		{"simple protocol, comment after", "insert into events_trace values (1, 'x') " + comment, nil, traceID},
		{"simple protocol, comment before", comment + " insert into events_trace values (1, 'x')", nil, traceID},
		{"extended protocol", "insert into events_trace values ($1, $2) " + comment, []any{1, "x"}, traceID},
		{"sqlcommenter with other keys", "insert into events_trace values (1, 'x') /*action='index',traceparent='00-" +
			traceID + "-b7ad6b7169203331-01'*/", nil, traceID},
		{"no comment", "insert into events_trace values (1, 'x')", nil, ""},
		{"malformed trace id", "insert into events_trace values (1, 'x') /*traceparent='00-0AF7651916CD43DD-b7ad6b7169203331-01'*/", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := replicaRelay(t)
			conn := r.connect(t)
			_, err := conn.Exec(boundedCtx(t, 10*time.Second), tt.sql, tt.args...)
			if got := sqlState(err); got != "25006" {
				t.Fatalf("got %v (SQLSTATE %q), want SQLSTATE 25006", err, got)
			}
			got := r.events.Violations()
			if len(got) != 1 {
				t.Fatalf("events: got %d, want 1", len(got))
			}
			if got[0].TraceID != tt.want {
				t.Errorf("TraceID: got %q, want %q", got[0].TraceID, tt.want)
			}
		})
	}
}

// TestReadOnlyEventTraceIDPreparedStatements: the trace id of a refusal is that of the statement
// that failed, also when pgx runs it as a cached named prepared statement (its comment was seen
// once, at Parse, and each later run is only Bind and Execute), and a statement without a
// comment never inherits the id of one before it.
func TestReadOnlyEventTraceIDPreparedStatements(t *testing.T) {
	replicatedTable(t, "events_prep")
	const a, b = "0af7651916cd43dd8448eb211c80319c", "4bf92f3577b34da6a3ce929d0e0e4736"
	comment := func(id string) string { return " /*traceparent='00-" + id + "-b7ad6b7169203331-01'*/" }
	insertA := "insert into events_prep values ($1, 'a')" + comment(a)
	insertB := "insert into events_prep values ($1, 'b')" + comment(b)
	plain := "insert into events_prep values ($1, 'plain')"
	steps := []struct {
		name  string
		sql   string
		mode  pgx.QueryExecMode
		batch []string // sent as one pgx batch (one Sync) instead of sql
		want  string
	}{
		{name: "first run: Parse with the comment, then Bind", sql: insertA, mode: pgx.QueryExecModeCacheStatement, want: a},
		{name: "a statement without a comment", sql: plain, mode: pgx.QueryExecModeCacheStatement, want: ""},
		{name: "the cached statement again: Bind only", sql: insertA, mode: pgx.QueryExecModeCacheStatement, want: a},
		{name: "another cached statement", sql: insertB, mode: pgx.QueryExecModeCacheStatement, want: b},
		{name: "the plain one again", sql: plain, mode: pgx.QueryExecModeCacheStatement, want: ""},
		{name: "unnamed statement", sql: insertB, mode: pgx.QueryExecModeExec, want: b},
		{name: "unnamed statement without a comment", sql: plain, mode: pgx.QueryExecModeExec, want: ""},
		{name: "a batch binding two ids is ambiguous", batch: []string{"select 1" + comment(a), "insert into events_prep values (9, 'b')" + comment(b)}, want: ""},
		{name: "a batch with one id", batch: []string{"select 1" + comment(b), "insert into events_prep values (9, 'b')" + comment(b)}, want: b},
	}
	r := replicaRelay(t)
	conn := r.connect(t)
	for i, st := range steps {
		ctx := boundedCtx(t, 10*time.Second)
		var err error
		if st.batch != nil {
			batch := &pgx.Batch{}
			for _, q := range st.batch {
				batch.Queue(q)
			}
			err = conn.SendBatch(ctx, batch).Close()
		} else {
			_, err = conn.Exec(ctx, st.sql, st.mode, i)
		}
		if got := sqlState(err); got != "25006" {
			t.Fatalf("step %d (%s): got %v (SQLSTATE %q), want SQLSTATE 25006", i, st.name, err, got)
		}
		got := r.events.Violations()
		if len(got) != i+1 {
			t.Fatalf("step %d (%s): %d events in all, want %d", i, st.name, len(got), i+1)
		}
		if id := got[i].TraceID; id != st.want {
			t.Errorf("step %d (%s): TraceID %q, want %q", i, st.name, id, st.want)
		}
	}
}

// writeStep is one client action and the number of WriteCommitted events expected once it
// has returned, counted from the start of the session.
type writeStep struct {
	sql        string
	copyIn     string   // when set, sql is a COPY FROM STDIN fed this
	copyOut    bool     // sql is a COPY TO STDOUT
	batch      []string // when set, these are sent as one pgx batch (one Sync) instead of sql
	wantCode   string
	wantWrites int
}

func (s writeStep) run(ctx context.Context, conn *pgx.Conn) error {
	switch {
	case s.copyIn != "":
		_, err := conn.PgConn().CopyFrom(ctx, strings.NewReader(s.copyIn), s.sql)
		return err
	case s.copyOut:
		_, err := conn.PgConn().CopyTo(ctx, io.Discard, s.sql)
		return err
	case s.batch != nil:
		b := &pgx.Batch{}
		for _, q := range s.batch {
			b.Queue(q)
		}
		return conn.SendBatch(ctx, b).Close()
	default:
		_, err := conn.PgConn().Exec(ctx, s.sql).ReadAll()
		return err
	}
}

func (s writeStep) String() string {
	if s.batch != nil {
		return "batch " + strings.Join(s.batch, "; ")
	}
	return s.sql
}

func TestWriteCommittedEvents(t *testing.T) {
	primary := connectURL(t, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	mustExec(t, primary, "create table events_wc (id int primary key, v text)")
	t.Cleanup(func() { primary.Exec(context.Background(), "drop table if exists events_wc, events_wc_ddl") })

	const ins = "insert into events_wc values (1, 'a')"
	tests := []struct {
		name  string
		steps []writeStep
	}{
		{"autocommit insert", []writeStep{{sql: ins, wantWrites: 1}}},
		{"select", []writeStep{{sql: "select * from events_wc", wantWrites: 0}}},
		{"two autocommit inserts", []writeStep{{sql: ins, wantWrites: 1}, {sql: "insert into events_wc values (2, 'b')", wantWrites: 2}}},
		{"committed transaction", []writeStep{
			{sql: "begin"}, {sql: ins}, {sql: "select 1"}, {sql: "commit", wantWrites: 1}, {sql: "select 1", wantWrites: 1}}},
		{"rolled back transaction", []writeStep{{sql: "begin"}, {sql: ins}, {sql: "rollback"}}},
		{"read-only transaction", []writeStep{{sql: "begin"}, {sql: "select 1"}, {sql: "commit"}}},
		{"update of no rows", []writeStep{{sql: "update events_wc set v = 'x' where false"}}},
		{"delete of one row", []writeStep{{sql: ins, wantWrites: 1}, {sql: "delete from events_wc", wantWrites: 2}}},
		{"copy from stdin", []writeStep{{sql: "copy events_wc from stdin", copyIn: "1\ta\n2\tb\n", wantWrites: 1}}},
		{"failed copy from stdin", []writeStep{{sql: "copy events_wc from stdin", copyIn: "1\ta\nx\tb\n", wantCode: "22P02"}}},
		{"copy to stdout", []writeStep{{sql: "copy events_wc to stdout", copyOut: true}}},
		{"create table", []writeStep{{sql: "create table events_wc_ddl (id int)", wantWrites: 1}, {sql: "drop table events_wc_ddl", wantWrites: 2}}},
		{"failed autocommit insert", []writeStep{{sql: ins, wantWrites: 1}, {sql: ins, wantCode: "23505", wantWrites: 1}}},
		{"multi-statement query that fails", []writeStep{{sql: ins + "; select 1/0", wantCode: "22012"}, {sql: "select count(*) from events_wc"}}},
		{"multi-statement query that succeeds", []writeStep{{sql: ins + "; select 1", wantWrites: 1}}},
		{"explicit transaction in one query", []writeStep{{sql: "begin; " + ins + "; commit", wantWrites: 1}}},
		{"pipelined inserts, one sync", []writeStep{{batch: []string{ins, "insert into events_wc values (2, 'b')", "select 1"}, wantWrites: 1}}},
		{"pipelined inserts that fail", []writeStep{{batch: []string{ins, "select 1/0"}, wantCode: "22012"}}},
		{"commit of a failed transaction", []writeStep{
			{sql: "begin"}, {sql: ins}, {sql: "select 1/0", wantCode: "22012"}, {sql: "commit"}}},
		{"savepoint released, then committed", []writeStep{
			{sql: "begin"}, {sql: "savepoint s"}, {sql: ins}, {sql: "release savepoint s"}, {sql: "commit", wantWrites: 1}}},
		{"rolled back to a savepoint, then committed", []writeStep{
			{sql: "begin"}, {sql: ins}, {sql: "savepoint s"}, {sql: "insert into events_wc values (2, 'b')"},
			{sql: "rollback to savepoint s"}, {sql: "commit", wantWrites: 1}}},
		{"failed insert undone by a savepoint, then committed", []writeStep{
			{sql: "begin"}, {sql: ins}, {sql: "savepoint s"}, {sql: ins, wantCode: "23505"},
			{sql: "rollback to savepoint s"}, {sql: "commit", wantWrites: 1}}},
		{"errors in a failed block undone by a savepoint, then committed", []writeStep{
			{sql: "begin"}, {sql: ins}, {sql: "savepoint s"}, {sql: "select 1/0", wantCode: "22012"},
			{sql: "select 1", wantCode: "25P02"}, {sql: "rollback to savepoint s"}, {sql: "commit", wantWrites: 1}}},
		{"savepoint rolled back in the same query as the commit", []writeStep{
			{sql: "begin; " + ins + "; savepoint s; rollback to savepoint s; commit", wantWrites: 1}}},
		{"only the rolled back part wrote", []writeStep{
			{sql: "begin"}, {sql: "savepoint s"}, {sql: ins}, {sql: "rollback to savepoint s"}, {sql: "rollback"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mustExec(t, primary, "truncate events_wc")
			r := primaryRelay(t)
			conn := r.connect(t)
			for i, s := range tt.steps {
				err := s.run(boundedCtx(t, 10*time.Second), conn)
				if got := sqlState(err); got != s.wantCode || (err != nil && s.wantCode == "") {
					t.Fatalf("step %d (%s): got error %v, want SQLSTATE %q", i, s, err, s.wantCode)
				}
				if got := len(r.events.Writes()); got != s.wantWrites {
					t.Fatalf("step %d (%s): got %d write events, want %d", i, s, got, s.wantWrites)
				}
			}
			opened := r.events.Opened()
			for _, w := range r.events.Writes() {
				if len(opened) != 1 || w.SessionID != opened[0].ID || w.Time.IsZero() {
					t.Errorf("write event %+v: want session %+v and a time", w, opened)
				}
			}
		})
	}
}

// fakeUpstream is a scripted Postgres server for what a real one cannot be made to send. It
// accepts any startup, then answers each simple Query with answers[sql] followed by
// ReadyForQuery idle, or with CommandComplete "OK" when answers has no entry.
type fakeUpstream struct {
	ln      net.Listener
	answers map[string][]byte
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   []net.Conn
}

func startFakeUpstream(tb testing.TB, answers map[string][]byte) *fakeUpstream {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	f := &fakeUpstream{ln: ln, answers: answers}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.conns = append(f.conns, c)
			f.mu.Unlock()
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer c.Close()
				if err := f.serve(c); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
					tb.Logf("fake upstream: %v", err)
				}
			}()
		}
	}()
	tb.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		for _, c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return f
}

func (f *fakeUpstream) url() string {
	return fmt.Sprintf("postgres://%s/?sslmode=disable", f.ln.Addr())
}

func (f *fakeUpstream) serve(c net.Conn) error {
	c.SetDeadline(time.Now().Add(30 * time.Second))
	be := pgproto3.NewBackend(c, c)
	msg, err := be.ReceiveStartupMessage()
	if err != nil {
		return err
	}
	if _, ok := msg.(*pgproto3.StartupMessage); !ok {
		return fmt.Errorf("startup: got %T", msg)
	}
	be.Send(&pgproto3.AuthenticationOk{})
	be.Send(&pgproto3.ParameterStatus{Name: "server_version", Value: "15.0"})
	be.Send(&pgproto3.BackendKeyData{ProcessID: 4242, SecretKey: []byte{1, 2, 3, 4}})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if err := be.Flush(); err != nil {
		return err
	}
	for {
		msg, err := be.Receive()
		if err != nil {
			return err
		}
		switch m := msg.(type) {
		case *pgproto3.Query:
			if raw, ok := f.answers[m.String]; ok {
				if _, err := c.Write(raw); err != nil {
					return err
				}
			} else {
				be.Send(&pgproto3.CommandComplete{CommandTag: []byte("OK")})
			}
			be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
			if err := be.Flush(); err != nil {
				return err
			}
		case *pgproto3.Terminate:
			return nil
		default:
			return fmt.Errorf("unexpected %T", msg)
		}
	}
}

// errorResponse encodes an ErrorResponse from raw fields ("SERROR", "C25006", ...), each
// terminated by a NUL, and then the final NUL unless unterminated is set.
func errorResponse(unterminated bool, fields ...string) []byte {
	body := []byte{}
	for _, f := range fields {
		body = append(body, f...)
		body = append(body, 0)
	}
	if !unterminated {
		body = append(body, 0)
	}
	return rawMessage('E', body)
}

func rawMessage(typ byte, body []byte) []byte {
	msg := make([]byte, 5, 5+len(body))
	msg[0] = typ
	binary.BigEndian.PutUint32(msg[1:], uint32(4+len(body)))
	return append(msg, body...)
}

func TestOddErrorResponsesThroughPgconn(t *testing.T) {
	const roMsg = "cannot execute INSERT in a read-only transaction"
	tests := []struct {
		name      string
		answer    []byte
		wantCode  string
		wantMsg   string
		wantEvent bool
	}{
		{"no SQLSTATE", errorResponse(false, "SERROR", "VERROR", "Mno code at all"), "", "no code at all", false},
		{"no fields at all", errorResponse(false), "", "", false},
		{"25006 with unknown fields", errorResponse(false, "SERROR", "Zzzz", "C25006", "~odd\x01value", "M"+roMsg, "Xmore", "Vwhatever"),
			"25006", roMsg, true},
		{"25006 without a message", errorResponse(false, "C25006"), "25006", "", true},
		{"0A000 read-write during recovery, localized severity only", errorResponse(false, "SFEHLER", "C0A000",
			"Mcannot set transaction read-write mode during recovery"), "0A000", "cannot set transaction read-write mode during recovery", true},
		{"0A000 for something else: reported by code, the observer decides", errorResponse(false, "SERROR", "C0A000", "Mnot supported"), "0A000", "not supported", true},
		{"another class 0A code", errorResponse(false, "SERROR", "C0A001", "Mnot supported"), "0A001", "not supported", false},
		{"empty code", errorResponse(false, "SERROR", "C", "Mempty code"), "", "empty code", false},
		{"a notice is not an error", rawMessage('N', []byte("SNOTICE\x00C25006\x00M"+roMsg+"\x00\x00")), "", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := startFakeUpstream(t, map[string][]byte{"crafted": tt.answer})
			r := startRelay(t, fake.url(), wire.Config{})
			ctx := boundedCtx(t, 10*time.Second)
			conn, err := pgconn.Connect(ctx, fmt.Sprintf("postgres://app@%s/app?sslmode=disable", r.Addr()))
			if err != nil {
				t.Fatalf("connect: %v", err)
			}
			defer conn.Close(context.Background())

			_, err = conn.Exec(ctx, "crafted").ReadAll()
			if tt.answer[0] == 'E' {
				var pe *pgconn.PgError
				if !errors.As(err, &pe) {
					t.Fatalf("crafted: got %v, want a server error", err)
				}
				if pe.Code != tt.wantCode || pe.Message != tt.wantMsg {
					t.Errorf("crafted: got %q %q, want %q %q", pe.Code, pe.Message, tt.wantCode, tt.wantMsg)
				}
			} else if err != nil {
				t.Fatalf("crafted: got %v, want no error", err)
			}
			results, err := conn.Exec(ctx, "next").ReadAll()
			if err != nil || len(results) != 1 || results[0].CommandTag.String() != "OK" {
				t.Fatalf("next query: got %v, %d results, want OK", err, len(results))
			}
			got := r.events.Violations()
			if !tt.wantEvent {
				if len(got) != 0 {
					t.Fatalf("events: got %+v, want none", got)
				}
				return
			}
			if len(got) != 1 || got[0].Code != tt.wantCode || got[0].Message != tt.wantMsg || got[0].TxStatus != wire.TxIdle {
				t.Fatalf("events: got %+v, want one with code %q, message %q, status idle", got, tt.wantCode, tt.wantMsg)
			}
		})
	}
}

// TestMalformedErrorResponsesRelayedVerbatim covers ErrorResponses a client library cannot
// decode: the relay must forward their bytes untouched and keep the session going.
func TestMalformedErrorResponsesRelayedVerbatim(t *testing.T) {
	tests := []struct {
		name      string
		answer    []byte
		wantEvent bool
	}{
		{"missing final terminator", errorResponse(true, "SERROR", "C25006", "Mcannot execute INSERT in a read-only transaction"), true},
		{"unterminated code", rawMessage('E', []byte("SERROR\x00C25006")), false},
		{"unterminated severity", rawMessage('E', []byte("SERR")), false},
		{"empty body", rawMessage('E', nil), false},
		{"lone field type", rawMessage('E', []byte("C")), false},
		{"code inside another field, no final terminator", rawMessage('E', []byte("Mhello C25006\x00")), false},
		{"large with 25006", errorResponse(false, "SERROR", "C25006", "M"+strings.Repeat("x", 100<<10)), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := startFakeUpstream(t, map[string][]byte{"crafted": tt.answer})
			r := startRelay(t, fake.url(), wire.Config{})
			c, err := net.Dial("tcp", r.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))

			startup, _ := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
				Parameters: map[string]string{"user": "app", "database": "app"}}).Encode(nil)
			writeAll(t, c, startup)
			readUntilReady(t, c)

			query, _ := (&pgproto3.Query{String: "crafted"}).Encode(nil)
			writeAll(t, c, query)
			got := readMessage(t, c)
			if !bytes.Equal(got, tt.answer) {
				t.Fatalf("relayed error: got %q, want %q", got, tt.answer)
			}
			if z := readMessage(t, c); !bytes.Equal(z, []byte{'Z', 0, 0, 0, 5, 'I'}) {
				t.Fatalf("after the error: got %q, want ReadyForQuery idle", z)
			}

			next, _ := (&pgproto3.Query{String: "next"}).Encode(nil)
			writeAll(t, c, next)
			if m := readMessage(t, c); m[0] != 'C' || !bytes.Contains(m, []byte("OK")) {
				t.Fatalf("next query: got %q, want CommandComplete OK", m)
			}
			readUntilReady(t, c)

			if n := len(r.events.Violations()); (n == 1) != tt.wantEvent || n > 1 {
				t.Errorf("events: got %d, want event %v", n, tt.wantEvent)
			}
			if n := r.OpenSessions(); n != 1 {
				t.Errorf("open sessions: got %d, want 1", n)
			}
		})
	}
}

func writeAll(tb testing.TB, c net.Conn, b []byte) {
	tb.Helper()
	if _, err := c.Write(b); err != nil {
		tb.Fatalf("write: %v", err)
	}
}

// readMessage reads one whole backend message, header included.
func readMessage(tb testing.TB, c net.Conn) []byte {
	tb.Helper()
	head := make([]byte, 5)
	if _, err := io.ReadFull(c, head); err != nil {
		tb.Fatalf("read message header: %v", err)
	}
	n := int(binary.BigEndian.Uint32(head[1:]))
	if n < 4 || n > 1<<20 {
		tb.Fatalf("message %q: length %d", head[0], n)
	}
	msg := make([]byte, 1+n)
	copy(msg, head)
	if _, err := io.ReadFull(c, msg[5:]); err != nil {
		tb.Fatalf("read message body: %v", err)
	}
	return msg
}

func readUntilReady(tb testing.TB, c net.Conn) {
	tb.Helper()
	for range 20 {
		m := readMessage(tb, c)
		switch m[0] {
		case 'Z':
			return
		case 'E':
			tb.Fatalf("unexpected error: %q", m)
		}
	}
	tb.Fatal("no ReadyForQuery within 20 messages")
}

// TestExtendedCopyKeepsUnitsInStep: during a COPY FROM STDIN started by the extended protocol
// the server ignores the Sync after Execute, and answers only the one after CopyDone. The relay
// must not stay one ReadyForQuery behind afterwards: a later refusal names its own statement,
// not the one before it. Run on the primary, where COPY FROM is allowed; the refusal is a
// read-only transaction's.
func TestExtendedCopyKeepsUnitsInStep(t *testing.T) {
	const a, b = "0af7651916cd43dd8448eb211c80319c", "4bf92f3577b34da6a3ce929d0e0e4736"
	r := primaryRelay(t)
	c := dialRaw(t, r.Addr().String())
	c.login(t, pgcluster.RoleSuperuser)
	c.query(t, "create temporary table copy_units (x int)")

	c.send(t, &pgproto3.Parse{Query: "copy copy_units from stdin"}, &pgproto3.Bind{},
		&pgproto3.Execute{}, &pgproto3.Sync{})
	for {
		m := c.receive(t)
		if _, ok := m.(*pgproto3.CopyInResponse); ok {
			break
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			t.Fatalf("copy: %s %s", e.Code, e.Message)
		}
	}
	c.send(t, &pgproto3.CopyData{Data: []byte("1\n2\n")}, &pgproto3.CopyDone{}, &pgproto3.Sync{})
	c.readUntilReady(t)
	if got := c.query(t, "select count(*) from copy_units"); got != "2" {
		t.Fatalf("copied %s rows, want 2", got)
	}

	c.query(t, "select 1 /*traceparent='00-"+a+"-b7ad6b7169203331-01'*/")
	time.Sleep(50 * time.Millisecond)
	sent := time.Now()
	c.send(t, &pgproto3.Query{String: "begin read only; create table copy_units_never (x int) /*traceparent='00-" + b + "-b7ad6b7169203331-01'*/"})
	for {
		m := c.receive(t)
		if e, ok := m.(*pgproto3.ErrorResponse); ok && e.Code != "25006" {
			t.Fatalf("got %s %s, want 25006", e.Code, e.Message)
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	got := r.events.Violations()
	if len(got) != 1 {
		t.Fatalf("events: %+v, want one refusal", got)
	}
	if got[0].TraceID != b {
		t.Errorf("TraceID %q, want %q (the refused statement's, not the one before it)", got[0].TraceID, b)
	}
	if got[0].SentAt.Before(sent) {
		t.Errorf("SentAt %v is before the refused statement was sent (%v)", got[0].SentAt, sent)
	}
}
