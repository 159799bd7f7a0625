package lag

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// Defaults for the Config tunables left zero.
const (
	// DefaultInterval is how often the upstream and the primary are polled
	// while nobody waits.
	DefaultInterval = time.Second
	// DefaultWaitInterval is how often the upstream is polled while a
	// WaitFor is pending, so waiters wake within a few milliseconds of the
	// replay.
	DefaultWaitInterval = 2 * time.Millisecond
	// DefaultMaxBackoff caps the delay between attempts to reach a server
	// that is down.
	DefaultMaxBackoff = 5 * time.Second
	// DefaultQueryTimeout bounds one monitoring query, connecting included.
	DefaultQueryTimeout = 2 * time.Second
)

// minBackoff is the delay before the first retry of a server that is down;
// it doubles per failure up to Config.MaxBackoff.
const minBackoff = 100 * time.Millisecond

// bookmarkConns is how many connections PrimaryLSN (and the primary's poll)
// may hold open at once.
const bookmarkConns = 4

// applicationName is the application_name of the monitor's sessions unless
// the URL sets one, so they are easy to tell apart in pg_stat_activity.
const applicationName = "pgfly-lag"

// The monitoring queries. Each is a single read-only statement; LSNs come back
// as text because pgx has no pg_lsn type.
const (
	// upstreamQuery is the one query of an upstream poll: the role, the
	// replay (or, on a primary, the write) position, the age of the last
	// replayed commit, the receive position (NULL on a primary and without a
	// WAL receiver) and whether replay is paused. pg_is_wal_replay_paused()
	// is also true while a pause is requested but not yet reached (PG14 and
	// later), which is the same for a waiter: replay stops before the next
	// record. It fails outside recovery, hence the CASE.
	upstreamQuery = `select pg_is_in_recovery(),
	(case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end)::text,
	extract(epoch from now() - pg_last_xact_replay_timestamp())::float8,
	pg_last_wal_receive_lsn()::text,
	case when pg_is_in_recovery() then pg_is_wal_replay_paused() else false end`
	// primaryQuery is the one query of a primary poll.
	primaryQuery = `select pg_current_wal_lsn()::text`
	// bookmarkQuery is PrimaryLSN's query: the insert position, its offset
	// in its WAL segment and the WAL page size, or NULLs on a server in
	// recovery (where pg_current_wal_insert_lsn() would fail). See
	// PrimaryLSN for why it reads the insert position.
	bookmarkQuery = `select l::text, (pg_walfile_name_offset(l)).file_offset, current_setting('wal_block_size')::int
	from (select case when pg_is_in_recovery() then null else pg_current_wal_insert_lsn() end as l) as s`
)

// ErrClosed is returned by a Monitor's methods once Close has been called.
var ErrClosed = errors.New("lag: monitor closed")

// ErrNoPrimary is returned by PrimaryLSN when no primary is configured and the
// upstream is a replica, or when the configured primary is in recovery.
var ErrNoPrimary = errors.New("lag: no primary to ask: the server is in recovery")

// ErrUnreachable is returned by WaitFor as soon as the Monitor can tell that
// the upstream, a replica, will not replay the LSN before ctx's deadline:
// its replay is paused, or it is so far behind at the rate it replays that
// it cannot catch up in time (see WaitFor). Waiting longer would be wasted;
// the caller should serve the request elsewhere.
var ErrUnreachable = errors.New("lag: the upstream cannot replay the LSN in time")

// Config configures a Monitor. Zero durations take their defaults.
type Config struct {
	// Upstream is the Postgres URL of the server pgfly relays to, with
	// credentials for the monitoring queries (any login role may run them).
	Upstream string
	// Primary is the optional Postgres URL of the primary, polled for its
	// WAL position and asked by PrimaryLSN. When it names the upstream's
	// host and port it is not polled separately.
	Primary string
	// Interval is how often the servers are polled while no WaitFor is
	// pending; DefaultInterval when zero.
	Interval time.Duration
	// WaitInterval is how often the upstream is polled while at least one
	// WaitFor is pending; DefaultWaitInterval when zero.
	WaitInterval time.Duration
	// MaxBackoff caps the retry delay while a server is down, which starts
	// at 100ms and doubles per failure; DefaultMaxBackoff when zero.
	MaxBackoff time.Duration
	// QueryTimeout bounds each monitoring query, connecting included;
	// DefaultQueryTimeout when zero.
	QueryTimeout time.Duration
}

