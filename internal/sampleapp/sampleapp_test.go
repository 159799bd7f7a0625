package sampleapp_test

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
	"github.com/pgfly/pgfly/internal/sampleapp"
)

// wait bounds every blocking step of these tests; reaching it is a failure.
const wait = 10 * time.Second

// traceparent is a valid W3C traceparent.
const traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

// openDB opens a database/sql pool on connURL and closes it in Cleanup.
func openDB(tb testing.TB, connURL string) *sql.DB {
	tb.Helper()
	db, err := sql.Open("pgx", connURL)
	if err != nil {
		tb.Fatalf("open %s: %v", connURL, err)
	}
	tb.Cleanup(func() { db.Close() })
	return db
}

// startApp serves the app for region on an httptest server.
func startApp(tb testing.TB, db *sql.DB, region string) string {
	tb.Helper()
	srv := httptest.NewServer(sampleapp.New(db, region, zaptest.NewLogger(tb)))
	tb.Cleanup(srv.Close)
	return srv.URL
}

// unreachableDB returns a pool whose every use fails: for endpoints that must
// not touch the database.
func unreachableDB(tb testing.TB) *sql.DB {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return openDB(tb, "postgres://nobody@"+addr+"/nothing?sslmode=disable&connect_timeout=2")
}

type request struct {
	method, path string
	header       map[string]string
	body         string
}

