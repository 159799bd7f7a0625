package lag

import (
	"fmt"
	"time"

	"go.uber.org/zap"
)

// identity tells one server from another. A streaming replica shares its
// primary's system identifier, and promotion moves it to a new timeline, so a
// promoted replica and the primary it left differ by timeline; two replicas
// promoted apart may both pick the same new timeline, so the postmaster's
// start time tells those apart. One server reached by two addresses (its own
// port and a proxy such as Fly's HAProxy in front of the leader) has one
// identity, however it is reached.
type identity struct {
	systemID uint64    // pg_control_system().system_identifier; 0 when unknown (not compared)
	timeline uint32    // see pollQuery and identityQuery; 0 when unknown
	started  time.Time // pg_postmaster_start_time()
}

// conflict returns why up and pri, the last states of the upstream and of the
// configured primary, are two primaries, or "" when they are not: both must
// be up primaries of different identities.
func (m *Monitor) conflict(up, pri serverState) string {
	if !up.up() || !pri.up() || up.role != RolePrimary || pri.role != RolePrimary {
		return ""
	}
	a, b := up.id, pri.id
	where := fmt.Sprintf("the upstream %s and the primary %s are both primaries", m.upstream.addr, m.primary.addr)
	switch {
	case a.systemID != 0 && b.systemID != 0 && a.systemID != b.systemID:
		return fmt.Sprintf("%s, of different systems (%d and %d)", where, a.systemID, b.systemID)
	case a.timeline != b.timeline:
		return fmt.Sprintf("%s of system %d, on timelines %d and %d: a promoted replica beside a primary that still runs",
			where, a.systemID, a.timeline, b.timeline)
	case !a.started.Equal(b.started):
		return fmt.Sprintf("%s of system %d on timeline %d, but different servers (started at %s and %s)",
			where, a.systemID, a.timeline, a.started.UTC().Format(time.RFC3339Nano), b.started.UTC().Format(time.RFC3339Nano))
	}
	return ""
}

// checkPrimaries updates the two-primaries verdict after a poll that
// finished at now (see Status.TwoPrimaries). A conflict counts once a poll of
// each server sent after it was first seen shows it too, so that two polls
// that straddle a restart or a failover of one server (the upstream seen after
// it, the primary before) are not taken for two primaries; when one is seen,
// both servers are asked for such a poll at once. The verdict holds while
// either server is down, since nothing new is then known, and ends with the
// first pair of polls without conflict, or an upstream in recovery. m.mu
// must be held.
func (m *Monitor) checkPrimaries(now time.Time) {
	if m.primary == nil {
		return
	}
	if m.up.up() && m.up.role != RolePrimary {
		m.twoPrimaries, m.conflictSeen = "", time.Time{}
		return
	}
	if !m.up.up() || !m.pri.up() {
		return
	}
	reason := m.conflict(m.up, m.pri)
	switch {
	case reason == "":
		m.twoPrimaries, m.conflictSeen = "", time.Time{}
	case m.twoPrimaries != "":
		m.twoPrimaries = reason
	case m.conflictSeen.IsZero():
		m.conflictSeen = now
		signal(m.upstream.soon)
		signal(m.primary.soon)
	case m.up.startedAt.After(m.conflictSeen) && m.pri.startedAt.After(m.conflictSeen):
		m.twoPrimaries, m.conflictSeen = reason, time.Time{}
	}
}

// logPrimaries logs the start and the end of two primaries, once each.
func (m *Monitor) logPrimaries(was, now string) {
	switch {
	case was == "" && now != "":
		m.log.Error("two primaries: this region's upstream accepts writes, and so does the configured primary",
			zap.String("upstream", m.upstream.addr), zap.String("primary", m.primary.addr), zap.String("reason", now))
		if m.cfg.OnTwoPrimaries != nil {
			m.cfg.OnTwoPrimaries()
		}
	case was != "" && now == "":
		m.log.Info("two primaries no more", zap.String("upstream", m.upstream.addr), zap.String("primary", m.primary.addr))
	}
}
