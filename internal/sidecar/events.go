package sidecar

import (
	"go.uber.org/zap"

	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// events is a relay's Observer: it logs each standby refusal, counts it, and hands it to the
// shim, which taints the requests it may belong to. The jobs relay's has no shim: its sessions
// belong to no request.
type events struct {
	log     *zap.Logger
	shim    *router.Shim    // nil when the shim is off
	metrics func() *metrics // set once the relay exists; events arrive only after that
	// upstreamStandby reports whether the monitor's last poll saw the upstream in recovery;
	// lastSeenStandby whether its last successful one did, which holds while it is down.
	upstreamStandby, lastSeenStandby func() bool
	// kick asks the monitor to look at the upstream now; may be nil.
	kick func()
}

func (e *events) SessionOpened(wire.SessionInfo) {}

func (e *events) SessionClosed(wire.SessionEnd) {}

// ReadOnly: 25006 is a refusal wherever it comes from (a primary's read-only transaction is
// surfaced as before: the primary region replays nothing). 0A000 and 55000 have causes other
// than recovery, so they count only while the monitor last saw the upstream in recovery: from a
// primary, or an upstream whose role is not known (before the first poll, or while polls
// fail), they are the app's own errors, since replaying a request whose earlier statements may
// have committed on a primary would run them twice. From a standby, one that is not about
// recovery (currval before nextval) fails the same way in the primary region: a wasted replay.
func (e *events) ReadOnly(v wire.ReadOnlyViolation) {
	if v.Code != "25006" && !e.upstreamStandby() {
		return
	}
	e.metrics().violations.Inc()
	e.log.Warn("standby refusal",
		zap.Uint64("session", v.SessionID),
		zap.String("sqlstate", v.Code),
		zap.String("message", v.Message),
		zap.Stringer("tx_status", v.TxStatus),
		zap.String("trace_id", v.TraceID))
	if e.shim != nil {
		e.shim.ReadOnly(router.Violation{
			SessionID: v.SessionID,
			Time:      v.Time,
			SentAt:    v.SentAt,
			Code:      v.Code,
			Message:   v.Message,
			TraceID:   v.TraceID,
		})
	}
}

// WriteCommitted: a standby commits no write (a read-only CALL has a write's tag), so only
// from an upstream that is not seen in recovery does a write make the requests in flight
// unreplayable.
func (e *events) WriteCommitted(w wire.WriteCommitted) {
	e.metrics().writes.Inc()
	if e.shim != nil && !e.upstreamStandby() {
		e.shim.WriteCommitted(w.Time)
	}
}

// UpstreamFailed: the relay could not reach the upstream for a session, or lost it. The
// requests that may have used it are replayed in the primary region, and the monitor is woken
// so that /health and up-front replays follow at once.
func (e *events) UpstreamFailed(f wire.UpstreamFailure) {
	e.metrics().upstreamFailures.WithLabelValues(f.Cause).Inc()
	if e.kick != nil {
		e.kick()
	}
	if e.shim != nil {
		// A statement cut off on a standby wrote nothing; on a primary it may have committed.
		// The session's own in_hot_standby says which for a statement inside a transaction
		// block begun on a standby; else the monitor's last successful poll, which is up to
		// an Interval stale after a promotion (a window the README names).
		standby := f.InHotStandby == "on" || f.InHotStandby == "" && e.lastSeenStandby()
		unsafe := f.Wrote || f.Busy && !standby
		e.shim.UpstreamFailed(router.Violation{SessionID: f.SessionID, Time: f.Time, SentAt: f.Time, Code: f.Code,
			Message: f.Message, TraceID: f.TraceID}, unsafe)
	}
}

// Forwarded: a forwarding session's refusal, and what the relay did about it. A move the
// client never saw is news (info); the rest reached the client, as a 40001 to retry, the
// standby's refusal, or a 53300, or mean the upstream is unreachable (warnings).
func (e *events) Forwarded(f wire.Forward) {
	e.metrics().forwards.WithLabelValues(f.Outcome).Inc()
	fields := []zap.Field{zap.Uint64("session", f.SessionID), zap.String("user", f.User),
		zap.String("outcome", f.Outcome), zap.String("reason", f.Reason)}
	switch f.Outcome {
	case wire.ForwardMoved:
		e.log.Info("session moved to the primary", fields...)
	case wire.ForwardBack:
		e.log.Info("session moved back to the replica", fields...)
	case wire.ForwardRetry:
		e.log.Warn("session moved to the primary; its client was answered 40001 to retry", fields...)
	case wire.ForwardDirect:
		e.log.Warn("session relayed to the primary from its start: the upstream is unreachable", fields...)
	default: // refused, limit
		e.log.Warn("session not moved to the primary", fields...)
	}
}
