package wire_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

// A benchBatch is what the fake upstream answers to every simple Query: pre-encoded, so that
// neither end of a benchmark spends anything per message but the relay.
type benchBatch struct {
	name     string
	bytes    []byte
	messages int
}

// benchSmall is a result set of 1,000 40-byte rows.
var benchSmall = func() benchBatch {
	msgs := []pgproto3.BackendMessage{&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{
		{Name: []byte("v"), DataTypeOID: 25, DataTypeSize: -1, TypeModifier: -1},
	}}}
	value := []byte("abcdefghijklmnopqrstuvwxyz012") // 29 bytes: a 40-byte DataRow
	for range 1000 {
		msgs = append(msgs, &pgproto3.DataRow{Values: [][]byte{value}})
	}
	msgs = append(msgs, &pgproto3.CommandComplete{CommandTag: []byte("SELECT 1000")}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	return benchBatch{"small", benchEncode(msgs...), len(msgs)}
}()

// benchLarge is a result set of four 1 MiB rows, each far larger than the relay's buffer.
var benchLarge = largeRows("large", 4, 1<<20)

// benchWide is a result set of a hundred 16 KiB rows: larger than the relay's buffer, so
// streamed like benchLarge's, but with many more messages per round trip, for counting
// allocations per message.
var benchWide = largeRows("wide", 100, 16<<10)

func largeRows(name string, rows, size int) benchBatch {
	msgs := []pgproto3.BackendMessage{&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{
		{Name: []byte("v"), DataTypeOID: 17, DataTypeSize: -1, TypeModifier: -1},
	}}}
	for i := range rows {
		value := make([]byte, size)
		for j := range value {
			value[j] = byte(i + j)
		}
		msgs = append(msgs, &pgproto3.DataRow{Values: [][]byte{value}})
	}
	msgs = append(msgs, &pgproto3.CommandComplete{CommandTag: fmt.Appendf(nil, "SELECT %d", rows)},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	return benchBatch{name, benchEncode(msgs...), len(msgs)}
}

func benchEncode(msgs ...pgproto3.BackendMessage) []byte {
	var b []byte
	for _, m := range msgs {
		var err error
		if b, err = m.Encode(b); err != nil {
			panic(err)
		}
	}
	return b
}

// BenchmarkRelay measures one simple-Query round trip over loopback sockets, straight to a
// scripted upstream ("direct") and through a wire.Server ("pgfly").
func BenchmarkRelay(b *testing.B) {
	for _, bt := range []benchBatch{benchSmall, benchLarge} {
		b.Run(bt.name, func(b *testing.B) {
			b.Run("direct", func(b *testing.B) {
				up := startBenchUpstream(b, bt.bytes)
				benchRoundTrips(b, dialBenchClient(b, up.Addr()), bt)
			})
			b.Run("pgfly", func(b *testing.B) {
				up := startBenchUpstream(b, bt.bytes)
				r := startRelay(b, up.URL(), wire.Config{})
				benchRoundTrips(b, dialBenchClient(b, r.Addr().String()), bt)
			})
		})
	}
}

func benchRoundTrips(b *testing.B, c *benchClient, bt benchBatch) {
	b.ReportAllocs()
	b.SetBytes(int64(len(bt.bytes)))
	b.ResetTimer()
	for b.Loop() {
		n, err := c.roundTrip()
		if err != nil {
			b.Fatalf("round trip: %v", err)
		}
		if n != len(bt.bytes) {
			b.Fatalf("round trip: got %d bytes, want %d", n, len(bt.bytes))
		}
	}
}

