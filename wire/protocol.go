package wire

import (
	"bytes"
	"sync/atomic"
)

// protocol follows one session's conversation and says what its messages mean: whether a
// request is in flight (busy), the transaction status, whether the session wrote and when a
// write committed, which request an error answers, and whether an error is a standby's
// refusal or a shutdown to hold back. It has no connection, goroutine or logger: the session
// feeds it each watched message before forwarding it (client from the client-to-upstream
// goroutine, server from the upstream-to-client one) and acts on what it says.
type protocol struct {
	// Shared between the two copy goroutines.
	pending    atomic.Int32 // ReadyForQuery messages the client is owed
	unsynced   atomic.Bool  // an Execute was sent and no Sync after it
	txStatus   atomic.Uint32
	copyInSeen atomic.Bool // the server sent CopyInResponse
	// standby is the upstream backend's in_hot_standby as its ParameterStatus last said
	// (PostgreSQL 14 and later report it at login and when a promotion ends recovery).
	standby atomic.Value    // string: "on", "off", or unset
	units   units           // sent and not yet answered; with its own mutex
	stmts   statementTraces // owned by the client-to-upstream goroutine
	// syncsInCopy counts the Syncs sent since the last Execute or Query; owned by the
	// client-to-upstream goroutine. During an extended-protocol COPY FROM STDIN the server
	// ignores them, so at CopyDone or CopyFail they are owed no ReadyForQuery.
	syncsInCopy int

	// Owned by the upstream-to-client goroutine, read by the session once it has returned.
	wrote     bool   // the current transaction wrote
	committed bool   // a write of this session committed
	commits   uint64 // how many transactions that wrote have ended (committed or not)
	undone    bool   // it wrote before a ROLLBACK that may have been ROLLBACK TO SAVEPOINT
	copyIn    bool   // a COPY FROM STDIN is running
	fatal     bool   // the server sent a FATAL or PANIC error
}

// reply is what one server message means for the session. Its error fields alias the
// message and are valid only while the message is.
type reply struct {
	idle      bool // a ReadyForQuery left the client owed nothing: no request is in flight
	committed bool // a ReadyForQuery ended a transaction that wrote
	// shutdown: a FATAL saying the server is going away (see isShutdown). hold: it came while
	// the session was idle, so it is held back from the client (see session.report) and
	// nothing else of it is noted. wrote: with shutdown, mayHaveWritten as it stood before
	// the error ended the session's implicit transaction.
	shutdown, hold, wrote bool
	// refusal: an error a hot standby raises for what only a primary can do (see
	// isStandbyRefusal); unit is the request it answers and status the transaction status
	// before the failing statement.
	refusal bool
	unit    unit
	status  TxStatus
	err     errorFields // of an ErrorResponse
}

// startup notes the StartupMessage sent: a request that the first ReadyForQuery answers.
func (p *protocol) startup() {
	p.pending.Store(1)
	p.units.query(traceID{}, false)
}

// busy reports whether the client waits for an answer: a request is using the session.
func (p *protocol) busy() bool { return p.pending.Load() > 0 || p.unsynced.Load() }

// status is the transaction status of the last ReadyForQuery.
func (p *protocol) status() TxStatus { return TxStatus(p.txStatus.Load()) }

// mayHaveWritten reports whether a write of this session committed, or its open transaction
// wrote and may commit. For the upstream-to-client goroutine, or once it has returned.
func (p *protocol) mayHaveWritten() bool { return p.committed || p.wrote }

// standbyInBlock is the backend's in_hot_standby while the session is inside a transaction
// block, "" otherwise. The server changes it only at its next ReadyForQuery: a session idle
// since it said "on" may run its next statement, in a new transaction, on a server promoted
// meanwhile. Only a transaction block it was already in when it said so stays read-only
// through a promotion; otherwise the observer must judge by other means.
func (p *protocol) standbyInBlock() string {
	if status := p.status(); status != TxInBlock && status != TxFailed {
		return ""
	}
	s, _ := p.standby.Load().(string)
	return s
}

