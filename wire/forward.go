package wire

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"
)

// Forwarding (Config.Primary) moves a session that its hot standby refuses to the primary,
// at a point where the client cannot tell, or else answers 40001 so that it retries there.
//
// A forwarding session is followed in epochs: an epoch begins each time the session is idle
// outside a transaction block (a ReadyForQuery 'I' that leaves nothing owed). Within it, the
// relay records what the client sent (upstreamWriter, bounded by maxRecorded) and hashes what
// the client received (SHA-256), and it holds back the metadata a request is answered with
// before its results (ParseComplete, BindComplete, RowDescription and the like), so that a
// refusal coming first leaves the client having seen nothing of that request.
//
// A refusal of the standby (isStandbyRefusal, from a backend whose in_hot_standby is on) is
// held with everything after it until its ReadyForQuery. Then, with the client's writes
// stopped (upstreamWriter's lock):
//   - the replica's session is brought to idle (ROLLBACK, when a transaction block failed),
//     its state read (settings, prepared statements, and what cannot be carried: cursors WITH
//     HOLD, advisory locks, temporary tables), and a backend opened on the primary as the
//     client's own user with the client's startup parameters, where that state is set;
//   - the epoch's earlier requests are re-run there and the hash of their answers compared
//     with what the client received; equal, the refused request is sent to the primary and the
//     session is relayed there from now on, the client never having seen the refusal;
//   - different, or not comparable (the refused request had already returned results, the
//     epoch's input outgrew its bound), the primary's copy is rolled back and the client is
//     answered 40001; the session is on the primary, where its retry runs.
//
// A session whose state cannot be carried, or that has no way to log in to the primary, is
// answered the standby's own refusal; past Config.MaxForwarded, 53300. A moved session stays
// on the primary for the rest of its life.
const (
	maxRecorded  = 1 << 20  // what a client sends in one epoch, kept for a re-run
	maxHeld      = 64 << 10 // metadata held back from the client before a request's results
	rerunTimeout = time.Minute
	// keptRecording is the recording buffer a session keeps between epochs; a larger one is let go.
	keptRecording = 64 << 10
)

// SQLSTATE pgfly answers for a request it could not re-run on the primary.
const codeSerializationFailure = "40001"

// errPrimaryLost ends a session whose refused request was sent to the primary when the
// connection failed: whether it ran is unknown, and is not guessed.
var errPrimaryLost = errors.New("pgfly lost the primary while it ran the forwarded statement")

// forwarder is a forwarding session's view of its conversation (see above). It is the
// upstream-to-client pump's inspect, and owned by that goroutine but for w and primaryKey.
type forwarder struct {
	ss  *session
	out *pump           // the upstream-to-client pump
	w   *upstreamWriter // the client-to-upstream pump's destination

	ready   bool // the login is over
	active  bool // this epoch is followed: the upstream is a hot standby
	moved   bool // the session is on the primary
	counted bool // it counts under MaxForwarded

	hash          hash.Hash // of what the client received in this epoch
	units         int       // requests answered in this epoch
	held          []byte    // metadata of the current request, held back
	unitDelivered bool      // the current request's answer has reached the client in part

	refusing bool   // a refusal is held until its ReadyForQuery
	refusal  []byte // the refusal's ErrorResponse
	late     []byte // what came between it and its ReadyForQuery

	// moveAtIdle is why a 40001 was answered while more requests were in flight: the session
	// moves to the primary once they are answered.
	moveAtIdle string

	buf []byte // for pgfly's own exchanges with the servers

	// primaryKey is the BackendKeyData (process id and secret) of the primary's backend, once
	// moved; read by cancel requests.
	primaryKey atomic.Value // string
}

// upstreamWriter is a forwarding session's client-to-upstream destination: it records what
// the client sends during an epoch, and its lock holds the client's requests back while the
// session moves.
type upstreamWriter struct {
	mu        sync.Mutex
	c         net.Conn
	rec       []byte
	recording bool // an epoch is being recorded and fits in maxRecorded
}

