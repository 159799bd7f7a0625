package lag

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
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
	// DefaultDownInterval is how often a server that is down is probed, so
	// that the Status says it is back within this long of its return; it is
	// also the least time between the polls SuspectDown asks for.
	DefaultDownInterval = 200 * time.Millisecond
	// DefaultQueryTimeout bounds one monitoring query, connecting included.
	DefaultQueryTimeout = 2 * time.Second
)

// bookmarkConns is how many connections PrimaryLSN (and the primary's poll)
// may hold open at once.
const bookmarkConns = 4

// applicationName is the application_name of the monitor's sessions unless
// the URL sets one, so they are easy to tell apart in pg_stat_activity.
const applicationName = "pgfly-lag"

// bookmarkQuery is PrimaryLSN's query (the polls run pollQuery).
const (
	// bookmarkQuery is the insert position, its offset
	// in its WAL segment and the WAL page size, or NULLs on a server in
	// recovery (where pg_current_wal_insert_lsn() would fail). See
	// PrimaryLSN for why it reads the insert position.
	bookmarkQuery = `select l::text, (pg_walfile_name_offset(l)).file_offset, current_setting('wal_block_size')::int,
		(pg_walfile_name_offset(l)).file_name
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
	// DownInterval is how often a server is probed while it is down (no
	// backoff: a probe to a server that refuses costs it nothing, and the
	// Status should say it is back as soon as it is), and the least time
	// between two polls that SuspectDown asks for; DefaultDownInterval when
	// zero. An Interval shorter than it wins.
	DownInterval time.Duration
	// QueryTimeout bounds each monitoring query, connecting included;
	// DefaultQueryTimeout when zero.
	QueryTimeout time.Duration
	// OnTwoPrimaries, when set, is called each time two primaries begin (see
	// Status.TwoPrimaries), once the Status says so, from a poller's
	// goroutine: it must not block.
	OnTwoPrimaries func()
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
	// LastRole is the role the last successful upstream poll found, kept while the
	// upstream is down: RoleUnknown before the first. A session cut off while the upstream
	// was last seen in recovery cannot have written.
	LastRole Role
	// UpstreamUp reports whether the last upstream poll succeeded.
	UpstreamUp bool
	// UpstreamError is the last poll's error while the upstream is down, ""
	// while it is up.
	UpstreamError string
	// PrimaryUp reports whether the primary answered its last poll and is
	// not in recovery. It is true while the upstream is up and is itself the
	// primary, and false when no primary is known, it is down, or the
	// configured primary is a standby.
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
	// SystemID is the upstream's system identifier (pg_control_system()),
	// 0 while it is down. A streaming replica has its primary's.
	SystemID uint64
	// Timeline is the upstream's timeline, 0 while it is down or unknown. On
	// a primary it is the timeline it writes, exact. On a replica it is its
	// WAL receiver's timeline when the monitor's role may see it (a
	// superuser or pg_read_all_stats), else the timeline of its last
	// restartpoint, which trails a switch to a new timeline until the next
	// restartpoint.
	Timeline uint32
	// PrimarySystemID and PrimaryTimeline are the configured primary's as its
	// last poll found them (a primary in recovery included), 0 when unknown;
	// when no primary distinct from the upstream is configured and the
	// upstream is a primary, they are the upstream's.
	PrimarySystemID uint64
	PrimaryTimeline uint32
	// TwoPrimaries reports a split brain: the upstream is not in recovery,
	// and the configured primary, a different server (another system
	// identifier, another timeline, or another postmaster: one server
	// reached by two addresses is not two), accepts writes too, as after a
	// replica was promoted while the primary still runs. Writes through this
	// region's upstream would then diverge from the primary's: sessions
	// started while it is true should be fenced (e.g. started with
	// default_transaction_read_only=on, so that their writes are refused and
	// replayed in the primary region), and /health answers 503
	// two_primaries. It is set once a poll of each server sent after the
	// conflict was first seen shows it too (about DownInterval later), stays
	// set while either server is unreachable, and ends with a pair of polls
	// without conflict or an upstream seen in recovery. It is never true
	// without a configured primary at another address than the upstream.
	TwoPrimaries bool
	// TwoPrimariesReason says which servers are two primaries and how they
	// differ, while TwoPrimaries is true; "" otherwise.
	TwoPrimariesReason string
}

// Monitor polls the upstream and the primary and serves Status, WaitFor and
// PrimaryLSN. Its methods are safe for concurrent use.
type Monitor struct {
	cfg       Config
	log       *zap.Logger
	upstream  *poller
	primary   *poller // nil when no primary distinct from the upstream is configured
	bookmarks *conns  // PrimaryLSN's connections, shared with the primary's polls: the primary's, else the upstream's

	ctx    context.Context // the monitor's lifetime, ended by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	started bool
	closed  bool
	up      serverState
	replays replayHistory // the upstream's recent replay positions while it is an up replica
	pri     serverState
	// twoPrimaries is why the upstream and the primary are two primaries, ""
	// when they are not; conflictSeen is when a conflict not yet confirmed
	// was first seen. See checkPrimaries.
	twoPrimaries string
	conflictSeen time.Time
	lastRole     Role // the role of the last successful upstream poll

	status  Status
	waiters waiterHeap
}

// ConfigError is a Config field that New cannot take, named as in Config, so
// that the caller can name its own setting (a flag) for it.
type ConfigError struct {
	Field string // e.g. "Primary"
	Err   error
}

func (e *ConfigError) Error() string { return "lag: " + e.Field + ": " + e.Err.Error() }
func (e *ConfigError) Unwrap() error { return e.Err }

// New validates cfg and returns a Monitor that has not connected yet; Start
// begins polling. log is used as given (the caller names it, e.g.
// Named("lag")) and may be nil. A field it cannot take is reported as a
// *ConfigError.
func New(cfg Config, log *zap.Logger) (*Monitor, error) {
	if log == nil {
		log = zap.NewNop()
	}
	for _, d := range []struct {
		field string
		v     *time.Duration
		def   time.Duration
	}{
		{"Interval", &cfg.Interval, DefaultInterval},
		{"WaitInterval", &cfg.WaitInterval, DefaultWaitInterval},
		{"DownInterval", &cfg.DownInterval, DefaultDownInterval},
		{"QueryTimeout", &cfg.QueryTimeout, DefaultQueryTimeout},
	} {
		if *d.v < 0 {
			return nil, &ConfigError{d.field, fmt.Errorf("%v is negative", *d.v)}
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if cfg.Upstream == "" {
		return nil, &ConfigError{"Upstream", errors.New("is required")}
	}
	upCfg, upDropped, err := parseURL(cfg.Upstream)
	if err != nil {
		return nil, &ConfigError{"Upstream", err}
	}
	upAddr := addrOf(upCfg)
	logDropped(log, "upstream", upAddr, upDropped)
	upDial := newDialer(upCfg, log.With(zap.String("upstream", upAddr)))
	m := &Monitor{
		cfg:       cfg,
		log:       log,
		lastRole:  RoleUnknown,
		upstream:  newPoller("upstream", upAddr, newConns(upDial, 1)),
		bookmarks: newConns(upDial, bookmarkConns),
	}
	if cfg.Primary != "" {
		priCfg, priDropped, err := parseURL(cfg.Primary)
		if err != nil {
			return nil, &ConfigError{"Primary", err}
		}
		priAddr := addrOf(priCfg)
		logDropped(log, "primary", priAddr, priDropped)
		m.bookmarks = newConns(newDialer(priCfg, log.With(zap.String("primary", priAddr))), bookmarkConns)
		if priAddr != upAddr {
			m.primary = newPoller("primary", priAddr, m.bookmarks)
		}
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
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

// Start starts polling: each server at once and then every Interval, the
// upstream every WaitInterval while a WaitFor is pending, and a server that
// is down every DownInterval, so that the Status says it is back within
// about DownInterval of its return. Polling runs until Close. Calling Start
// again, or after Close, does nothing.
func (m *Monitor) Start() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.started || m.closed {
		return
	}
	m.started = true
	for _, p := range m.pollers() {
		m.wg.Add(1)
		go m.watch(p)
	}
}

// pollers returns the upstream's poller and the primary's, if any.
func (m *Monitor) pollers() []*poller {
	if m.primary == nil {
		return []*poller{m.upstream}
	}
	return []*poller{m.upstream, m.primary}
}

// Ready waits until the first poll of each server has finished, whether it
// succeeded or not, so Status describes them; it is meant for start-up. It
// returns ctx.Err() if ctx ends first and ErrClosed if the Monitor was
// closed first.
func (m *Monitor) Ready(ctx context.Context) error {
	for _, p := range m.pollers() {
		select {
		case <-p.ready:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.up.polled || m.primary != nil && !m.pri.polled {
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
	return m.upstream.polls.Load()
}

// SuspectDown tells the Monitor that something (a client session that could
// not reach the upstream, or lost it) suggests the upstream is down, so that
// it polls the upstream now instead of at its next Interval, and the Status
// (and /health) says so as soon as that poll fails: at once for a server
// that refuses or has gone away, after QueryTimeout for one that hangs. From
// then on the upstream is probed every DownInterval until it answers.
//
// It never blocks and is safe to call from any number of sessions at once:
// calls coalesce, and a poll they cause starts no sooner than DownInterval
// after the previous poll ended, so a thousand sessions failing at once cost
// one poll (and one more if some fail while it runs, since its answer may
// predate their failure), and clients failing in a loop at most one poll per
// DownInterval. While the Monitor already sees the upstream down a call
// changes nothing. Calls before Start are served by the first poll, which
// comes at once anyway; after Close a call does nothing. It concerns the
// upstream only: the primary is polled on its own schedule.
func (m *Monitor) SuspectDown() {
	signal(m.upstream.soon)
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

	signal(m.upstream.waiter)

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
	lsn, _, err := m.primaryLSN(ctx)
	return lsn, err
}

// primaryLSN is PrimaryLSN with the timeline the primary writes.
func (m *Monitor) primaryLSN(ctx context.Context) (LSN, uint32, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.QueryTimeout)
	defer cancel()
	var (
		text, file *string
		offset     *int64
		blockSize  int64
	)
	if err := m.bookmarks.queryRow(ctx, bookmarkQuery, &text, &offset, &blockSize, &file); err != nil {
		return 0, 0, fmt.Errorf("read primary WAL position: %w", err)
	}
	if text == nil || offset == nil || file == nil {
		return 0, 0, ErrNoPrimary
	}
	lsn, err := ParseLSN(*text)
	if err != nil {
		return 0, 0, err
	}
	tli, err := timelineOf(*file)
	if err != nil {
		return 0, 0, err
	}
	return insertEnd(lsn, *offset, blockSize), tli, nil
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
	for _, p := range m.pollers() {
		p.markReady()
	}
	errUp := m.upstream.conns.close()
	errPri := m.bookmarks.close()
	if errUp != nil {
		return errUp
	}
	return errPri
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

// snapshot derives a Status from the last polls. m.mu must be held.
func (m *Monitor) snapshot() Status {
	s := Status{Role: RoleUnknown, LastRole: m.lastRole, LagBytes: -1, LagSeconds: -1, CheckedAt: m.up.checkedAt}
	upOK := m.up.up()
	if m.up.err != nil {
		s.UpstreamError = m.up.err.Error()
	}
	s.TwoPrimaries = m.twoPrimaries != ""
	s.TwoPrimariesReason = m.twoPrimaries
	if m.primary != nil && m.pri.up() {
		s.PrimarySystemID = m.pri.id.systemID
		s.PrimaryTimeline = m.pri.id.timeline
		if m.pri.role == RolePrimary {
			s.PrimaryUp = true
			s.PrimaryLSN = m.pri.lsn
		}
	}
	if !upOK {
		return s
	}
	s.UpstreamUp = true
	s.Role = m.up.role
	s.ReplayLSN = m.up.lsn
	s.ReplayPaused = m.up.paused
	s.SystemID = m.up.id.systemID
	s.Timeline = m.up.id.timeline
	switch {
	case s.Role == RolePrimary:
		s.PrimaryUp = true
		s.PrimaryLSN = s.ReplayLSN
		if m.primary == nil {
			s.PrimarySystemID = s.SystemID
			s.PrimaryTimeline = s.Timeline
		}
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
		case m.primary == nil && m.up.replayedAll:
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
