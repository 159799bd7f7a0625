package sidecar

import (
	"testing"

	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgfly/pgfly/wire"
)

// TestForwardedEvents: each Forward is counted by its outcome and logged with its session,
// user, outcome and reason; at info when the client saw nothing, as a warning otherwise. (The
// relay reports them once it forwards; this drives the observer directly.)
func TestForwardedEvents(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	m := newMetrics(nil, nil, nil)
	e := &events{log: zap.New(core), metrics: func() *metrics { return m }}
	for _, tc := range []struct {
		outcome, reason string
		level           zapcore.Level
	}{
		{wire.ForwardMoved, "", zapcore.InfoLevel},
		{wire.ForwardRetry, "read before the write", zapcore.WarnLevel},
		{wire.ForwardRefused, "temporary table", zapcore.WarnLevel},
		{wire.ForwardLimit, "100 sessions on the primary", zapcore.WarnLevel},
		{wire.ForwardDirect, "upstream unreachable", zapcore.WarnLevel},
		{wire.ForwardBack, "", zapcore.InfoLevel},
	} {
		t.Run(tc.outcome, func(t *testing.T) {
			before := forwards(t, m, tc.outcome)
			e.Forwarded(wire.Forward{SessionID: 7, User: "app", Outcome: tc.outcome, Reason: tc.reason})
			if got := forwards(t, m, tc.outcome) - before; got != 1 {
				t.Errorf("pgfly_forwards_total{outcome=%q}: got an increase of %v, want 1", tc.outcome, got)
			}
			entries := logs.TakeAll()
			if len(entries) != 1 {
				t.Fatalf("got %d log lines, want 1: %v", len(entries), entries)
			}
			fields := entries[0].ContextMap()
			if entries[0].Level != tc.level || fields["session"] != uint64(7) || fields["user"] != "app" ||
				fields["outcome"] != tc.outcome || fields["reason"] != tc.reason {
				t.Errorf("got %v %q %v, want %v with session 7, user app, outcome %s, reason %q",
					entries[0].Level, entries[0].Message, fields, tc.level, tc.outcome, tc.reason)
			}
		})
	}
}

func forwards(t *testing.T, m *metrics, outcome string) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.forwards.WithLabelValues(outcome).Write(&d); err != nil {
		t.Fatal(err)
	}
	return d.GetCounter().GetValue()
}
