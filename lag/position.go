package lag

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// A Position is a place in a cluster's WAL history: an LSN on a timeline of a system. Two
// LSNs compare only on one timeline of one system: after a promotion the new timeline forks
// from the old one at its switch point, and an LSN of the old one past it was never written
// on the new one, however far the new one has got. PostgreSQL's own comparison of pg_lsn
// values is timeline-blind.
type Position struct {
	LSN      LSN
	Timeline uint32 // 0 when unknown
	SystemID uint64 // 0 when unknown
}

// String formats p as the bookmark cookie holds it: "16/B374D848@2:7299913487211118352", the
// LSN, then the timeline and the system identifier when they are known.
func (p Position) String() string {
	s := p.LSN.String()
	if p.Timeline != 0 {
		s += "@" + strconv.FormatUint(uint64(p.Timeline), 10)
		if p.SystemID != 0 {
			s += ":" + strconv.FormatUint(p.SystemID, 10)
		}
	}
	return s
}

// ParsePosition reads what Position.String writes. A bare LSN, as bookmarks were before
// they carried a timeline, is a Position of unknown timeline.
func ParsePosition(s string) (Position, error) {
	lsnText, history, hasHistory := strings.Cut(s, "@")
	lsn, err := ParseLSN(lsnText)
	if err != nil {
		return Position{}, err
	}
	p := Position{LSN: lsn}
	if !hasHistory {
		return p, nil
	}
	tli, sys, hasSys := strings.Cut(history, ":")
	t, err := strconv.ParseUint(tli, 10, 32)
	if err != nil || t == 0 {
		return Position{}, fmt.Errorf("parse position %q: the timeline is not a positive number", s)
	}
	p.Timeline = uint32(t)
	if hasSys {
		if p.SystemID, err = strconv.ParseUint(sys, 10, 64); err != nil || p.SystemID == 0 {
			return Position{}, fmt.Errorf("parse position %q: the system identifier is not a positive number", s)
		}
	}
	return p, nil
}

// ErrOtherHistory is returned by WaitForPosition for a position that the upstream's LSN cannot
// be compared with: of another timeline or system, or of one the monitor does not know.
var ErrOtherHistory = errors.New("lag: the position is not on the upstream's timeline")

// PrimaryPosition is PrimaryLSN with the timeline the primary writes and its system
// identifier, for a bookmark that a replica can compare safely.
func (m *Monitor) PrimaryPosition(ctx context.Context) (Position, error) {
	lsn, tli, err := m.primaryLSN(ctx)
	if err != nil {
		return Position{}, err
	}
	return Position{LSN: lsn, Timeline: tli, SystemID: m.Status().PrimarySystemID}, nil
}

// WaitForPosition is WaitFor for a position: at once ErrOtherHistory when the position is not
// on the upstream's timeline of the upstream's system as the monitor last saw them (or either
// is unknown), since comparing their LSNs could take a position that was never replayed for
// reached. pgfly does not read timeline history files (a superuser's or a replication
// connection's), so a position of an older timeline is not compared through its switch point:
// the caller serves it from the primary once instead.
func (m *Monitor) WaitForPosition(ctx context.Context, p Position) error {
	st := m.Status()
	if p.Timeline == 0 || st.Timeline != p.Timeline || p.SystemID != 0 && st.SystemID != 0 && p.SystemID != st.SystemID {
		return ErrOtherHistory
	}
	return m.WaitFor(ctx, p.LSN)
}

// timelineOf reads the timeline from a WAL file name (its first 8 hex digits).
func timelineOf(walFile string) (uint32, error) {
	if len(walFile) < 8 {
		return 0, fmt.Errorf("WAL file name %q is too short", walFile)
	}
	t, err := strconv.ParseUint(walFile[:8], 16, 32)
	if err != nil {
		return 0, fmt.Errorf("WAL file name %q: %w", walFile, err)
	}
	return uint32(t), nil
}
