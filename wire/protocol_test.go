package wire_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// boundedCtx is a context that ends after d or with the test, whichever comes first.
func boundedCtx(tb testing.TB, d time.Duration) context.Context {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	tb.Cleanup(cancel)
	return ctx
}

// sqlState is the SQLSTATE of a server error, or "" when err is not one.
func sqlState(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// mustExec runs sql (simple protocol when there are no args) and fails the test on error.
func mustExec(tb testing.TB, conn *pgx.Conn, sql string, args ...any) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		tb.Fatalf("%s: %v", sql, err)
	}
}

// assertUsable fails the test unless conn still answers a query and is idle.
func assertUsable(tb testing.TB, conn *pgx.Conn) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var got int
	if err := conn.QueryRow(ctx, "select 40 + $1::int", 2).Scan(&got); err != nil {
		tb.Fatalf("connection unusable afterwards: %v", err)
	}
	if got != 42 {
		tb.Fatalf("select 40 + 2: got %d, want 42", got)
	}
	if st := conn.PgConn().TxStatus(); st != 'I' {
		tb.Fatalf("transaction status afterwards: got %q, want 'I'", st)
	}
}

func TestQueryExecModes(t *testing.T) {
	r := primaryRelay(t)
	conn := r.connect(t)
	tests := []struct {
		name string
		mode pgx.QueryExecMode
	}{
		{"simple protocol", pgx.QueryExecModeSimpleProtocol},
		{"extended, cached named statement", pgx.QueryExecModeCacheStatement},
		{"extended, cached description", pgx.QueryExecModeCacheDescribe},
		{"extended, describe then execute", pgx.QueryExecModeDescribeExec},
		{"extended, unnamed statement", pgx.QueryExecModeExec},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := boundedCtx(t, 10*time.Second)
			for i := range 3 { // cached modes take another path once the cache is warm
				var sum int64
				var text string
				var null *string
				err := conn.QueryRow(ctx, "select $1::int8 + $2::int8, $3::text || '-' || $4::text, $5::text",
					tt.mode, int64(i), int64(40), "it's", fmt.Sprintf("run %d", i), nil).Scan(&sum, &text, &null)
				if err != nil {
					t.Fatalf("query: %v", err)
				}
				if want := int64(i + 40); sum != want {
					t.Errorf("sum: got %d, want %d", sum, want)
				}
				if want := fmt.Sprintf("it's-run %d", i); text != want {
					t.Errorf("text: got %q, want %q", text, want)
				}
				if null != nil {
					t.Errorf("null: got %q, want NULL", *null)
				}
			}
		})
	}
	assertUsable(t, conn)
}

func TestSimpleQueryProtocol(t *testing.T) {
	r := primaryRelay(t)
	conn := r.connect(t)
	ctx := boundedCtx(t, 10*time.Second)
	results, err := conn.PgConn().Exec(ctx, "select g, 'row ' || g from generate_series(1, 3) g").ReadAll()
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	if len(results) != 1 {
		t.Fatalf("results: got %d, want 1", len(results))
	}
	res := results[0]
	if got, want := res.CommandTag.String(), "SELECT 3"; got != want {
		t.Errorf("command tag: got %q, want %q", got, want)
	}
	if got, want := len(res.FieldDescriptions), 2; got != want {
		t.Fatalf("columns: got %d, want %d", got, want)
	}
	var got []string
	for _, row := range res.Rows {
		got = append(got, string(row[0])+"|"+string(row[1]))
	}
	if want := "1|row 1,2|row 2,3|row 3"; strings.Join(got, ",") != want {
		t.Errorf("rows: got %q, want %q", strings.Join(got, ","), want)
	}
}

