package wire

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"net"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

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
// answered the standby's own refusal; past Config.MaxForwarded, 53300.
//
// A moved session keeps its replica backend, idle, and moves back to it (back) at a later
// point where it is idle outside a transaction block, once the replica has replayed the
// primary's WAL as far as it was then: the session reads its own writes, and nothing it saw
// goes back in time. Its settings and prepared statements go with it, and its primary backend
// is kept in turn, idle, for its next write (checked for a FATAL it sent meanwhile). A session
// that holds on the primary what cannot be carried stays there, as does one whose replica
// backend is gone.
//
// pgfly's own requests run in the unnamed statement, which a client may have prepared in one
// request and use in the next (pgx's describe-exec mode does): the client's last Parse of it is
// kept (upstreamWriter.track) and sent again to whichever backend the session goes on with,
// after pgfly's requests there; a re-run begins with the one its epoch began with.
const (
	maxRecorded  = 1 << 20  // what a client sends in one epoch, kept for a re-run
	maxHeld      = 64 << 10 // metadata held back from the client before a request's results
	rerunTimeout = time.Minute
	// keptRecording is the recording buffer a session keeps between epochs; a larger one is let go.
	keptRecording = 64 << 10
	// maxUnnamed is the largest Parse of the unnamed statement kept to prepare it again on
	// another backend; a session whose client sent a larger one does not move until it is gone.
	maxUnnamed = 64 << 10
	// A moved session waits at most maxCatchUp for the replica to replay the primary's WAL
	// position (and no longer than two round trips to the primary, which is what each of its
	// requests would cost there); when the replica is further behind, it tries again at an idle
	// point recheckAfter later.
	maxCatchUp   = time.Second
	minCatchUp   = 10 * time.Millisecond
	recheckAfter = time.Second
	retryStay    = time.Minute
)

// SQLSTATE pgfly answers for a request it could not re-run on the primary.
const codeSerializationFailure = "40001"

// SQLSTATE of a query a CancelRequest ended.
const codeQueryCanceled = "57014"

// errPrimaryLost ends a session whose refused request was sent to the primary when the
// connection failed: whether it ran is unknown, and is not guessed.
var errPrimaryLost = errors.New("pgfly lost the primary while it ran the forwarded statement")

// forwarder is a forwarding session's view of its conversation (see above). It is the
// upstream-to-client pump's inspect, and owned by that goroutine but for w and primaryKey.
type forwarder struct {
	ss  *session
	out *pump           // the upstream-to-client pump
	w   *upstreamWriter // the client-to-upstream pump's destination

	ready  bool // the login is over
	active bool // this epoch is followed: the upstream is a hot standby
	moved  bool // the session is on the primary now
	pinned bool // and stays there: it holds what cannot move back, or has no replica backend

	pri  *primaryConn // the session's primary backend, once it has one
	rep  net.Conn     // its replica backend, kept idle while it is on the primary
	kept sessionState // what the idle one of the two holds

	// retried: the client was answered 40001 (at retriedWhen), and its retry is to run on the
	// primary: the session does not move back until a transaction that wrote has ended there
	// (commits past retriedAt), or for retryStay if none does (a retry whose write the command
	// tags do not show, such as SELECT of a function that writes). nextBack is when it tries
	// again after the replica was found behind.
	retried     bool
	retriedAt   uint64
	retriedWhen time.Time
	nextBack    time.Time
	sentAt      uint64 // w.writes when back was decided on

	hash          hash.Hash // of what the client received in this epoch
	units         int       // requests answered in this epoch
	held          []byte    // metadata of the current request, held back
	unitDelivered bool      // the current request's answer has reached the client in part

	refusing bool // a refusal is held until its ReadyForQuery
	// answered: a refusal of this epoch reached the client as an error, and the request it
	// refused did not run: the epoch is never re-run, which would run it.
	answered bool
	refusal  []byte // the refusal's ErrorResponse
	late     []byte // what came between it and its ReadyForQuery

	// owed: the session ended with its client owed the ReadyForQuery that a move was to follow.
	owed bool
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
	recording bool   // an epoch is being recorded and fits in maxRecorded
	missed    bool   // an epoch is not recorded: the client had sent part of it before it began
	writes    uint64 // calls to Write: whether the client sent anything since a point
	// unnamed is the client's last Parse of the unnamed statement, which the upstream holds
	// until a simple Query or a Close drops it (empty then), and which pgfly's own requests
	// drop too: it is prepared again wherever the session goes on. unnamedLost: that Parse was
	// larger than maxUnnamed. epochUnnamed is unnamed when the epoch began, for a re-run.
	unnamed      []byte
	unnamedLost  bool
	epochUnnamed []byte
	collecting   bool   // the message being written is such a Parse
	rest         int    // bytes of a message begun in an earlier Write still to come
	parseHead    []byte // a Parse's header written alone: its name, in the next Write, tells which it is
	// custom: the client may have set a custom setting (app.tenant), with SET or set_config,
	// which pg_settings does not show and a move would not carry.
	custom bool
	pinned bool // the session never moves again: nothing of the above is needed
}