// client notes a message of the client's (its type and body) that is being forwarded. whole
// is false for a message too large to buffer, of which body is a prefix.
func (p *protocol) client(typ byte, body []byte, whole bool) {
	switch typ {
	case 'Q':
		p.pending.Add(1)
		p.syncsInCopy = 0
		var sql []byte
		if whole { // the trace comment of a query too large to buffer is out of reach
			sql = body
		}
		p.units.query(findTraceID(sql))
	case 'F':
		p.pending.Add(1)
		p.units.query(traceID{}, false)
	case 'P':
		p.units.extended()
		if name, rest, ok := cbytes(body); ok {
			var sql []byte
			if whole {
				sql, _, _ = cbytes(rest)
			}
			id, found := findTraceID(sql)
			p.stmts.parsed(name, id, found)
		} else {
			p.stmts.forget() // which statement it replaces is unknown
		}
	case 'B':
		var id traceID
		found := false
		if _, rest, ok := cbytes(body); ok { // the portal's name, then the statement's
			if name, _, ok := cbytes(rest); ok {
				id, found = p.stmts.lookup(name)
			}
		}
		p.units.bind(id, found)
	case 'C':
		p.units.extended()
		if len(body) > 0 && body[0] == 'S' {
			if name, _, ok := cbytes(body[1:]); ok {
				p.stmts.closed(name)
			}
		}
	case 'E':
		p.units.extended()
		p.unsynced.Store(true)
		p.syncsInCopy = 0
	case 'S':
		p.pending.Add(1)
		p.unsynced.Store(false)
		p.units.sync()
		p.syncsInCopy++
	case 'c', 'f':
		if p.copyInSeen.Swap(false) && p.syncsInCopy > 0 {
			p.units.ignored(p.syncsInCopy)
			p.pending.Add(-int32(p.syncsInCopy))
		}
		p.syncsInCopy = 0
	}
}

// server notes a message of the server's (its type and body) before it is forwarded, and
// says what it means. An error is a protocolError: the message is not a valid one.
func (p *protocol) server(typ byte, body []byte) (reply, error) {
	switch typ {
	case 'Z':
		if len(body) != 1 {
			return reply{}, &protocolError{"invalid ReadyForQuery"}
		}
		return p.readyForQuery(TxStatus(body[0])), nil
	case 'C':
		p.commandComplete(body)
	case 'G':
		p.copyIn = true
		p.copyInSeen.Store(true)
	case 'H':
		p.copyIn = false
	case 'E':
		return p.errorResponse(body), nil
	case 'S':
		if name, rest, ok := cbytes(body); ok && string(name) == "in_hot_standby" {
			if value, _, ok := cbytes(rest); ok {
				p.standby.Store(string(value))
			}
		}
	}
	return reply{}, nil
}

// readyForQuery answers the oldest request and settles whether its transaction wrote.
func (p *protocol) readyForQuery(status TxStatus) reply {
	r := reply{idle: p.pending.Add(-1) <= 0 && !p.unsynced.Load()}
	p.units.answered()
	p.txStatus.Store(uint32(status))
	switch status {
	case TxIdle:
		p.undone = false
		if p.wrote {
			p.wrote, p.committed = false, true
			p.commits++
			r.committed = true
		}
	default:
		// Still in a block: a ROLLBACK since the last ReadyForQuery was ROLLBACK TO
		// SAVEPOINT (the tags are the same), and the writes before the savepoint stand.
		if p.undone {
			p.wrote, p.undone = true, false
		}
	}
	return r
}