func TestPipelinedQueries(t *testing.T) {
	t.Run("pgx batch", func(t *testing.T) {
		r := primaryRelay(t)
		conn := r.connect(t)
		ctx := boundedCtx(t, 20*time.Second)
		mustExec(t, conn, "create temp table batch_t (id int primary key, v text)")

		batch := &pgx.Batch{}
		for i := 1; i <= 5; i++ {
			batch.Queue("insert into batch_t values ($1, $2) returning id * 10", i, fmt.Sprintf("v%d", i))
		}
		batch.Queue("select count(*), string_agg(v, ',' order by id) from batch_t")
		batch.Queue("update batch_t set v = upper(v) where id > $1", 3)
		batch.Queue("select v from batch_t where id = $1", 5)
		br := conn.SendBatch(ctx, batch)
		for i := 1; i <= 5; i++ {
			var got int
			if err := br.QueryRow().Scan(&got); err != nil {
				t.Fatalf("insert %d: %v", i, err)
			}
			if got != i*10 {
				t.Errorf("insert %d returning: got %d, want %d", i, got, i*10)
			}
		}
		var n int
		var vs string
		if err := br.QueryRow().Scan(&n, &vs); err != nil {
			t.Fatalf("count: %v", err)
		}
		if n != 5 || vs != "v1,v2,v3,v4,v5" {
			t.Errorf("count, values: got %d, %q, want 5, %q", n, vs, "v1,v2,v3,v4,v5")
		}
		tag, err := br.Exec()
		if err != nil {
			t.Fatalf("update: %v", err)
		}
		if tag.RowsAffected() != 2 {
			t.Errorf("update rows: got %d, want 2", tag.RowsAffected())
		}
		var v string
		if err := br.QueryRow().Scan(&v); err != nil {
			t.Fatalf("select: %v", err)
		}
		if v != "V5" {
			t.Errorf("select: got %q, want %q", v, "V5")
		}
		if err := br.Close(); err != nil {
			t.Fatalf("close batch: %v", err)
		}
		assertUsable(t, conn)
	})

	t.Run("pgconn pipeline with an error between syncs", func(t *testing.T) {
		r := primaryRelay(t)
		conn := r.connect(t)
		ctx := boundedCtx(t, 20*time.Second)
		p := conn.PgConn().StartPipeline(ctx)
		p.SendQueryParams("select $1::text || 'a'", [][]byte{[]byte("x")}, nil, nil, nil)
		p.SendQueryParams("select 1 / $1::int", [][]byte{[]byte("0")}, nil, nil, nil)
		p.SendQueryParams("select 'skipped after the error'", nil, nil, nil, nil)
		p.SendPipelineSync()
		p.SendQueryParams("select $1::int * 2", [][]byte{[]byte("21")}, nil, nil, nil)
		p.SendPipelineSync()
		if err := p.Flush(); err != nil {
			t.Fatalf("flush: %v", err)
		}

		// First sync: a row, then the error, after which the server skips to the Sync.
		first := pipelineResult(t, p)
		if first.Err != nil || len(first.Rows) != 1 || string(first.Rows[0][0]) != "xa" {
			t.Errorf("first query: got %v rows %q, want 1 row \"xa\"", first.Err, first.Rows)
		}
		second := pipelineResult(t, p)
		if got := sqlState(second.Err); got != "22012" {
			t.Errorf("second query: got error %v (SQLSTATE %q), want SQLSTATE 22012", second.Err, got)
		}
		pipelineSync(t, p)
		third := pipelineResult(t, p)
		if third.Err != nil || len(third.Rows) != 1 || string(third.Rows[0][0]) != "42" {
			t.Errorf("query after the sync: got %v rows %q, want 1 row \"42\"", third.Err, third.Rows)
		}
		pipelineSync(t, p)
		if err := p.Close(); err != nil {
			t.Fatalf("close pipeline: %v", err)
		}
		assertUsable(t, conn)
	})
}

// pipelineResult reads the next query result of p. A query the server skipped after an
// earlier error has no result of its own: the pipeline goes on to its Sync.
func pipelineResult(tb testing.TB, p *pgconn.Pipeline) *pgconn.Result {
	tb.Helper()
	res, err := p.GetResults()
	if err != nil {
		return &pgconn.Result{Err: err}
	}
	rr, ok := res.(*pgconn.ResultReader)
	if !ok {
		tb.Fatalf("pipeline result: got %T, want *pgconn.ResultReader", res)
	}
	return rr.Read()
}

func pipelineSync(tb testing.TB, p *pgconn.Pipeline) {
	tb.Helper()
	for range 5 { // results of queries skipped after an error come before the sync
		res, err := p.GetResults()
		if err != nil {
			continue
		}
		if _, ok := res.(*pgconn.PipelineSync); ok {
			return
		}
		if rr, ok := res.(*pgconn.ResultReader); ok {
			rr.Close()
		}
	}
	tb.Fatalf("pipeline: no PipelineSync")
}