// TestRelayAllocsPerMessage checks that the relay's steady state allocates nothing per
// message: it counts the process's heap allocations over many round trips through the
// relay, subtracts those of the same round trips made directly, and divides by the number
// of messages relayed.
func TestRelayAllocsPerMessage(t *testing.T) {
	const rounds = 200
	// The extended protocol as a statement cache replays it: Parse of a named statement with
	// a trace comment (a re-Parse after the first round), Bind to it, Execute, Sync.
	var extended []byte
	for _, m := range []pgproto3.FrontendMessage{
		&pgproto3.Parse{Name: "stmtcache_1", Query: "select v from bench /*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/"},
		&pgproto3.Bind{PreparedStatement: "stmtcache_1"}, &pgproto3.Execute{}, &pgproto3.Sync{},
	} {
		var err error
		if extended, err = m.Encode(extended); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		bt       benchBatch
		extended bool
	}{{benchSmall, false}, {benchWide, false}, {benchSmall, true}} {
		bt := tc.bt
		name := bt.name
		if tc.extended {
			name += "/extended"
		}
		t.Run(name, func(t *testing.T) {
			up := startBenchUpstream(t, bt.bytes)
			r := startRelay(t, up.URL(), wire.Config{})
			direct := dialBenchClient(t, up.Addr())
			relayed := dialBenchClient(t, r.Addr().String())
			if tc.extended {
				direct.query, relayed.query = extended, extended
			}

			d := benchMallocs(t, direct, bt, rounds)
			p := benchMallocs(t, relayed, bt, rounds)
			extra := int64(p) - int64(d)
			perMessage := float64(extra) / float64(rounds*bt.messages)
			t.Logf("%d round trips of %d messages: %d allocations direct, %d through pgfly: %.4f per message, %.2f per round trip",
				rounds, bt.messages, d, p, perMessage, float64(extra)/rounds)
			if perMessage >= 0.01 {
				t.Errorf("allocations per relayed message: got %.4f, want < 0.01", perMessage)
			}
			if perTrip := float64(extra) / rounds; perTrip >= 0.1 { // the client's messages too
				t.Errorf("allocations per round trip: got %.2f, want < 0.1", perTrip)
			}
		})
	}
}

// benchMallocs returns the heap allocations of the whole process during rounds round trips,
// after a warm-up.
func benchMallocs(tb testing.TB, c *benchClient, bt benchBatch, rounds int) uint64 {
	tb.Helper()
	trip := func() {
		n, err := c.roundTrip()
		if err != nil {
			tb.Fatalf("round trip: %v", err)
		}
		if n != len(bt.bytes) {
			tb.Fatalf("round trip: got %d bytes, want %d", n, len(bt.bytes))
		}
	}
	for range 10 {
		trip()
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range rounds {
		trip()
	}
	runtime.ReadMemStats(&after)
	return after.Mallocs - before.Mallocs
}

// BenchmarkSelect1 measures a simple-protocol `select 1` against the real primary, directly
// and through pgfly: the relay's per-query overhead.
func BenchmarkSelect1(b *testing.B) {
	run := func(b *testing.B, url string) {
		cfg, err := pgx.ParseConfig(url)
		if err != nil {
			b.Fatalf("parse %s: %v", url, err)
		}
		cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err := pgx.ConnectConfig(ctx, cfg)
		cancel()
		if err != nil {
			b.Fatalf("connect %s: %v", url, err)
		}
		b.Cleanup(func() { conn.Close(context.Background()) })
		ctx = context.Background()
		b.ReportAllocs()
		b.ResetTimer()
		for b.Loop() {
			var n int
			if err := conn.QueryRow(ctx, "select 1").Scan(&n); err != nil {
				b.Fatalf("select 1: %v", err)
			}
			if n != 1 {
				b.Fatalf("select 1: got %d, want 1", n)
			}
		}
	}
	b.Run("direct", func(b *testing.B) {
		run(b, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
	})
	b.Run("pgfly", func(b *testing.B) {
		run(b, primaryRelay(b).url(pgcluster.RoleSuperuser))
	})
}

// benchUpstream is a scripted Postgres server on loopback: it accepts any startup without
// authentication and answers every simple Query with the same pre-encoded batch. It
// allocates nothing per query.
type benchUpstream struct {
	ln    net.Listener
	batch []byte
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

func startBenchUpstream(tb testing.TB, batch []byte) *benchUpstream {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen: %v", err)
	}
	f := &benchUpstream{ln: ln, batch: batch, conns: make(map[net.Conn]struct{})}
	f.wg.Add(1)
	go f.serve()
	tb.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		for c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return f
}

// Addr is the fake server's host:port.
func (f *benchUpstream) Addr() string { return f.ln.Addr().String() }

// URL is an upstream URL for a relay in front of the fake server.
func (f *benchUpstream) URL() string {
	return fmt.Sprintf("postgres://bench@%s/bench?sslmode=disable", f.Addr())
}

func (f *benchUpstream) serve() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		f.conns[c] = struct{}{}
		f.mu.Unlock()
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer func() {
				f.mu.Lock()
				delete(f.conns, c)
				f.mu.Unlock()
				c.Close()
			}()
			f.handle(c)
		}()
	}
}

