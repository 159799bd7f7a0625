package regions_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgfly/pgfly/internal/edge"
	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/internal/sampleapp"
	"github.com/pgfly/pgfly/router"
)

// cluster is one real primary and replica shared by every test here; each test starts its
// own pgfly instances, apps and edge against it.
var cluster *pgcluster.Cluster

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	c, err := pgcluster.Start(ctx, pgcluster.Options{})
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "end-to-end tests need a real PostgreSQL cluster:", err)
		os.Exit(1)
	}
	cluster = c
	code := m.Run()
	c.Close()
	os.Exit(code)
}

// world is a running two-region setup with its logs captured.
type world struct {
	*regions.Setup
	logs *observer.ObservedLogs
}

func start(tb testing.TB, opts regions.Options) *world {
	tb.Helper()
	return startOn(tb, cluster, opts)
}

// startOn is start on a cluster of the test's own, for tests that must break it.
func startOn(tb testing.TB, c *pgcluster.Cluster, opts regions.Options) *world {
	tb.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	opts.Cluster = c
	opts.Log = zap.New(core)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := regions.Start(ctx, opts)
	if err != nil {
		tb.Fatalf("start two regions: %v", err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("close: %v", err)
		}
	})
	return &world{Setup: s, logs: logs}
}

// reply is what a client got back.
type reply struct {
	status int
	region string // X-App-Region: which app answered, "" when the app did not
	trail  string // X-Edge-Trail: the regions the request ran in
	body   string
	header http.Header
}

func do(tb testing.TB, method, u string, body io.Reader, header http.Header) reply {
	tb.Helper()
	return doWith(tb, http.DefaultClient, method, u, body, header)
}

func postForm(tb testing.TB, u string, form url.Values) reply {
	tb.Helper()
	return do(tb, http.MethodPost, u, strings.NewReader(form.Encode()),
		http.Header{"Content-Type": {"application/x-www-form-urlencoded"}, "Accept": {"application/json"}})
}

// connectTo opens a superuser connection to one of the cluster's servers, directly; the
// caller closes it.
func connectTo(tb testing.TB, s *pgcluster.Server, params ...string) *pgx.Conn {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database, params...))
	if err != nil {
		tb.Fatalf("connect to the %s: %v", s.Name, err)
	}
	return conn
}

// wantRows checks how many items have a name on one server.
func wantRows(tb testing.TB, s *pgcluster.Server, name string, want int) {
	tb.Helper()
	if n := rowsNamed(tb, s, name); n != want {
		tb.Fatalf("got %d rows named %s on the %s, want %d", n, name, s.Name, want)
	}
}

// rowsNamed counts the items with a name on one server, directly.
func rowsNamed(tb testing.TB, s *pgcluster.Server, name string) int {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn := connectTo(tb, s)
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, "select count(*) from items where name = $1", name).Scan(&n); err != nil {
		tb.Fatalf("count on %s: %v", s.Name, err)
	}
	return n
}

func waitReplayed(tb testing.TB) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := cluster.WaitReplayed(ctx); err != nil {
		tb.Fatalf("wait for the replica: %v", err)
	}
}

var seq struct {
	sync.Mutex
	n int
}

// unique returns a name no other test uses.
func unique(prefix string) string {
	seq.Lock()
	defer seq.Unlock()
	seq.n++
	return fmt.Sprintf("%s-%d-%d", prefix, time.Now().UnixNano(), seq.n)
}

// wantReply checks where a request ran and who answered it.
func wantReply(tb testing.TB, got reply, status int, region, trail string) {
	tb.Helper()
	if got.status != status || got.region != region || (trail != "" && got.trail != trail) {
		tb.Fatalf("got status %d from app region %q via trail %q (body %q), want %d from %q via %q",
			got.status, got.region, got.trail, got.body, status, region, trail)
	}
}