func (w *upstreamWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.recording {
		if len(w.rec)+len(b) > maxRecorded {
			w.recording, w.rec = false, w.rec[:0]
		} else {
			w.rec = append(w.rec, b...)
		}
	}
	return w.c.Write(b)
}

func newForwarder(ss *session) *forwarder {
	return &forwarder{ss: ss, w: &upstreamWriter{c: ss.upstream}, hash: sha256.New()}
}

// tap hashes the rest of a message streamed through (see pump.tap).
func (f *forwarder) tap(b []byte) {
	if f.active {
		f.hash.Write(b)
	}
}

// inspect is the upstream-to-client pump's inspect for a forwarding session.
func (f *forwarder) inspect(typ byte, msg []byte, whole bool) ([]byte, error) {
	ss := f.ss
	if !f.ready && !f.moved && typ == 'E' && f.out.n == 0 {
		if e := parseError(msg[headerLen:]); string(e.severity) == "FATAL" && string(e.code) == codeCannotConnectNow {
			// The replica is starting up or shutting down: the client, which has been sent
			// nothing yet, logs in to the primary instead.
			if err := f.direct(string(e.message)); err == nil {
				return suppressed, nil
			}
		}
	}
	if !f.active {
		var repl []byte
		if ss.srv.watchOut[typ] {
			var err error
			if repl, err = ss.inspectServer(typ, msg, whole); err != nil {
				return nil, err
			}
		}
		if typ == 'Z' && !f.moved {
			f.ready = true
			f.idle()
		}
		return repl, nil
	}
	if f.refusing {
		if typ == 'Z' {
			return f.decide(msg)
		}
		f.late = append(f.late, msg...) // after an error the server sends only notices until Sync
		return suppressed, nil
	}
	switch typ {
	case 'N', 'A', 'S': // asynchronous: kept in order with what is held
		if typ == 'S' {
			if _, err := ss.inspectServer(typ, msg, whole); err != nil {
				return nil, err
			}
		}
		if len(f.held) > 0 {
			f.held = append(f.held, msg...)
			return suppressed, nil
		}
		f.hash.Write(msg)
		return nil, nil
	case '1', '2', '3', 't', 'n', 'T':
		// Held only while the server owes more for the request (a Sync or Query was sent),
		// so that a client waiting on a Flush is never kept waiting.
		if whole && !f.unitDelivered && ss.proto.units.sealed() && len(f.held)+len(msg) <= maxHeld {
			f.held = append(f.held, msg...)
			return suppressed, nil
		}
	case 'E':
		if !f.isRefusal(msg[headerLen:]) {
			break
		}
		if !ss.proto.units.sealed() {
			// The client sent no Sync yet and may wait for this error (after a Flush): it cannot
			// be held until a ReadyForQuery. The session moves at its next idle point.
			f.moveAtIdle = "the client had not finished sending its request"
			f.report(ForwardRetry, f.moveAtIdle)
			ss.proto.server(typ, msg[headerLen:])
			return f.deliver(typ, retryError(f.moveAtIdle), true)
		}
		{
			f.refusing = true
			f.refusal = append(f.refusal[:0], msg...)
			ss.proto.server(typ, msg[headerLen:]) // its bookkeeping; the observer is not told
			return suppressed, nil
		}
	}
	return f.deliver(typ, msg, whole)
}

// isRefusal tells whether an error is the standby's refusal of what only a primary can do.
func (f *forwarder) isRefusal(body []byte) bool {
	e := parseError(body)
	standby, _ := f.ss.proto.standby.Load().(string)
	return string(e.severity) == "ERROR" && isStandbyRefusal(e.code) && standby == "on"
}

