// Package sampleapp is the small guestbook app that pgfly's end-to-end tests
// and demo run behind the shim: net/http and database/sql over pgx.
//
// It is written as if its database were always writable, like any app that
// pgfly is meant to carry unchanged, and it must never contain replay code of
// any kind (no fly-replay, no region checks, no retries): when its nearby
// database refuses a write it answers 500 "db error: ...", and making that
// request succeed is pgfly's job. The one piece of plumbing it has is
// standard tracing propagation: a W3C traceparent request header is appended
// to every SQL statement as a sqlcommenter comment. For the demo, the guestbook
// page (page.go) also shows what the app can see of replays and replication
// (the fly-replay-src header, pgfly's bookmark cookie, its database's role and
// replay position) without acting on any of it.
//
// Importing the package registers the pgx database/sql driver as "pgx".
package sampleapp

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver
	"go.uber.org/zap"
)

// RegionHeader is the response header that names the region of the instance
// that answered.
const RegionHeader = "X-App-Region"

// Limits that keep every request bounded.
const (
	maxUpload    = 32 << 20 // bytes /upload reads
	maxEcho      = 8 << 20  // bytes /echo reads
	maxForm      = 1 << 20  // bytes of a POST /items body
	maxChunks    = 1000     // /stream?n=
	maxGap       = time.Minute
	defaultGap   = 20 * time.Millisecond
	wsIdle       = 5 * time.Minute // a /ws connection idle this long is closed
	defaultChunk = 3
)

// schema is the app's only table.
const schema = `CREATE TABLE IF NOT EXISTS items (
	id bigserial PRIMARY KEY,
	name text NOT NULL,
	region text NOT NULL,
	body_size int NOT NULL DEFAULT 0,
	created_at timestamptz NOT NULL DEFAULT now()
)`

// Migrate creates the items table unless it exists.
func Migrate(ctx context.Context, db *sql.DB) error {
	if _, err := db.ExecContext(ctx, schema); err != nil {
		return fmt.Errorf("create table items: %w", err)
	}
	return nil
}

// Item is a row of the items table as the JSON endpoints write it.
type Item struct {
	ID       int64  `json:"id"`
	Name     string `json:"name"`
	Region   string `json:"region"`
	BodySize int    `json:"body_size"`
}

// TxItem is what POST /tx answers: the item it inserted and the number of
// items it counted, in the same transaction, before inserting it.
type TxItem struct {
	Item
	Count int64 `json:"count"`
}

// Echo is what /echo answers: the request as the app saw it.
type Echo struct {
	Method  string            `json:"method"`
	Path    string            `json:"path"`
	Query   string            `json:"query"`
	Host    string            `json:"host"`
	Headers map[string]string `json:"headers"` // values joined with ", "
	Body    string            `json:"body"`
}

// app holds the handlers' dependencies.
type app struct {
	db      *sql.DB
	primary *sql.DB // DB-level routing for /work, set only by WithPrimary; see work.go
	region  string
	log     *zap.Logger
}

// New returns the app's handler. region is written into every row the app
// inserts and into the X-App-Region header of every response. Options are
// for the benchmarks (see WithPrimary).
func New(db *sql.DB, region string, log *zap.Logger, opts ...Option) http.Handler {
	if log == nil {
		log = zap.NewNop()
	}
	a := &app{db: db, region: region, log: log.Named("sampleapp")}
	for _, o := range opts {
		o(a)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", a.page)
	mux.HandleFunc("GET /healthz", a.healthz)
	mux.HandleFunc("GET /items", a.list)
	mux.HandleFunc("GET /items/{id}", a.get)
	mux.HandleFunc("POST /items", a.create)
	mux.HandleFunc("GET /touch", a.touch)
	mux.HandleFunc("POST /tx", a.tx)
	mux.HandleFunc("GET /work", a.workRead)
	mux.HandleFunc("POST /work", a.workWrite)
	mux.HandleFunc("POST /upload", a.upload)
	mux.HandleFunc("GET /stream", a.stream)
	mux.HandleFunc("GET /ws", a.ws)
	mux.HandleFunc("/echo", a.echo)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(RegionHeader, a.region)
		if tp := r.Header.Get("traceparent"); validTraceparent(tp) {
			r = r.WithContext(context.WithValue(r.Context(), traceparentKey{}, tp))
		}
		mux.ServeHTTP(w, r)
	})
}

// traceparentKey is the context key of a request's valid traceparent.
type traceparentKey struct{}