// Role is what the upstream is.
type Role string

// The roles a Status can report.
const (
	// RolePrimary is a server that is not in recovery.
	RolePrimary Role = "primary"
	// RoleReplica is a hot standby.
	RoleReplica Role = "replica"
	// RoleUnknown means the upstream has not answered yet or is down.
	RoleUnknown Role = "unknown"
)

// Status is a snapshot of what the Monitor knows. Values read from a server
// that is down are zero (LSNs) or -1 (lags), never stale.
type Status struct {
	// Role is the upstream's role, from pg_is_in_recovery().
	Role Role
	// UpstreamUp reports whether the last upstream poll succeeded.
	UpstreamUp bool
	// UpstreamError is the last poll's error while the upstream is down, ""
	// while it is up.
	UpstreamError string
	// PrimaryUp reports whether the primary answered its last poll. It is
	// true while the upstream is up and is itself the primary, and false
	// when no primary is known or it is down.
	PrimaryUp bool
	// ReplayLSN is how far the upstream has got: pg_last_wal_replay_lsn() on
	// a replica, pg_current_wal_lsn() on a primary; 0 when unknown.
	ReplayLSN LSN
	// PrimaryLSN is the primary's pg_current_wal_lsn(), 0 when unknown. When
	// the upstream is the primary it equals ReplayLSN.
	PrimaryLSN LSN
	// LagBytes is PrimaryLSN - ReplayLSN, clamped at 0 (the two are polled at
	// different moments), or -1 when either is unknown.
	LagBytes int64
	// ReplayPaused reports whether WAL replay is paused on the upstream, or a
	// pause is requested (pg_is_wal_replay_paused()); false on a primary and
	// while the upstream is down. While it is true WaitFor answers
	// ErrUnreachable for any LSN not replayed yet.
	ReplayPaused bool
	// LagSeconds is 0 when the upstream has replayed PrimaryLSN or is the
	// primary; otherwise the upstream's now() minus the commit time of the
	// last transaction it replayed (clamped at 0), or -1 when unknown. With
	// no primary configured, a replica that has replayed all the WAL it
	// received counts as 0, so that an idle primary does not look like lag;
	// a broken WAL stream then goes unseen here.
	LagSeconds float64
	// CheckedAt is when the last upstream poll finished; zero before the
	// first.
	CheckedAt time.Time
}

// upstreamState is what the last upstream poll found.
type upstreamState struct {
	polled    bool      // at least one poll finished
	err       error     // nil when the poll succeeded
	downSince time.Time // when the current outage began
	role      Role
	lsn       LSN
	received  LSN      // a replica's receive position; 0 when unknown
	paused    bool     // a replica's replay is paused or a pause is requested
	replayAge *float64 // seconds since the last replayed commit; nil when unknown
	// replayedAll: a replica has replayed all the WAL it has received. Without a primary to
	// compare with, that is the best sign that it is not behind while the primary is idle.
	replayedAll bool
	checkedAt   time.Time
}

// primaryState is what the last primary poll found.
type primaryState struct {
	polled    bool
	err       error
	downSince time.Time
	lsn       LSN
}

// Monitor polls the upstream and the primary and serves Status, WaitFor and
// PrimaryLSN. Its methods are safe for concurrent use.
type Monitor struct {
	cfg      Config
	log      *zap.Logger
	upAddr   string
	priAddr  string
	upstream *conns // the upstream poll's connection
	primary  *conns // the primary's poll and PrimaryLSN, or the upstream's when no primary is configured
	pollPri  bool   // whether a primary distinct from the upstream is polled

	ctx      context.Context // the monitor's lifetime, ended by Close
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	kick     chan struct{} // a new waiter arrived
	upReady  chan struct{} // closed after the first upstream poll or by Close
	priReady chan struct{} // closed after the first primary poll or by Close
	polls    atomic.Uint64

	mu        sync.Mutex
	started   bool
	closed    bool
	readyOnce [2]sync.Once
	up        upstreamState
	replays   replayHistory // the upstream's recent replay positions while it is an up replica
	pri       primaryState
	status    Status
	waiters   waiterHeap
}