// deliver passes a message to the client, after what was held back, and hashes it.
func (f *forwarder) deliver(typ byte, msg []byte, whole bool) ([]byte, error) {
	ss := f.ss
	if ss.srv.watchOut[typ] {
		repl, err := ss.inspectServer(typ, msg, whole)
		if err != nil {
			return nil, err
		}
		if repl != nil {
			msg = repl
		}
	}
	out, changed := msg, false
	if len(f.held) > 0 {
		out, changed = append(f.held, msg...), true
		f.held = f.held[:0]
	}
	if f.active {
		f.hash.Write(out)
	}
	if typ != 'Z' {
		f.unitDelivered = true
		return out, nil
	}
	f.unitDelivered = false
	f.units++
	if err := f.idle(); err != nil {
		return nil, err
	}
	if !changed {
		return nil, nil
	}
	return out, nil
}

// idle acts on a ReadyForQuery the protocol has noted: when it leaves the session idle outside
// a transaction block, a session owed a move moves, and a new epoch begins.
func (f *forwarder) idle() error {
	if f.moved || f.ss.proto.busy() || f.ss.proto.status() != TxIdle {
		return nil
	}
	if f.moveAtIdle != "" {
		why := f.moveAtIdle
		f.moveAtIdle = ""
		f.w.mu.Lock()
		res := f.connect(TxIdle)
		if res.primary != nil {
			f.switchTo(res.primary)
		}
		f.w.mu.Unlock()
		if res.primary == nil { // the client was answered 40001 for nothing: say why
			f.report(res.outcome, "after a 40001 ("+why+"): "+res.reason)
		} else {
			f.ss.srv.log.Info("session moved to the primary", zap.Uint64("session", f.ss.info.ID), zap.String("user", f.ss.info.User), zap.String("reason", why))
			return nil
		}
	}
	standby, _ := f.ss.proto.standby.Load().(string)
	f.active = standby == "on"
	f.hash.Reset()
	f.units = 0
	f.w.mu.Lock()
	if cap(f.w.rec) > keptRecording {
		f.w.rec = nil
	}
	f.w.rec, f.w.recording = f.w.rec[:0], f.active
	f.w.mu.Unlock()
	return nil
}

// decide acts on the ReadyForQuery z that follows a held refusal: it moves the session and
// forwards nothing, or answers the client (the refusal, 40001 or 53300) and z.
func (f *forwarder) decide(z []byte) ([]byte, error) {
	f.refusing = false
	if len(z) != headerLen+1 {
		return nil, &protocolError{"invalid ReadyForQuery"}
	}
	res := f.tryMove(TxStatus(z[headerLen]))
	if res.err != nil {
		return nil, res.err
	}
	f.report(res.outcome, res.reason)
	if res.outcome == ForwardMoved {
		f.held, f.late = f.held[:0], f.late[:0]
		return suppressed, nil
	}
	answer := f.refusal
	switch res.outcome {
	case ForwardRetry:
		answer = retryError(res.reason)
	case ForwardLimit:
		answer = errorMessage("ERROR", codeTooManyConnections, fmt.Sprintf("pgfly: this statement needs the primary, and %d sessions "+
			"are on it already (--max-forwarded-sessions)", f.ss.srv.cfg.MaxForwarded))
	}
	f.held = append(append(f.held, answer...), f.late...)
	f.late = f.late[:0]
	f.unitDelivered = true
	return f.deliver('Z', z, true)
}

// retryError is the 40001 a client is answered for a refused statement that pgfly could not
// re-run on the primary unseen.
func retryError(why string) []byte {
	return errorMessage("ERROR", codeSerializationFailure, "pgfly: this statement needs the primary, and it could not be re-run there "+
		"without risk ("+why+"): retry the transaction; the session now runs on the primary")
}

// moveResult is what tryMove or connect did.
type moveResult struct {
	outcome, reason string
	primary         *primaryConn // connect's, nil unless it succeeded
	err             error        // the session must end
}