// traceparentRE matches a W3C traceparent: version-traceid-parentid-flags in
// lowercase hex. Only such a value is ever put into SQL text.
var traceparentRE = regexp.MustCompile(`^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$`)

func validTraceparent(tp string) bool {
	return traceparentRE.MatchString(tp) && !strings.HasPrefix(tp, "ff") &&
		tp[3:35] != strings.Repeat("0", 32) && tp[36:52] != strings.Repeat("0", 16)
}

// withTrace returns query with the request's traceparent appended the way
// OpenTelemetry's sqlcommenter writes it, /*traceparent='...'*/, or query
// unchanged when the request had no valid traceparent.
func withTrace(ctx context.Context, query string) string {
	tp, _ := ctx.Value(traceparentKey{}).(string)
	if tp == "" {
		return query
	}
	return query + " /*traceparent='" + tp + "'*/"
}

// queryer is what insert needs of a *sql.DB or a *sql.Tx.
type queryer interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// insert adds an item written by this region.
func (a *app) insert(ctx context.Context, q queryer, name string, size int) (Item, error) {
	it := Item{Name: name, Region: a.region, BodySize: size}
	err := q.QueryRowContext(ctx,
		withTrace(ctx, "INSERT INTO items (name, region, body_size) VALUES ($1, $2, $3) RETURNING id"),
		name, a.region, size).Scan(&it.ID)
	return it, err
}

// items lists every item in id order.
func (a *app) items(ctx context.Context) ([]Item, error) {
	rows, err := a.db.QueryContext(ctx, withTrace(ctx, "SELECT id, name, region, body_size FROM items ORDER BY id"))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	items := []Item{}
	for rows.Next() {
		var it Item
		if err := rows.Scan(&it.ID, &it.Name, &it.Region, &it.BodySize); err != nil {
			return nil, err
		}
		items = append(items, it)
	}
	return items, rows.Err()
}

// dbError answers a failed database call with the app's own error.
func (a *app) dbError(w http.ResponseWriter, r *http.Request, err error) {
	a.log.Warn("db error", zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Error(err))
	http.Error(w, "db error: "+err.Error(), http.StatusInternalServerError)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// nameParam returns the name query parameter, or def when it is empty.
func nameParam(r *http.Request, def string) string {
	if n := r.URL.Query().Get("name"); n != "" {
		return n
	}
	return def
}

func (a *app) healthz(w http.ResponseWriter, r *http.Request) {
	fmt.Fprint(w, "ok")
}

func (a *app) list(w http.ResponseWriter, r *http.Request) {
	items, err := a.items(r.Context())
	if err != nil {
		a.dbError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, items)
}

func (a *app) get(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	ctx := r.Context()
	it := Item{ID: id}
	err = a.db.QueryRowContext(ctx, withTrace(ctx, "SELECT name, region, body_size FROM items WHERE id = $1"), id).
		Scan(&it.Name, &it.Region, &it.BodySize)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		http.NotFound(w, r)
	case err != nil:
		a.dbError(w, r, err)
	default:
		writeJSON(w, http.StatusOK, it)
	}
}

// create serves POST /items with a form field or a JSON body {"name": ...}.
// A browser's form post is redirected to the guestbook page, with a flash
// cookie that lets the page say where the entry was written; other clients
// get the item.
func (a *app) create(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxForm)
	var name string
	if ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); ct == "application/json" {
		var in struct {
			Name string `json:"name"`
		}
		if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
			http.Error(w, "bad JSON body: "+err.Error(), http.StatusBadRequest)
			return
		}
		name = in.Name
	} else {
		name = r.FormValue("name")
	}
	name = strings.TrimSpace(name)
	if name == "" {
		http.Error(w, "name required", http.StatusBadRequest)
		return
	}
	it, err := a.insert(r.Context(), a.db, name, 0)
	if err != nil {
		a.dbError(w, r, err)
		return
	}
	if prefersHTML(r.Header.Get("Accept")) {
		setFlash(w, r, it)
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return
	}
	writeJSON(w, http.StatusCreated, it)
}

// prefersHTML reports whether an Accept header ranks text/html above
// application/json, as a browser's does; "*/*" alone means JSON.
func prefersHTML(accept string) bool {
	html, js := 0.0, 0.0
	for part := range strings.SplitSeq(accept, ",") {
		mt, params, err := mime.ParseMediaType(part)
		if err != nil {
			continue
		}
		q := 1.0
		if v, ok := params["q"]; ok {
			if f, err := strconv.ParseFloat(v, 64); err == nil {
				q = f
			}
		}
		switch mt {
		case "text/html":
			html = max(html, q)
		case "application/json":
			js = max(js, q)
		}
	}
	return html > js
}

