package lag

import (
	"container/heap"
	"context"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// pollQuery is the one query of every poll, of the upstream and of the
// primary alike: the role, the replay (or, on a primary, the write) position,
// the age of the last replayed commit, the receive position (NULL on a
// primary and without a WAL receiver), whether replay is paused, the
// timeline and the postmaster's start time. pg_is_wal_replay_paused() is also
// true while a pause is requested but not yet reached (PG14 and later), which
// is the same for a waiter: replay stops before the next record. It and
// pg_walfile_name() fail on the wrong side of recovery, hence the CASEs. LSNs
// come back as text because pgx has no pg_lsn type. A primary's timeline is
// the first 8 hex digits of its current WAL file's name, exact; a standby's
// is its WAL receiver's, NULL unless the role may see it (a superuser or
// pg_read_all_stats). Nothing here reads the control file (identityQuery
// does, rarely): it runs every WaitInterval while WaitFor waits.
const pollQuery = `select pg_is_in_recovery(),
	(case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end)::text,
	extract(epoch from now() - pg_last_xact_replay_timestamp())::float8,
	pg_last_wal_receive_lsn()::text,
	case when pg_is_in_recovery() then pg_is_wal_replay_paused() else false end,
	case when pg_is_in_recovery()
		then (select received_tli from pg_stat_wal_receiver)::bigint
		else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint
	end,
	pg_postmaster_start_time()`

// identityQuery reads the control file: the system identifier, and the
// timeline of the last checkpoint (on a standby, restartpoint), which stands
// for a standby's timeline when its WAL receiver's is hidden and trails a
// switch to a new timeline until the next restartpoint. A poller runs it when
// a poll finds a server it has not identified (a new postmaster start time),
// and otherwise at most every Interval while something is missing, never
// every poll: the control file is read from disk, and older releases read it
// without ControlFileLock, so that a read torn by a concurrent write (a
// standby rewrites it every few seconds while it flushes data) fails its CRC
// check. Its failure does not fail the poll.
const identityQuery = `select (select system_identifier from pg_control_system()),
	(select timeline_id from pg_control_checkpoint())::bigint`

// serverState is what the last poll of one server found.
type serverState struct {
	polled    bool      // at least one poll finished
	err       error     // nil when the poll succeeded
	downSince time.Time // when the current outage began
	startedAt time.Time // when the poll's query was sent
	checkedAt time.Time // when the poll finished
	role      Role
	lsn       LSN      // pg_last_wal_replay_lsn() on a replica, pg_current_wal_lsn() on a primary
	received  LSN      // a replica's receive position; 0 when unknown
	paused    bool     // a replica's replay is paused or a pause is requested
	replayAge *float64 // seconds since the last replayed commit; nil when unknown
	// replayedAll: a replica has replayed all the WAL it has received. Without a primary to
	// compare with, that is the best sign that it is not behind while the primary is idle.
	replayedAll bool
	id          identity
}

// up reports whether the last poll succeeded.
func (s *serverState) up() bool { return s.polled && s.err == nil }

// poller polls one server, the upstream or the primary: both run pollQuery in
// the same loop (Monitor.watch), and the Monitor decides what a result means
// (publish) and how long to wait for the next (delay).
type poller struct {
	name  string // "upstream" or "primary": the log field and the start of each message
	addr  string // host:port, for logs
	conns *conns

	ready     chan struct{} // closed after the first poll, or by Close
	readyOnce sync.Once
	waiter    chan struct{} // a WaitFor arrived: poll every WaitInterval (upstream only)
	soon      chan struct{} // poll within DownInterval of the last poll: SuspectDown
	polls     atomic.Uint64

	// What identityQuery last found; only p's loop touches these.
	id         identity  // systemID 0 when unknown; timeline is the checkpoint's
	idTried    time.Time // when it last ran, whether it worked or not
	idTriedFor time.Time // the postmaster start time it last ran for
	idWarned   bool      // its failure was logged
}

// newPoller returns a poller of the server at addr over conns.
func newPoller(name, addr string, conns *conns) *poller {
	return &poller{
		name:   name,
		addr:   addr,
		conns:  conns,
		ready:  make(chan struct{}),
		waiter: make(chan struct{}, 1),
		soon:   make(chan struct{}, 1),
	}
}

// markReady closes p.ready once.
func (p *poller) markReady() {
	p.readyOnce.Do(func() { close(p.ready) })
}

// signal wakes p's loop through ch (p.waiter or p.soon) without blocking;
// signals sent while one is pending coalesce into it.
func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// watch is p's polling loop; it ends with the Monitor.
func (m *Monitor) watch(p *poller) {
	defer m.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		ok := m.poll(p)
		p.markReady()
		polled := time.Now()
		next := polled.Add(m.delay(p, ok))
		for wait := true; wait; {
			timer.Reset(time.Until(next))
			select {
			case <-m.ctx.Done():
				return
			case <-timer.C:
				wait = false
			case <-p.waiter:
				// A waiter arrived: poll sooner, but never more often
				// than every WaitInterval, nor faster while down.
				next = earliest(next, polled.Add(m.delay(p, ok)))
			case <-p.soon:
				// While down the server is probed every DownInterval
				// anyway; while up a session's failure is news.
				if ok {
					next = earliest(next, polled.Add(m.cfg.DownInterval))
				}
			}
		}
	}
}