// setsCustom matches SQL that may set a custom setting: SET of a name with a dot (comments
// and quoted or non-ASCII names allowed), or set_config. A function that calls set_config, or
// such a SET past the first read of a message larger than the pump's buffer, is not seen.
var setsCustom = regexp.MustCompile(`(?is)\bset_config\b|\bset(?:\s|/\*.*?\*/|--[^\n]*\n)+(?:(?:session|local)(?:\s|/\*.*?\*/|--[^\n]*\n)+)?(?:"[^"]*\.[^"]*"|(?:"[^"]*"|[^\s.=;"/-]+)\s*\.)`)

// mentionsSet tells whether b holds "set" in any case, which every match of setsCustom does: a
// scan of a few nanoseconds a byte spares most requests the regular expression.
func mentionsSet(b []byte) bool {
	for i := 0; i+2 < len(b); i++ {
		if b[i]|0x20 == 's' && b[i+1]|0x20 == 'e' && b[i+2]|0x20 == 't' {
			return true
		}
	}
	return false
}

func (w *upstreamWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes++
	if !w.pinned {
		w.track(b)
	}
	if w.recording {
		if len(w.rec)+len(b) > maxRecorded {
			w.recording, w.rec = false, w.rec[:0]
		} else {
			w.rec = append(w.rec, b...)
		}
	}
	return w.c.Write(b)
}