// tryMove moves the session to the primary for the refused request, whose ReadyForQuery has
// come with status (see the comment at the top).
func (f *forwarder) tryMove(status TxStatus) moveResult {
	ss, w := f.ss, f.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if ss.proto.pending.Load() != 1 || ss.proto.unsynced.Load() || f.out.after > 0 {
		// More requests follow it on the replica, where they must run in their order.
		f.moveAtIdle = "more requests were in flight behind it"
		return moveResult{outcome: ForwardRetry, reason: f.moveAtIdle}
	}
	why := ""
	rec := w.rec
	refused := lastUnit(rec)
	switch {
	case f.unitDelivered:
		why = "it had already returned results"
	case !w.recording:
		why = fmt.Sprintf("the transaction sent more than the %d bytes pgfly keeps to re-run it", maxRecorded)
	case refused < 0 || countUnits(rec[:refused]) != f.units:
		why = "pgfly could not tell the transaction's requests apart"
	}
	res := f.connect(status)
	if res.primary == nil {
		return res
	}
	p := res.primary
	if why == "" && f.units > 0 {
		same, pstatus, err := f.rerun(p, rec[:refused])
		switch {
		case err != nil:
			p.close(ss)
			return moveResult{outcome: ForwardRefused, reason: "the primary failed while the transaction was re-run: " + err.Error()}
		case !same:
			why = "the transaction's earlier statements returned different results on the primary"
			if pstatus != TxIdle {
				if _, err := f.exchange(p.conn, queryMessage("ROLLBACK"), 1, ss.srv.primaryUp.timeout, nil); err != nil {
					p.close(ss)
					return moveResult{outcome: ForwardRefused, reason: "the primary failed: " + err.Error()}
				}
			}
		}
	}
	if why == "" {
		if !ss.setDeadline(p.conn, time.Now().Add(ss.srv.primaryUp.timeout)) {
			p.close(ss)
			return moveResult{err: errStopping}
		}
		_, err := p.conn.Write(rec[refused:])
		p.conn.SetDeadline(time.Time{})
		if err != nil {
			p.close(ss)
			return moveResult{err: fmt.Errorf("%w: %v", errPrimaryLost, err)}
		}
	}
	f.switchTo(p)
	if why == "" {
		return moveResult{outcome: ForwardMoved}
	}
	return moveResult{outcome: ForwardRetry, reason: why}
}

// connect readies a backend on the primary for the session, whose replica backend has just
// answered a request with status: it brings the replica's session to idle, reads its state,
// and opens the primary's backend with that state. The caller holds w.mu.
func (f *forwarder) connect(status TxStatus) moveResult {
	ss, srv := f.ss, f.ss.srv
	refused := func(reason string) moveResult { return moveResult{outcome: ForwardRefused, reason: reason} }
	rep := ss.upstreamConn()
	if status != TxIdle {
		if _, err := f.exchange(rep, queryMessage("ROLLBACK"), 1, srv.upstream.timeout, nil); err != nil {
			return refused("the replica failed: " + err.Error())
		}
	}
	st, err := f.sessionState(rep)
	if err != nil {
		return refused("could not read the session's state on the replica: " + err.Error())
	}
	if st.blocker != "" {
		return refused("the session holds " + st.blocker + ", which cannot move to the primary")
	}
	if max := srv.cfg.MaxForwarded; max > 0 && srv.forwarded.Add(1) > int64(max) {
		srv.forwarded.Add(-1)
		return moveResult{outcome: ForwardLimit, reason: fmt.Sprintf("%d sessions are on the primary (--max-forwarded-sessions)", max)}
	} else if max <= 0 {
		srv.forwarded.Add(1)
	}
	p, err := srv.dialPrimary(ss)
	if err != nil {
		srv.forwarded.Add(-1)
		var le *loginError
		if errors.As(err, &le) {
			srv.warnLogin(ss.info.User, err)
		}
		return refused(err.Error())
	}
	if err := f.carry(p, st, parsedNames(f.w.rec)); err != nil {
		p.close(ss)
		return refused("could not set the session's state on the primary: " + err.Error())
	}
	return moveResult{primary: p}
}