func TestNamedPreparedStatements(t *testing.T) {
	t.Run("protocol level", func(t *testing.T) {
		r := primaryRelay(t)
		conn := r.connect(t)
		ctx := boundedCtx(t, 10*time.Second)
		if _, err := conn.Prepare(ctx, "proto_square", "select $1::int * $1::int, $2::text"); err != nil {
			t.Fatalf("prepare: %v", err)
		}
		for _, n := range []int{3, -7, 1000} {
			var sq int
			var s string
			if err := conn.QueryRow(ctx, "proto_square", n, fmt.Sprint("n=", n)).Scan(&sq, &s); err != nil {
				t.Fatalf("execute with %d: %v", n, err)
			}
			if sq != n*n || s != fmt.Sprint("n=", n) {
				t.Errorf("execute with %d: got %d, %q, want %d, %q", n, sq, s, n*n, fmt.Sprint("n=", n))
			}
		}
		if got := preparedOnServer(t, conn, "proto_square"); got != 1 {
			t.Fatalf("pg_prepared_statements before deallocate: got %d, want 1", got)
		}
		if err := conn.Deallocate(ctx, "proto_square"); err != nil {
			t.Fatalf("deallocate: %v", err)
		}
		if got := preparedOnServer(t, conn, "proto_square"); got != 0 {
			t.Errorf("pg_prepared_statements after deallocate: got %d, want 0", got)
		}
		_, err := conn.PgConn().ExecPrepared(ctx, "proto_square", [][]byte{[]byte("2"), []byte("x")}, nil, nil).Close()
		if got := sqlState(err); got != "26000" {
			t.Errorf("execute after deallocate: got %v (SQLSTATE %q), want SQLSTATE 26000", err, got)
		}
		assertUsable(t, conn)
	})

	t.Run("SQL PREPARE, EXECUTE, DEALLOCATE", func(t *testing.T) {
		r := primaryRelay(t)
		conn := r.connect(t)
		ctx := boundedCtx(t, 10*time.Second)
		mustExec(t, conn, "prepare sql_twice(int) as select $1 * 2")
		for _, n := range []int{1, 21, -4} {
			var got int
			if err := conn.QueryRow(ctx, fmt.Sprintf("execute sql_twice(%d)", n), pgx.QueryExecModeSimpleProtocol).Scan(&got); err != nil {
				t.Fatalf("execute %d: %v", n, err)
			}
			if got != 2*n {
				t.Errorf("execute %d: got %d, want %d", n, got, 2*n)
			}
		}
		mustExec(t, conn, "deallocate sql_twice")
		_, err := conn.Exec(ctx, "execute sql_twice(1)")
		if got := sqlState(err); got != "26000" {
			t.Errorf("execute after deallocate: got %v (SQLSTATE %q), want SQLSTATE 26000", err, got)
		}
		assertUsable(t, conn)
	})
}

func preparedOnServer(tb testing.TB, conn *pgx.Conn, name string) int {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var n int
	err := conn.QueryRow(ctx, "select count(*) from pg_prepared_statements where name = $1",
		pgx.QueryExecModeExec, name).Scan(&n)
	if err != nil {
		tb.Fatalf("count prepared statements: %v", err)
	}
	return n
}

func TestMultiStatementSimpleQuery(t *testing.T) {
	r := primaryRelay(t)
	conn := r.connect(t)
	ctx := boundedCtx(t, 10*time.Second)
	results, err := conn.PgConn().Exec(ctx, "select 1; select 2, 3; set application_name = 'multi'; show application_name").ReadAll()
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	var got []string
	for _, res := range results {
		var cells []string
		for _, row := range res.Rows {
			for _, v := range row {
				cells = append(cells, string(v))
			}
		}
		got = append(got, res.CommandTag.String()+":"+strings.Join(cells, ","))
	}
	want := []string{"SELECT 1:1", "SELECT 1:2,3", "SET:", "SHOW:multi"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("results: got %q, want %q", got, want)
	}
	assertUsable(t, conn)
}

func TestEmptyQuery(t *testing.T) {
	r := primaryRelay(t)
	conn := r.connect(t)
	tests := []struct {
		name string
		run  func(ctx context.Context) error
	}{
		{"simple, empty string", func(ctx context.Context) error {
			_, err := conn.PgConn().Exec(ctx, "").ReadAll()
			return err
		}},
		{"simple, semicolon", func(ctx context.Context) error {
			_, err := conn.PgConn().Exec(ctx, ";").ReadAll()
			return err
		}},
		{"simple, comment and whitespace", func(ctx context.Context) error {
			_, err := conn.PgConn().Exec(ctx, " -- nothing\n ; ").ReadAll()
			return err
		}},
		{"extended, empty string", func(ctx context.Context) error {
			_, err := conn.PgConn().ExecParams(ctx, "", nil, nil, nil, nil).Close()
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.run(boundedCtx(t, 10*time.Second)); err != nil {
				t.Fatalf("got %v, want no error", err)
			}
			assertUsable(t, conn)
		})
	}
}

