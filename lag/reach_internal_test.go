package lag

import (
	"testing"
	"time"
)

// The rate rule is a pure function of two samples, so it is specified here
// without a server; TestWaitForFarBehind runs it against a real replica.

func TestOutOfReach(t *testing.T) {
	const mib = 1 << 20
	t0 := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	t1 := t0.Add(time.Second)
	at := func(when time.Time, replayed, received LSN) replaySample {
		return replaySample{at: when, replayed: replayed, received: received}
	}
	const p = LSN(1 << 32) // a replay position to start from
	for _, tt := range []struct {
		name     string
		lsn      LSN
		deadline time.Time
		base     replaySample
		last     replaySample
		want     bool
	}{
		{
			name: "stalled replay, far behind",
			lsn:  p + 64*mib, deadline: t1.Add(500 * time.Millisecond),
			base: at(t0, p, p+64*mib), last: at(t1, p, p+64*mib),
			want: true,
		},
		{
			name: "slow replay, far behind: 1 MiB/s, 100 MiB to go, 0.5s left",
			lsn:  p + 101*mib, deadline: t1.Add(500 * time.Millisecond),
			base: at(t0, p, p+200*mib), last: at(t1, p+mib, p+200*mib),
			want: true,
		},
		{
			name: "fast enough: 100 MiB/s, 40 MiB to go, 0.5s left",
			lsn:  p + 140*mib, deadline: t1.Add(500 * time.Millisecond),
			base: at(t0, p, p+500*mib), last: at(t1, p+100*mib, p+500*mib),
			want: false,
		},
		{
			name: "within the safety factor: 16 MiB to go at 5 MiB/s for 1s",
			lsn:  p + 5*mib + 16*mib, deadline: t1.Add(time.Second),
			base: at(t0, p, p+100*mib), last: at(t1, p+5*mib, p+100*mib),
			want: false, // 4 × 5 MiB/s × 1s = 20 MiB ≥ 16 MiB
		},
		{
			name: "beyond the safety factor: 21 MiB to go at 5 MiB/s for 1s",
			lsn:  p + 5*mib + 21*mib, deadline: t1.Add(time.Second),
			base: at(t0, p, p+100*mib), last: at(t1, p+5*mib, p+100*mib),
			want: true, // 21 MiB > 20 MiB
		},
		{
			name: "gap below 16 MiB waits even with no replay",
			lsn:  p + 16*mib - 1, deadline: t1.Add(500 * time.Millisecond),
			base: at(t0, p, p+64*mib), last: at(t1, p, p+64*mib),
			want: false,
		},
		{
			name: "idle primary: the replica ran out of WAL in the window",
			lsn:  p + 64*mib, deadline: t1.Add(500 * time.Millisecond),
			base: at(t0, p, p), last: at(t1, p, p),
			want: false,
		},
		{
			name: "caught up with what it had at the window's start",
			lsn:  p + 64*mib, deadline: t1.Add(500 * time.Millisecond),
			base: at(t0, p, p+mib), last: at(t1, p+mib, p+2*mib),
			want: false,
		},
		{
			name: "no receive position (no WAL receiver)",
			lsn:  p + 64*mib, deadline: t1.Add(500 * time.Millisecond),
			base: at(t0, p, 0), last: at(t1, p, 0),
			want: false,
		},
		{
			name: "no deadline",
			lsn:  p + 64*mib,
			base: at(t0, p, p+64*mib), last: at(t1, p, p+64*mib),
			want: false,
		},
		{
			name: "deadline already past",
			lsn:  p + 64*mib, deadline: t1.Add(-time.Millisecond),
			base: at(t0, p, p+64*mib), last: at(t1, p, p+64*mib),
			want: false,
		},
		{
			name: "window shorter than a second",
			lsn:  p + 64*mib, deadline: t1.Add(500 * time.Millisecond),
			base: at(t1.Add(-999*time.Millisecond), p, p+64*mib), last: at(t1, p, p+64*mib),
			want: false,
		},
		{
			name: "already replayed",
			lsn:  p, deadline: t1.Add(500 * time.Millisecond),
			base: at(t0, p, p+64*mib), last: at(t1, p, p+64*mib),
			want: false,
		},
		{
			name: "replay went backwards",
			lsn:  p + 64*mib, deadline: t1.Add(500 * time.Millisecond),
			base: at(t0, p+mib, p+64*mib), last: at(t1, p, p+64*mib),
			want: false,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := outOfReach(tt.lsn, tt.deadline, tt.base, tt.last); got != tt.want {
				t.Errorf("outOfReach(%v, last+%v, %+v, %+v) = %v, want %v",
					tt.lsn, tt.deadline.Sub(tt.last.at), tt.base, tt.last, got, tt.want)
			}
		})
	}
}

func TestReplayHistory(t *testing.T) {
	t0 := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	sample := func(d time.Duration, replayed LSN) replaySample {
		return replaySample{at: t0.Add(d), replayed: replayed, received: replayed + 100}
	}

	t.Run("empty has no base", func(t *testing.T) {
		var h replayHistory
		if s, ok := h.base(t0.Add(time.Hour)); ok {
			t.Errorf("base of an empty history = %+v, want none", s)
		}
	})

	t.Run("base is the newest sample a window old", func(t *testing.T) {
		var h replayHistory
		for i := range 60 { // polls every 50ms for 3s
			h.add(sample(time.Duration(i)*50*time.Millisecond, LSN(1000+i)))
		}
		now := t0.Add(2950 * time.Millisecond)
		s, ok := h.base(now)
		if !ok {
			t.Fatalf("no base at %v", now.Sub(t0))
		}
		if age := now.Sub(s.at); age < rateWindow || age > rateWindow+sampleSpacing {
			t.Errorf("base is %v old, want between %v and %v", age, rateWindow, rateWindow+sampleSpacing)
		}
		if h.n != historyLen {
			t.Errorf("kept %d samples, want %d", h.n, historyLen)
		}
	})

	t.Run("polls closer than the spacing are not kept", func(t *testing.T) {
		var h replayHistory
		for i := range 1000 { // polls every 2ms for 2s
			h.add(sample(time.Duration(i)*2*time.Millisecond, LSN(1000+i)))
		}
		got := h.ring[(h.next+historyLen-1)%historyLen].at.Sub(h.ring[h.next%historyLen].at)
		if min := (historyLen - 1) * sampleSpacing; got < min {
			t.Errorf("kept samples span %v, want at least %v", got, min)
		}
	})

	t.Run("too young for a base", func(t *testing.T) {
		var h replayHistory
		h.add(sample(0, 1000))
		h.add(sample(500*time.Millisecond, 1001))
		if s, ok := h.base(t0.Add(900 * time.Millisecond)); ok {
			t.Errorf("base = %+v with every sample younger than %v, want none", s, rateWindow)
		}
	})

	t.Run("replay going backwards starts over", func(t *testing.T) {
		var h replayHistory
		h.add(sample(0, 1000))
		h.add(sample(time.Second, 999))
		if h.n != 1 {
			t.Errorf("kept %d samples after replay went back, want 1", h.n)
		}
		if s, ok := h.base(t0.Add(2 * time.Second)); !ok || s.replayed != 999 {
			t.Errorf("base = %+v, %v; want the sample after the rewind", s, ok)
		}
	})

	t.Run("reset forgets", func(t *testing.T) {
		var h replayHistory
		h.add(sample(0, 1000))
		h.reset()
		if _, ok := h.base(t0.Add(time.Hour)); ok {
			t.Errorf("base found after reset, want none")
		}
	})
}