// direct relays a session whose upstream refused its startup (why) to the primary instead, from
// its startup message on.
func (f *forwarder) direct(why string) error {
	ss := f.ss
	up, err := ss.dialDirect(errors.New(why))
	if err != nil {
		return err
	}
	if _, err := up.Write(ss.startup); err != nil {
		up.Close()
		ss.srv.forwarded.Add(-1)
		ss.direct = false
		return err
	}
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	ss.swapUpstream(up).Close()
	ss.login.retarget(up)
	f.w.c, f.w.recording = up, false
	f.out.src, f.out.watch, f.out.tap = up, &ss.srv.watchOut, nil
	f.moved = true
	return nil
}

// switchTo makes p the session's upstream. The caller holds w.mu.
func (f *forwarder) switchTo(p *primaryConn) {
	ss := f.ss
	old := ss.swapUpstream(p.conn)
	f.w.c, f.w.recording, f.w.rec = p.conn, false, nil
	f.out.src, f.out.watch, f.out.tap = p.conn, &ss.srv.watchOut, nil
	f.moved, f.active, f.counted = true, false, true
	f.primaryKey.Store(p.key)
	ss.onPrimary.Store(true)
	ss.proto.standby.Store("off")
	old.Close() // the replica's backend: nothing of the session is left there
}

// report tells the observer and the log what was decided for a refusal.
func (f *forwarder) report(outcome, reason string) {
	ss := f.ss
	fields := []zap.Field{zap.Uint64("session", ss.info.ID), zap.String("user", ss.info.User), zap.String("outcome", outcome)}
	if reason != "" {
		fields = append(fields, zap.String("reason", reason))
	}
	if outcome == ForwardMoved || outcome == ForwardRetry {
		ss.srv.log.Info("session moved to the primary", fields...)
	} else {
		ss.srv.log.Warn("session not moved to the primary", fields...)
	}
	ss.srv.obs.Forwarded(Forward{SessionID: ss.info.ID, Time: time.Now(), User: ss.info.User, Outcome: outcome, Reason: reason})
}

// rerun sends the epoch's earlier requests to the primary and tells whether the answers hash
// as what the client received; status is the primary's after them.
func (f *forwarder) rerun(p *primaryConn, earlier []byte) (same bool, status TxStatus, err error) {
	h := sha256.New()
	status, err = f.exchange(p.conn, earlier, f.units, rerunTimeout, func(msg []byte) error {
		h.Write(msg)
		return nil
	})
	if err != nil {
		return false, status, err
	}
	var got, want [sha256.Size]byte
	return bytes.Equal(h.Sum(got[:0]), f.hash.Sum(want[:0])), status, nil
}

// exchange sends msgs on c, pgfly's own requests or a re-run of the client's, and reads the
// answers until zs ReadyForQuery messages, passing each message (header included) to each.
// With each nil, an ErrorResponse is returned as an error once its ReadyForQuery has come.
// It returns the last ReadyForQuery's status. Everything is bounded by timeout.
func (f *forwarder) exchange(c net.Conn, msgs []byte, zs int, timeout time.Duration, each func(msg []byte) error) (TxStatus, error) {
	if !f.ss.setDeadline(c, time.Now().Add(timeout)) {
		return TxUnknown, errStopping
	}
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write(msgs); err != nil {
		return TxUnknown, err
	}
	var failed error
	status := TxUnknown
	for zs > 0 {
		msg, err := readMessage(c, &f.buf, f.ss.srv.cfg.MaxMessageSize)
		if err != nil {
			return TxUnknown, err
		}
		if each != nil {
			if err := each(msg); err != nil {
				return TxUnknown, err
			}
		}
		switch msg[0] {
		case 'E':
			if e := parseError(msg[headerLen:]); failed == nil && each == nil {
				failed = fmt.Errorf("%s (SQLSTATE %s)", e.message, e.code)
			}
		case 'Z':
			zs--
			if len(msg) > headerLen {
				status = TxStatus(msg[headerLen])
			}
		}
	}
	return status, failed
}

