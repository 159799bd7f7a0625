package router_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgfly/pgfly/router"
)

// These tests set the shim's timeouts short and check, with generous upper bounds, what a slow
// or idle client and a slow app get, and that long answers and upgraded connections are not
// cut by them.

// short is the timeout these tests give the shim; bound is how long they wait for it to act.
const (
	short = 300 * time.Millisecond
	bound = 10 * time.Second
)

// dialShim opens a raw connection to the shim, closed at the end of the test.
func dialShim(tb testing.TB, h *harness) (net.Conn, *bufio.Reader) {
	tb.Helper()
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(h.url, "http://"), bound)
	if err != nil {
		tb.Fatalf("dial the shim: %v", err)
	}
	tb.Cleanup(func() { conn.Close() })
	return conn, bufio.NewReader(conn)
}

// closedByPeer waits up to bound for the peer to close conn, reading and discarding what
// comes first; it reports whether it was closed (EOF or a reset) rather than still open.
func closedByPeer(conn net.Conn, br *bufio.Reader, within time.Duration) bool {
	conn.SetReadDeadline(time.Now().Add(within))
	_, err := io.Copy(io.Discard, br)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

func TestIdleKeepAliveIsClosed(t *testing.T) {
	for _, tc := range []struct {
		name       string
		idle       time.Duration
		wantClosed bool
	}{
		{"after the idle timeout", short, true},
		{"never with NoTimeout", router.NoTimeout, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := replicaRegion()
			cfg.IdleTimeout = tc.idle
			h := start(t, cfg, reader)
			const conns = 50 // as many as the issue found held
			type result struct {
				status int
				closed bool
				err    error
			}
			results := make(chan result, conns)
			for range conns {
				conn, br := dialShim(t, h)
				go func() {
					io.WriteString(conn, "GET /items HTTP/1.1\r\nHost: app.example\r\n\r\n")
					conn.SetReadDeadline(time.Now().Add(bound))
					resp, err := http.ReadResponse(br, nil)
					if err != nil {
						results <- result{err: err}
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					// Kept alive after the answer; the client sends nothing more.
					within := bound
					if !tc.wantClosed {
						within = 5 * short
					}
					results <- result{status: resp.StatusCode, closed: closedByPeer(conn, br, within)}
				}()
			}
			for range conns {
				r := <-results
				switch {
				case r.err != nil:
					t.Errorf("first request: %v", r.err)
				case r.status != http.StatusOK:
					t.Errorf("first request: got status %d, want 200", r.status)
				case r.closed != tc.wantClosed:
					t.Errorf("idle keep-alive connection closed by the shim: got %v, want %v", r.closed, tc.wantClosed)
				}
			}
		})
	}
}

// bodyApp is an app that reads the whole body and reports what it got, then answers.
type bodyApp struct {
	got chan bodyRead
}

type bodyRead struct {
	n   int
	err error
}

func newBodyApp() *bodyApp { return &bodyApp{got: make(chan bodyRead, 1)} }

func (a *bodyApp) handler(*router.Shim) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		a.got <- bodyRead{len(b), err}
		if err != nil {
			return
		}
		io.WriteString(w, appBody)
	})
}

