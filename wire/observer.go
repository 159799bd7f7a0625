package wire

import "time"

// TxStatus is a session's transaction status as last reported by ReadyForQuery.
type TxStatus byte

// Transaction statuses, as the server reports them in ReadyForQuery.
const (
	TxUnknown TxStatus = 0   // no ReadyForQuery seen yet
	TxIdle    TxStatus = 'I' // not in a transaction block
	TxInBlock TxStatus = 'T' // in a transaction block
	TxFailed  TxStatus = 'E' // in a failed transaction block
)

// String returns the status as a word for logs.
func (t TxStatus) String() string {
	switch t {
	case TxIdle:
		return "idle"
	case TxInBlock:
		return "in_transaction"
	case TxFailed:
		return "failed_transaction"
	default:
		return "unknown"
	}
}

// SessionInfo describes one relayed session. It never holds a password.
type SessionInfo struct {
	ID              uint64
	ClientAddr      string
	User            string
	Database        string
	ApplicationName string
	Upstream        string
	Start           time.Time
}

// SessionEnd is reported once when a session closes.
type SessionEnd struct {
	SessionInfo
	Duration      time.Duration
	BytesIn       int64 // bytes from the client to the upstream
	BytesOut      int64 // bytes from the upstream to the client
	Reason        string
	ProtocolError bool // the session ended because a peer broke the protocol
}

// ReadOnlyViolation is reported when the upstream answers with an error a hot standby raises
// for what only a primary can do: SQLSTATE 25006, 0A000 or 55000, decided by code alone (see
// isStandbyRefusal). 0A000 and 55000 have other causes too; only an upstream in recovery makes
// them refusals, which the observer knows and the relay does not. It is delivered before the
// ErrorResponse reaches the client.
type ReadOnlyViolation struct {
	SessionID uint64
	Time      time.Time
	// SentAt is when the client's request that failed (its Query, or the first
	// extended-protocol message after the previous Sync) was forwarded; a client request that
	// began later cannot have caused the refusal.
	SentAt   time.Time
	Code     string
	Message  string
	TxStatus TxStatus // the status before the failing statement
	// TraceID is the W3C trace id of the sqlcommenter-style traceparent comment of the
	// failing statement: of the Query, or of the Parse of the prepared statement that the
	// unit's Bind named. "" when it had none, or when one pipelined unit bound statements
	// with different ids.
	TraceID string
}

// WriteCommitted is reported when a session's transaction that wrote (INSERT, UPDATE,
// DELETE, MERGE, COPY FROM, DDL and friends) has committed: ReadyForQuery idle followed it.
type WriteCommitted struct {
	SessionID uint64
	Time      time.Time
}

// UpstreamFailure is reported when a session cannot reach its upstream or loses it: the dial
// failed, the upstream did not answer the login in time, it ended the session with a FATAL
// of class 57P (shutting down, crashed, not accepting connections yet), or the connection
// broke, or Server.Fenced ended it. It is delivered before the client is told; for a session
// that was idle (a connection resting in a pool), when its client next speaks. A standby
// cannot have written for the session; Wrote and Busy say whether it may have anyway (the
// upstream was promoted), in which case whoever ran the session's work must not run it again
// elsewhere.
type UpstreamFailure struct {
	SessionID uint64 // 0 when the session never reached the upstream
	Time      time.Time
	Cause     string // "connect", "login timeout", "shutdown", "lost" or "fenced"
	Code      string // the SQLSTATE the client is told
	Message   string
	// Wrote: a write of this session committed, or its open transaction wrote and may have
	// committed before the connection broke.
	Wrote bool
	// Busy: a statement was in flight, whose outcome is unknown. On a standby it cannot have
	// written; on a primary (a promoted or fenced upstream) it may have committed.
	Busy bool
	// TraceID is the trace id of the statement in flight (see ReadOnlyViolation), or "".
	TraceID string
	// InHotStandby is the session's own backend's in_hot_standby ("on" or "off") when the
	// session was inside a transaction block, which stays as it began through a promotion:
	// "on" then says the statement in flight ran read-only, whatever the monitor last saw.
	// "" otherwise (an idle session's next statement may run on a server promoted since its
	// last ReadyForQuery), and from servers before PostgreSQL 14.
	InHotStandby string
}

// Causes of an UpstreamFailure.
const (
	FailConnect      = "connect"
	FailLoginTimeout = "login timeout"
	FailShutdown     = "shutdown"
	FailLost         = "lost"
	FailFenced       = "fenced" // ended by Server.Fenced
)

// Forward is reported when a forwarding session (Config.Primary) is refused for being on a
// standby and pgfly decides what to do about it, when a session goes to the primary from its
// start because the upstream is unreachable, and when a moved session goes back.
type Forward struct {
	SessionID uint64
	Time      time.Time
	User      string
	Outcome   string // one of the Forward* outcomes
	// Reason says why a session did not move or was answered 40001: "" for ForwardMoved.
	Reason string
}

// Outcomes of a Forward.
const (
	// ForwardMoved: the session moved to the primary and its refused request ran there; the
	// client never saw the refusal.
	ForwardMoved = "moved"
	// ForwardRetry: the refused request could not be re-run safely; the client was answered
	// 40001 (serialization_failure) and the session moved to the primary, where its retry runs.
	ForwardRetry = "retry"
	// ForwardRefused: the session could not move (state that cannot be carried, no way to log
	// in to the primary, the primary unreachable or in recovery); the client got the standby's
	// refusal.
	ForwardRefused = "refused"
	// ForwardLimit: Config.MaxForwarded sessions were on the primary; the client was answered
	// 53300.
	ForwardLimit = "limit"
	// ForwardDirect: the upstream was unreachable, so the session was relayed to the primary
	// from its start (its client logged in to the primary itself).
	ForwardDirect = "direct"
	// ForwardBack: a moved session went back to the replica, which had replayed its writes.
	ForwardBack = "back"
)

// Observer receives a relay's events. Its methods are called from session goroutines,
// synchronously: they must be quick and safe for concurrent use. ReadOnly is called before
// the error is forwarded, so its effects are visible before the client can react.
type Observer interface {
	SessionOpened(SessionInfo)
	SessionClosed(SessionEnd)
	ReadOnly(ReadOnlyViolation)
	WriteCommitted(WriteCommitted)
	UpstreamFailed(UpstreamFailure)
	Forwarded(Forward)
}

// NopObserver ignores every event.
type NopObserver struct{}

func (NopObserver) SessionOpened(SessionInfo)      {}
func (NopObserver) SessionClosed(SessionEnd)       {}
func (NopObserver) ReadOnly(ReadOnlyViolation)     {}
func (NopObserver) WriteCommitted(WriteCommitted)  {}
func (NopObserver) UpstreamFailed(UpstreamFailure) {}
func (NopObserver) Forwarded(Forward)              {}