// readMessage reads one whole message from r into *buf, which it grows as needed.
func readMessage(r io.Reader, buf *[]byte, max int) ([]byte, error) {
	if cap(*buf) < headerLen {
		*buf = make([]byte, 4096)
	}
	b := (*buf)[:headerLen]
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(b[1:]))
	if n < 4 || n > max {
		return nil, &protocolError{fmt.Sprintf("invalid message length %d for message type %q", n, b[0])}
	}
	if cap(*buf) < 1+n {
		nb := make([]byte, 1+n)
		copy(nb, b)
		*buf = nb
	}
	b = (*buf)[:1+n]
	if _, err := io.ReadFull(r, b[headerLen:]); err != nil {
		return nil, unexpected(err)
	}
	return b, nil
}

// queryMessage encodes a simple Query.
func queryMessage(sql string) []byte {
	b, _ := (&pgproto3.Query{String: sql}).Encode(nil)
	return b
}

// A recording is split into requests: each ends with a Query, Sync or FunctionCall.

// countUnits counts the requests in rec, -1 when rec is not whole messages.
func countUnits(rec []byte) int {
	n := 0
	for len(rec) >= headerLen {
		size := 1 + int(binary.BigEndian.Uint32(rec[1:]))
		if size > len(rec) {
			return -1
		}
		switch rec[0] {
		case 'Q', 'S', 'F':
			n++
		}
		rec = rec[size:]
	}
	if len(rec) > 0 {
		return -1
	}
	return n
}

// lastUnit is where the last request of rec begins, -1 when rec does not end with a whole
// request.
func lastUnit(rec []byte) int {
	start, end := 0, -1
	for pos := 0; pos+headerLen <= len(rec); {
		size := 1 + int(binary.BigEndian.Uint32(rec[pos+1:]))
		if size < headerLen || pos+size > len(rec) {
			return -1
		}
		switch rec[pos] {
		case 'Q', 'S', 'F':
			if pos+size == len(rec) {
				end = start
			}
			start = pos + size
		}
		pos += size
	}
	return end
}

// parsedNames are the statement names rec's Parse messages create.
func parsedNames(rec []byte) map[string]bool {
	names := map[string]bool{}
	for len(rec) >= headerLen {
		size := 1 + int(binary.BigEndian.Uint32(rec[1:]))
		if size < headerLen || size > len(rec) {
			break
		}
		if rec[0] == 'P' {
			if name, _, ok := cbytes(rec[headerLen:size]); ok && len(name) > 0 {
				names[string(name)] = true
			}
		}
		rec = rec[size:]
	}
	return names
}

// sessionState is what of a replica session's state a move carries, or why it cannot.
type sessionState struct {
	settings   [][2]string // name, value: what the session SET
	prepared   []preparedStatement
	blocker    string // what cannot be carried, "" when nothing
	blockerMsg string
}

type preparedStatement struct {
	name, statement string
	fromSQL         bool
	types           []uint32
}

// stateQuery reads a session's state: its SET parameters, its prepared statements, and what
// pgfly cannot carry to another backend.
const stateQuery = `SELECT 's', name::text, setting, NULL, NULL FROM pg_catalog.pg_settings WHERE source = 'session'
UNION ALL SELECT 'p', name::text, statement, from_sql::text, pg_catalog.array_to_string(parameter_types::oid[], ',') FROM pg_catalog.pg_prepared_statements
UNION ALL SELECT 'b', 'a cursor WITH HOLD', name::text, NULL, NULL FROM pg_catalog.pg_cursors WHERE is_holdable
UNION ALL SELECT 'b', 'an advisory lock', objid::text, NULL, NULL FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()
UNION ALL SELECT 'b', 'a temporary table', relname::text, NULL, NULL FROM pg_catalog.pg_class WHERE relpersistence = 't' AND relnamespace = pg_catalog.pg_my_temp_schema()`