// trickle sends a request's headers, then its body one byte every 100 ms, until the body is
// sent, a write fails or the test ends. With chunked set, each byte is a chunk.
func trickle(tb testing.TB, conn net.Conn, bodyLen int, chunked bool) {
	tb.Helper()
	head := fmt.Sprintf("POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Length: %d\r\n\r\n", bodyLen)
	if chunked {
		head = "POST /upload HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n"
	}
	if _, err := io.WriteString(conn, head); err != nil {
		tb.Fatalf("send the headers: %v", err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	tb.Cleanup(func() {
		close(stop)
		wg.Wait()
	})
	go func() {
		defer wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for i := 0; i < bodyLen; i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			b := "x"
			if chunked {
				b = "1\r\nx\r\n"
			}
			conn.SetWriteDeadline(time.Now().Add(bound))
			if _, err := io.WriteString(conn, b); err != nil {
				return
			}
		}
		if chunked {
			io.WriteString(conn, "0\r\n\r\n")
		}
	}()
}

func TestSlowBodyIsCutAtItsDeadline(t *testing.T) {
	// A body of 1 byte every 100 ms never leaves a gap near the 300 ms deadline, and needs
	// 100 s to arrive in full.
	const bodyLen = 1000
	primary := startPrimary(t)
	for _, tc := range []struct {
		name    string
		cfg     router.Config
		chunked bool
		appSees bool // the app gets the request (and must see its body fail), or nothing at all
	}{
		{"a body with a length", replicaRegion(), false, true},
		{"a chunked body", replicaRegion(), true, true},
		{"in the primary region", router.Config{Region: "iad", PrimaryRegion: "iad"}, false, true},
		{"in proxy mode, where the shim reads the body first", proxyConfig(primary.url), false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var timeouts []router.Timeout
			cfg := tc.cfg
			cfg.BodyTimeout = short
			cfg.ObserveTimeout = func(to router.Timeout) {
				mu.Lock()
				defer mu.Unlock()
				timeouts = append(timeouts, to)
			}
			app := newBodyApp()
			h := start(t, cfg, app.handler)
			conn, br := dialShim(t, h)
			started := time.Now()
			trickle(t, conn, bodyLen, tc.chunked)

			// The client gets 408, or at least its connection closed, long before its body is in.
			conn.SetReadDeadline(time.Now().Add(bound))
			resp, err := http.ReadResponse(br, nil)
			switch {
			case err == nil:
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusRequestTimeout || !strings.Contains(string(b), "--http-body-timeout") {
					t.Fatalf("got %d %q, want 408 naming --http-body-timeout", resp.StatusCode, b)
				}
				if !resp.Close {
					t.Errorf("got a 408 that keeps the connection, want Connection: close")
				}
			case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
				strings.Contains(err.Error(), "connection reset"):
				// closed without a readable answer: allowed
			default:
				t.Fatalf("waiting for the shim's answer: %v (after %v), want 408 or the connection closed", err, time.Since(started))
			}
			if !closedByPeer(conn, br, bound) {
				t.Errorf("the connection is still open %v after the 408, want it closed", bound)
			}

			if tc.appSees {
				select {
				case got := <-app.got:
					if got.err == nil || got.n >= bodyLen {
						t.Errorf("the app read %d bytes with error %v, want an error and less than the %d-byte body", got.n, got.err, bodyLen)
					}
				case <-time.After(bound):
					t.Fatalf("the app's body read did not end within %v of the deadline", bound)
				}
			} else if n := h.appHits.Load(); n != 0 {
				t.Errorf("the app got %d requests, want none: the body never arrived", n)
			}
			wantLog := func() bool {
				mu.Lock()
				defer mu.Unlock()
				return len(timeouts) == 1 && timeouts[0] == router.TimeoutBody
			}
			for deadline := time.Now().Add(bound); !wantLog() && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(timeouts) != 1 || timeouts[0] != router.TimeoutBody {
				t.Errorf("got timeouts %v, want [body]", timeouts)
			}
		})
	}

	t.Run("a slow body within the deadline is served", func(t *testing.T) {
		cfg := replicaRegion()
		cfg.BodyTimeout = bound
		app := newBodyApp()
		h := start(t, cfg, app.handler)
		conn, br := dialShim(t, h)
		trickle(t, conn, 3, false) // 300 ms of a 10 s deadline
		conn.SetReadDeadline(time.Now().Add(bound))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("read the answer: %v", err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		wantAppReply(t, reply{resp.StatusCode, resp.Header, string(b)}, http.StatusOK)
		if got := <-app.got; got.err != nil || got.n != 3 {
			t.Errorf("the app read %d bytes with error %v, want the 3-byte body", got.n, got.err)
		}
	})
}

func TestSlowAppGets504(t *testing.T) {
	// The app waits for its request to be cancelled, and says whether it was.
	slowApp := func(taint bool, cancelled chan<- bool) func(*router.Shim) http.Handler {
		return func(shim *router.Shim) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				if taint {
					shim.ReadOnly(violation(""))
				}
				select {
				case <-r.Context().Done():
					cancelled <- true
				case <-time.After(bound):
					cancelled <- false
					io.WriteString(w, appBody)
				}
			})
		}
	}
	for _, tc := range []struct {
		name    string
		cfg     router.Config
		taint   bool
		replays bool
	}{
		{"in a replica region", replicaRegion(), false, false},
		{"in the primary region", router.Config{Region: "iad", PrimaryRegion: "iad"}, false, false},
		{"tainted by a refusal: replayed instead", replicaRegion(), true, true},
		{"tainted in the primary region: never replayed", router.Config{Region: "iad", PrimaryRegion: "iad"}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var timeouts []router.Timeout
			cfg := tc.cfg
			// The body arrives at once: its deadline, passed when the app times out, is not
			// what failed.
			cfg.AppTimeout, cfg.BodyTimeout = short, short/3
			cfg.ObserveTimeout = func(to router.Timeout) {
				mu.Lock()
				defer mu.Unlock()
				timeouts = append(timeouts, to)
			}
			cancelled := make(chan bool, 1)
			h := start(t, cfg, slowApp(tc.taint, cancelled))
			got := h.send(t, http.MethodPost, "/report", strings.NewReader("name=a"), nil)
			if tc.replays {
				wantFlyReplay(t, got, "pgfly_read_only")
			} else {
				app := "http://" + cfgAppHost(t, h)
				if got.status != http.StatusGatewayTimeout || !strings.Contains(got.body, app) ||
					!strings.Contains(got.body, short.String()) || !strings.Contains(got.body, "--app-timeout") {
					t.Fatalf("got %d %q, want 504 naming the app %s, %v and --app-timeout", got.status, got.body, app, short)
				}
				if fr := got.header.Get("Fly-Replay"); fr != "" {
					t.Errorf("got Fly-Replay %q, want none", fr)
				}
				if n := h.logs.FilterMessageSnippet("app did not answer in time").Len(); n != 1 {
					t.Errorf("got %d log lines for the app's timeout, want 1", n)
				}
			}
			select {
			case c := <-cancelled:
				if !c {
					t.Errorf("the app's request was not cancelled within %v, want it cancelled at the timeout", bound)
				}
			case <-time.After(2 * bound):
				t.Fatal("the app handler did not return")
			}
			mu.Lock()
			defer mu.Unlock()
			if want := !tc.replays; want != (len(timeouts) == 1 && timeouts[0] == router.TimeoutApp) {
				t.Errorf("got timeouts %v, want [app] %v", timeouts, want)
			}
		})
	}

	t.Run("an app that cannot be reached still gets 502", func(t *testing.T) {
		cfg := replicaRegion()
		cfg.AppTimeout = short
		cfg.Listen = "127.0.0.1:0"
		cfg.App = unreachable(t)
		shim, err := router.New(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := shim.Listen(); err != nil {
			t.Fatal(err)
		}
		go shim.Serve()
		t.Cleanup(func() { shim.Close() })
		resp, err := http.Post("http://"+shim.Addr().String()+"/items", "text/plain", strings.NewReader("x"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadGateway {
			t.Errorf("got %d %q, want 502", resp.StatusCode, b)
		}
	})
}

// cfgAppHost is the host:port of the harness's app, as the shim's 504 names it.
func cfgAppHost(tb testing.TB, h *harness) string {
	tb.Helper()
	lines := h.logs.FilterMessage("listening").All()
	if len(lines) != 1 {
		tb.Fatalf("got %d \"listening\" log lines, want 1", len(lines))
	}
	u, err := url.Parse(lines[0].ContextMap()["app"].(string))
	if err != nil {
		tb.Fatal(err)
	}
	return u.Host
}

func TestLongAnswersOutliveTheTimeouts(t *testing.T) {
	// Each timeout is short; the answer lasts five times as long.
	const events = 15
	every := short / 3
	timeouts := func() router.Config {
		cfg := replicaRegion()
		cfg.IdleTimeout, cfg.BodyTimeout, cfg.AppTimeout = short, short, short
		return cfg
	}

	t.Run("server-sent events", func(t *testing.T) {
		sse := func(*router.Shim) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", "text/event-stream")
				rc := http.NewResponseController(w)
				for i := range events {
					fmt.Fprintf(w, "data: %d\n\n", i)
					if err := rc.Flush(); err != nil {
						return
					}
					time.Sleep(every)
				}
			})
		}
		for _, tc := range []struct {
			name, method string
			body         io.Reader
		}{
			{"after a GET", http.MethodGet, nil},
			{"after a POST with a body", http.MethodPost, strings.NewReader("subscribe=1")},
			{"after a POST with a chunked body", http.MethodPost, chunked{strings.NewReader("subscribe=1")}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				h := start(t, timeouts(), sse)
				got := h.send(t, tc.method, "/events", tc.body, nil)
				if n := strings.Count(got.body, "data: "); got.status != http.StatusOK || n != events {
					t.Fatalf("got %d with %d events (%q), want 200 with all %d", got.status, n, got.body, events)
				}
			})
		}
	})

	t.Run("an upgraded connection", func(t *testing.T) {
		echo := func(*router.Shim) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				conn, brw, ok := acceptUpgrade(w)
				if !ok {
					return
				}
				defer conn.Close()
				for {
					line, err := brw.ReadString('\n')
					if err != nil {
						return
					}
					brw.WriteString("echo: " + line)
					brw.Flush()
				}
			})
		}
		h := start(t, timeouts(), echo)
		req := h.newRequest(t, http.MethodGet, "/ws", nil, http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}})
		ctx, cancel := context.WithTimeout(context.Background(), 2*bound)
		defer cancel()
		resp, err := h.client.Do(req.WithContext(ctx))
		if err != nil {
			t.Fatalf("upgrade: %v", err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("got status %d, want 101", resp.StatusCode)
		}
		conn := resp.Body.(io.ReadWriteCloser)
		br := bufio.NewReader(conn)
		for i := range 3 {
			if i > 0 {
				time.Sleep(2 * short) // silent longer than every timeout
			}
			fmt.Fprintf(conn, "line %d\n", i)
			got, err := br.ReadString('\n')
			if want := fmt.Sprintf("echo: line %d\n", i); err != nil || got != want {
				t.Fatalf("got %q (%v) over the upgraded connection, want %q", got, err, want)
			}
		}
	})
}

// TestBodyTimeoutSparesRequestsWithoutABody: a request with no body has nothing for the body
// timeout to bound. A GET whose answer outlives it (server-sent events, a long download) keeps
// its connection and context, and the next request on that keep-alive connection is served.
func TestBodyTimeoutSparesRequestsWithoutABody(t *testing.T) {
	const events = 4
	cfg := replicaRegion()
	cfg.BodyTimeout = 200 * time.Millisecond
	h := start(t, cfg, func(*router.Shim) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/events" {
				io.WriteString(w, appBody)
				return
			}
			w.Header().Set("Content-Type", "text/event-stream")
			for i := range events {
				fmt.Fprintf(w, "data: %d\n\n", i)
				http.NewResponseController(w).Flush()
				time.Sleep(100 * time.Millisecond) // 400 ms in all, twice the body timeout
			}
		})
	})
	got := h.send(t, http.MethodGet, "/events", nil, nil)
	if n := strings.Count(got.body, "data: "); got.status != http.StatusOK || n != events {
		t.Fatalf("GET /events: got %d with %d events, want 200 with all %d: %q", got.status, n, events, got.body)
	}
	wantAppReply(t, h.send(t, http.MethodGet, "/next", nil, nil), http.StatusOK)
}