func TestReplayThroughTheEdge(t *testing.T) {
	w := start(t, regions.Options{})

	t.Run("a GET that reads is served in the replica region", func(t *testing.T) {
		got := do(t, http.MethodGet, w.EdgeURL+"/items", nil, nil)
		wantReply(t, got, http.StatusOK, "fra", "fra")
	})

	t.Run("a POST that inserts is replayed and writes once", func(t *testing.T) {
		name := unique("post")
		got := postForm(t, w.EdgeURL+"/items", url.Values{"name": {name}})
		wantReply(t, got, http.StatusCreated, "iad", "fra>iad")
		wantRows(t, cluster.Primary, name, 1)
		waitReplayed(t)
		wantRows(t, cluster.Replica, name, 1)
	})

	t.Run("a GET that writes is replayed too", func(t *testing.T) {
		name := unique("touch")
		got := do(t, http.MethodGet, w.EdgeURL+"/touch?name="+name, nil, nil)
		wantReply(t, got, http.StatusOK, "iad", "fra>iad")
		wantRows(t, cluster.Primary, name, 1)
	})

	t.Run("a transaction is replayed and commits once", func(t *testing.T) {
		name := unique("tx")
		got := do(t, http.MethodPost, w.EdgeURL+"/tx?name="+name, nil, nil)
		wantReply(t, got, http.StatusCreated, "iad", "fra>iad")
		wantRows(t, cluster.Primary, name, 1)
	})

	t.Run("every replay decision is one log line that follows the request", func(t *testing.T) {
		lines := w.logs.FilterMessage("replaying in the primary region").FilterField(zap.String("path", "/tx")).All()
		if len(lines) == 0 {
			t.Fatal("no replay decision logged for /tx")
		}
		fields := lines[len(lines)-1].ContextMap()
		for _, k := range []string{"method", "path", "region", "target_region", "reason", "session", "sqlstate", "match", "duration"} {
			if _, ok := fields[k]; !ok {
				t.Errorf("replay log line lacks %q: %v", k, fields)
			}
		}
		if fields["region"] != "fra" || fields["target_region"] != "iad" || fields["sqlstate"] != "25006" {
			t.Errorf("got %v, want region fra, target iad, sqlstate 25006", fields)
		}
	})
}

// TestConcurrentWritesAndReads sends 20 POSTs and 100 GETs at once, in overlap mode and in
// precise mode, and reports how many GETs were replayed needlessly.
func TestConcurrentWritesAndReads(t *testing.T) {
	for _, tc := range []struct {
		name    string
		precise bool
	}{{"overlap", false}, {"precise", true}} {
		t.Run(tc.name, func(t *testing.T) {
			w := start(t, regions.Options{InjectTraceparent: tc.precise})
			const posts, gets = 20, 100
			prefix := unique("burst-" + tc.name)
			var wg sync.WaitGroup
			replies := make([]reply, posts+gets)
			errs := make(chan error, posts+gets)
			for i := range posts + gets {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var req *http.Request
					if i < posts {
						form := url.Values{"name": {fmt.Sprintf("%s-%d", prefix, i)}}
						req, _ = http.NewRequest(http.MethodPost, w.EdgeURL+"/items", strings.NewReader(form.Encode()))
						req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
						req.Header.Set("Accept", "application/json")
					} else {
						req, _ = http.NewRequest(http.MethodGet, w.EdgeURL+"/items", nil)
					}
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					defer cancel()
					resp, err := http.DefaultClient.Do(req.WithContext(ctx))
					if err != nil {
						errs <- err
						return
					}
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					replies[i] = reply{resp.StatusCode, resp.Header.Get(sampleapp.RegionHeader), resp.Header.Get(edge.TrailHeader), string(b), resp.Header}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatalf("request failed: %v", err)
			}
			needless := 0
			for i, r := range replies {
				if r.region == "" {
					t.Fatalf("request %d got a response that is not the app's own: %d %q", i, r.status, r.body)
				}
				if i < posts {
					wantReply(t, r, http.StatusCreated, "iad", "fra>iad")
					continue
				}
				if r.status != http.StatusOK {
					t.Fatalf("GET %d: got status %d (%q), want 200", i, r.status, r.body)
				}
				if r.region == "iad" {
					needless++
				}
			}
			for i := range posts {
				if n := rowsNamed(t, cluster.Primary, fmt.Sprintf("%s-%d", prefix, i)); n != 1 {
					t.Fatalf("POST %d: got %d rows, want exactly 1", i, n)
				}
			}
			t.Logf("%s mode: %d of %d concurrent GETs were replayed needlessly", tc.name, needless, gets)
			if tc.precise && needless != 0 {
				t.Errorf("precise mode replayed %d GETs, want 0", needless)
			}
		})
	}
}

// TestReadOnlyPrimary makes the primary refuse writes: the write is replayed once to the
// primary region, which answers with the app's own error and does not loop.
func TestReadOnlyPrimary(t *testing.T) {
	w := start(t, regions.Options{})
	setPrimaryReadOnly(t, true)
	t.Cleanup(func() { setPrimaryReadOnly(t, false) })

	got := postForm(t, w.EdgeURL+"/items", url.Values{"name": {unique("ro-primary")}})
	wantReply(t, got, http.StatusInternalServerError, "iad", "fra>iad")
	if !strings.Contains(got.body, "db error") {
		t.Fatalf("got body %q, want the app's own db error", got.body)
	}
	lines := w.logs.FilterLevelExact(zapcore.ErrorLevel).FilterMessageSnippet("primary region").All()
	if len(lines) == 0 {
		t.Fatal("no error log line about a read-only primary")
	}
}