// sessionState runs stateQuery on the replica's idle session.
func (f *forwarder) sessionState(c net.Conn) (sessionState, error) {
	var st sessionState
	var failed error
	_, err := f.exchange(c, queryMessage(stateQuery), 1, f.ss.srv.upstream.timeout, func(msg []byte) error {
		switch msg[0] {
		case 'E':
			e := parseError(msg[headerLen:])
			failed = fmt.Errorf("%s (SQLSTATE %s)", e.message, e.code)
		case 'D':
			cols, err := dataRow(msg[headerLen:], 5)
			if err != nil {
				return err
			}
			switch cols[0] {
			case "s":
				st.settings = append(st.settings, [2]string{cols[1], cols[2]})
			case "p":
				ps := preparedStatement{name: cols[1], statement: cols[2], fromSQL: cols[3] == "true"}
				for _, t := range strings.Split(cols[4], ",") {
					if t == "" {
						continue
					}
					oid, err := strconv.ParseUint(t, 10, 32)
					if err != nil {
						return fmt.Errorf("parameter type %q: %w", t, err)
					}
					ps.types = append(ps.types, uint32(oid))
				}
				st.prepared = append(st.prepared, ps)
			case "b":
				if st.blocker == "" {
					st.blocker = cols[1] + " (" + cols[2] + ")"
				}
			}
		}
		return nil
	})
	if err == nil {
		err = failed
	}
	return st, err
}

// dataRow reads the n text columns of a DataRow body; NULL is "".
func dataRow(body []byte, n int) ([]string, error) {
	if len(body) < 2 || int(binary.BigEndian.Uint16(body)) != n {
		return nil, &protocolError{"unexpected DataRow"}
	}
	body = body[2:]
	cols := make([]string, n)
	for i := range cols {
		if len(body) < 4 {
			return nil, &protocolError{"invalid DataRow"}
		}
		size := int(int32(binary.BigEndian.Uint32(body)))
		body = body[4:]
		if size < 0 {
			continue
		}
		if size > len(body) {
			return nil, &protocolError{"invalid DataRow"}
		}
		cols[i], body = string(body[:size]), body[size:]
	}
	return cols, nil
}

// carry sets st on the primary's new backend: the settings through set_config, the prepared
// statements as they were prepared (Parse, or the PREPARE statement), but those the epoch's
// own requests create, which its re-run prepares.
func (f *forwarder) carry(p *primaryConn, st sessionState, skip map[string]bool) error {
	var msgs []byte
	zs := 0
	if len(st.settings) > 0 {
		msgs, _ = (&pgproto3.Parse{Query: "SELECT pg_catalog.set_config($1, $2, false)"}).Encode(msgs)
		for _, s := range st.settings {
			msgs, _ = (&pgproto3.Bind{Parameters: [][]byte{[]byte(s[0]), []byte(s[1])}}).Encode(msgs)
			msgs, _ = (&pgproto3.Execute{}).Encode(msgs)
		}
	}
	for _, ps := range st.prepared {
		if skip[ps.name] || ps.fromSQL {
			continue
		}
		msgs, _ = (&pgproto3.Parse{Name: ps.name, Query: ps.statement, ParameterOIDs: ps.types}).Encode(msgs)
	}
	if len(msgs) > 0 {
		msgs, _ = (&pgproto3.Sync{}).Encode(msgs)
		zs++
	}
	sent := map[string]bool{} // one PREPARE text may have prepared several statements
	for _, ps := range st.prepared {
		if ps.fromSQL && !skip[ps.name] && !sent[ps.statement] {
			sent[ps.statement] = true
			msgs = append(msgs, queryMessage(ps.statement)...)
			zs++
		}
	}
	if zs == 0 {
		return nil
	}
	_, err := f.exchange(p.conn, msgs, zs, f.ss.srv.primaryUp.timeout, nil)
	return err
}