// New validates cfg and returns a Monitor that has not connected yet; Start
// begins polling. log is used as given (the caller names it, e.g.
// Named("lag")) and may be nil.
func New(cfg Config, log *zap.Logger) (*Monitor, error) {
	if log == nil {
		log = zap.NewNop()
	}
	for _, d := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"interval", &cfg.Interval, DefaultInterval},
		{"wait interval", &cfg.WaitInterval, DefaultWaitInterval},
		{"max backoff", &cfg.MaxBackoff, DefaultMaxBackoff},
		{"query timeout", &cfg.QueryTimeout, DefaultQueryTimeout},
	} {
		if *d.v < 0 {
			return nil, fmt.Errorf("lag: %s %v is negative", d.name, *d.v)
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if cfg.Upstream == "" {
		return nil, errors.New("lag: an upstream URL is required")
	}
	upCfg, upDropped, err := parseURL(cfg.Upstream)
	if err != nil {
		return nil, fmt.Errorf("lag: upstream URL: %w", err)
	}
	upAddr := addrOf(upCfg)
	logDropped(log, "upstream", upAddr, upDropped)
	upDial := newDialer(upCfg, log.With(zap.String("upstream", upAddr)))
	ctx, cancel := context.WithCancel(context.Background())
	m := &Monitor{
		cfg:      cfg,
		log:      log,
		upAddr:   upAddr,
		upstream: newConns(upDial, 1),
		primary:  newConns(upDial, bookmarkConns),
		ctx:      ctx,
		cancel:   cancel,
		kick:     make(chan struct{}, 1),
		upReady:  make(chan struct{}),
		priReady: make(chan struct{}),
	}
	if cfg.Primary != "" {
		priCfg, priDropped, err := parseURL(cfg.Primary)
		if err != nil {
			cancel()
			return nil, fmt.Errorf("lag: primary URL: %w", err)
		}
		m.priAddr = addrOf(priCfg)
		logDropped(log, "primary", m.priAddr, priDropped)
		m.primary = newConns(newDialer(priCfg, log.With(zap.String("primary", m.priAddr))), bookmarkConns)
		m.pollPri = m.priAddr != m.upAddr
	}
	m.status = m.snapshot()
	return m, nil
}

// parseURL parses a Postgres URL, drops the query parameters that
// application frameworks put there for themselves (see dropFrameworkParams)
// and names the monitor's sessions. It returns the names of the parameters
// dropped.
func parseURL(url string) (cfg *pgx.ConnConfig, dropped []string, err error) {
	cfg, err = pgx.ParseConfig(url)
	if err != nil {
		return nil, nil, err
	}
	dropped = dropFrameworkParams(cfg.RuntimeParams)
	if _, ok := cfg.RuntimeParams["application_name"]; !ok {
		cfg.RuntimeParams["application_name"] = applicationName
	}
	return cfg, dropped, nil
}

// logDropped logs the names of the frameworks' parameters that parseURL
// dropped from the URL of the server at addr, what (upstream or primary).
func logDropped(log *zap.Logger, what, addr string, dropped []string) {
	if len(dropped) > 0 {
		log.Info("ignoring application framework parameters in the URL", zap.String(what, addr), zap.Strings("params", dropped))
	}
}

// addrOf is the host:port a config dials first, for logs and for telling
// whether the primary is the upstream.
func addrOf(cfg *pgx.ConnConfig) string {
	return net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
}

// Start starts polling: the upstream at once and then every Interval (every
// WaitInterval while a WaitFor is pending), the primary at once and then
// every Interval. Polling runs until Close. Calling Start again, or after
// Close, does nothing.
func (m *Monitor) Start() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.started || m.closed {
		return
	}
	m.started = true
	m.wg.Add(1)
	go m.watchUpstream()
	if m.pollPri {
		m.wg.Add(1)
		go m.watchPrimary()
	} else {
		m.markReady(1)
	}
}

