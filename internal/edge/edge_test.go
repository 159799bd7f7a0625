package edge_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgfly/pgfly/internal/edge"
	"github.com/pgfly/pgfly/internal/flyreplay"
)

// wait bounds every blocking step of these tests; reaching it is a failure.
const wait = 10 * time.Second

// region starts an httptest server standing for one region's instance.
func region(tb testing.TB, h http.HandlerFunc) string {
	tb.Helper()
	srv := httptest.NewServer(h)
	tb.Cleanup(srv.Close)
	return srv.URL
}

// named answers 200 with the region's name, so a test can see who served.
func named(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, name)
	}
}

// startEdge starts an Edge on 127.0.0.1:0 and returns its base URL. Cleanup
// closes it and checks that Serve returned nil.
func startEdge(tb testing.TB, cfg edge.Config, log *zap.Logger) string {
	tb.Helper()
	if log == nil {
		log = zaptest.NewLogger(tb)
	}
	cfg.Listen = "127.0.0.1:0"
	e, err := edge.New(cfg, log)
	if err != nil {
		tb.Fatalf("edge.New: %v", err)
	}
	if err := e.Listen(); err != nil {
		tb.Fatalf("Listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- e.Serve() }()
	tb.Cleanup(func() {
		if err := e.Close(); err != nil {
			tb.Errorf("Close: %v", err)
		}
		select {
		case err := <-served:
			if err != nil {
				tb.Errorf("Serve returned %v, want nil after Close", err)
			}
		case <-time.After(wait):
			tb.Errorf("Serve did not return within %v of Close", wait)
		}
	})
	return "http://" + e.Addr().String()
}

// do sends req with a bounded context and returns the response and its body.
func do(tb testing.TB, req *http.Request) (*http.Response, string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(req.Context(), wait)
	defer cancel()
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	if err != nil {
		tb.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("read body of %s %s: %v", req.Method, req.URL, err)
	}
	return resp, string(body)
}

func newRequest(tb testing.TB, method, url string, body io.Reader) *http.Request {
	tb.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		tb.Fatalf("new request: %v", err)
	}
	return req
}

func TestRouting(t *testing.T) {
	base := startEdge(t, edge.Config{
		Regions: map[string]string{"fra": region(t, named("fra")), "iad": region(t, named("iad"))},
		Default: "fra",
	}, nil)

	tests := []struct {
		name       string
		header     map[string]string
		wantStatus int
		wantBody   string
		wantTrail  string
	}{
		{name: "default region", wantStatus: 200, wantBody: "fra", wantTrail: "fra"},
		{name: "fly-prefer-region known", header: map[string]string{"fly-prefer-region": "iad"},
			wantStatus: 200, wantBody: "iad", wantTrail: "iad"},
		{name: "fly-prefer-region unknown falls back to default", header: map[string]string{"fly-prefer-region": "syd"},
			wantStatus: 200, wantBody: "fra", wantTrail: "fra"},
		{name: "fly-force-region", header: map[string]string{"fly-force-region": "iad"},
			wantStatus: 200, wantBody: "iad", wantTrail: "iad"},
		{name: "fly-force-region wins over fly-prefer-region",
			header:     map[string]string{"fly-force-region": "fra", "fly-prefer-region": "iad"},
			wantStatus: 200, wantBody: "fra", wantTrail: "fra"},
		{name: "fly-force-region unknown", header: map[string]string{"fly-force-region": "syd"},
			wantStatus: http.StatusBadGateway, wantBody: `unknown region "syd"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := newRequest(t, "GET", base+"/", nil)
			for k, v := range tt.header {
				req.Header.Set(k, v)
			}
			resp, body := do(t, req)
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status: got %d, want %d (body %q)", resp.StatusCode, tt.wantStatus, body)
			}
			if !strings.Contains(body, tt.wantBody) {
				t.Errorf("body: got %q, want it to contain %q", body, tt.wantBody)
			}
			if got := resp.Header.Get(edge.TrailHeader); got != tt.wantTrail {
				t.Errorf("%s: got %q, want %q", edge.TrailHeader, got, tt.wantTrail)
			}
		})
	}
}

// seen is what a region recorded of the request it received.
type seen struct {
	method, uri, host, replaySrc string
	body                         []byte
}

// recorder records each request a region receives.
type recorder struct {
	mu   sync.Mutex
	reqs []seen
}

func (rec *recorder) record(tb testing.TB, r *http.Request) {
	tb.Helper()
	body, err := io.ReadAll(r.Body)
	if err != nil {
		tb.Errorf("region: read request body: %v", err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.reqs = append(rec.reqs, seen{method: r.Method, uri: r.URL.RequestURI(), host: r.Host,
		replaySrc: r.Header.Get("fly-replay-src"), body: body})
}

func (rec *recorder) got() []seen {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]seen(nil), rec.reqs...)
}

func TestReplayCarriesTheRequest(t *testing.T) {
	var a, b recorder
	urlA := region(t, func(w http.ResponseWriter, r *http.Request) {
		a.record(t, r)
		w.Header().Set("fly-replay", "region=b;state=captured_write")
		w.WriteHeader(http.StatusConflict)
		fmt.Fprint(w, "retry in region b")
	})
	urlB := region(t, func(w http.ResponseWriter, r *http.Request) {
		b.record(t, r)
		w.WriteHeader(http.StatusCreated)
		fmt.Fprint(w, "created in b")
	})
	core, logs := observer.New(zapcore.InfoLevel)
	base := startEdge(t, edge.Config{Regions: map[string]string{"a": urlA, "b": urlB}, Default: "a"}, zap.New(core))

	payload := make([]byte, 100<<10)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	req := newRequest(t, "POST", base+"/items?x=1", bytes.NewReader(payload))
	req.Host = "app.example"
	req.Header.Set("fly-replay-src", "forged-by-client")
	before := time.Now()
	resp, body := do(t, req)

	if resp.StatusCode != http.StatusCreated || body != "created in b" {
		t.Errorf("client got %d %q, want 201 %q", resp.StatusCode, body, "created in b")
	}
	if got := resp.Header.Values("fly-replay"); len(got) != 0 {
		t.Errorf("client got fly-replay %q, want none", got)
	}
	if got, want := resp.Header.Get(edge.TrailHeader), "a>b"; got != want {
		t.Errorf("%s: got %q, want %q", edge.TrailHeader, got, want)
	}

	gotA, gotB := a.got(), b.got()
	if len(gotA) != 1 || len(gotB) != 1 {
		t.Fatalf("requests: got %d in a and %d in b, want 1 and 1", len(gotA), len(gotB))
	}
	for name, s := range map[string]seen{"a": gotA[0], "b": gotB[0]} {
		if s.method != "POST" || s.uri != "/items?x=1" || s.host != "app.example" {
			t.Errorf("region %s got %s %s Host %s, want POST /items?x=1 Host app.example", name, s.method, s.uri, s.host)
		}
		if !bytes.Equal(s.body, payload) {
			t.Errorf("region %s got a body of %d bytes that differs from the %d bytes sent", name, len(s.body), len(payload))
		}
	}
	if gotA[0].replaySrc != "" {
		t.Errorf("region a got fly-replay-src %q, want none (the client's is removed)", gotA[0].replaySrc)
	}
	src := parseFields(t, gotB[0].replaySrc)
	want := map[string]string{"instance": "a-local", "region": "a", "state": "captured_write"}
	for k, v := range want {
		if src[k] != v {
			t.Errorf("fly-replay-src %q: %s: got %q, want %q", gotB[0].replaySrc, k, src[k], v)
		}
	}
	if us, err := strconv.ParseInt(src["t"], 10, 64); err != nil || us < before.UnixMicro() {
		t.Errorf("fly-replay-src %q: t: got %q, want unix microseconds not before %d", gotB[0].replaySrc, src["t"], before.UnixMicro())
	}

	hops := logs.FilterMessage("hop").AllUntimed()
	wantHops := []map[string]any{
		{"method": "POST", "path": "/items", "from": "", "to": "a", "state": "", "status": int64(409)},
		{"method": "POST", "path": "/items", "from": "a", "to": "b", "state": "captured_write", "status": int64(201)},
	}
	if len(hops) != len(wantHops) {
		t.Fatalf("hop log lines: got %d, want %d", len(hops), len(wantHops))
	}
	for i, h := range hops {
		fields := h.ContextMap()
		for k, v := range wantHops[i] {
			if fields[k] != v {
				t.Errorf("hop %d log field %s: got %v, want %v", i, k, fields[k], v)
			}
		}
		if _, ok := fields["duration"]; !ok {
			t.Errorf("hop %d log: got fields %v, want a duration", i, fields)
		}
	}
}

// parseFields reads a fly-replay-src header into a map of its non-empty
// fields, t in microseconds.
func parseFields(tb testing.TB, h string) map[string]string {
	tb.Helper()
	src, err := flyreplay.ParseSrc(h)
	if err != nil {
		tb.Errorf("fly-replay-src %q: %v", h, err)
	}
	m := map[string]string{}
	for k, v := range map[string]string{"instance": src.Instance, "region": src.Region, "state": src.State} {
		if v != "" {
			m[k] = v
		}
	}
	if !src.Time.IsZero() {
		m["t"] = strconv.FormatInt(src.Time.UnixMicro(), 10)
	}
	for _, f := range src.Extra {
		m[f.Key] = f.Value
	}
	return m
}

func TestReplayHeaderForms(t *testing.T) {
	tests := []struct {
		name      string
		replay    string
		wantTrail string
		wantSrc   map[string]string // fields of fly-replay-src seen by the target
		wantState bool              // whether fly-replay-src has a state field
	}{
		{name: "region only", replay: "region=b",
			wantTrail: "a>b", wantSrc: map[string]string{"region": "a"}},
		{name: "quoted list takes the first known region", replay: `region="syd,b,a";state=w`,
			wantTrail: "a>b", wantSrc: map[string]string{"region": "a", "state": "w"}, wantState: true},
		{name: "quoted state and ignored fields", replay: `state="x y"; app=other ;region=b;elsewhere=true`,
			wantTrail: "a>b", wantSrc: map[string]string{"region": "a", "state": "x y"}, wantState: true},
		{name: "replay to the same region", replay: "region=a;state=again",
			wantTrail: "a>a", wantSrc: map[string]string{"region": "a", "state": "again"}, wantState: true},
		{name: "state with ; and quotes reaches the target whole", replay: `region=b;state="k=v; \"q\""`,
			wantTrail: "a>b", wantSrc: map[string]string{"region": "a", "state": `k=v; "q"`}, wantState: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A region answers fly-replay to a first request and echoes
			// fly-replay-src to a replayed one.
			h := func(w http.ResponseWriter, r *http.Request) {
				if src := r.Header.Get("fly-replay-src"); src != "" {
					fmt.Fprint(w, src)
					return
				}
				w.Header().Set("fly-replay", tt.replay)
				w.WriteHeader(http.StatusConflict)
			}
			base := startEdge(t, edge.Config{Regions: map[string]string{"a": region(t, h), "b": region(t, h)}, Default: "a"}, nil)
			resp, body := do(t, newRequest(t, "GET", base+"/", nil))
			if resp.StatusCode != 200 {
				t.Fatalf("status: got %d, want 200 (body %q)", resp.StatusCode, body)
			}
			if got := resp.Header.Get(edge.TrailHeader); got != tt.wantTrail {
				t.Errorf("%s: got %q, want %q", edge.TrailHeader, got, tt.wantTrail)
			}
			src := parseFields(t, body)
			for k, v := range tt.wantSrc {
				if src[k] != v {
					t.Errorf("fly-replay-src %q: %s: got %q, want %q", body, k, src[k], v)
				}
			}
			if _, got := src["state"]; got != tt.wantState {
				t.Errorf("fly-replay-src %q has a state field: got %v, want %v", body, got, tt.wantState)
			}
		})
	}
}

func TestReplayLoopStops(t *testing.T) {
	tests := []struct {
		name      string
		maxHops   int
		wantCalls int64
		wantTrail string
	}{
		{name: "default max hops", maxHops: 0, wantCalls: edge.DefaultMaxHops + 1, wantTrail: "a>b>a>b"},
		{name: "one hop", maxHops: 1, wantCalls: 2, wantTrail: "a>b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int64
			to := func(other string) http.HandlerFunc {
				return func(w http.ResponseWriter, r *http.Request) {
					calls.Add(1)
					w.Header().Set("fly-replay", "region="+other+";state=loop")
					w.WriteHeader(http.StatusConflict)
				}
			}
			base := startEdge(t, edge.Config{
				Regions: map[string]string{"a": region(t, to("b")), "b": region(t, to("a"))},
				Default: "a", MaxHops: tt.maxHops,
			}, nil)
			resp, body := do(t, newRequest(t, "POST", base+"/items", strings.NewReader("name=x")))
			if resp.StatusCode != http.StatusLoopDetected {
				t.Errorf("status: got %d, want %d", resp.StatusCode, http.StatusLoopDetected)
			}
			if !strings.Contains(body, "loop detected") {
				t.Errorf("body: got %q, want it to say loop detected", body)
			}
			if got := resp.Header.Values("fly-replay"); len(got) != 0 {
				t.Errorf("client got fly-replay %q, want none", got)
			}
			if got := calls.Load(); got != tt.wantCalls {
				t.Errorf("requests to regions: got %d, want %d", got, tt.wantCalls)
			}
			if got := resp.Header.Get(edge.TrailHeader); got != tt.wantTrail {
				t.Errorf("%s: got %q, want %q", edge.TrailHeader, got, tt.wantTrail)
			}
		})
	}
}

func TestReplayToUnknownRegion(t *testing.T) {
	tests := []struct {
		name   string
		replay string
	}{
		{name: "unknown region", replay: "region=nowhere"},
		{name: "no known region in list", replay: `region="nowhere,elsewhere"`},
		{name: "no region field", replay: "instance=123abc"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var bCalls atomic.Int64
			urlA := region(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("fly-replay", tt.replay)
				w.WriteHeader(http.StatusConflict)
				fmt.Fprint(w, "from a")
			})
			urlB := region(t, func(w http.ResponseWriter, r *http.Request) { bCalls.Add(1) })
			base := startEdge(t, edge.Config{Regions: map[string]string{"a": urlA, "b": urlB}, Default: "a"}, nil)
			resp, body := do(t, newRequest(t, "GET", base+"/", nil))
			if resp.StatusCode != http.StatusBadGateway {
				t.Errorf("status: got %d, want %d", resp.StatusCode, http.StatusBadGateway)
			}
			if !strings.Contains(body, "does not know") || strings.Contains(body, "from a") {
				t.Errorf("body: got %q, want the edge's message that it does not know the region", body)
			}
			if got := resp.Header.Values("fly-replay"); len(got) != 0 {
				t.Errorf("client got fly-replay %q, want none", got)
			}
			if got := bCalls.Load(); got != 0 {
				t.Errorf("requests to b: got %d, want 0", got)
			}
		})
	}
}

func TestReplayMalformedHeader(t *testing.T) {
	tests := []struct {
		name    string
		replay  string
		wantErr string
	}{
		{name: "unterminated quote", replay: `region="b`, wantErr: "unterminated quoted value"},
		{name: "field without a value", replay: "region=b;elsewhere", wantErr: "field elsewhere has no value"},
		{name: "region twice", replay: "region=b;region=a", wantErr: "field region given twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var bCalls atomic.Int64
			urlA := region(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("fly-replay", tt.replay)
				w.WriteHeader(http.StatusConflict)
				fmt.Fprint(w, "from a")
			})
			urlB := region(t, func(w http.ResponseWriter, r *http.Request) { bCalls.Add(1) })
			base := startEdge(t, edge.Config{Regions: map[string]string{"a": urlA, "b": urlB}, Default: "a"}, nil)
			resp, body := do(t, newRequest(t, "GET", base+"/", nil))
			if resp.StatusCode != http.StatusBadGateway {
				t.Errorf("status: got %d, want %d", resp.StatusCode, http.StatusBadGateway)
			}
			if !strings.Contains(body, "cannot read") || !strings.Contains(body, tt.wantErr) || strings.Contains(body, "from a") {
				t.Errorf("body: got %q, want the edge's message that it cannot read the header, with %q", body, tt.wantErr)
			}
			if got, want := resp.Header.Get(edge.TrailHeader), "a"; got != want {
				t.Errorf("%s: got %q, want %q", edge.TrailHeader, got, want)
			}
			if got := bCalls.Load(); got != 0 {
				t.Errorf("requests to b: got %d, want 0", got)
			}
		})
	}
}