// primaryConn is a backend on the primary, logged in, for a moved session.
type primaryConn struct {
	conn net.Conn
	key  string // BackendKeyData: process id and secret
}

// close gives up a primary backend that the session did not move to.
func (p *primaryConn) close(ss *session) {
	p.conn.Close()
	ss.srv.forwarded.Add(-1)
}

// loginError is a failure to log in to the primary as a session's user.
type loginError struct{ err error }

func (e *loginError) Error() string { return e.err.Error() }
func (e *loginError) Unwrap() error { return e.err }

// primaryLogin is how ss logs in to the primary: as its own user, to its own database, with
// its own startup parameters, and with the primary URL's password only when the URL's user is
// ss's and the upstream made the client prove who it is before accepting it (a password, SASL,
// GSS). A client the upstream trusted without proof (a trust line) gets no password: it has on
// the primary only what the primary's own pg_hba.conf gives a password-less login.
func (s *Server) primaryLogin(ss *session) *pgconn.Config {
	cfg := s.primaryCfg.Copy()
	cfg.User, cfg.Database = ss.info.User, ss.info.Database
	if ss.info.User != s.primaryCfg.User || !ss.challenged {
		cfg.Password = ""
	}
	cfg.RuntimeParams = make(map[string]string, len(ss.params))
	for k, v := range ss.params {
		if k != "user" && k != "database" {
			cfg.RuntimeParams[k] = v
		}
	}
	cfg.DialFunc = s.primaryUp.dialer.DialContext
	return cfg
}

// dialPrimary opens a backend on the primary for ss (see primaryLogin).
func (s *Server) dialPrimary(ss *session) (*primaryConn, error) {
	cfg := s.primaryLogin(ss)
	ctx, cancel := context.WithTimeout(context.Background(), s.primaryUp.timeout)
	defer cancel()
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		var pe *pgconn.PgError
		if errors.As(err, &pe) && (pe.Code == "28P01" || pe.Code == "28000") {
			return nil, &loginError{fmt.Errorf("pgfly cannot log in to the primary as %q: %s (SQLSTATE %s)", ss.info.User, pe.Message, pe.Code)}
		}
		if strings.Contains(err.Error(), "password") || strings.Contains(err.Error(), "SASL") {
			return nil, &loginError{fmt.Errorf("pgfly cannot log in to the primary as %q: %v", ss.info.User, err)}
		}
		return nil, fmt.Errorf("the primary is unreachable: %v", err)
	}
	if err := pc.SyncConn(ctx); err != nil {
		pc.Close(ctx)
		return nil, fmt.Errorf("the primary is unreachable: %v", err)
	}
	hc, err := pc.Hijack()
	if err != nil {
		pc.Close(ctx)
		return nil, err
	}
	if hc.ParameterStatuses["in_hot_standby"] == "on" {
		hc.Conn.Close()
		return nil, errors.New("the primary is in recovery")
	}
	key := make([]byte, 4, 4+len(hc.SecretKey))
	binary.BigEndian.PutUint32(key, hc.PID)
	return &primaryConn{conn: hc.Conn, key: string(append(key, hc.SecretKey...))}, nil
}

// warnLogin logs, once per user, that pgfly cannot log in to the primary for that user's
// sessions, and how to fix it.
func (s *Server) warnLogin(user string, err error) {
	if _, seen := s.loginWarned.LoadOrStore(user, true); seen {
		return
	}
	s.log.Warn("forwarded sessions of this user get the standby's refusal: give --primary a URL with this user and its password",
		zap.String("user", user), zap.Error(err))
}
