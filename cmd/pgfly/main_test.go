package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/pgcluster"
)

// The tests of serve, edge, demo and run run the pgfly binary as an operator would, and
// call run in-process where no process boundary matters (configuration errors). The helpers
// they share are here.

var (
	// pgflyBin is the binary under test, built once by TestMain.
	pgflyBin string

	clusterOnce sync.Once
	cluster     *pgcluster.Cluster
	clusterErr  error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "pgfly-serve-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "create a directory for the binary:", err)
		os.Exit(1)
	}
	pgflyBin = filepath.Join(dir, "pgfly")
	build := exec.Command("go", "build", "-o", pgflyBin, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "go build pgfly:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	if cluster != nil {
		if err := cluster.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "closing the test cluster:", err)
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// testCluster is a real primary and replica shared by the tests that need one, started by
// the first of them; TestMain closes it.
func testCluster(tb testing.TB) *pgcluster.Cluster {
	tb.Helper()
	clusterOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cluster, clusterErr = pgcluster.Start(ctx, pgcluster.Options{})
	})
	if clusterErr != nil {
		tb.Fatalf("start PostgreSQL primary and replica: %v", clusterErr)
	}
	return cluster
}

// buildBinary builds the main package pkg of this module into the test's temporary
// directory and returns the binary's path.
func buildBinary(tb testing.TB, pkg, name string) string {
	tb.Helper()
	out := filepath.Join(tb.TempDir(), name)
	cmd := exec.Command("go", "build", "-o", out, pkg)
	if b, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return out
}

// syncBuffer is a bytes.Buffer safe for one writer and concurrent readers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// proc is a running binary with its output captured.
type proc struct {
	cmd            *exec.Cmd
	stdout, stderr syncBuffer
	done           chan struct{}
	err            error // from Wait, once done is closed
}

// startProc runs bin with args and the test's environment, minus anything pgfly reads, plus
// env. Cleanup stops it if it still runs (SIGTERM, then SIGKILL) and logs its output when
// the test failed.
func startProc(tb testing.TB, env []string, bin string, args ...string) *proc {
	tb.Helper()
	p := &proc{cmd: exec.Command(bin, args...), done: make(chan struct{})}
	p.cmd.Env = append(pgflyFreeEnv(), env...)
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if err := p.cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	tb.Cleanup(func() {
		if !p.exited() {
			p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(30 * time.Second):
				p.cmd.Process.Kill()
				<-p.done
			}
		}
		if tb.Failed() {
			tb.Logf("%s %s\nstdout:\n%s\nstderr:\n%s", filepath.Base(bin), strings.Join(args, " "), p.stdout.String(), p.stderr.String())
		}
	})
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) signal(tb testing.TB, sig os.Signal) {
	tb.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		tb.Fatalf("signal %v: %v", sig, err)
	}
}

// wait waits up to timeout for the process to exit and returns its exit status.
func (p *proc) wait(tb testing.TB, timeout time.Duration) int {
	tb.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		tb.Fatalf("still running %v later, want it to have exited", timeout)
	}
	var ee *exec.ExitError
	switch {
	case p.err == nil:
		return 0
	case errors.As(p.err, &ee):
		return ee.ExitCode()
	}
	tb.Fatalf("wait: %v", p.err)
	return -1
}

// waitFor polls cond until it holds, up to timeout; it fails early if the process exits.
func (p *proc) waitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if p.exited() {
			tb.Fatalf("exited (%v) before %s", p.err, what)
		}
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// logEntry is one line of a process's stderr, decoded if it is JSON.
type logEntry struct {
	raw    string
	err    error // not a JSON object, or one without level, msg or time
	Level  string
	Msg    string
	fields map[string]any // the decoded object, nil if the line is not one
}

func parseLine(s string) logEntry {
	l := logEntry{raw: s}
	var fields map[string]any
	if l.err = json.Unmarshal([]byte(s), &fields); l.err != nil {
		return l
	}
	l.fields = fields
	l.Level, _ = l.fields["level"].(string)
	l.Msg, _ = l.fields["msg"].(string)
	if l.Level == "" || l.Msg == "" || l.fields["time"] == nil {
		l.err = errors.New("no level, msg or time")
	}
	return l
}

// lines returns what the process wrote to stderr so far, line by line, each decoded.
func (p *proc) lines() []logEntry {
	s := strings.TrimSuffix(p.stderr.String(), "\n")
	if s == "" {
		return nil
	}
	var out []logEntry
	for line := range strings.SplitSeq(s, "\n") {
		out = append(out, parseLine(line))
	}
	return out
}

func filterLines(lines []logEntry, msg string) []logEntry {
	var out []logEntry
	for _, l := range lines {
		if l.err == nil && l.Msg == msg {
			out = append(out, l)
		}
	}
	return out
}

// logLine returns the first JSON log line on stderr whose msg is msg, or nil.
func (p *proc) logLine(msg string) map[string]any {
	for _, l := range p.lines() {
		if l.fields != nil && l.fields["msg"] == msg {
			return l.fields
		}
	}
	return nil
}

// waitLog waits for a JSON log line with msg and returns its fields.
func (p *proc) waitLog(tb testing.TB, timeout time.Duration, msg string) map[string]any {
	tb.Helper()
	p.waitFor(tb, timeout, fmt.Sprintf("the log line %q", msg), func() bool { return p.logLine(msg) != nil })
	return p.logLine(msg)
}

// waitLine waits up to timeout for a log line (one with level, msg and time) that matches,
// and returns it.
func (p *proc) waitLine(tb testing.TB, timeout time.Duration, what string, match func(logEntry) bool) logEntry {
	tb.Helper()
	var found logEntry
	p.waitFor(tb, timeout, "a log line for "+what, func() bool {
		for _, l := range p.lines() {
			if l.err == nil && match(l) {
				found = l
				return true
			}
		}
		return false
	})
	return found
}

// waitListening waits for the relay's "listening" line for addr.
func (p *proc) waitListening(tb testing.TB, addr string) {
	tb.Helper()
	p.waitLine(tb, 10*time.Second, "listening on "+addr, func(l logEntry) bool {
		return l.Msg == "listening" && l.fields["addr"] == addr
	})
}

// pgflyFreeEnv is the test's environment without anything pgfly reads.
func pgflyFreeEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(name, "PGFLY_"), strings.HasPrefix(name, "FLY_"),
			name == "PRIMARY_REGION", name == "DATABASE_URL", name == "PORT":
			continue
		}
		env = append(env, kv)
	}
	return env
}

// freeAddr is a loopback address whose port was free a moment ago.
func freeAddr(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("find a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// holdAddr listens on a loopback port for the rest of the test.
func holdAddr(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen: %v", err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln.Addr().String()
}