// markReady closes the ready channel of the upstream (0) or the primary (1)
// once.
func (m *Monitor) markReady(i int) {
	m.readyOnce[i].Do(func() { close([]chan struct{}{m.upReady, m.priReady}[i]) })
}

// Ready waits until the first poll of each server has finished, whether it
// succeeded or not, so Status describes them; it is meant for start-up. It
// returns ctx.Err() if ctx ends first and ErrClosed if the Monitor was
// closed first.
func (m *Monitor) Ready(ctx context.Context) error {
	for _, ch := range []chan struct{}{m.upReady, m.priReady} {
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.up.polled || m.pollPri && !m.pri.polled {
		return ErrClosed
	}
	return nil
}

// Status returns the latest snapshot without querying anything.
func (m *Monitor) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.status
}

// Polls returns how many times the upstream has been polled (failed attempts
// included), for metrics.
func (m *Monitor) Polls() uint64 {
	return m.polls.Load()
}

// WaitFor returns nil once the upstream is up and has replayed lsn
// (ReplayLSN >= lsn), at once if the last poll already showed that. While
// any WaitFor is pending the upstream is polled every WaitInterval; all
// waiters are served by that one loop. WaitFor returns ctx.Err() when ctx
// ends first and ErrClosed when the Monitor is closed. Before Start it only
// waits.
//
// When the upstream is an up replica, WaitFor returns ErrUnreachable instead
// of waiting on, at its start from the last poll (up to Interval old) and
// after each later poll, as soon as that poll shows that lsn will not be
// replayed before ctx's deadline:
//
//   - replay is paused (Status.ReplayPaused), deadline or not: only an
//     operator's resume ends a pause;
//   - or, with a deadline, the rate rule: the replica has had WAL to replay
//     throughout the last second or more, the gap lsn - ReplayLSN is at
//     least 16 MiB, and it is more than 4 times what the replica replayed
//     per second in that window times the time left until the deadline.
//
// The rule leans towards waiting: a wrong ErrUnreachable costs a needless
// replay in the primary region, a wrong wait only the wait. Small gaps and
// a replica that is idle or limited by its WAL stream rather than by replay
// always wait. On a primary, or while the upstream is down, WaitFor only
// waits.
func (m *Monitor) WaitFor(ctx context.Context, lsn LSN) error {
	deadline, _ := ctx.Deadline()
	m.mu.Lock()
	if m.up.err == nil && m.up.polled && m.up.lsn >= lsn {
		m.mu.Unlock()
		return nil
	}
	if m.closed {
		m.mu.Unlock()
		return ErrClosed
	}
	if m.unreachable(lsn, deadline) {
		m.mu.Unlock()
		return ErrUnreachable
	}
	w := &waiter{lsn: lsn, deadline: deadline, done: make(chan struct{})}
	heap.Push(&m.waiters, w)
	m.mu.Unlock()

	select {
	case m.kick <- struct{}{}:
	default: // the loop already has a kick to read
	}

	select {
	case <-w.done:
		return w.err
	case <-ctx.Done():
		m.mu.Lock()
		defer m.mu.Unlock()
		if w.index >= 0 {
			heap.Remove(&m.waiters, w.index)
			return ctx.Err()
		}
		return w.err // woken in the meantime
	}
}

// PrimaryLSN asks the primary (the upstream when no primary is configured)
// for its WAL position now, for a read-your-writes bookmark after a write. It
// reuses pooled connections. It reads pg_current_wal_insert_lsn() rather than
// pg_current_wal_lsn(): after a commit with synchronous_commit=off the commit
// record may not be written yet, and a bookmark from the write position could
// then be reached before the commit is replayed. It returns ErrNoPrimary when
// the server asked is in recovery.
func (m *Monitor) PrimaryLSN(ctx context.Context) (LSN, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.QueryTimeout)
	defer cancel()
	var (
		text      *string
		offset    *int64
		blockSize int64
	)
	if err := m.primary.queryRow(ctx, bookmarkQuery, &text, &offset, &blockSize); err != nil {
		return 0, fmt.Errorf("read primary WAL position: %w", err)
	}
	if text == nil || offset == nil {
		return 0, ErrNoPrimary
	}
	lsn, err := ParseLSN(*text)
	if err != nil {
		return 0, err
	}
	return insertEnd(lsn, *offset, blockSize), nil
}