func TestReplayBodyLimit(t *testing.T) {
	const limit = 1024
	tests := []struct {
		name       string
		size       int
		replay     bool
		wantStatus int
		wantBody   string
		wantB      int // requests region b gets
	}{
		{name: "at the limit, replayed", size: limit, replay: true, wantStatus: 200, wantBody: "from b", wantB: 1},
		{name: "over the limit, not replayed", size: 2 * limit, replay: false, wantStatus: 200, wantBody: "from a"},
		{name: "over the limit, replay asked", size: 2 * limit, replay: true,
			wantStatus: http.StatusBadGateway, wantBody: "over the replay limit of 1024 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var a, b recorder
			urlA := region(t, func(w http.ResponseWriter, r *http.Request) {
				a.record(t, r)
				if tt.replay {
					w.Header().Set("fly-replay", "region=b")
					w.WriteHeader(http.StatusConflict)
				}
				fmt.Fprint(w, "from a")
			})
			urlB := region(t, func(w http.ResponseWriter, r *http.Request) {
				b.record(t, r)
				fmt.Fprint(w, "from b")
			})
			base := startEdge(t, edge.Config{Regions: map[string]string{"a": urlA, "b": urlB}, Default: "a", MaxReplayBody: limit}, nil)
			payload := bytes.Repeat([]byte("x"), tt.size)
			resp, body := do(t, newRequest(t, "POST", base+"/upload", bytes.NewReader(payload)))
			if resp.StatusCode != tt.wantStatus || !strings.Contains(body, tt.wantBody) {
				t.Errorf("client got %d %q, want %d containing %q", resp.StatusCode, body, tt.wantStatus, tt.wantBody)
			}
			if got := resp.Header.Values("fly-replay"); len(got) != 0 {
				t.Errorf("client got fly-replay %q, want none", got)
			}
			gotA, gotB := a.got(), b.got()
			if len(gotA) != 1 || !bytes.Equal(gotA[0].body, payload) {
				t.Errorf("region a: got %d requests, want 1 with the whole %d-byte body", len(gotA), tt.size)
			}
			if len(gotB) != tt.wantB {
				t.Fatalf("region b: got %d requests, want %d", len(gotB), tt.wantB)
			}
			for _, s := range gotB {
				if !bytes.Equal(s.body, payload) {
					t.Errorf("region b: got a %d-byte body, want the %d bytes sent", len(s.body), tt.size)
				}
			}
		})
	}
}

