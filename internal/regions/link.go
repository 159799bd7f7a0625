package regions

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pgfly/pgfly/internal/delay"
	"github.com/pgfly/pgfly/internal/netns"
	"github.com/pgfly/pgfly/internal/pgcluster"
)

// LinkConfig puts the connections between the two regions on a Link (Options.Link).
type LinkConfig struct {
	// Delay is the one-way delay of every connection across the link, at the start;
	// Link.SetDelay changes it.
	Delay time.Duration
	// WAL puts the replica's WAL stream on a link of its own, Setup.WAL, with the same
	// initial delay: Start points the replica's primary_conninfo at it and Close points it
	// back. It changes the cluster's replica for the setup's lifetime.
	WAL bool
}

// Link is the network between the two regions: each connection from one region to the other
// goes through one of its hops, which the link delays and cuts together. In a Setup with
// Options.Link these are the replica-region pgfly's connections to the primary (its lag
// monitor), the edge's connections to the primary region's shim (the replays), and the
// replica-region shim's to it in proxy mode; Forward adds more (a benchmark's own apps).
//
// The delay is a userspace relay (internal/delay) on every hop, on every machine: the
// kernel's way, tc netem, needs qdiscs, and the kernel of this project's machines and CI is
// built without them (CONFIG_NET_SCH unset: `tc qdisc add ... netem` answers "Specified qdisc
// kind is unknown"). The cut is the kernel's where network namespaces are available (root
// and the ip command, internal/netns): each hop first crosses a veth pair whose far end Cut
// takes down, so that what a region sends across is dropped unacknowledged and new
// connections get no answer to their SYN, as on a real black hole, which pgfly's dead-link
// watch sees. Only where namespaces are unavailable does Cut stall the userspace relays
// instead (delay.Relay.Cut): nothing is refused and nothing arrives, but the sender's
// kernel still acknowledges what it sent, so a dead-link watch cannot see the cut.
// KernelCut tells which one a link has.
type Link struct {
	kernel *netns.Link // nil where namespaces are unavailable

	mu     sync.Mutex
	delay  time.Duration
	cut    bool
	hops   []hop
	closed bool
}

// hop is one address across the link: a delay relay in front of the target.
type hop struct {
	relay  *delay.Relay
	served chan error // Serve's result
}

// NewLink returns a link with one-way delay d and no hops yet, cut in the kernel where
// network namespaces are available. Close removes it.
func NewLink(d time.Duration) (*Link, error) {
	return newLink(d, netns.Available() == nil)
}

// newLink is NewLink, with a network namespace only when kernel is set.
func newLink(d time.Duration, kernel bool) (*Link, error) {
	if d < 0 {
		return nil, fmt.Errorf("regions: negative link delay %v", d)
	}
	l := &Link{delay: d}
	if kernel {
		k, err := netns.New()
		if err != nil {
			return nil, fmt.Errorf("regions: link: %w", err)
		}
		l.kernel = k
	}
	return l, nil
}

// KernelCut reports whether Cut drops packets in the kernel (a network namespace) rather
// than stalling the userspace relays.
func (l *Link) KernelCut() bool { return l.kernel != nil }

// Forward starts a hop to target (host:port, on this machine) and returns the address that
// reaches it across the link.
func (l *Link) Forward(target string) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return "", errors.New("regions: link closed")
	}
	r, err := delay.New(delay.Config{Target: target, Delay: l.delay})
	if err != nil {
		return "", err
	}
	if err := r.Listen(); err != nil {
		return "", err
	}
	h := hop{relay: r, served: make(chan error, 1)}
	go func() { h.served <- r.Serve() }()
	l.hops = append(l.hops, h)
	l.cutHop(h, l.cut)
	if l.kernel == nil {
		return r.Addr().String(), nil
	}
	return l.kernel.Forward(r.Addr().String())
}

// forwardURL is rawURL (http:// or postgres://) with its host:port moved across the link.
func (l *Link) forwardURL(rawURL string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", err
	}
	if u.Host, err = l.Forward(u.Host); err != nil {
		return "", err
	}
	return u.String(), nil
}

// Delay is the current one-way delay.
func (l *Link) Delay() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.delay
}

// SetDelay changes the one-way delay of every hop, for bytes sent from now on, open
// connections included. Bytes never overtake each other: after a shorter delay, the bytes
// already held back still wait out the longer one.
func (l *Link) SetDelay(d time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.delay = max(d, 0)
	for _, h := range l.hops {
		h.relay.SetDelay(l.delay)
	}
}

// Cut black-holes the link, both ways, until Restore: open connections stall and new ones
// get no answer (see Link for how, and what a userspace cut cannot show). Nothing is
// refused or reset, so callers see timeouts, never errors; what TCP still retries when the
// link comes back arrives then.
func (l *Link) Cut() error { return l.setCut(true) }