// The sizes of a WAL page's short header and of the long header that starts
// each segment (64-bit builds). A record never ends right after either.
const (
	walShortHeader = 24
	walLongHeader  = 40
)

// insertEnd turns an insert position into the end of the last inserted
// record, given its offset in its WAL segment and the WAL page size. When
// the last record ended exactly on a page boundary,
// pg_current_wal_insert_lsn() points past the next page's header, while a
// replica that replayed that record reports the boundary itself, and a
// bookmark past the header would wait for WAL that may not come soon.
func insertEnd(lsn LSN, segOffset, blockSize int64) LSN {
	switch {
	case segOffset == walLongHeader:
		return lsn - walLongHeader
	case blockSize > 0 && segOffset > blockSize && segOffset%blockSize == walShortHeader:
		return lsn - walShortHeader
	}
	return lsn
}

// Close stops polling, wakes pending WaitFor calls with ErrClosed and closes
// the monitor's connections. It is idempotent and returns the first error.
func (m *Monitor) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	for m.waiters.Len() > 0 {
		w := heap.Pop(&m.waiters).(*waiter)
		w.err = ErrClosed
		close(w.done)
	}
	m.mu.Unlock()

	m.cancel()
	m.wg.Wait()
	m.markReady(0)
	m.markReady(1)
	errUp := m.upstream.close()
	errPri := m.primary.close()
	if errUp != nil {
		return errUp
	}
	return errPri
}

// watchUpstream is the upstream's polling loop; it ends with the Monitor.
func (m *Monitor) watchUpstream() {
	defer m.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var backoff time.Duration
	for {
		ok := m.pollUpstream()
		m.markReady(0)
		polled := time.Now()
		if ok {
			backoff = 0
		} else {
			backoff = nextBackoff(backoff, m.cfg.MaxBackoff)
		}
		next := polled.Add(m.delay(backoff))
		for wait := true; wait; {
			timer.Reset(time.Until(next))
			select {
			case <-m.ctx.Done():
				return
			case <-timer.C:
				wait = false
			case <-m.kick:
				// A waiter arrived: poll sooner, but never more often
				// than every WaitInterval and never during a backoff.
				if sooner := polled.Add(m.delay(backoff)); sooner.Before(next) {
					next = sooner
				}
			}
		}
	}
}

// delay is how long the upstream loop sleeps after a poll: the backoff while
// the upstream is down, else WaitInterval while anyone waits, else Interval.
func (m *Monitor) delay(backoff time.Duration) time.Duration {
	if backoff > 0 {
		return backoff
	}
	m.mu.Lock()
	waiting := m.waiters.Len() > 0
	m.mu.Unlock()
	if waiting {
		return m.cfg.WaitInterval
	}
	return m.cfg.Interval
}

// nextBackoff doubles the retry delay from minBackoff up to max.
func nextBackoff(cur, max time.Duration) time.Duration {
	if cur == 0 {
		return min(minBackoff, max)
	}
	return min(2*cur, max)
}