// earliest returns the earlier of a and b.
func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// delay is how long p's loop sleeps after a poll that succeeded (ok) or not:
// DownInterval while the server is down (or Interval, when that is shorter),
// else for the upstream WaitInterval while anyone waits, else Interval.
func (m *Monitor) delay(p *poller, ok bool) time.Duration {
	if !ok {
		return min(m.cfg.DownInterval, m.cfg.Interval)
	}
	if p == m.upstream {
		m.mu.Lock()
		waiting := m.waiters.Len() > 0
		m.mu.Unlock()
		if waiting {
			return m.cfg.WaitInterval
		}
	}
	return m.cfg.Interval
}

// poll runs one poll of p's server and publishes what it found. It reports
// whether the poll succeeded.
func (m *Monitor) poll(p *poller) bool {
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.QueryTimeout)
	var (
		inRecovery   bool
		lsnText      *string
		replayAge    *float64
		receivedText *string
		paused       bool
		timeline     *int64
		pmStart      time.Time
		lsn          LSN
		received     LSN
	)
	started := time.Now()
	err := p.conns.queryRow(ctx, pollQuery, &inRecovery, &lsnText, &replayAge, &receivedText, &paused,
		&timeline, &pmStart)
	cancel()
	p.polls.Add(1)
	if m.ctx.Err() != nil {
		return false // closing: the error is ours, not the server's
	}
	if err == nil && lsnText != nil {
		lsn, err = ParseLSN(*lsnText)
	}
	if err == nil && receivedText != nil {
		received, err = ParseLSN(*receivedText)
	}
	cur := serverState{polled: true, err: err, startedAt: started, checkedAt: time.Now(), role: RoleUnknown}
	if err == nil {
		cur.role = RolePrimary
		if inRecovery {
			cur.role = RoleReplica
		}
		cur.lsn = lsn
		cur.replayAge = replayAge
		cur.id = m.identify(p, pmStart, timeline)
		if inRecovery {
			cur.received = received
			cur.paused = paused
			cur.replayedAll = received != 0 && received <= lsn
		}
	}
	m.publish(p, cur)
	return err == nil
}