// Restore undoes Cut.
func (l *Link) Restore() error { return l.setCut(false) }

func (l *Link) setCut(cut bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.kernel != nil {
		set := l.kernel.Restore
		if cut {
			set = l.kernel.Cut
		}
		if err := set(); err != nil {
			return err
		}
	}
	for _, h := range l.hops {
		l.cutHop(h, cut)
	}
	l.cut = cut
	return nil
}

// cutHop cuts or restores one hop's relay, where the cut is not the kernel's.
func (l *Link) cutHop(h hop, cut bool) {
	switch {
	case l.kernel != nil:
	case cut:
		h.relay.Cut()
	default:
		h.relay.Restore()
	}
}

// Close ends every connection across the link and removes it. It is idempotent.
func (l *Link) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	hops := l.hops
	l.mu.Unlock()
	var errs []error
	if l.kernel != nil {
		errs = append(errs, l.kernel.Close())
	}
	for _, h := range hops {
		errs = append(errs, h.relay.Close(), <-h.served)
	}
	return errors.Join(errs...)
}

// walTimeout bounds the wait for the replica to stream from a new address.
const walTimeout = 30 * time.Second

// streamWALAcross starts a link of delay d in front of the primary and moves the replica's
// WAL stream onto it; streamWALDirect moves it back.
func streamWALAcross(ctx context.Context, c *pgcluster.Cluster, d time.Duration) (*Link, error) {
	l, err := NewLink(d)
	if err != nil {
		return nil, err
	}
	addr, err := l.Forward(c.Primary.Addr())
	if err == nil {
		err = streamFrom(ctx, c, addr)
	}
	if err != nil {
		return nil, errors.Join(err, l.Close())
	}
	return l, nil
}

func streamWALDirect(c *pgcluster.Cluster) error {
	ctx, cancel := context.WithTimeout(context.Background(), walTimeout)
	defer cancel()
	return streamFrom(ctx, c, c.Primary.Addr())
}

var (
	conninfoHost = regexp.MustCompile(`\bhost=\S+`)
	conninfoPort = regexp.MustCompile(`\bport=\d+`)
)

// streamFrom rewrites the host and port of the replica's primary_conninfo to addr (ALTER
// SYSTEM and a reload, on which the WAL receiver reconnects), and waits until the replica
// streams from there and has caught up.
func streamFrom(ctx context.Context, c *pgcluster.Cluster, addr string) error {
	host, portText, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		return fmt.Errorf("WAL stream address %s: %w", addr, err)
	}
	db, err := sql.Open("pgx", c.Replica.URL(pgcluster.RoleSuperuser.Name, "", "postgres"))
	if err != nil {
		return err
	}
	defer db.Close()
	var info string
	if err := db.QueryRowContext(ctx, "SHOW primary_conninfo").Scan(&info); err != nil {
		return fmt.Errorf("read the replica's primary_conninfo: %w", err)
	}
	if !conninfoHost.MatchString(info) || !conninfoPort.MatchString(info) {
		return fmt.Errorf("the replica's primary_conninfo names no host and port: %q", info)
	}
	info = conninfoHost.ReplaceAllString(info, "host="+host)
	info = conninfoPort.ReplaceAllString(info, "port="+portText)
	if _, err := db.ExecContext(ctx, "ALTER SYSTEM SET primary_conninfo = '"+strings.ReplaceAll(info, "'", "''")+"'"); err != nil {
		return fmt.Errorf("set the replica's primary_conninfo: %w", err)
	}
	if _, err := db.ExecContext(ctx, "SELECT pg_reload_conf()"); err != nil {
		return fmt.Errorf("reload the replica's configuration: %w", err)
	}
	deadline := time.Now().Add(walTimeout)
	for {
		var senderHost, status string
		var senderPort int
		err := db.QueryRowContext(ctx, "SELECT coalesce(sender_host, ''), coalesce(sender_port, 0), coalesce(status, '') FROM pg_stat_wal_receiver").
			Scan(&senderHost, &senderPort, &status)
		if err == nil && senderHost == host && senderPort == port && status == "streaming" {
			return c.WaitReplayed(ctx)
		}
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the replica does not stream from %s after %v (sender %s:%d, status %q)", addr, walTimeout, senderHost, senderPort, status)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// crossRegion is rawURL as the other region reaches it: across the link, or unchanged
// without one.
func (s *Setup) crossRegion(rawURL string) (string, error) {
	if s.Link == nil {
		return rawURL, nil
	}
	return s.Link.forwardURL(rawURL)
}

// closeLinks moves the WAL stream back to the primary and removes the links.
func (s *Setup) closeLinks() error {
	var errs []error
	if s.WAL != nil {
		errs = append(errs, streamWALDirect(s.Cluster), s.WAL.Close())
	}
	if s.Link != nil {
		errs = append(errs, s.Link.Close())
	}
	return errors.Join(errs...)
}