func setPrimaryReadOnly(tb testing.TB, on bool) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn := connectTo(tb, cluster.Primary)
	defer conn.Close(ctx)
	stmt := "alter system reset default_transaction_read_only"
	if on {
		stmt = "alter system set default_transaction_read_only = on"
	}
	if _, err := conn.Exec(ctx, stmt); err != nil {
		tb.Fatalf("%s: %v", stmt, err)
	}
	if _, err := conn.Exec(ctx, "select pg_reload_conf()"); err != nil {
		tb.Fatalf("reload: %v", err)
	}
	// The reload reaches backends asynchronously: wait until a new session sees it.
	want := "off"
	if on {
		want = "on"
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := pgx.Connect(ctx, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
		if err != nil {
			tb.Fatalf("connect: %v", err)
		}
		var got string
		err = c.QueryRow(ctx, "show default_transaction_read_only").Scan(&got)
		c.Close(ctx)
		if err == nil && got == want {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("default_transaction_read_only stayed %q, want %q", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestProxyMode replays without the edge: the replica region's pgfly sends the request to
// the primary region's pgfly itself.
func TestProxyMode(t *testing.T) {
	w := start(t, regions.Options{Mode: router.ModeProxy})
	fra := w.Replica.ShimURL

	t.Run("reads stay local", func(t *testing.T) {
		wantReply(t, do(t, http.MethodGet, fra+"/items", nil, nil), http.StatusOK, "fra", "")
	})
	t.Run("a POST is answered by the primary region, once", func(t *testing.T) {
		name := unique("proxy-post")
		got := postForm(t, fra+"/items", url.Values{"name": {name}})
		wantReply(t, got, http.StatusCreated, "iad", "")
		wantRows(t, cluster.Primary, name, 1)
	})
	t.Run("a GET that writes", func(t *testing.T) {
		name := unique("proxy-touch")
		wantReply(t, do(t, http.MethodGet, fra+"/touch?name="+name, nil, nil), http.StatusOK, "iad", "")
		wantRows(t, cluster.Primary, name, 1)
	})
	t.Run("a transaction", func(t *testing.T) {
		name := unique("proxy-tx")
		wantReply(t, do(t, http.MethodPost, fra+"/tx?name="+name, nil, nil), http.StatusCreated, "iad", "")
		wantRows(t, cluster.Primary, name, 1)
	})
	t.Run("a body within the limit is replayed whole", func(t *testing.T) {
		name := unique("proxy-upload")
		body := bytes.Repeat([]byte("x"), 512<<10)
		got := do(t, http.MethodPost, fra+"/upload?name="+name, bytes.NewReader(body), nil)
		wantReply(t, got, http.StatusCreated, "iad", "")
		var item struct {
			BodySize int `json:"body_size"`
		}
		if err := json.Unmarshal([]byte(got.body), &item); err != nil || item.BodySize != len(body) {
			t.Fatalf("got %q (%v), want body_size %d", got.body, err, len(body))
		}
	})
	t.Run("a body over the limit gets 503 naming the limit", func(t *testing.T) {
		name := unique("proxy-big")
		got := do(t, http.MethodPost, fra+"/upload?name="+name, bytes.NewReader(make([]byte, 2<<20)), nil)
		if got.status != http.StatusServiceUnavailable || !strings.Contains(got.body, "1048576") {
			t.Fatalf("got %d %q, want 503 naming the 1048576-byte limit", got.status, got.body)
		}
		wantRows(t, cluster.Primary, name, 0)
	})
}

// TestWhatIsNeverReplayed covers the requests the shim must leave alone.
func TestWhatIsNeverReplayed(t *testing.T) {
	w := start(t, regions.Options{})
	fra := w.Replica.ShimURL

	t.Run("a body over Fly's limit cannot be replayed by the edge", func(t *testing.T) {
		name := unique("big")
		got := do(t, http.MethodPost, w.EdgeURL+"/upload?name="+name, bytes.NewReader(make([]byte, 2<<20)), nil)
		if got.status != http.StatusBadGateway {
			t.Fatalf("got %d %q, want the edge's 502", got.status, got.body)
		}
		wantRows(t, cluster.Primary, name, 0)
	})

	t.Run("a request pgfly replayed already is not replayed again", func(t *testing.T) {
		name := unique("loop")
		got := do(t, http.MethodGet, fra+"/touch?name="+name, nil,
			http.Header{"Fly-Replay-Src": {"instance=x;region=fra;t=1;state=pgfly_read_only"}})
		if got.status != http.StatusServiceUnavailable || got.header.Get("Fly-Replay") != "" {
			t.Fatalf("got %d fly-replay %q, want 503 without fly-replay", got.status, got.header.Get("Fly-Replay"))
		}
		if len(w.logs.FilterMessageSnippet("not replaying twice").All()) == 0 {
			t.Fatal("no error log line for the blocked loop")
		}
	})

	t.Run("a streaming response that started cannot be replayed", func(t *testing.T) {
		got := do(t, http.MethodGet, w.EdgeURL+"/stream?n=3&write=1", nil, nil)
		wantReply(t, got, http.StatusOK, "fra", "fra")
		if !strings.Contains(got.body, "write: ") || strings.Contains(got.body, "write: ok") {
			t.Fatalf("got body %q, want the app's failed write inside the stream", got.body)
		}
		if len(w.logs.FilterMessageSnippet("cannot replay").All()) == 0 {
			t.Fatal("no log line saying the started response could not be replayed")
		}
	})

	t.Run("a violation outside any request reaches its client and is logged", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		dsn := fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", pgcluster.RoleSuperuser.Name, w.Replica.Sidecar.PostgresAddr(), pgcluster.Database)
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		_, err = conn.Exec(ctx, "insert into items (name, region) values ('console', 'fra')")
		if err == nil || !strings.Contains(err.Error(), "25006") {
			t.Fatalf("got %v, want the replica's 25006", err)
		}
		if len(w.logs.FilterMessageSnippet("no HTTP request in flight").All()) == 0 {
			t.Fatal("no warning for a violation without a request")
		}
	})

	t.Run("requests that touch no database pass through exactly", func(t *testing.T) {
		body := "exact body \x00 ünïcode"
		got := do(t, http.MethodPut, fra+"/echo?a=1&b=two", strings.NewReader(body),
			http.Header{"X-Custom": {"one", "two"}, "X-Forwarded-For": {"203.0.113.9"}})
		var echo struct {
			Method  string            `json:"method"`
			Query   string            `json:"query"`
			Headers map[string]string `json:"headers"`
			Body    string            `json:"body"`
		}
		if err := json.Unmarshal([]byte(got.body), &echo); err != nil {
			t.Fatalf("decode %q: %v", got.body, err)
		}
		if echo.Method != http.MethodPut || echo.Query != "a=1&b=two" || echo.Body != body {
			t.Fatalf("got %+v, want PUT a=1&b=two with the body intact", echo)
		}
		if h := echo.Headers["X-Custom"]; h != "one, two" {
			t.Fatalf("got X-Custom %q, want both values", h)
		}
		if h := echo.Headers["X-Forwarded-For"]; h != "203.0.113.9" {
			t.Fatalf("got X-Forwarded-For %v, want it as sent", h)
		}
	})
}

// doWith is do with a client of the caller's, e.g. one with a cookie jar.
func doWith(tb testing.TB, c *http.Client, method, u string, body io.Reader, header http.Header) reply {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	got, err := send(ctx, c, method, u, body, header)
	if err != nil {
		tb.Fatal(err)
	}
	return got
}

// send makes one request and reads the whole reply. It returns errors instead of failing the
// test, so goroutines may use it.
func send(ctx context.Context, c *http.Client, method, u string, body io.Reader, header http.Header) (reply, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return reply{}, fmt.Errorf("new request: %w", err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := c.Do(req)
	if err != nil {
		return reply{}, fmt.Errorf("%s %s: %w", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return reply{}, fmt.Errorf("read body of %s %s: %w", method, u, err)
	}
	return reply{resp.StatusCode, resp.Header.Get(sampleapp.RegionHeader), resp.Header.Get(edge.TrailHeader), string(b), resp.Header}, nil
}

// formHeader is the header of a form POST whose client wants JSON back.
func formHeader() http.Header {
	return http.Header{"Content-Type": {"application/x-www-form-urlencoded"}, "Accept": {"application/json"}}
}

// browser returns a client that keeps cookies, as a browser does.
func browser(tb testing.TB) *http.Client {
	tb.Helper()
	jar, err := cookiejar.New(nil)
	if err != nil {
		tb.Fatalf("cookie jar: %v", err)
	}
	return &http.Client{Jar: jar}
}

// TestWebSocketPassesThrough upgrades a connection through the edge and fra's pgfly to the
// app, and echoes bytes over it.
func TestWebSocketPassesThrough(t *testing.T) {
	w := start(t, regions.Options{})
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(w.EdgeURL, "http://"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(conn, "GET /ws HTTP/1.1\r\nHost: example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read the upgrade response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get(sampleapp.RegionHeader) != "fra" {
		t.Fatalf("got %d from region %q, want 101 from fra", resp.StatusCode, resp.Header.Get(sampleapp.RegionHeader))
	}
	for _, msg := range []string{"hello\n", "pgfly\n"} {
		if _, err := io.WriteString(conn, msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(br, got); err != nil {
			t.Fatalf("read the echo: %v", err)
		}
		if string(got) != msg {
			t.Fatalf("got echo %q, want %q", got, msg)
		}
	}
}