func TestStreamingResponseIsFlushed(t *testing.T) {
	tests := []struct {
		name          string
		contentLength bool // whether the region declares the length up front
	}{
		{name: "chunked"},
		// ReverseProxy flushes chunked responses by itself; a response with
		// a Content-Length is flushed only because of FlushInterval -1.
		{name: "with content-length", contentLength: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			release := make(chan struct{})
			urlA := region(t, func(w http.ResponseWriter, r *http.Request) {
				if tt.contentLength {
					w.Header().Set("Content-Length", strconv.Itoa(len("first\nsecond\n")))
				}
				fmt.Fprint(w, "first\n")
				w.(http.Flusher).Flush()
				select {
				case <-release:
				case <-r.Context().Done():
					return
				}
				fmt.Fprint(w, "second\n")
			})
			base := startEdge(t, edge.Config{Regions: map[string]string{"a": urlA}, Default: "a"}, nil)

			ctx, cancel := context.WithTimeout(t.Context(), wait)
			defer cancel()
			req := newRequest(t, "GET", base+"/stream", nil).WithContext(ctx)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatalf("GET /stream: %v", err)
			}
			defer resp.Body.Close()
			br := bufio.NewReader(resp.Body)
			// The region writes the second chunk only after the client has
			// read the first: without flushing, this read waits until ctx
			// ends.
			first, err := br.ReadString('\n')
			if err != nil || first != "first\n" {
				t.Fatalf("first chunk: got %q, %v, want %q before the region writes the second", first, err, "first\n")
			}
			close(release)
			rest, err := io.ReadAll(br)
			if err != nil || string(rest) != "second\n" {
				t.Errorf("rest: got %q, %v, want %q", rest, err, "second\n")
			}
		})
	}
}