func TestCopyFromStdin(t *testing.T) {
	r := primaryRelay(t)
	conn := r.connect(t)
	ctx := boundedCtx(t, 30*time.Second)
	mustExec(t, conn, "create temp table copy_in (id int, name text)")
	const rows = 5000
	var data strings.Builder
	wantSum := 0
	for i := 1; i <= rows; i++ {
		fmt.Fprintf(&data, "%d\tname %d with a tab\\there\n", i, i)
		wantSum += i
	}
	tag, err := conn.PgConn().CopyFrom(ctx, strings.NewReader(data.String()), "copy copy_in from stdin")
	if err != nil {
		t.Fatalf("copy from: %v", err)
	}
	if tag.RowsAffected() != rows {
		t.Errorf("command tag: got %d rows, want %d", tag.RowsAffected(), rows)
	}
	var n, sum int
	var name string
	err = conn.QueryRow(ctx, "select count(*), sum(id), max(name) filter (where id = 4321) from copy_in").Scan(&n, &sum, &name)
	if err != nil {
		t.Fatalf("count: %v", err)
	}
	if n != rows || sum != wantSum || name != "name 4321 with a tab\there" {
		t.Errorf("count, sum, name: got %d, %d, %q, want %d, %d, %q", n, sum, name, rows, wantSum, "name 4321 with a tab\there")
	}
	assertUsable(t, conn)
}

func TestCopyToStdout(t *testing.T) {
	r := primaryRelay(t)
	conn := r.connect(t)
	ctx := boundedCtx(t, 30*time.Second)
	var got bytes.Buffer
	tag, err := conn.PgConn().CopyTo(ctx, &got,
		"copy (select g, repeat('x', g % 50), g % 7 = 0 from generate_series(1, 20000) g) to stdout")
	if err != nil {
		t.Fatalf("copy to: %v", err)
	}
	var want bytes.Buffer
	for g := 1; g <= 20000; g++ {
		b := "f"
		if g%7 == 0 {
			b = "t"
		}
		fmt.Fprintf(&want, "%d\t%s\t%s\n", g, strings.Repeat("x", g%50), b)
	}
	if tag.RowsAffected() != 20000 {
		t.Errorf("command tag: got %d rows, want 20000", tag.RowsAffected())
	}
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Errorf("copy output: got %d bytes, want %d bytes (first difference at %d)",
			got.Len(), want.Len(), firstDiff(got.Bytes(), want.Bytes()))
	}
	assertUsable(t, conn)
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// failingReader yields data and then fails, as a client whose source breaks mid-COPY.
type failingReader struct {
	data io.Reader
}

func (f *failingReader) Read(p []byte) (int, error) {
	n, err := f.data.Read(p)
	if err == io.EOF {
		return n, errors.New("the source broke")
	}
	return n, err
}

func TestCopyFromFailure(t *testing.T) {
	var good strings.Builder
	for i := 1; i <= 2500; i++ {
		fmt.Fprintf(&good, "%d\tok\n", i)
	}
	tests := []struct {
		name     string
		src      func() io.Reader
		wantCode string
	}{
		{"bad data mid-stream", func() io.Reader {
			return strings.NewReader(good.String() + "not a number\tbad\n" + good.String())
		}, "22P02"},
		{"too many columns", func() io.Reader {
			return strings.NewReader(good.String() + "1\ttwo\tthree\n")
		}, "22P04"},
		{"client aborts with CopyFail", func() io.Reader {
			return &failingReader{data: strings.NewReader(good.String())}
		}, "57014"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := primaryRelay(t)
			conn := r.connect(t)
			ctx := boundedCtx(t, 30*time.Second)
			mustExec(t, conn, "create temp table copy_fail (id int, v text)")
			_, err := conn.PgConn().CopyFrom(ctx, tt.src(), "copy copy_fail from stdin")
			if got := sqlState(err); got != tt.wantCode {
				t.Fatalf("copy from: got %v (SQLSTATE %q), want SQLSTATE %s", err, got, tt.wantCode)
			}
			assertUsable(t, conn)
			var n int
			if err := conn.QueryRow(ctx, "select count(*) from copy_fail").Scan(&n); err != nil {
				t.Fatalf("count: %v", err)
			}
			if n != 0 {
				t.Errorf("rows after a failed copy: got %d, want 0", n)
			}
			// A second COPY on the same session works.
			tag, err := conn.PgConn().CopyFrom(ctx, strings.NewReader(good.String()), "copy copy_fail from stdin")
			if err != nil || tag.RowsAffected() != 2500 {
				t.Errorf("copy after the failure: got %v, %d rows, want nil, 2500 rows", err, tag.RowsAffected())
			}
		})
	}
}