// touch is a GET that writes, on purpose.
func (a *app) touch(w http.ResponseWriter, r *http.Request) {
	it, err := a.insert(r.Context(), a.db, nameParam(r, "touch"), 0)
	if err != nil {
		a.dbError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, it)
}

// tx counts the items and inserts one in one transaction.
func (a *app) tx(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	out, err := func() (TxItem, error) {
		tx, err := a.db.BeginTx(ctx, nil)
		if err != nil {
			return TxItem{}, err
		}
		defer tx.Rollback() //nolint:errcheck // a no-op after Commit
		var out TxItem
		if err := tx.QueryRowContext(ctx, withTrace(ctx, "SELECT count(*) FROM items")).Scan(&out.Count); err != nil {
			return TxItem{}, err
		}
		if out.Item, err = a.insert(ctx, tx, nameParam(r, "tx"), 0); err != nil {
			return TxItem{}, err
		}
		return out, tx.Commit()
	}()
	if err != nil {
		a.dbError(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, out)
}

// upload stores the size of the request body.
func (a *app) upload(w http.ResponseWriter, r *http.Request) {
	n, err := io.Copy(io.Discard, http.MaxBytesReader(w, r.Body, maxUpload))
	if err != nil {
		status := http.StatusBadRequest
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			status = http.StatusRequestEntityTooLarge
		}
		http.Error(w, "read body: "+err.Error(), status)
		return
	}
	it, err := a.insert(r.Context(), a.db, nameParam(r, "upload"), int(n))
	if err != nil {
		a.dbError(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, it)
}

// intParam reads a bounded integer query parameter.
func intParam(r *http.Request, key string, def, lo, hi int) (int, error) {
	v := r.URL.Query().Get(key)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		return 0, fmt.Errorf("%s=%q: want an integer from %d to %d", key, v, lo, hi)
	}
	return n, nil
}

// stream writes n chunks "chunk i\n" (i from 1), flushing each, gap apart.
// With write=1 it inserts an item after the first chunk, once the response
// has started, and reports the outcome as the next chunk.
func (a *app) stream(w http.ResponseWriter, r *http.Request) {
	n, err := intParam(r, "n", defaultChunk, 0, maxChunks)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	gapMS, err := intParam(r, "gap", int(defaultGap/time.Millisecond), 0, int(maxGap/time.Millisecond))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	gap := time.Duration(gapMS) * time.Millisecond
	write := r.URL.Query().Get("write") == "1"

	ctx := r.Context()
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for i := 1; i <= n; i++ {
		if i > 1 {
			timer.Reset(gap)
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
			}
		}
		fmt.Fprintf(w, "chunk %d\n", i)
		if err := rc.Flush(); err != nil {
			return
		}
		if i == 1 && write {
			if _, err := a.insert(ctx, a.db, nameParam(r, "stream"), 0); err != nil {
				a.log.Warn("db error", zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Error(err))
				fmt.Fprintf(w, "write: %v\n", err)
			} else {
				fmt.Fprint(w, "write: ok\n")
			}
			if err := rc.Flush(); err != nil {
				return
			}
		}
	}
}

// ws is a WebSocket-like upgrade without framing: after the 101 it echoes
// bytes until the client closes or stays idle for wsIdle.
func (a *app) ws(w http.ResponseWriter, r *http.Request) {
	if !hasToken(r.Header.Values("Connection"), "upgrade") || !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		http.Error(w, "want Connection: Upgrade and Upgrade: websocket", http.StatusBadRequest)
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "hijack: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		RegionHeader + ": " + a.region + "\r\n\r\n")
	if err := brw.Flush(); err != nil {
		return
	}
	buf := make([]byte, 32<<10)
	for {
		_ = conn.SetReadDeadline(time.Now().Add(wsIdle))
		n, err := brw.Read(buf)
		if n > 0 {
			if _, werr := conn.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// hasToken reports whether a comma-separated header contains token.
func hasToken(values []string, token string) bool {
	for _, v := range values {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func (a *app) echo(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxEcho))
	if err != nil {
		http.Error(w, "read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	headers := make(map[string]string, len(r.Header))
	for k, v := range r.Header {
		headers[k] = strings.Join(v, ", ")
	}
	writeJSON(w, http.StatusOK, Echo{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Host: r.Host,
		Headers: headers, Body: string(body)})
}
