package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The HTTP helpers the edge, demo and run tests share are here, with assertFree; the
// process and address helpers are in main_test.go.

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
			p := startProc(t, env, pgflyBin, tt.args(addr)...)
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