var benchLogin = benchEncode(&pgproto3.AuthenticationOk{},
	&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{0, 0, 0, 1}},
	&pgproto3.ReadyForQuery{TxStatus: 'I'})

func (f *benchUpstream) handle(c net.Conn) {
	buf := make([]byte, 64<<10)
	// The startup packet, after an SSLRequest if the client sends one.
	for {
		if _, err := io.ReadFull(c, buf[:8]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint32(buf))
		if n < 8 || n > len(buf) {
			return
		}
		if _, err := io.ReadFull(c, buf[8:n]); err != nil {
			return
		}
		if binary.BigEndian.Uint32(buf[4:]) != 80877103 { // not an SSLRequest
			break
		}
		if _, err := c.Write([]byte{'N'}); err != nil {
			return
		}
	}
	if _, err := c.Write(benchLogin); err != nil {
		return
	}
	for {
		if _, err := io.ReadFull(c, buf[:5]); err != nil {
			return
		}
		typ, n := buf[0], int64(binary.BigEndian.Uint32(buf[1:]))-4
		if n < 0 || n > int64(len(buf)) {
			return
		}
		if _, err := io.ReadFull(c, buf[:n]); err != nil {
			return
		}
		switch typ {
		case 'Q', 'S': // a Sync ends an extended-protocol query: the same answer
			if _, err := c.Write(f.batch); err != nil {
				return
			}
		case 'X':
			return
		}
	}
}

// benchClient is a raw Postgres client that sends a pre-encoded Query and reads the answer
// by message headers only, without decoding or allocating.
type benchClient struct {
	c     net.Conn
	buf   []byte
	query []byte
}

func dialBenchClient(tb testing.TB, addr string) *benchClient {
	tb.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		tb.Fatalf("dial %s: %v", addr, err)
	}
	tb.Cleanup(func() { c.Close() })
	startup, err := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": "bench", "database": "bench"}}).Encode(nil)
	if err != nil {
		tb.Fatalf("encode startup: %v", err)
	}
	query, err := (&pgproto3.Query{String: "select v from bench"}).Encode(nil)
	if err != nil {
		tb.Fatalf("encode query: %v", err)
	}
	bc := &benchClient{c: c, buf: make([]byte, 64<<10), query: query}
	if _, err := c.Write(startup); err != nil {
		tb.Fatalf("send startup: %v", err)
	}
	if _, err := bc.readUntilReady(); err != nil {
		tb.Fatalf("startup: %v", err)
	}
	return bc
}

// roundTrip sends the query and returns the number of bytes of the answer, which ends with
// ReadyForQuery.
func (bc *benchClient) roundTrip() (int, error) {
	if _, err := bc.c.Write(bc.query); err != nil {
		return 0, err
	}
	return bc.readUntilReady()
}

// readUntilReady reads until the end of a ReadyForQuery message. The server sends nothing
// after it until the next query, so no byte of the next answer is consumed.
func (bc *benchClient) readUntilReady() (int, error) {
	bc.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	var (
		total int
		head  [5]byte
		hn    int  // bytes of the current header read so far
		skip  int  // body bytes of the current message still to come
		typ   byte // the current message's type
	)
	for {
		n, err := bc.c.Read(bc.buf)
		total += n
		b := bc.buf[:n]
		for len(b) > 0 {
			if hn < len(head) {
				k := copy(head[hn:], b)
				hn += k
				b = b[k:]
				if hn < len(head) {
					break
				}
				typ, skip = head[0], int(binary.BigEndian.Uint32(head[1:]))-4
				if skip < 0 {
					return total, fmt.Errorf("invalid message length %d", skip+4)
				}
			}
			k := min(skip, len(b))
			skip -= k
			b = b[k:]
			if skip > 0 {
				break
			}
			if typ == 'Z' {
				if len(b) > 0 {
					return total, errors.New("bytes after ReadyForQuery")
				}
				return total, nil
			}
			if typ == 'E' {
				return total, errors.New("got an ErrorResponse")
			}
			hn = 0
		}
		if err != nil {
			return total, err
		}
	}
}