func TestListenNotify(t *testing.T) {
	r := primaryRelay(t)
	tests := []struct {
		name     string
		notifier func(t *testing.T) *pgx.Conn
	}{
		{"notifier connected directly", func(t *testing.T) *pgx.Conn {
			return connectURL(t, cluster.Primary.URL("postgres", "", "pgfly"))
		}},
		{"notifier through the relay", func(t *testing.T) *pgx.Conn { return r.connect(t) }},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			listener := r.connect(t)
			channel := fmt.Sprintf("proto_chan_%d", i)
			mustExec(t, listener, "listen "+channel)
			notifier := tt.notifier(t)
			payload := fmt.Sprintf("hello %d, with 'quotes'", i)
			mustExec(t, notifier, "select pg_notify($1, $2)", channel, payload)

			// The listener is idle: the notification arrives on its own.
			n, err := listener.WaitForNotification(boundedCtx(t, 10*time.Second))
			if err != nil {
				t.Fatalf("wait for notification: %v", err)
			}
			if n.Channel != channel || n.Payload != payload || n.PID != notifier.PgConn().PID() {
				t.Errorf("notification: got %q %q from pid %d, want %q %q from pid %d",
					n.Channel, n.Payload, n.PID, channel, payload, notifier.PgConn().PID())
			}
			// And it is delivered once.
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			if n, err := listener.WaitForNotification(ctx); err == nil {
				t.Errorf("second notification: got %q %q, want none", n.Channel, n.Payload)
			}
			assertUsable(t, listener)
		})
	}
}

func TestLargeValue(t *testing.T) {
	const size = 64 << 20
	r := primaryRelay(t)
	conn := r.connect(t)
	ctx := boundedCtx(t, 2*time.Minute)
	mustExec(t, conn, "create temp table large_value (id int, b bytea)")
	want := make([]byte, size)
	if _, err := rand.Read(want); err != nil {
		t.Fatal(err)
	}
	wantSum := sha256.Sum256(want)
	if _, err := conn.Exec(ctx, "insert into large_value values (1, $1)", want); err != nil {
		t.Fatalf("insert: %v", err)
	}
	var n int
	var serverSum string
	if err := conn.QueryRow(ctx, "select length(b), encode(sha256(b), 'hex') from large_value").Scan(&n, &serverSum); err != nil {
		t.Fatalf("length: %v", err)
	}
	if n != size || serverSum != hex.EncodeToString(wantSum[:]) {
		t.Errorf("on the server: got %d bytes with sha256 %s, want %d bytes with sha256 %x", n, serverSum, size, wantSum)
	}
	var got []byte
	if err := conn.QueryRow(ctx, "select b from large_value where id = $1", 1).Scan(&got); err != nil {
		t.Fatalf("select: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("round trip: got %d bytes (first difference at %d), want %d bytes", len(got), firstDiff(got, want), len(want))
	}
	got = nil
	assertUsable(t, conn)
}

func TestTxStatusThroughRelay(t *testing.T) {
	r := primaryRelay(t)
	conn := r.connect(t)
	steps := []struct {
		sql      string
		wantCode string
		want     byte
	}{
		{"select 1", "", 'I'},
		{"begin", "", 'T'},
		{"select 1", "", 'T'},
		{"select 1/0", "22012", 'E'},
		{"select 1", "25P02", 'E'},
		{"rollback", "", 'I'},
		{"begin; select 1", "", 'T'},
		{"commit", "", 'I'},
	}
	for _, st := range steps {
		ctx := boundedCtx(t, 10*time.Second)
		_, err := conn.PgConn().Exec(ctx, st.sql).ReadAll()
		if got := sqlState(err); got != st.wantCode || (err != nil && st.wantCode == "") {
			t.Fatalf("%s: got error %v, want SQLSTATE %q", st.sql, err, st.wantCode)
		}
		if got := conn.PgConn().TxStatus(); got != st.want {
			t.Errorf("after %s: got status %q, want %q", st.sql, got, st.want)
		}
	}
}
