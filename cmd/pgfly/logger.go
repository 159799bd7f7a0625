package main

import (
	"fmt"
	"io"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Repeated warnings are sampled, per message: in each second the first warnFirst lines of a
// message are written, then one in warnThereafter. A storm of bad connections (3,267 warning
// lines for one, before) then costs tens of lines, and the next warning written says how many
// of it were dropped (sampled_away). Other levels are not sampled: info lines are the sessions'
// records, and errors are rare and each one matters.
const (
	warnFirst      = 10
	warnThereafter = 100
)

// newLogger returns a JSON logger writing to w at the named level.
func newLogger(level string, w io.Writer) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("invalid value %q for flag --log-level: want debug, info, warn or error", level)
	}
	cfg := zap.NewProductionEncoderConfig()
	cfg.TimeKey = "time"
	cfg.EncodeTime = zapcore.ISO8601TimeEncoder
	cfg.EncodeDuration = zapcore.MillisDurationEncoder
	enc := zapcore.NewJSONEncoder(cfg)
	out := zapcore.Lock(zapcore.AddSync(w))

	warn := zap.LevelEnablerFunc(func(l zapcore.Level) bool { return l == zapcore.WarnLevel && lvl.Enabled(l) })
	rest := zap.LevelEnablerFunc(func(l zapcore.Level) bool { return l != zapcore.WarnLevel && lvl.Enabled(l) })
	dropped := &dropCounts{n: make(map[string]int64)}
	sampled := zapcore.NewSamplerWithOptions(dropReport{zapcore.NewCore(enc, out, warn), dropped},
		time.Second, warnFirst, warnThereafter,
		zapcore.SamplerHook(func(e zapcore.Entry, d zapcore.SamplingDecision) {
			if d&zapcore.LogDropped != 0 {
				dropped.add(e.Message)
			}
		}))
	return zap.New(zapcore.NewTee(sampled, zapcore.NewCore(enc.Clone(), out, rest))), nil
}

// dropCounts counts, per message, the warnings the sampler dropped since the last one
// written. Messages are pgfly's own constant texts, so the map stays small.
type dropCounts struct {
	mu sync.Mutex
	n  map[string]int64
}

func (d *dropCounts) add(msg string) {
	d.mu.Lock()
	d.n[msg]++
	d.mu.Unlock()
}

// take returns and forgets the count for msg.
func (d *dropCounts) take(msg string) int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := d.n[msg]
	delete(d.n, msg)
	return n
}

// dropReport is the core under the warnings' sampler: each line it writes says how many
// lines of its message the sampler dropped since the previous one, if any.
type dropReport struct {
	zapcore.Core
	dropped *dropCounts
}

func (c dropReport) With(fields []zapcore.Field) zapcore.Core {
	return dropReport{c.Core.With(fields), c.dropped}
}

func (c dropReport) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c dropReport) Write(e zapcore.Entry, fields []zapcore.Field) error {
	if n := c.dropped.take(e.Message); n > 0 {
		fields = append(fields[:len(fields):len(fields)], zap.Int64("sampled_away", n))
	}
	return c.Core.Write(e, fields)
}