// pollUpstream runs one upstream poll, publishes the result, wakes the
// waiters it satisfies and logs a change of state. It reports whether the
// poll succeeded.
func (m *Monitor) pollUpstream() bool {
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.QueryTimeout)
	var (
		inRecovery   bool
		lsnText      *string
		replayAge    *float64
		receivedText *string
		paused       bool
		lsn          LSN
		received     LSN
	)
	err := m.upstream.queryRow(ctx, upstreamQuery, &inRecovery, &lsnText, &replayAge, &receivedText, &paused)
	cancel()
	m.polls.Add(1)
	if m.ctx.Err() != nil {
		return false // closing: the error is ours, not the upstream's
	}
	if err == nil && lsnText != nil {
		lsn, err = ParseLSN(*lsnText)
	}
	if err == nil && receivedText != nil {
		received, err = ParseLSN(*receivedText)
	}
	now := time.Now()

	m.mu.Lock()
	prev := m.up
	cur := upstreamState{polled: true, err: err, checkedAt: now, role: RoleUnknown}
	if err == nil {
		cur.role = RolePrimary
		if inRecovery {
			cur.role = RoleReplica
		}
		cur.lsn = lsn
		cur.replayAge = replayAge
		if inRecovery {
			cur.received = received
			cur.paused = paused
			cur.replayedAll = received != 0 && received <= lsn
		}
	} else {
		cur.downSince = now
		if prev.polled && prev.err != nil {
			cur.downSince = prev.downSince
		}
	}
	m.up = cur
	if cur.role == RoleReplica {
		m.replays.add(replaySample{at: now, replayed: lsn, received: cur.received})
	} else {
		m.replays.reset()
	}
	m.status = m.snapshot()
	if err == nil {
		for m.waiters.Len() > 0 && m.waiters[0].lsn <= lsn {
			close(heap.Pop(&m.waiters).(*waiter).done)
		}
		m.wakeUnreachable()
	}
	m.mu.Unlock()

	addr := zap.String("upstream", m.upAddr)
	switch {
	case err != nil && (!prev.polled || prev.err == nil):
		m.log.Warn("upstream down", addr, zap.Error(err))
	case err != nil:
		m.log.Debug("upstream still down", addr, zap.Error(err))
	case !prev.polled:
		m.log.Info("upstream up", addr, zap.String("role", string(cur.role)), zap.Stringer("replay_lsn", lsn),
			zap.Bool("replay_paused", cur.paused))
	case prev.err != nil:
		m.log.Info("upstream up again", addr, zap.String("role", string(cur.role)),
			zap.Duration("down_for", now.Sub(prev.downSince)), zap.Stringer("replay_lsn", lsn),
			zap.Bool("replay_paused", cur.paused))
	case prev.role != cur.role && prev.role != RoleUnknown:
		m.log.Info("upstream role changed", addr, zap.String("from", string(prev.role)), zap.String("to", string(cur.role)))
	case !prev.paused && cur.paused:
		m.log.Info("upstream replay paused", addr, zap.Stringer("replay_lsn", lsn))
	case prev.paused && !cur.paused:
		m.log.Info("upstream replay resumed", addr, zap.Stringer("replay_lsn", lsn))
	}
	return err == nil
}

// unreachable reports whether the last upstream poll shows that the upstream
// will not replay lsn by deadline (zero for none): see WaitFor. m.mu must be
// held.
func (m *Monitor) unreachable(lsn LSN, deadline time.Time) bool {
	if !m.up.polled || m.up.err != nil || m.up.role != RoleReplica || m.up.lsn >= lsn {
		return false
	}
	if m.up.paused {
		return true
	}
	last := replaySample{at: m.up.checkedAt, replayed: m.up.lsn, received: m.up.received}
	base, ok := m.replays.base(last.at)
	return ok && outOfReach(lsn, deadline, base, last)
}

// wakeUnreachable wakes, with ErrUnreachable, the pending waiters that the
// last upstream poll shows cannot be served in time. m.mu must be held.
func (m *Monitor) wakeUnreachable() {
	var out []*waiter
	for _, w := range m.waiters {
		if m.unreachable(w.lsn, w.deadline) {
			out = append(out, w)
		}
	}
	for _, w := range out {
		heap.Remove(&m.waiters, w.index)
		w.err = ErrUnreachable
		close(w.done)
	}
}

// watchPrimary is the primary's polling loop, every Interval; it ends with
// the Monitor.
func (m *Monitor) watchPrimary() {
	defer m.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var backoff time.Duration
	for {
		delay := m.cfg.Interval
		if m.pollPrimary() {
			backoff = 0
		} else {
			backoff = nextBackoff(backoff, m.cfg.MaxBackoff)
			delay = backoff
		}
		m.markReady(1)
		timer.Reset(delay)
		select {
		case <-m.ctx.Done():
			return
		case <-timer.C:
		}
	}
}

