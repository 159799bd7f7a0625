package sidecar

import (
	"go.uber.org/zap"

	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// events is the relay's Observer: it logs each read-only violation, counts it, and hands it to
// the shim, which taints the requests it may belong to.
type events struct {
	log     *zap.Logger
	shim    *router.Shim    // nil when the shim is off
	metrics func() *metrics // set once the relay exists; events arrive only after that
}

func (e *events) SessionOpened(wire.SessionInfo) {}

func (e *events) SessionClosed(wire.SessionEnd) {}

func (e *events) ReadOnly(v wire.ReadOnlyViolation) {
	e.metrics().violations.Inc()
	e.log.Warn("read-only violation",
		zap.Uint64("session", v.SessionID),
		zap.String("sqlstate", v.Code),
		zap.String("message", v.Message),
		zap.Stringer("tx_status", v.TxStatus),
		zap.String("trace_id", v.TraceID))
	if e.shim != nil {
		e.shim.ReadOnly(router.Violation{
			SessionID: v.SessionID,
			Time:      v.Time,
			Code:      v.Code,
			Message:   v.Message,
			TraceID:   v.TraceID,
		})
	}
}

func (e *events) WriteCommitted(wire.WriteCommitted) {
	e.metrics().writes.Inc()
}
