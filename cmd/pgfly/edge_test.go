package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The tests of edge, demo and run run the pgfly binary as an operator would, and call run
// in-process where no process boundary matters (configuration errors). The helpers they
// share are here.

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

// logLine returns the first JSON log line on stderr whose msg is msg, or nil.
func (p *proc) logLine(msg string) map[string]any {
	for line := range strings.SplitSeq(p.stderr.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			return m
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

// assertFree fails unless addr can be listened on again.
func assertFree(tb testing.TB, addr string) {
	tb.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		tb.Errorf("listen on %s after exit: got %v, want the port free", addr, err)
		return
	}
	ln.Close()
}

// reply is an HTTP answer with its body read.
type reply struct {
	status int
	header http.Header
	body   string
}

// send makes one request without following redirects.
func send(tb testing.TB, method, u string, body string, header http.Header) reply {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, u, strings.NewReader(body))
	if err != nil {
		tb.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("%s %s: read body: %v", method, u, err)
	}
	return reply{resp.StatusCode, resp.Header, string(b)}
}

// answers reports whether an HTTP server answers at u.
func answers(u string) bool {
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(u)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return true
}

func TestEdgeCommand(t *testing.T) {
	bin := buildBinary(t, ".", "pgfly")
	// fra asks for every POST to be replayed in iad; iad tells what it was sent.
	fra := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			w.Header().Set("Fly-Replay", "region=iad;state=test_state")
			w.WriteHeader(http.StatusConflict)
			return
		}
		fmt.Fprint(w, "fra")
	}))
	defer fra.Close()
	iad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "iad body=%s src=%s", b, r.Header.Get("Fly-Replay-Src"))
	}))
	defer iad.Close()

	tests := []struct {
		name      string
		args      func(addr string) []string
		env       func(addr string) []string
		wantGet   string // the body of GET /: which region got it
		wantTrail string
	}{
		{name: "flags",
			args: func(addr string) []string {
				return []string{"edge", "--listen", addr, "--region", "fra=" + fra.URL, "--region", "iad=" + iad.URL, "--default", "fra"}
			},
			wantGet: "fra", wantTrail: "fra"},
		{name: "environment",
			args: func(string) []string { return []string{"edge"} },
			env: func(addr string) []string {
				return []string{"PGFLY_EDGE_LISTEN=" + addr, "PGFLY_EDGE_REGIONS=fra=" + fra.URL + ",iad=" + iad.URL, "PGFLY_EDGE_DEFAULT=iad"}
			},
			wantGet: "iad body= src=", wantTrail: "iad"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := freeAddr(t)
			var env []string
			if tt.env != nil {
				env = tt.env(addr)
			}
			p := startProc(t, env, bin, tt.args(addr)...)
			base := "http://" + addr
			p.waitFor(t, 10*time.Second, "the edge to answer", func() bool { return answers(base + "/") })

			got := send(t, http.MethodGet, base+"/", "", nil)
			if got.status != http.StatusOK || got.body != tt.wantGet || got.header.Get("X-Edge-Trail") != tt.wantTrail {
				t.Errorf("GET /: got %d %q trail %q, want 200 %q trail %q", got.status, got.body, got.header.Get("X-Edge-Trail"), tt.wantGet, tt.wantTrail)
			}
			got = send(t, http.MethodPost, base+"/items", "name=x", http.Header{"Fly-Prefer-Region": {"fra"}})
			if got.status != http.StatusOK || got.header.Get("X-Edge-Trail") != "fra>iad" ||
				!strings.HasPrefix(got.body, "iad body=name=x src=instance=fra-local;region=fra;t=") || !strings.HasSuffix(got.body, ";state=test_state") {
				t.Errorf("POST /items: got %d %q trail %q, want 200 from iad after a replay from fra, trail fra>iad", got.status, got.body, got.header.Get("X-Edge-Trail"))
			}

			p.signal(t, syscall.SIGTERM)
			if code := p.wait(t, 10*time.Second); code != 0 {
				t.Errorf("exit status after SIGTERM: got %d, want 0", code)
			}
			assertFree(t, addr)
		})
	}
}

func TestEdgeCommandRejects(t *testing.T) {
	const fra = "fra=http://127.0.0.1:1"
	busy := holdAddr(t)
	tests := []struct {
		name string
		args []string
		want []string // fragments of the error
	}{
		{name: "no region", args: []string{"--default", "fra"}, want: []string{"--region NAME=URL", "required"}},
		{name: "no default", args: []string{"--region", fra}, want: []string{"--default", "required"}},
		{name: "a default that is no region", args: []string{"--region", fra, "--default", "iad"}, want: []string{`default region "iad" is not one of the regions (fra)`}},
		{name: "a region without a URL", args: []string{"--region", "fra", "--default", "fra"}, want: []string{"want NAME=URL"}},
		{name: "a region twice", args: []string{"--region", fra, "--region", fra, "--default", "fra"}, want: []string{"region fra given twice"}},
		{name: "a URL that is not http", args: []string{"--region", "fra=ftp://x", "--default", "fra"}, want: []string{"want an absolute http:// or https:// URL"}},
		{name: "no hops", args: []string{"--region", fra, "--default", "fra", "--max-hops", "0"}, want: []string{"--max-hops", "1 or more"}},
		{name: "a busy port", args: []string{"--region", fra, "--default", "fra", "--listen", busy}, want: []string{"address already in use", "pick another with --listen"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			err := run(context.Background(), append([]string{"edge"}, tt.args...), io.Discard, &stderr)
			if err == nil {
				t.Fatalf("got no error, want one saying %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) && !strings.Contains(stderr.String(), w) {
					t.Errorf("got %q (stderr %q), want it to say %q", err, stderr.String(), w)
				}
			}
		})
	}
}