// track follows the client's unnamed statement through what it sends, b: whole messages and
// the parts of a large one (the pump writes each header whole).
func (w *upstreamWriter) track(b []byte) {
	if len(w.parseHead) > 0 && len(b) > 0 {
		if b[0] == 0 { // the unnamed statement
			w.unnamed, w.unnamedLost = w.unnamed[:0], headerLen+w.rest > maxUnnamed
			w.collecting = !w.unnamedLost
			if w.collecting {
				w.unnamed = append(w.unnamed, w.parseHead...)
			}
		}
		w.parseHead = w.parseHead[:0]
	}
	for len(b) > 0 {
		if w.rest == 0 {
			if len(b) < headerLen {
				w.unnamed, w.unnamedLost = w.unnamed[:0], true
				return
			}
			w.rest, w.collecting = 1+int(binary.BigEndian.Uint32(b[1:])), false
			body := b[headerLen:]
			if (b[0] == 'Q' || b[0] == 'P') && !w.custom {
				sql := body[:min(len(body), w.rest-headerLen)]
				w.custom = mentionsSet(sql) && setsCustom.Match(sql)
			}
			switch b[0] {
			case 'Q': // a simple Query runs in the unnamed statement
				w.unnamed, w.unnamedLost = w.unnamed[:0], false
			case 'P':
				switch {
				case len(body) == 0: // its name is in the next Write
					w.parseHead = append(w.parseHead[:0], b[:headerLen]...)
				case body[0] == 0:
					w.unnamed, w.unnamedLost = w.unnamed[:0], w.rest > maxUnnamed
					w.collecting = !w.unnamedLost
				}
			case 'C':
				if len(body) >= 2 && body[0] == 'S' && body[1] == 0 {
					w.unnamed, w.unnamedLost = w.unnamed[:0], false
				}
			}
		}
		n := min(w.rest, len(b))
		if w.collecting {
			w.unnamed = append(w.unnamed, b[:n]...)
		}
		w.rest -= n
		b = b[n:]
	}
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
		if typ == 'Z' {
			f.ready = true
			if err := f.idle(); err != nil {
				return nil, err
			}
		}
		return repl, nil
	}
	if f.refusing {
		if typ == 'Z' {
			return f.decide(msg)
		}
		if !whole { // a notice too large to hold, which streams through: the refusal goes first, as it is
			f.refusing, f.answered = false, true
			f.report(ForwardRefused, "a notice too large to hold came between the refusal and its ReadyForQuery")
			f.held = append(append(f.held, f.refusal...), f.late...)
			f.late = f.late[:0]
			return f.deliver(typ, msg, whole)
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
		if len(f.held) > 0 && whole {
			f.held = append(f.held, msg...)
			return suppressed, nil
		}
		if len(f.held) > 0 { // too large to hold, it streams through: what is held goes first
			return f.deliver(typ, msg, whole)
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
			f.answered = true
			f.report(ForwardRetry, f.moveAtIdle)
			ss.proto.server(typ, msg[headerLen:])
			return f.deliver(typ, retryError(f.moveAtIdle), true)
		}
		f.refusing = true
		f.refusal = append(f.refusal[:0], msg...)
		ss.proto.server(typ, msg[headerLen:]) // its bookkeeping; the observer is not told
		return suppressed, nil
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
	if f.ss.proto.busy() || f.ss.proto.status() != TxIdle {
		return nil
	}
	if f.moved {
		f.back()
		return nil
	}
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	// What the client sent meanwhile runs on the replica, and a move owed waits for it.
	if f.moveAtIdle != "" && !f.inFlight() && f.w.rest == 0 {
		why := f.moveAtIdle
		f.moveAtIdle = ""
		res := f.connect(TxIdle, f.w.unnamed, nil)
		if res.err != nil {
			f.owed = true // the ReadyForQuery it follows is not sent
			return res.err
		}
		if res.primary != nil {
			f.switchTo(res.primary, res.state)
			f.retried, f.retriedAt, f.retriedWhen = true, f.ss.proto.commits, time.Now()
			f.ss.srv.log.Info("session moved to the primary", zap.Uint64("session", f.ss.info.ID), zap.String("user", f.ss.info.User), zap.String("reason", why))
			return nil
		}
		f.report(res.outcome, "after a 40001 ("+why+"): "+res.reason) // the client was answered 40001 for nothing: say why
	}
	f.newEpoch()
	if f.inFlight() || f.w.rest > 0 { // the client sent more meanwhile, perhaps before the epoch began
		f.w.recording, f.w.missed = false, f.active
	}
	return nil
}

// inFlight tells whether the client has sent more than the server has answered: a request
// (up to its Sync) owed an answer, or messages of one not yet ended by a Sync, such as a Parse
// and a Describe it waits on after a Flush.
func (f *forwarder) inFlight() bool {
	return f.ss.proto.busy() || f.ss.proto.units.isOpen()
}

// newEpoch begins an epoch, followed when the upstream is a hot standby. The caller holds w.mu.
func (f *forwarder) newEpoch() {
	standby, _ := f.ss.proto.standby.Load().(string)
	f.active = standby == "on"
	f.hash.Reset()
	f.units, f.answered = 0, false
	if cap(f.w.rec) > keptRecording {
		f.w.rec = nil
	}
	f.w.rec, f.w.recording, f.w.missed = f.w.rec[:0], f.active, false
	f.w.epochUnnamed = append(f.w.epochUnnamed[:0], f.w.unnamed...)
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
	f.answered = true
	switch res.outcome {
	case ForwardRetry:
		answer = retryError(res.reason)
		if f.moved {
			f.retried, f.retriedAt, f.retriedWhen = true, f.ss.proto.commits, time.Now()
		}
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
		"without risk ("+why+"): retry the transaction, which pgfly will run on the primary")
}

// moveResult is what tryMove or connect did.
type moveResult struct {
	outcome, reason string
	primary         *primaryConn // connect's, nil unless it succeeded
	state           sessionState // connect's: the replica backend's, which it keeps
	err             error        // the session must end
}

// tryMove moves the session to the primary for the refused request, whose ReadyForQuery has
// come with status (see the comment at the top).
func (f *forwarder) tryMove(status TxStatus) moveResult {
	ss, w := f.ss, f.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if ss.proto.pending.Load() != 1 || ss.proto.unsynced.Load() || ss.proto.units.isOpen() || w.rest > 0 || f.out.after > 0 {
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
	case w.missed:
		why = "pgfly had not seen the transaction begin"
	case f.answered:
		why = "an earlier request of the same batch was refused"
	case !w.recording:
		why = fmt.Sprintf("the transaction sent more than the %d bytes pgfly keeps to re-run it", maxRecorded)
	case refused < 0 || countUnits(rec[:refused]) != f.units:
		why = "pgfly could not tell the transaction's requests apart"
	}
	if why != "" && status != TxIdle {
		// The client is told its transaction block failed, which its replica backend is in
		// still: it stays there until the client's ROLLBACK, and moves then.
		f.moveAtIdle = why
		return moveResult{outcome: ForwardRetry, reason: why}
	}
	unnamed, fresh := w.epochUnnamed, parsedNames(rec) // what the re-run begins with, and prepares
	if why != "" {
		unnamed, fresh = w.unnamed, nil // what the client's next request may use
	}
	res := f.connect(status, unnamed, fresh)
	if res.primary == nil {
		return f.keepFailed(res, status)
	}
	p := res.primary
	if why == "" && f.units > 0 {
		same, pstatus, err := f.rerun(p, rec[:refused])
		switch {
		case err != nil:
			f.dropPrimary()
			return f.keepFailed(moveResult{outcome: ForwardRefused, reason: "the primary failed while the transaction was re-run: " + err.Error()}, status)
		case !same:
			why = "the transaction's earlier statements returned different results on the primary"
			var msgs []byte
			zs := 0
			if pstatus != TxIdle {
				msgs, zs = queryMessage("ROLLBACK"), 1
			}
			if status != TxIdle {
				m, z := f.failedBlock()
				msgs, zs = append(msgs, m...), zs+z
			} else {
				msgs, zs = withUnnamed(msgs, zs, w.unnamed)
			}
			if zs > 0 {
				if _, err := f.exchange(p.conn, msgs, zs, ss.srv.primaryUp.timeout, ignoreErrors); err != nil {
					f.dropPrimary()
					return f.keepFailed(moveResult{outcome: ForwardRefused, reason: "the primary failed: " + err.Error()}, status)
				}
			}
		}
	}
	if why == "" {
		if err := f.send(p.conn, rec[refused:], ss.srv.primaryUp.timeout); err != nil {
			f.dropPrimary()
			if err == errStopping {
				return moveResult{err: err}
			}
			return moveResult{err: fmt.Errorf("%w: %v", errPrimaryLost, err)}
		}
	}
	f.switchTo(p, res.state)
	if why == "" {
		return moveResult{outcome: ForwardMoved}
	}
	return moveResult{outcome: ForwardRetry, reason: why}
}

// failedBlock returns the messages that put an idle backend in a failed transaction block, with
// the client's unnamed statement prepared (before the block fails, which would refuse it), and
// how many ReadyForQuery messages answer them; their errors are not the caller's. A backend in a
// failed block already stays so.
func (f *forwarder) failedBlock() (msgs []byte, zs int) {
	msgs, zs = withUnnamed(queryMessage("BEGIN"), 1, f.w.unnamed)
	// A named Parse that fails (a syntax error) ends no other statement, the unnamed one included.
	msgs, _ = (&pgproto3.Parse{Name: "pgfly.failed", Query: "pgfly: the transaction block failed"}).Encode(msgs)
	return append(msgs, syncMessage...), zs + 1
}

// keepFailed puts the replica backend, on which res leaves a session that the client is told
// is in a failed transaction block (status), back in one: pgfly's ROLLBACK ended the block there
// to read its state, and the client's next statements must fail until its own ROLLBACK, not
// run in autocommit.
func (f *forwarder) keepFailed(res moveResult, status TxStatus) moveResult {
	if status == TxIdle || res.err != nil {
		return res
	}
	msgs, zs := f.failedBlock()
	if _, err := f.exchange(f.ss.upstreamConn(), msgs, zs, f.ss.srv.upstream.timeout, ignoreErrors); err != nil {
		return moveResult{err: err}
	}
	return res
}

// connect readies a backend on the primary for the session, whose replica backend has just
// answered a request with status: it brings the replica's session to idle, reads its state,
// and opens the primary's backend with that state and unnamed, the client's Parse of the
// unnamed statement, prepared, but for the statements named in fresh, which a re-run is about to
// prepare there. The caller holds w.mu.
func (f *forwarder) connect(status TxStatus, unnamed []byte, fresh map[string]bool) moveResult {
	if f.w.unnamedLost {
		return moveResult{outcome: ForwardRefused, reason: fmt.Sprintf("the session's unnamed prepared statement is larger than "+
			"the %d bytes pgfly keeps to prepare it on the primary", maxUnnamed)}
	}
	if f.w.custom {
		return moveResult{outcome: ForwardRefused, reason: "the session may have set a custom setting (SET of a dotted name, or set_config), which pgfly cannot carry"}
	}
	return f.open(status, unnamed, fresh)
}

// open is connect's work.
func (f *forwarder) open(status TxStatus, unnamed []byte, fresh map[string]bool) moveResult {
	ss, srv := f.ss, f.ss.srv
	refused := func(reason string) moveResult { return moveResult{outcome: ForwardRefused, reason: reason} }
	rep := ss.upstreamConn()
	// A failure of the replica's connection here ends the session: what the replica still owes
	// pgfly would reach the client as answers to its own requests.
	var se *sqlError
	if status != TxIdle {
		if _, err := f.exchange(rep, queryMessage("ROLLBACK"), 1, srv.upstream.timeout, nil); errors.As(err, &se) {
			return refused("the replica failed: " + err.Error())
		} else if err != nil {
			return moveResult{err: err}
		}
	}
	// The replica's session stays as the client left it, its unnamed statement prepared again
	// after pgfly's requests, whether or not it moves.
	st, err := f.readState(rep, srv.upstream.timeout, stateQuery, nil, f.w.unnamed)
	if errors.As(err, &se) {
		return refused("could not read the session's state on the replica: " + err.Error())
	} else if err != nil {
		return moveResult{err: err}
	}
	if st.blocker != "" {
		return refused("the session holds " + st.blocker + ", which cannot move to the primary")
	}
	if f.pri != nil { // its primary backend, kept from an earlier move
		f.unkeep()
		err := f.idleConn(f.pri.conn)
		if err == nil {
			err = f.carry(f.pri.conn, st, f.kept, fresh, unnamed, srv.primaryUp.timeout)
		}
		if err == nil {
			return moveResult{primary: f.pri, state: st}
		} else if err == errStopping {
			return moveResult{err: err}
		}
		srv.log.Info("the session's primary backend failed: opening another", zap.Uint64("session", ss.info.ID), zap.Error(err))
		f.dropPrimary()
	}
	if !srv.takePlace(f, ss.info.ID) {
		return moveResult{outcome: ForwardLimit, reason: fmt.Sprintf("%d sessions are on the primary (--max-forwarded-sessions)", srv.cfg.MaxForwarded)}
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
	f.pri = p // counted under MaxForwarded while it is held
	if err := f.carry(p.conn, st, loginState(ss.info.User), fresh, unnamed, srv.primaryUp.timeout); err != nil {
		f.dropPrimary()
		if err == errStopping {
			return moveResult{err: err}
		}
		return refused("could not set the session's state on the primary: " + err.Error())
	}
	return moveResult{primary: p, state: st}
}

// carry makes the backend on c, which holds have, hold want: its settings and prepared
// statements, but those named in fresh, which the requests about to be sent there prepare;
// and unnamed, the client's Parse of the unnamed statement, when not empty. That one's error
// is not carry's: the client's Parse failed, or it fails on this backend, and the client's
// use of the statement meets the error that its Parse had or that it does not exist.
func (f *forwarder) carry(c net.Conn, want, have sessionState, fresh map[string]bool, unnamed []byte, timeout time.Duration) error {
	msgs, zs := settingsTo(want.settings, have.settings), 0
	if msgs != nil {
		zs++
	}
	pm, pz := statementsTo(want.prepared, have.prepared, fresh)
	msgs, zs = append(msgs, pm...), zs+pz
	mine := zs
	msgs, zs = withUnnamed(msgs, zs, unnamed)
	if zs == 0 {
		return nil
	}
	var failed error
	answered := 0
	_, err := f.exchange(c, msgs, zs, timeout, func(msg []byte) error {
		switch {
		case msg[0] == 'Z':
			answered++
		case msg[0] == 'E' && answered < mine && failed == nil:
			failed = newSQLError(msg[headerLen:])
		}
		return nil
	})
	if err == nil {
		err = failed
	}
	return err
}

// idleConn checks that an idle backend's connection has said nothing since it was last used,
// waiting a millisecond: a backend that ended (idle_session_timeout, a restart, a terminate)
// sent its FATAL and closed. A link that went silent is not noticed.
func (f *forwarder) idleConn(c net.Conn) error {
	if !f.ss.setDeadline(c.SetReadDeadline, time.Now().Add(time.Millisecond)) {
		return errStopping
	}
	defer c.SetReadDeadline(time.Time{})
	var b [1]byte
	n, err := c.Read(b[:])
	var ne net.Error
	switch {
	case n == 0 && errors.As(err, &ne) && ne.Timeout():
		return nil
	case err != nil:
		return err
	}
	return errors.New("the idle backend sent a message")
}

// dropPrimary closes the session's primary backend, which it is not on.
func (f *forwarder) dropPrimary() {
	f.unkeep()
	if f.pri != nil {
		f.pri.close(f.ss)
		f.pri = nil
	}
}

// end closes the backend kept idle, when the session ends (the caller closes the other), and
// gives up the session's place under MaxForwarded.
func (f *forwarder) end() {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	f.unkeep()
	if f.moved && f.rep != nil {
		f.rep.Close()
	} else if !f.moved && f.pri != nil {
		f.pri.conn.Close()
	}
	if f.pri != nil {
		f.ss.srv.forwarded.Add(-1)
		f.pri = nil
	}
}

// keep offers the session's primary backend, idle now that the session is back on its
// upstream, to sessions that need a place under MaxForwarded (reclaim). The caller holds w.mu.
func (f *forwarder) keep() {
	srv := f.ss.srv
	srv.keptMu.Lock()
	defer srv.keptMu.Unlock()
	if srv.kept == nil {
		srv.kept = map[*forwarder]time.Time{}
	}
	srv.kept[f] = time.Now()
}

// unkeep withdraws keep's offer. The caller holds w.mu.
func (f *forwarder) unkeep() {
	srv := f.ss.srv
	srv.keptMu.Lock()
	delete(srv.kept, f)
	srv.keptMu.Unlock()
}

// takePlace counts one more session holding a primary backend, for session id (whose
// forwarder is self, or nil), within MaxForwarded: at the bound it takes the place of an idle
// one (reclaim). It tells whether there was a place; the caller gives it up with forwarded.Add(-1).
func (s *Server) takePlace(self *forwarder, id uint64) bool {
	if max := s.cfg.MaxForwarded; max > 0 && s.forwarded.Add(1) > int64(max) && !s.reclaim(self, id) {
		s.forwarded.Add(-1)
		return false
	} else if max <= 0 {
		s.forwarded.Add(1)
	}
	return true
}

// reclaim closes the idle primary backend that another session has kept the longest, making
// room under MaxForwarded for session id's (whose forwarder is self, or nil); it tells whether
// it did. A session busy moving (its w.mu held) is passed over, so that two sessions
// reclaiming at once never wait on each other.
func (s *Server) reclaim(self *forwarder, id uint64) bool {
	s.keptMu.Lock()
	others := make([]*forwarder, 0, len(s.kept))
	for f := range s.kept {
		if f != self {
			others = append(others, f)
		}
	}
	slices.SortFunc(others, func(a, b *forwarder) int { return s.kept[a].Compare(s.kept[b]) })
	s.keptMu.Unlock()
	for _, o := range others {
		if !o.w.mu.TryLock() {
			continue
		}
		released := !o.moved && o.pri != nil
		o.unkeep()
		if released {
			o.dropPrimary()
		}
		o.w.mu.Unlock()
		if released {
			s.log.Info("closed a session's idle primary backend for another session's write (--max-forwarded-sessions)",
				zap.Uint64("session", o.ss.info.ID), zap.Uint64("for_session", id))
			return true
		}
	}
	return false
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
	f.moved, f.pinned, f.w.pinned = true, true, true
	return nil
}

// switchTo makes p the session's upstream and keeps its replica backend, which holds st,
// idle. The caller holds w.mu.
func (f *forwarder) switchTo(p *primaryConn, st sessionState) {
	ss := f.ss
	f.rep, f.kept = ss.swapUpstream(p.conn), st
	f.w.c, f.w.recording = p.conn, false
	f.out.src, f.out.watch, f.out.tap = p.conn, &ss.srv.watchOut, nil
	f.moved, f.active = true, false
	f.moveAtIdle = "" // the move it owed is made
	f.primaryKey.Store(p.key)
	ss.onPrimary.Store(true)
	ss.proto.standby.Store("off")
}

// back moves a session on the primary, idle outside a transaction block, back to its replica
// backend once that has replayed the primary's WAL as far as it is now; the session's settings
// and prepared statements go with it. The client is sent the ReadyForQuery first, and the work
// is done (goBack) after it, unless the client has sent anything by then: a session that ends
// after its write costs no more than it did on the primary, and the next request of one that
// goes on waits for the move instead (the client-to-upstream pump waits on w.mu).
func (f *forwarder) back() {
	ss, w := f.ss, f.w
	if f.pinned || f.rep == nil || time.Now().Before(f.nextBack) {
		return
	}
	if f.retried && ss.proto.commits == f.retriedAt && time.Since(f.retriedWhen) < retryStay {
		return
	}
	f.retried = false
	w.mu.Lock()
	defer w.mu.Unlock()
	if f.inFlight() || f.out.after > 0 || f.moveAtIdle != "" {
		return // the client has sent more, or the primary said more: it runs there
	}
	f.sentAt = w.writes
	f.out.then = f.goBack
}

// goBack is back's work, once the client has been sent the ReadyForQuery.
func (f *forwarder) goBack() error {
	ss, w := f.ss, f.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.writes != f.sentAt || w.rest > 0 {
		return nil // the client was quicker (or is inside a message): what it sent runs on the primary
	}
	if w.unnamedLost {
		return nil // it cannot be prepared on the replica: back at an idle point after it is gone
	}
	if w.custom {
		f.stay("the session may have set a custom setting, which pgfly cannot carry")
		return nil
	}
	start := time.Now()
	// The primary's session stays as the client left it too, in case the session stays there.
	st, err := f.readState(f.pri.conn, ss.srv.primaryUp.timeout, checkQuery, f.pass, w.unnamed)
	var se *sqlError
	switch {
	case errors.As(err, &se) && se.code == codeQueryCanceled:
		f.nextBack = time.Now().Add(recheckAfter) // the client cancelled the check, meaning its own request
		return nil
	case errors.As(err, &se) || err == nil && st.lsn == "":
		f.stay("could not read the session's state on the primary: " + fmt.Sprint(err))
		return nil
	case err != nil:
		return err // the primary is lost, after its answer: the session ends, and nothing is unknown
	case st.blocker != "":
		f.stay("the session holds " + st.blocker + " on the primary")
		return nil
	}
	caught, err := f.caughtUp(st.lsn, time.Since(start))
	if err == nil && !caught {
		f.nextBack = time.Now().Add(recheckAfter)
		return nil
	}
	if err == nil {
		err = f.carry(f.rep, st, f.kept, nil, w.unnamed, ss.srv.upstream.timeout)
	}
	if err == errStopping {
		return err
	}
	if err != nil {
		f.rep.Close()
		f.rep = nil
		f.stay("its replica backend failed: " + err.Error())
		return nil
	}
	f.kept = st
	ss.swapUpstream(f.rep)
	f.w.c = f.rep
	f.out.src, f.out.watch, f.out.tap = f.rep, &watchAll, f.tap
	f.rep, f.moved = nil, false
	ss.onPrimary.Store(false) // before the key goes: a cancel meanwhile goes to the replica with the client's key
	f.primaryKey.Store("")
	ss.proto.standby.Store("on")
	f.report(ForwardBack, "")
	f.keep()
	f.newEpoch()
	return nil
}

// pass relays to the client what the primary sent it unasked (a NOTIFY, a ParameterStatus)
// during one of pgfly's own exchanges, which is not the exchange's answer.
func (f *forwarder) pass(msg []byte) error {
	if msg[0] != 'A' && msg[0] != 'S' {
		return nil
	}
	if f.ss.srv.watchOut[msg[0]] {
		if _, err := f.ss.inspectServer(msg[0], msg, true); err != nil {
			return err
		}
	}
	return f.out.write(msg)
}

// stay keeps a moved session on the primary for the rest of its life, for why.
func (f *forwarder) stay(why string) {
	f.pinned, f.w.pinned = true, true
	f.ss.srv.log.Info("session stays on the primary", zap.Uint64("session", f.ss.info.ID), zap.String("user", f.ss.info.User), zap.String("reason", why))
}

// caughtUp polls the idle replica backend until the replica has replayed the primary's WAL
// as far as lsn, for as long as two of the session's round trips to the primary (rtt) take,
// within minCatchUp and maxCatchUp.
func (f *forwarder) caughtUp(lsn string, rtt time.Duration) (bool, error) {
	if !validLSN(lsn) {
		return false, fmt.Errorf("the primary gave an invalid WAL position %q", lsn)
	}
	deadline := time.Now().Add(min(max(2*rtt, minCatchUp), maxCatchUp))
	q := queryMessage("SELECT pg_catalog.pg_last_wal_replay_lsn() >= '" + lsn + "'::pg_lsn")
	for pause := time.Millisecond; ; pause = min(2*pause, 16*time.Millisecond) {
		replayed := false
		_, err := f.exchange(f.rep, q, 1, f.ss.srv.upstream.timeout, func(msg []byte) error {
			if msg[0] == 'D' {
				cols, err := dataRow(msg[headerLen:], 1)
				replayed = err == nil && cols[0] == "t"
				return err
			}
			return nil
		})
		if err != nil || replayed || time.Now().Add(pause).After(deadline) {
			return replayed, err
		}
		time.Sleep(pause)
	}
}

// validLSN tells whether s is a WAL position as PostgreSQL prints one: two hex numbers.
func validLSN(s string) bool {
	hi, lo, ok := strings.Cut(s, "/")
	hex := func(s string) bool {
		if s == "" || len(s) > 8 {
			return false
		}
		for _, c := range s {
			if !('0' <= c && c <= '9' || 'A' <= c && c <= 'F' || 'a' <= c && c <= 'f') {
				return false
			}
		}
		return true
	}
	return ok && hex(hi) && hex(lo)
}

// report tells the observer and the log what was decided for a refusal.
func (f *forwarder) report(outcome, reason string) {
	ss := f.ss
	fields := []zap.Field{zap.Uint64("session", ss.info.ID), zap.String("user", ss.info.User), zap.String("outcome", outcome)}
	if reason != "" {
		fields = append(fields, zap.String("reason", reason))
	}
	switch outcome {
	case ForwardMoved, ForwardRetry:
		ss.srv.log.Info("session moved to the primary", fields...)
	case ForwardBack:
		ss.srv.log.Info("session moved back to the replica", fields...)
	default:
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
