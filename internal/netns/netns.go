// Package netns gives a test a network link it can cut in the kernel: a
// network namespace joined to this one by a veth pair, with listeners inside the namespace
// that forward each connection to an address here (a Postgres server on loopback). A
// connection to such a listener crosses the veth pair, where Cut drops its packets exactly
// as a broken network would: nothing is refused, nothing is acknowledged.
//
// It needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and the ip command. Addresses
// are in 10.200.0.0/14, a /30 per link derived from the process id, so that test processes
// running at once do not collide; namespaces left by a process that died are removed by the
// next New.
package netns

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// prefix starts the name of every namespace this package creates: prefix<pid>-<n>.
const prefix = "pgfly-"

var counter atomic.Uint32

// Available reports why links cannot be made here, or nil when they can.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("network namespaces need the ip command: %w", err)
	}
	return nil
}

// Link is a network namespace and the veth pair that joins it to this one.
type Link struct {
	name         string // the namespace
	hostIf, nsIf string // the veth ends
	hostIP, nsIP netip.Addr
	cut          bool // the namespace's end is down
	mu           sync.Mutex
	lns          []net.Listener
	conns        map[net.Conn]struct{}
	closed       bool
	wg           sync.WaitGroup
}

// New creates a namespace and its link. Close removes both.
func New() (*Link, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	reapStale()
	n := counter.Add(1)
	idx := (uint32(os.Getpid())*16 + n) % (1 << 16)
	base := netip.AddrFrom4([4]byte{10, 200 + byte(idx>>14), byte(idx >> 6), byte(idx<<2) & 0xfc})
	l := &Link{
		name:   fmt.Sprintf("%s%d-%d", prefix, os.Getpid(), n),
		hostIf: fmt.Sprintf("pfh%x", idx),
		nsIf:   fmt.Sprintf("pfn%x", idx),
		hostIP: base.Next(),
		conns:  make(map[net.Conn]struct{}),
	}
	l.nsIP = l.hostIP.Next()
	steps := [][]string{
		{"ip", "netns", "add", l.name},
		{"ip", "link", "add", l.hostIf, "type", "veth", "peer", "name", l.nsIf},
		{"ip", "link", "set", l.nsIf, "netns", l.name},
		{"ip", "addr", "add", l.hostIP.String() + "/30", "dev", l.hostIf},
		{"ip", "link", "set", l.hostIf, "up"},
		{"ip", "netns", "exec", l.name, "ip", "addr", "add", l.nsIP.String() + "/30", "dev", l.nsIf},
		{"ip", "netns", "exec", l.name, "ip", "link", "set", l.nsIf, "up"},
		{"ip", "netns", "exec", l.name, "ip", "link", "set", "lo", "up"},
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			l.remove()
			return nil, err
		}
	}
	return l, nil
}

// Forward listens on the namespace's side of the link and relays each connection to target,
// an address reachable from this namespace. It returns the address to dial, which is only
// reachable across the link.
func (l *Link) Forward(target string) (string, error) {
	ln, err := l.listen(net.JoinHostPort(l.nsIP.String(), "0"))
	if err != nil {
		return "", err
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		ln.Close()
		return "", errors.New("netns: link closed")
	}
	l.lns = append(l.lns, ln)
	l.wg.Add(1)
	l.mu.Unlock()
	go l.accept(ln, target)
	return ln.Addr().String(), nil
}

// listen opens a listener inside the namespace: a socket belongs to the namespace of the
// thread that creates it, so a goroutine moves its locked thread there and never unlocks
// it, which makes the runtime discard the thread when the goroutine ends.
func (l *Link) listen(addr string) (net.Listener, error) {
	type result struct {
		ln  net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/var/run/netns/"+l.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{err: fmt.Errorf("netns: open %s: %w", l.name, err)}
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			ch <- result{err: fmt.Errorf("netns: setns %s: %w", l.name, err)}
			return
		}
		ln, err := net.Listen("tcp", addr)
		ch <- result{ln, err}
	}()
	r := <-ch
	return r.ln, r.err
}

func (l *Link) accept(ln net.Listener, target string) {
	defer l.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		up, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		if !l.track(c, up) {
			return
		}
		l.wg.Add(2)
		go l.copy(up, c)
		go l.copy(c, up)
	}
}

// track remembers a relayed pair so that Close can end it; false once the link is closed.
func (l *Link) track(c ...net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		for _, x := range c {
			x.Close()
		}
		return false
	}
	for _, x := range c {
		l.conns[x] = struct{}{}
	}
	return true
}

func (l *Link) copy(dst, src net.Conn) {
	defer l.wg.Done()
	io.Copy(dst, src)
	dst.Close()
	src.Close()
	l.mu.Lock()
	delete(l.conns, dst)
	delete(l.conns, src)
	l.mu.Unlock()
}

// Cut drops every packet on the link, both ways, until Restore: a black hole, as a dead
// network path or a machine that vanished. The namespace's end of the veth pair goes down,
// which the kernel treats as a cable pulled out: packets are dropped, no error is sent.
// (tc netem would do the same and could delay too, but not every kernel has sch_netem.)
func (l *Link) Cut() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := run("ip", "netns", "exec", l.name, "ip", "link", "set", l.nsIf, "down"); err != nil {
		return err
	}
	l.cut = true
	return nil
}

// Restore undoes Cut.
func (l *Link) Restore() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.cut {
		return nil
	}
	if err := run("ip", "netns", "exec", l.name, "ip", "link", "set", l.nsIf, "up"); err != nil {
		return err
	}
	l.cut = false
	return nil
}

// Close ends every relayed connection and listener and removes the namespace and its link.
func (l *Link) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	for _, ln := range l.lns {
		ln.Close()
	}
	for c := range l.conns {
		c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
	return l.remove()
}

// remove deletes the namespace, which takes its veth end and with it the pair.
func (l *Link) remove() error {
	err := run("ip", "netns", "del", l.name)
	run("ip", "link", "del", l.hostIf) // gone with the namespace unless New failed halfway
	return err
}

// reapStale removes namespaces that a process which has since died created.
func reapStale() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		rest, ok := strings.CutPrefix(name, prefix)
		if !ok {
			continue
		}
		pidText, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidText)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat("/proc/" + pidText); err == nil {
			continue
		}
		run("ip", "netns", "del", name)
	}
}

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("netns: %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
