package sidecar

import (
	"go.uber.org/zap"

	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// events is the relay's Observer: it logs each standby refusal, counts it, and hands it to the
// shim, which taints the requests it may belong to.
type events struct {
	log     *zap.Logger
	shim    *router.Shim    // nil when the shim is off
	metrics func() *metrics // set once the relay exists; events arrive only after that
	// upstreamPrimary reports whether the monitor last saw the upstream out of recovery.
	upstreamPrimary func() bool
}

func (e *events) SessionOpened(wire.SessionInfo) {}

func (e *events) SessionClosed(wire.SessionEnd) {}

// ReadOnly: 25006 is a refusal wherever it comes from (a primary's read-only transaction is
// surfaced as before: the primary region replays nothing). 0A000 and 55000 have causes other
// than recovery, so from an upstream known to be a primary they are the app's own errors and
// pass by unremarked; from a standby, or one whose role is not known yet, they are refusals
// (one that was not about recovery fails the same way in the primary region, which wastes a
// replay and loses nothing).
func (e *events) ReadOnly(v wire.ReadOnlyViolation) {
	if v.Code != "25006" && e.upstreamPrimary() {
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

func (e *events) WriteCommitted(wire.WriteCommitted) {
	e.metrics().writes.Inc()
}