// send makes req against base (no redirects followed) and returns the
// response with its body read.
func send(tb testing.TB, base string, req request) (*http.Response, string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(tb.Context(), wait)
	defer cancel()
	r, err := http.NewRequestWithContext(ctx, req.method, base+req.path, strings.NewReader(req.body))
	if err != nil {
		tb.Fatal(err)
	}
	for k, v := range req.header {
		r.Header.Set(k, v)
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(r)
	if err != nil {
		tb.Fatalf("%s %s: %v", req.method, req.path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("%s %s: read body: %v", req.method, req.path, err)
	}
	return resp, string(body)
}

// sendJSON makes req, checks the status and decodes the JSON body into v.
func sendJSON(tb testing.TB, base string, req request, wantStatus int, v any) {
	tb.Helper()
	resp, body := send(tb, base, req)
	if resp.StatusCode != wantStatus {
		tb.Fatalf("%s %s: got %d %q, want %d", req.method, req.path, resp.StatusCode, body, wantStatus)
	}
	if err := json.Unmarshal([]byte(body), v); err != nil {
		tb.Fatalf("%s %s: decode %q: %v", req.method, req.path, body, err)
	}
}

// countNamed counts the rows named name.
func countNamed(tb testing.TB, db *sql.DB, name string) int {
	tb.Helper()
	var n int
	if err := db.QueryRowContext(tb.Context(), "SELECT count(*) FROM items WHERE name = $1", name).Scan(&n); err != nil {
		tb.Fatalf("count items named %s: %v", name, err)
	}
	return n
}

func TestAgainstPostgres(t *testing.T) {
	cluster := pgtest.Start(t, pgcluster.Options{})
	su := pgcluster.RoleSuperuser.Name
	primaryDB := openDB(t, cluster.Primary.URL(su, "", pgcluster.Database))
	for i := range 2 {
		if err := sampleapp.Migrate(t.Context(), primaryDB); err != nil {
			t.Fatalf("Migrate #%d: %v", i+1, err)
		}
	}
	primary := startApp(t, primaryDB, "fra")

	t.Run("POST then GET shows the item", func(t *testing.T) {
		var created sampleapp.Item
		sendJSON(t, primary, request{method: "POST", path: "/items",
			header: map[string]string{"Content-Type": "application/json"}, body: `{"name":"alice"}`},
			http.StatusCreated, &created)
		if created.ID <= 0 || created.Name != "alice" || created.Region != "fra" {
			t.Errorf("created: got %+v, want a positive id, name alice, region fra", created)
		}
		var list []sampleapp.Item
		sendJSON(t, primary, request{method: "GET", path: "/items"}, http.StatusOK, &list)
		if !containsItem(list, created) {
			t.Errorf("GET /items: got %+v, want it to contain %+v", list, created)
		}
		var one sampleapp.Item
		sendJSON(t, primary, request{method: "GET", path: fmt.Sprintf("/items/%d", created.ID)}, http.StatusOK, &one)
		if one != created {
			t.Errorf("GET /items/%d: got %+v, want %+v", created.ID, one, created)
		}
	})

	t.Run("GET missing item", func(t *testing.T) {
		for _, path := range []string{"/items/999999999", "/items/abc"} {
			if resp, body := send(t, primary, request{method: "GET", path: path}); resp.StatusCode != http.StatusNotFound {
				t.Errorf("GET %s: got %d %q, want 404", path, resp.StatusCode, body)
			}
		}
	})

	t.Run("POST /items", func(t *testing.T) {
		tests := []struct {
			name         string
			req          request
			wantStatus   int
			wantLocation string
			wantRows     int
		}{
			{name: "form from a browser redirects",
				req: request{header: map[string]string{"Content-Type": "application/x-www-form-urlencoded",
					"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}, body: "name=form-browser"},
				wantStatus: http.StatusSeeOther, wantLocation: "/", wantRows: 1},
			{name: "form from a JSON client answers 201",
				req: request{header: map[string]string{"Content-Type": "application/x-www-form-urlencoded",
					"Accept": "application/json"}, body: "name=form-json"},
				wantStatus: http.StatusCreated, wantRows: 1},
			{name: "form without Accept answers 201",
				req:        request{header: map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, body: "name=form-plain"},
				wantStatus: http.StatusCreated, wantRows: 1},
			{name: "missing name",
				req:        request{header: map[string]string{"Content-Type": "application/json"}, body: `{"name":"  "}`},
				wantStatus: http.StatusBadRequest},
			{name: "bad JSON",
				req:        request{header: map[string]string{"Content-Type": "application/json"}, body: `{"name":`},
				wantStatus: http.StatusBadRequest},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				tt.req.method, tt.req.path = "POST", "/items"
				resp, body := send(t, primary, tt.req)
				if resp.StatusCode != tt.wantStatus {
					t.Errorf("status: got %d %q, want %d", resp.StatusCode, body, tt.wantStatus)
				}
				if got := resp.Header.Get("Location"); got != tt.wantLocation {
					t.Errorf("Location: got %q, want %q", got, tt.wantLocation)
				}
				if name, _ := url.ParseQuery(tt.req.body); name.Get("name") != "" {
					if got := countNamed(t, primaryDB, name.Get("name")); got != tt.wantRows {
						t.Errorf("rows named %s: got %d, want %d", name.Get("name"), got, tt.wantRows)
					}
				}
			})
		}
	})

	t.Run("guestbook page lists items", func(t *testing.T) {
		send(t, primary, request{method: "POST", path: "/items",
			header: map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, body: "name=%3Cb%3Epage-guest"})
		resp, body := send(t, primary, request{method: "GET", path: "/"})
		if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
			t.Fatalf("GET /: got %d %s, want 200 text/html", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		for _, want := range []string{`<strong id="region">fra</strong>`, "&lt;b&gt;page-guest", `action="/items"`} {
			if !strings.Contains(body, want) {
				t.Errorf("GET /: got %q, want it to contain %q", body, want)
			}
		}
	})

	t.Run("GET /touch writes", func(t *testing.T) {
		var it sampleapp.Item
		sendJSON(t, primary, request{method: "GET", path: "/touch?name=touched"}, http.StatusOK, &it)
		if it.Name != "touched" || it.ID <= 0 {
			t.Errorf("got %+v, want a new item named touched", it)
		}
		if got := countNamed(t, primaryDB, "touched"); got != 1 {
			t.Errorf("rows named touched: got %d, want 1", got)
		}
	})

	t.Run("POST /tx writes once", func(t *testing.T) {
		var before int64
		if err := primaryDB.QueryRowContext(t.Context(), "SELECT count(*) FROM items").Scan(&before); err != nil {
			t.Fatal(err)
		}
		var it sampleapp.TxItem
		sendJSON(t, primary, request{method: "POST", path: "/tx?name=in-tx"}, http.StatusCreated, &it)
		if it.Name != "in-tx" || it.Region != "fra" || it.Count != before {
			t.Errorf("got %+v, want name in-tx, region fra, count %d", it, before)
		}
		if got := countNamed(t, primaryDB, "in-tx"); got != 1 {
			t.Errorf("rows named in-tx: got %d, want 1", got)
		}
	})

	t.Run("POST /upload stores the size", func(t *testing.T) {
		var it sampleapp.Item
		sendJSON(t, primary, request{method: "POST", path: "/upload?name=uploaded", body: strings.Repeat("u", 12345)},
			http.StatusCreated, &it)
		var size int
		if err := primaryDB.QueryRowContext(t.Context(), "SELECT body_size FROM items WHERE id = $1", it.ID).Scan(&size); err != nil {
			t.Fatal(err)
		}
		if it.BodySize != 12345 || size != 12345 {
			t.Errorf("body_size: got %d in the response and %d in the table, want 12345", it.BodySize, size)
		}
	})

	t.Run("GET /stream with a write", func(t *testing.T) {
		resp, body := send(t, primary, request{method: "GET", path: "/stream?n=3&gap=0&write=1&name=streamed"})
		if want := "chunk 1\nwrite: ok\nchunk 2\nchunk 3\n"; resp.StatusCode != 200 || body != want {
			t.Errorf("got %d %q, want 200 %q", resp.StatusCode, body, want)
		}
		if got := countNamed(t, primaryDB, "streamed"); got != 1 {
			t.Errorf("rows named streamed: got %d, want 1", got)
		}
	})

	t.Run("SQL carries the traceparent", func(t *testing.T) {
		// A pool of one connection, tagged so that pg_stat_activity finds
		// it: an idle backend shows the last statement it ran.
		db := openDB(t, cluster.Primary.URL(su, "", pgcluster.Database, "application_name=sampleapp_trace"))
		db.SetMaxOpenConns(1)
		app := startApp(t, db, "fra")
		tests := []struct {
			name   string
			path   string
			header map[string]string
			want   string
		}{
			{name: "insert with traceparent", path: "/touch?name=traced", header: map[string]string{"traceparent": traceparent},
				want: "INSERT INTO items (name, region, body_size) VALUES ($1, $2, $3) RETURNING id /*traceparent='" + traceparent + "'*/"},
			{name: "read with traceparent", path: "/items", header: map[string]string{"traceparent": traceparent},
				want: "SELECT id, name, region, body_size FROM items ORDER BY id /*traceparent='" + traceparent + "'*/"},
			{name: "without traceparent", path: "/items",
				want: "SELECT id, name, region, body_size FROM items ORDER BY id"},
			{name: "invalid traceparent is not put in SQL", path: "/items", header: map[string]string{"traceparent": "00-x'*/; DROP TABLE items; --"},
				want: "SELECT id, name, region, body_size FROM items ORDER BY id"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				resp, body := send(t, app, request{method: "GET", path: tt.path, header: tt.header})
				if resp.StatusCode != 200 {
					t.Fatalf("GET %s: got %d %q, want 200", tt.path, resp.StatusCode, body)
				}
				var got string
				if err := primaryDB.QueryRowContext(t.Context(),
					"SELECT query FROM pg_stat_activity WHERE application_name = 'sampleapp_trace'").Scan(&got); err != nil {
					t.Fatalf("read the app's last statement: %v", err)
				}
				if got != tt.want {
					t.Errorf("last statement: got %q, want %q", got, tt.want)
				}
			})
		}
	})

	t.Run("on the replica", func(t *testing.T) {
		if err := cluster.WaitReplayed(t.Context()); err != nil {
			t.Fatal(err)
		}
		replicaDB := openDB(t, cluster.Replica.URL(su, "", pgcluster.Database))
		replica := startApp(t, replicaDB, "iad")

		var list []sampleapp.Item
		sendJSON(t, replica, request{method: "GET", path: "/items"}, http.StatusOK, &list)
		if len(list) == 0 {
			t.Errorf("GET /items on the replica: got no items, want those written on the primary")
		}

		writes := []request{
			{method: "POST", path: "/items", header: map[string]string{"Content-Type": "application/json"}, body: `{"name":"refused"}`},
			{method: "GET", path: "/touch?name=refused"},
			{method: "POST", path: "/tx?name=refused"},
			{method: "POST", path: "/upload?name=refused", body: "data"},
		}
		for _, req := range writes {
			t.Run(req.method+" "+req.path, func(t *testing.T) {
				resp, body := send(t, replica, req)
				if resp.StatusCode != http.StatusInternalServerError || !strings.HasPrefix(body, "db error: ") ||
					!strings.Contains(body, "25006") && !strings.Contains(body, "read-only") {
					t.Errorf("got %d %q, want 500 \"db error: ...\" with 25006 or read-only", resp.StatusCode, body)
				}
				if got := resp.Header.Get(sampleapp.RegionHeader); got != "iad" {
					t.Errorf("%s: got %q, want iad", sampleapp.RegionHeader, got)
				}
			})
		}

		t.Run("GET /stream with a write", func(t *testing.T) {
			resp, body := send(t, replica, request{method: "GET", path: "/stream?n=2&gap=0&write=1&name=refused"})
			lines := strings.Split(body, "\n")
			if resp.StatusCode != 200 || len(lines) != 4 || lines[0] != "chunk 1" || lines[2] != "chunk 2" ||
				!strings.HasPrefix(lines[1], "write: ") || !strings.Contains(lines[1], "25006") {
				t.Errorf("got %d %q, want 200 with chunk 1, a write error with 25006, chunk 2", resp.StatusCode, body)
			}
		})
		if got := countNamed(t, primaryDB, "refused"); got != 0 {
			t.Errorf("rows named refused: got %d, want 0", got)
		}
	})
}

func containsItem(list []sampleapp.Item, it sampleapp.Item) bool {
	for _, x := range list {
		if x == it {
			return true
		}
	}
	return false
}

// These endpoints must work without a database: the app's pool points at a
// closed port.
func TestWithoutDatabase(t *testing.T) {
	app := startApp(t, unreachableDB(t), "fra")

	t.Run("GET /healthz", func(t *testing.T) {
		resp, body := send(t, app, request{method: "GET", path: "/healthz"})
		if resp.StatusCode != 200 || body != "ok" {
			t.Errorf("got %d %q, want 200 ok", resp.StatusCode, body)
		}
	})

	t.Run("every response names the region", func(t *testing.T) {
		for _, req := range []request{{method: "GET", path: "/healthz"}, {method: "GET", path: "/nope"},
			{method: "DELETE", path: "/items"}, {method: "GET", path: "/items"}} {
			resp, _ := send(t, app, req)
			if got := resp.Header.Get(sampleapp.RegionHeader); got != "fra" {
				t.Errorf("%s %s: %s: got %q, want fra", req.method, req.path, sampleapp.RegionHeader, got)
			}
		}
	})

	t.Run("a database error is the app's 500", func(t *testing.T) {
		resp, body := send(t, app, request{method: "GET", path: "/items"})
		if resp.StatusCode != http.StatusInternalServerError || !strings.HasPrefix(body, "db error: ") {
			t.Errorf("got %d %q, want 500 \"db error: ...\"", resp.StatusCode, body)
		}
	})

	t.Run("ANY /echo", func(t *testing.T) {
		var got sampleapp.Echo
		sendJSON(t, app, request{method: "PUT", path: "/echo?a=1&b=2",
			header: map[string]string{"X-Thing": "v", "fly-replay-src": "region=fra"}, body: "hello body"}, http.StatusOK, &got)
		if got.Method != "PUT" || got.Path != "/echo" || got.Query != "a=1&b=2" || got.Body != "hello body" ||
			got.Headers["X-Thing"] != "v" || got.Headers["Fly-Replay-Src"] != "region=fra" {
			t.Errorf("got %+v, want PUT /echo a=1&b=2 with the body and headers sent", got)
		}
	})

	t.Run("GET /stream flushes each chunk", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), wait)
		defer cancel()
		// A minute between chunks: the first can only arrive in time if it
		// was flushed. Cancelling the request ends the handler.
		req, err := http.NewRequestWithContext(ctx, "GET", app+"/stream?n=2&gap=60000", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("GET /stream: %v", err)
		}
		defer resp.Body.Close()
		line, err := bufio.NewReader(resp.Body).ReadString('\n')
		if err != nil || line != "chunk 1\n" {
			t.Errorf("first chunk: got %q, %v, want %q", line, err, "chunk 1\n")
		}
	})

	t.Run("GET /stream", func(t *testing.T) {
		tests := []struct {
			name, path string
			wantStatus int
			wantBody   string
		}{
			{name: "defaults", path: "/stream?gap=0", wantStatus: 200, wantBody: "chunk 1\nchunk 2\nchunk 3\n"},
			{name: "n=1", path: "/stream?n=1", wantStatus: 200, wantBody: "chunk 1\n"},
			{name: "bad n", path: "/stream?n=x", wantStatus: 400, wantBody: "n=\"x\""},
			{name: "gap too long", path: "/stream?gap=600000", wantStatus: 400, wantBody: "gap="},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				resp, body := send(t, app, request{method: "GET", path: tt.path})
				if resp.StatusCode != tt.wantStatus || !strings.Contains(body, tt.wantBody) {
					t.Errorf("got %d %q, want %d containing %q", resp.StatusCode, body, tt.wantStatus, tt.wantBody)
				}
			})
		}
	})

	t.Run("GET /ws echoes", func(t *testing.T) {
		conn, err := net.Dial("tcp", strings.TrimPrefix(app, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if err := conn.SetDeadline(time.Now().Add(wait)); err != nil {
			t.Fatal(err)
		}
		fmt.Fprint(conn, "GET /ws HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n")
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("read 101: %v", err)
		}
		if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "websocket" ||
			resp.Header.Get(sampleapp.RegionHeader) != "fra" {
			t.Fatalf("got %d %v, want 101 with Upgrade: websocket and %s: fra", resp.StatusCode, resp.Header, sampleapp.RegionHeader)
		}
		for _, msg := range []string{"hello", strings.Repeat("x", 100<<10)} {
			if _, err := io.WriteString(conn, msg); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, []byte(msg)) {
				t.Fatalf("echo of %d bytes: got %d bytes, %v", len(msg), len(got), err)
			}
		}
		if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
			t.Errorf("after half-close: got %q, %v, want EOF", rest, err)
		}
	})

	t.Run("GET /ws without upgrade headers", func(t *testing.T) {
		resp, _ := send(t, app, request{method: "GET", path: "/ws"})
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("got %d, want 400", resp.StatusCode)
		}
	})
}