// pollPrimary runs one primary poll, publishes the result and logs a change
// of state. It reports whether the poll succeeded.
func (m *Monitor) pollPrimary() bool {
	ctx, cancel := context.WithTimeout(m.ctx, m.cfg.QueryTimeout)
	var (
		lsnText *string
		lsn     LSN
	)
	err := m.primary.queryRow(ctx, primaryQuery, &lsnText)
	cancel()
	if m.ctx.Err() != nil {
		return false
	}
	if err == nil {
		if lsnText == nil {
			err = errors.New("pg_current_wal_lsn() returned NULL")
		} else {
			lsn, err = ParseLSN(*lsnText)
		}
	}
	now := time.Now()

	m.mu.Lock()
	prev := m.pri
	cur := primaryState{polled: true, err: err, lsn: lsn}
	if err != nil {
		cur.lsn = 0
		cur.downSince = now
		if prev.polled && prev.err != nil {
			cur.downSince = prev.downSince
		}
	}
	m.pri = cur
	m.status = m.snapshot()
	m.mu.Unlock()

	addr := zap.String("primary", m.priAddr)
	switch {
	case err != nil && (!prev.polled || prev.err == nil):
		m.log.Warn("primary down", addr, zap.Error(err))
	case err != nil:
		m.log.Debug("primary still down", addr, zap.Error(err))
	case !prev.polled:
		m.log.Info("primary up", addr, zap.Stringer("lsn", lsn))
	case prev.err != nil:
		m.log.Info("primary up again", addr, zap.Duration("down_for", now.Sub(prev.downSince)), zap.Stringer("lsn", lsn))
	}
	return err == nil
}

// snapshot derives a Status from the last polls. m.mu must be held.
func (m *Monitor) snapshot() Status {
	s := Status{Role: RoleUnknown, LagBytes: -1, LagSeconds: -1, CheckedAt: m.up.checkedAt}
	upOK := m.up.polled && m.up.err == nil
	if m.up.err != nil {
		s.UpstreamError = m.up.err.Error()
	}
	if m.pollPri && m.pri.polled && m.pri.err == nil {
		s.PrimaryUp = true
		s.PrimaryLSN = m.pri.lsn
	}
	if !upOK {
		return s
	}
	s.UpstreamUp = true
	s.Role = m.up.role
	s.ReplayLSN = m.up.lsn
	s.ReplayPaused = m.up.paused
	switch {
	case s.Role == RolePrimary:
		s.PrimaryUp = true
		s.PrimaryLSN = s.ReplayLSN
		s.LagBytes = 0
		s.LagSeconds = 0
	case s.PrimaryUp && s.ReplayLSN >= s.PrimaryLSN:
		s.LagBytes = 0
		s.LagSeconds = 0
	default:
		if s.PrimaryUp {
			s.LagBytes = int64(s.PrimaryLSN - s.ReplayLSN)
		}
		switch {
		case !m.pollPri && m.up.replayedAll:
			s.LagSeconds = 0
		case m.up.replayAge != nil:
			s.LagSeconds = max(0, *m.up.replayAge)
		}
	}
	return s
}

// waiter is one pending WaitFor.
type waiter struct {
	lsn      LSN
	deadline time.Time     // its context's deadline; zero when it has none
	done     chan struct{} // closed when the waiter is woken
	err      error         // why it was woken: nil (replayed), ErrUnreachable or ErrClosed; set before done is closed
	index    int           // position in the heap, -1 once removed
}

// waiterHeap keeps pending waiters ordered by LSN, so a poll wakes exactly
// the ones it satisfies from the front.
type waiterHeap []*waiter

// Len is the number of pending waiters.
func (h waiterHeap) Len() int { return len(h) }

// Less orders waiters by LSN.
func (h waiterHeap) Less(i, j int) bool { return h[i].lsn < h[j].lsn }

// Swap swaps two waiters and keeps their indexes right.
func (h waiterHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index = i
	h[j].index = j
}

// Push adds a waiter; use heap.Push.
func (h *waiterHeap) Push(x any) {
	w := x.(*waiter)
	w.index = len(*h)
	*h = append(*h, w)
}

// Pop removes the last waiter; use heap.Pop.
func (h *waiterHeap) Pop() any {
	old := *h
	w := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	w.index = -1
	return w
}
