package main

import (
	"go.uber.org/zap"

	"github.com/pgfly/pgfly/wire"
)

// events receives the relay's events and hands them to whoever acts on them.
type events struct {
	log *zap.Logger
}

func (e *events) SessionOpened(wire.SessionInfo) {}

func (e *events) SessionClosed(wire.SessionEnd) {}

func (e *events) ReadOnly(v wire.ReadOnlyViolation) {
	e.log.Warn("read-only violation",
		zap.Uint64("session", v.SessionID),
		zap.String("sqlstate", v.Code),
		zap.String("message", v.Message),
		zap.Stringer("tx_status", v.TxStatus),
		zap.String("trace_id", v.TraceID))
}

func (e *events) WriteCommitted(w wire.WriteCommitted) {
	e.log.Debug("write committed", zap.Uint64("session", w.SessionID))
}