// identify returns the identity of p's server, which a poll found started at
// pmStart and on timeline (nil when hidden), running identityQuery when it
// must (see there). Unknown parts are zero.
func (m *Monitor) identify(p *poller, pmStart time.Time, timeline *int64) identity {
	known := p.id.started.Equal(pmStart)
	stale := !known || p.id.systemID == 0 || timeline == nil
	if !p.idTriedFor.Equal(pmStart) || stale && time.Since(p.idTried) >= m.cfg.Interval {
		p.idTried, p.idTriedFor = time.Now(), pmStart
		ctx, cancel := context.WithTimeout(m.ctx, m.cfg.QueryTimeout)
		var systemID, checkpointTLI int64
		err := p.conns.queryRow(ctx, identityQuery, &systemID, &checkpointTLI)
		cancel()
		switch {
		case err == nil:
			// A bigint in SQL, unsigned in pg_control.
			p.id = identity{systemID: uint64(systemID), timeline: uint32(checkpointTLI), started: pmStart}
			known = true
		case m.ctx.Err() == nil && !p.idWarned:
			p.idWarned = true
			m.log.Warn(p.name+": cannot read the system identifier; two primaries are told apart by timeline and start time only",
				zap.String(p.name, p.addr), zap.Error(err))
		}
	}
	id := identity{started: pmStart}
	if known {
		id.systemID, id.timeline = p.id.systemID, p.id.timeline
	}
	if timeline != nil {
		id.timeline = uint32(*timeline)
	}
	return id
}

// publish makes cur the last state of p's server: it refreshes the Status,
// wakes the waiters an upstream poll satisfies and logs a change of state.
func (m *Monitor) publish(p *poller, cur serverState) {
	m.mu.Lock()
	state := &m.pri
	if p == m.upstream {
		state = &m.up
	}
	prev := *state
	if cur.err != nil {
		cur.downSince = cur.checkedAt
		if prev.polled && prev.err != nil {
			cur.downSince = prev.downSince
		}
	}
	*state = cur
	if p == m.upstream && cur.err == nil {
		m.lastRole = cur.role
	}
	if p == m.upstream {
		if cur.role == RoleReplica {
			m.replays.add(replaySample{at: cur.checkedAt, replayed: cur.lsn, received: cur.received})
		} else {
			m.replays.reset()
		}
	}
	wasTwo := m.twoPrimaries
	m.checkPrimaries(cur.checkedAt)
	two := m.twoPrimaries
	m.status = m.snapshot()
	if p == m.upstream && cur.err == nil {
		for m.waiters.Len() > 0 && m.waiters[0].lsn <= cur.lsn {
			close(heap.Pop(&m.waiters).(*waiter).done)
		}
		m.wakeUnreachable()
	}
	m.mu.Unlock()
	p.logChange(m.log, prev, cur)
	m.logPrimaries(wasTwo, two)
}

// logChange logs what changed between two polls of p's server: one line
// when it goes down, comes back, changes role or pauses its replay, and
// debug lines only while it stays down.
func (p *poller) logChange(log *zap.Logger, prev, cur serverState) {
	addr := zap.String(p.name, p.addr)
	err, lsn := cur.err, cur.lsn
	switch {
	case err != nil && (!prev.polled || prev.err == nil):
		log.Warn(p.name+" down", addr, zap.Error(err))
	case err != nil:
		log.Debug(p.name+" still down", addr, zap.Error(err))
	case !prev.polled:
		log.Info(p.name+" up", addr, zap.String("role", string(cur.role)), zap.Stringer("replay_lsn", lsn),
			zap.Bool("replay_paused", cur.paused))
	case prev.err != nil:
		log.Info(p.name+" up again", addr, zap.String("role", string(cur.role)),
			zap.Duration("down_for", cur.checkedAt.Sub(prev.downSince)), zap.Stringer("replay_lsn", lsn),
			zap.Bool("replay_paused", cur.paused))
	case prev.role != cur.role && prev.role != RoleUnknown:
		log.Info(p.name+" role changed", addr, zap.String("from", string(prev.role)), zap.String("to", string(cur.role)))
	case !prev.paused && cur.paused:
		log.Info(p.name+" replay paused", addr, zap.Stringer("replay_lsn", lsn))
	case prev.paused && !cur.paused:
		log.Info(p.name+" replay resumed", addr, zap.Stringer("replay_lsn", lsn))
	}
	if p.name == "primary" && cur.err == nil && cur.role == RoleReplica && (!prev.up() || prev.role != RoleReplica) {
		log.Warn("the configured primary is in recovery: no primary WAL position, no lag in bytes", addr)
	}
}