// commandComplete tracks whether the current transaction wrote, from a CommandComplete tag.
func (p *protocol) commandComplete(body []byte) {
	tag := body
	if i := bytes.IndexByte(tag, 0); i >= 0 {
		tag = tag[:i]
	}
	verb := tag
	if i := bytes.IndexByte(tag, ' '); i >= 0 {
		verb = tag[:i]
	}
	switch string(verb) { // the compiler does not allocate for this conversion
	case "INSERT", "UPDATE", "DELETE", "MERGE":
		if !bytes.HasSuffix(tag, []byte(" 0")) {
			p.wrote = true
		}
	case "COPY":
		if p.copyIn {
			p.wrote = true
			p.copyIn = false
		}
	case "CREATE", "ALTER", "DROP", "TRUNCATE", "GRANT", "REVOKE", "COMMENT", "REFRESH",
		"CLUSTER", "REINDEX", "VACUUM", "CALL", "SECURITY", "IMPORT":
		p.wrote = true
	case "ROLLBACK":
		// ROLLBACK and ROLLBACK TO SAVEPOINT share this tag; the next ReadyForQuery or COMMIT
		// tells them apart. A transaction whose only writes were rolled back to a savepoint
		// is still reported: a needless event is cheaper than a missed one.
		p.undone = p.undone || p.wrote
		p.wrote = false
	case "COMMIT":
		if p.undone { // a COMMIT in the same query as a ROLLBACK TO SAVEPOINT
			p.wrote, p.undone = true, false
		}
	}
}

// errorResponse remembers a fatal error, says whether it is a shutdown to hold back or a
// standby's refusal, and forgets the writes of an implicit transaction it rolled back.
func (p *protocol) errorResponse(body []byte) reply {
	r := reply{err: parseError(body)}
	if string(r.err.severity) == "FATAL" || string(r.err.severity) == "PANIC" {
		p.fatal = true
		if isShutdown(r.err.code) {
			r.shutdown, r.hold, r.wrote = true, !p.busy(), p.mayHaveWritten()
			if r.hold {
				return r
			}
		}
	}
	status := p.status()
	if status != TxInBlock && status != TxFailed { // a failed block lives on until ROLLBACK
		p.wrote, p.undone = false, false // an implicit transaction rolled back
	}
	if isStandbyRefusal(r.err.code) {
		r.refusal, r.unit, r.status = true, p.units.current(), status
	}
	return r
}

// isShutdown tells whether a FATAL's code says the server is going away or not yet there:
// 57P01 admin_shutdown (a fast shutdown, or pg_terminate_backend), 57P02 crash_shutdown,
// 57P03 cannot_connect_now (starting up, shutting down). Not 57P05, an idle session's own
// timeout, nor 57P04, a dropped database.
func isShutdown(code []byte) bool {
	switch string(code) {
	case "57P01", "57P02", "57P03":
		return true
	}
	return false
}

// isStandbyRefusal tells whether an error is one a hot standby raises for what only a
// primary can do: 25006 (read_only_sql_transaction: writes, nextval, NOTIFY, LISTEN, LOCK,
// temporary tables, COPY FROM, "... during recovery"), 0A000 (feature_not_supported: a
// read-write or serializable transaction) and 55000 (object_not_in_prerequisite_state:
// "recovery is in progress", e.g. pg_current_wal_lsn()). The message text is not looked at,
// since servers speak other languages; a 0A000 or 55000 that has nothing to do with recovery is
// reported too, and the observer, which knows whether the upstream is in recovery, decides.
func isStandbyRefusal(code []byte) bool {
	switch string(code) {
	case codeReadOnlyTransaction, codeFeatureUnsupported, codeNotInPrerequisiteState:
		return true
	}
	return false
}

// errorFields are the fields of an ErrorResponse the relay acts on. They alias the message.
type errorFields struct {
	severity, code, message []byte
}

// parseError reads an ErrorResponse body without allocating. Missing, unknown or
// unterminated fields are tolerated: whatever could be read is returned.
func parseError(body []byte) errorFields {
	var f errorFields
	for len(body) > 1 && body[0] != 0 {
		k := body[0]
		i := bytes.IndexByte(body[1:], 0)
		if i < 0 {
			break
		}
		v := body[1 : 1+i]
		body = body[2+i:]
		switch k {
		case 'V':
			f.severity = v
		case 'S':
			if f.severity == nil {
				f.severity = v
			}
		case 'C':
			f.code = v
		case 'M':
			f.message = v
		}
	}
	return f
}
