package lag

import "time"

// The rate rule's tunables; see outOfReach.
const (
	// rateWindow is the least span over which the replay rate is measured:
	// from the newest kept sample at least this old to the latest poll.
	rateWindow = time.Second
	// sampleSpacing is the least time between two samples a replayHistory
	// keeps, so that polls every WaitInterval do not crowd out older ones.
	sampleSpacing = rateWindow / 8
	// historyLen is how many samples a replayHistory keeps: two rateWindows
	// at sampleSpacing, so a sample rateWindow old is always at hand.
	historyLen = 16
	// minUnreachableGap is the least gap (lsn minus the replay position), in
	// bytes, that the rate rule ever calls out of reach: one default WAL
	// segment, which a healthy replica replays in well under the default
	// consistency wait. Below it a short stall (a replay conflict, an I/O
	// hiccup) can make the measured rate say nothing about the next second,
	// so smaller gaps are left to the wait.
	minUnreachableGap = 16 << 20
	// reachFactor is how much faster than measured the replica would have to
	// replay for the rate rule to still call a gap out of reach.
	reachFactor = 4
)

// replaySample is what one upstream poll of a replica found.
type replaySample struct {
	at       time.Time // when the poll returned
	replayed LSN       // pg_last_wal_replay_lsn()
	received LSN       // pg_last_wal_receive_lsn(); 0 when unknown (no WAL receiver, e.g. archive recovery)
}

// replayHistory keeps a replica's recent samples for the rate rule, at least
// sampleSpacing apart, the oldest overwritten first. Its zero value is empty.
type replayHistory struct {
	ring [historyLen]replaySample
	n    int // samples kept, up to historyLen
	next int // where the next sample goes
}

// add keeps s unless the newest kept sample is less than sampleSpacing older.
// A replay position that went backwards (a replica rebuilt under the same
// address) starts the history over.
func (h *replayHistory) add(s replaySample) {
	if h.n > 0 {
		newest := h.ring[(h.next+historyLen-1)%historyLen]
		switch {
		case s.replayed < newest.replayed:
			h.reset()
		case s.at.Sub(newest.at) < sampleSpacing:
			return
		}
	}
	h.ring[h.next] = s
	h.next = (h.next + 1) % historyLen
	h.n = min(h.n+1, historyLen)
}

// reset forgets every sample, e.g. when the upstream goes down or stops being
// a replica: a rate must not span an outage.
func (h *replayHistory) reset() {
	*h = replayHistory{}
}

// base returns the newest kept sample taken at least rateWindow before at,
// the start of the window the rate rule measures; false when there is none
// yet.
func (h *replayHistory) base(at time.Time) (replaySample, bool) {
	for i := 1; i <= h.n; i++ {
		s := h.ring[(h.next-i+historyLen)%historyLen]
		if at.Sub(s.at) >= rateWindow {
			return s, true
		}
	}
	return replaySample{}, false
}

// outOfReach is the rate rule: it reports whether a replica whose replay went
// from base to last (two polls at least rateWindow apart) cannot replay lsn
// by deadline. It says so only when all of these hold:
//
//   - the replica had WAL to replay during the whole window: at last it has
//     still not replayed what it had already received at base. Replay
//     positions only grow, so it never ran dry in between, and the bytes it
//     replayed are what it can do, not what an idle primary gave it (an idle
//     primary makes the rate 0, which says nothing);
//   - the gap, lsn minus last's replay position, is at least
//     minUnreachableGap;
//   - the gap exceeds reachFactor times what the replica would replay at its
//     measured rate between last and deadline (counted from last, not from
//     now, which only gives the replica more time).
//
// A wrong "out of reach" costs one needless replay in the primary region and
// a wrong "in reach" only the wait, so every doubt (no deadline, no receive
// position, a deadline already past, a replica that caught up with its WAL
// during the window, as when the WAL stream rather than replay is the
// bottleneck) answers false.
func outOfReach(lsn LSN, deadline time.Time, base, last replaySample) bool {
	if deadline.IsZero() || lsn <= last.replayed || last.replayed < base.replayed {
		return false
	}
	gap := uint64(lsn - last.replayed)
	if gap < minUnreachableGap {
		return false
	}
	if base.received == 0 || last.replayed >= base.received {
		return false
	}
	window := last.at.Sub(base.at)
	left := deadline.Sub(last.at)
	if window < rateWindow || left <= 0 {
		return false
	}
	rate := float64(last.replayed-base.replayed) / window.Seconds() // bytes per second
	return float64(gap) > reachFactor*rate*left.Seconds()
}