func TestUpgradePassesThrough(t *testing.T) {
	urlA := region(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			http.Error(w, "want an upgrade", http.StatusBadRequest)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("region: hijack: %v", err)
			return
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(wait))
		fmt.Fprint(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		if err := brw.Flush(); err != nil {
			t.Errorf("region: write 101: %v", err)
			return
		}
		_, _ = io.Copy(conn, brw) // echo until EOF
	})
	base := startEdge(t, edge.Config{Regions: map[string]string{"a": urlA}, Default: "a"}, nil)

	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatalf("dial edge: %v", err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(wait)); err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(conn, "GET /ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read upgrade response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "websocket" {
		t.Fatalf("upgrade response: got %d Upgrade %q, want 101 Upgrade websocket", resp.StatusCode, resp.Header.Get("Upgrade"))
	}
	for _, msg := range []string{"ping", "pong and more bytes"} {
		if _, err := io.WriteString(conn, msg); err != nil {
			t.Fatalf("write %q: %v", msg, err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != msg {
			t.Fatalf("echo: got %q, %v, want %q", got, err, msg)
		}
	}
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Errorf("after half-close: got %q, %v, want EOF", rest, err)
	}
}

func TestNewValidates(t *testing.T) {
	ok := "http://127.0.0.1:8081"
	tests := []struct {
		name    string
		cfg     edge.Config
		wantErr string
	}{
		{name: "valid", cfg: edge.Config{Regions: map[string]string{"fra": ok, "iad": "https://localhost:8082/base"}, Default: "fra"}},
		{name: "no regions", cfg: edge.Config{Default: "fra"}, wantErr: "no regions"},
		{name: "empty region name", cfg: edge.Config{Regions: map[string]string{"": ok}, Default: ""}, wantErr: "invalid region name"},
		{name: "region name with separator", cfg: edge.Config{Regions: map[string]string{"fra>iad": ok}, Default: "fra>iad"}, wantErr: "invalid region name"},
		{name: "unparsable URL", cfg: edge.Config{Regions: map[string]string{"fra": "http://[::1"}, Default: "fra"}, wantErr: "parse URL"},
		{name: "URL without scheme", cfg: edge.Config{Regions: map[string]string{"fra": "localhost:8081"}, Default: "fra"}, wantErr: "absolute http"},
		{name: "no default", cfg: edge.Config{Regions: map[string]string{"fra": ok}}, wantErr: "no default region"},
		{name: "unknown default", cfg: edge.Config{Regions: map[string]string{"fra": ok}, Default: "iad"}, wantErr: `default region "iad"`},
		{name: "negative MaxHops", cfg: edge.Config{Regions: map[string]string{"fra": ok}, Default: "fra", MaxHops: -1}, wantErr: "MaxHops"},
		{name: "negative MaxReplayBody", cfg: edge.Config{Regions: map[string]string{"fra": ok}, Default: "fra", MaxReplayBody: -1}, wantErr: "MaxReplayBody"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := edge.New(tt.cfg, zaptest.NewLogger(t))
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("got error %v, want none", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("got error %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestLifecycle(t *testing.T) {
	e, err := edge.New(edge.Config{Listen: "127.0.0.1:0", Regions: map[string]string{"a": region(t, named("a"))}, Default: "a"},
		zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if got := e.Addr(); got != nil {
		t.Errorf("Addr before Listen: got %v, want nil", got)
	}
	if err := e.Serve(); err == nil {
		t.Errorf("Serve before Listen: got nil, want an error")
	}
	if err := e.Listen(); err != nil {
		t.Fatalf("Listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- e.Serve() }()

	resp, body := do(t, newRequest(t, "GET", "http://"+e.Addr().String()+"/", nil))
	if resp.StatusCode != 200 || body != "a" {
		t.Errorf("GET: got %d %q, want 200 %q", resp.StatusCode, body, "a")
	}
	for i := range 2 {
		if err := e.Close(); err != nil {
			t.Errorf("Close #%d: got %v, want nil", i+1, err)
		}
	}
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve: got %v, want nil after Close", err)
		}
	case <-time.After(wait):
		t.Fatalf("Serve did not return within %v of Close", wait)
	}
	if err := e.Listen(); !errors.Is(err, edge.ErrClosed) {
		t.Errorf("Listen after Close: got %v, want %v", err, edge.ErrClosed)
	}
}
