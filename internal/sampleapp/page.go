package sampleapp

import (
	"context"
	"database/sql"
	"html/template"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/flyreplay"
)

// The guestbook page is the demo's window on pgfly. Besides the entries and the form it
// shows what the app itself can see of its request and its database: the region that
// served the page, whether the request was replayed (the fly-replay-src request header
// Fly's edge sets on a replay), the database's role and how far it has replayed, and the
// bookmark cookie pgfly gave the browser after its last write. The app only displays these;
// nothing it does depends on them.

// Cookies the page reads.
const (
	// flashCookie carries, from a browser's form post to the page it is redirected to,
	// which entry was written where and whether that post was a replay.
	flashCookie = "guestbook_flash"
	// bookmarkCookie is pgfly's read-your-writes bookmark (router.BookmarkCookie), a WAL
	// position such as 0/3000148. The page shows it; pgfly, not the app, acts on it.
	bookmarkCookie = "pgfly_lsn"
	// flashMaxAge bounds how long a flash waits for the page that shows it.
	flashMaxAge = time.Minute
)

// dbStateQuery reads the database's role and WAL position: the replay position on a
// replica, the current one on a primary, and how long ago the last replayed transaction
// committed (NULL on a primary).
const dbStateQuery = `SELECT pg_is_in_recovery(),
	(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
	extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8`

// replayInfo is what a fly-replay-src request header says about a replay.
type replayInfo struct {
	From     string // the region the request ran in first
	State    string // the state the replaying instance asked for, e.g. pgfly_read_only
	Instance string
}

// parseReplaySrc reads a fly-replay-src header (instance=...;region=...;t=...;state=...);
// it returns nil when the header is absent. A header it cannot read still marks a replay,
// from "another region".
func parseReplaySrc(h string) *replayInfo {
	if strings.TrimSpace(h) == "" {
		return nil
	}
	src, _ := flyreplay.ParseSrc(h)
	ri := replayInfo{From: src.Region, State: src.State, Instance: src.Instance}
	if ri.From == "" {
		ri.From = "another region"
	}
	return &ri
}

// dbState is the page's view of its database.
type dbState struct {
	Replica bool
	LSN     string // replayed up to (replica) or written up to (primary)
	lsn     uint64
	// LastCommit is how long ago the last replayed transaction committed on the
	// primary, on a replica: the replica's lag while the primary is busy, and the time
	// since the last write while it is idle.
	LastCommit string
	Err        string
}

// state reads the database's role and position; a failure is shown, not fatal.
func (a *app) state(ctx context.Context) dbState {
	var (
		st  dbState
		lsn sql.NullString
		ago sql.NullFloat64
	)
	if err := a.db.QueryRowContext(ctx, withTrace(ctx, dbStateQuery)).Scan(&st.Replica, &lsn, &ago); err != nil {
		st.Err = err.Error()
		return st
	}
	st.LSN = lsn.String
	st.lsn, _ = parseLSN(lsn.String)
	if ago.Valid {
		st.LastCommit = (time.Duration(ago.Float64*1000) * time.Millisecond).Round(time.Millisecond).String()
	}
	return st
}

// parseLSN reads a WAL position written as two hex numbers, "16/B374D848".
func parseLSN(s string) (uint64, bool) {
	hi, lo, ok := strings.Cut(s, "/")
	if !ok {
		return 0, false
	}
	h, err1 := strconv.ParseUint(hi, 16, 32)
	l, err2 := strconv.ParseUint(lo, 16, 32)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return h<<32 | l, true
}

// flash says where an entry was written, for the page after a browser's form post.
type flash struct {
	ID     string
	Region string
	Replay *replayInfo
}

// setFlash leaves a flash for the page the browser is redirected to.
func setFlash(w http.ResponseWriter, r *http.Request, it Item) {
	v := url.Values{"id": {strconv.FormatInt(it.ID, 10)}, "region": {it.Region}}
	if src := r.Header.Get("Fly-Replay-Src"); src != "" {
		v.Set("src", src)
	}
	http.SetCookie(w, &http.Cookie{Name: flashCookie, Value: v.Encode(), Path: "/",
		MaxAge: int(flashMaxAge / time.Second), HttpOnly: true, SameSite: http.SameSiteLaxMode})
}

// takeFlash reads the request's flash, if any, and clears it.
func takeFlash(w http.ResponseWriter, r *http.Request) *flash {
	c, err := r.Cookie(flashCookie)
	if err != nil {
		return nil
	}
	http.SetCookie(w, &http.Cookie{Name: flashCookie, Path: "/", MaxAge: -1, HttpOnly: true, SameSite: http.SameSiteLaxMode})
	v, err := url.ParseQuery(c.Value)
	if err != nil || v.Get("id") == "" {
		return nil
	}
	return &flash{ID: v.Get("id"), Region: v.Get("region"), Replay: parseReplaySrc(v.Get("src"))}
}

// pageData is what the template shows.
type pageData struct {
	Region   string
	Items    []Item
	Replay   *replayInfo // this request's replay, if it is one
	DB       dbState
	Bookmark string // the pgfly_lsn cookie
	// BookmarkSeen is "yes" when the database has the bookmark's position, "no" when
	// not, "" when either is unknown.
	BookmarkSeen string
	Flash        *flash
}

func (a *app) page(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	items, err := a.items(ctx)
	if err != nil {
		a.dbError(w, r, err)
		return
	}
	d := pageData{Region: a.region, Items: items, Replay: parseReplaySrc(r.Header.Get("Fly-Replay-Src")), DB: a.state(ctx)}
	if c, err := r.Cookie(bookmarkCookie); err == nil {
		d.Bookmark = c.Value
		if b, ok := parseLSN(c.Value); ok && d.DB.lsn != 0 {
			d.BookmarkSeen = map[bool]string{true: "yes", false: "no"}[d.DB.lsn >= b]
		}
	}
	d.Flash = takeFlash(w, r)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if err := pageTemplate.Execute(w, d); err != nil {
		a.log.Warn("render page", zap.Error(err))
	}
}

// pageTemplate is the guestbook page.
var pageTemplate = template.Must(template.New("page").Funcs(template.FuncMap{"plural": plural}).Parse(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pgfly guestbook ({{.Region}})</title>
<link rel="icon" href="data:,">
<style>
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
code { background: #f2f2f2; padding: 0 .25em; border-radius: 3px; }
.box { border: 1px solid #ccc; border-radius: 6px; padding: .5rem 1rem; margin: 1rem 0; }
#flash { border-color: #6a6; background: #f4fbf4; }
.yes { color: #17702b; } .no { color: #a33; }
small { color: #555; }
</style>
</head>
<body>
<h1>Guestbook</h1>
<p>Served by region <strong id="region">{{.Region}}</strong>.</p>
{{with .Flash}}<div class="box" id="flash">
<p>Your entry #{{.ID}} was written by the app in <strong>{{.Region}}</strong>.
{{- with .Replay}} Your post was <strong>replayed</strong>: it ran first in <strong>{{.From}}</strong>, whose database
refused the write, so pgfly there answered with <code>fly-replay</code>{{with .State}} (state <code>{{.}}</code>){{end}}
and the edge sent the same request to the primary region.
{{- else}} Your post was not replayed: it ran where the edge sent it first.{{end}}</p>
</div>{{end}}
<form method="post" action="/items">
<input name="name" placeholder="Your name" required maxlength="200">
<button type="submit">Sign</button>
</form>
<div class="box">
<p><strong>This page</strong></p>
<ul>
<li id="replay">{{with .Replay}}Replayed from <strong>{{.From}}</strong>{{with .State}} (state <code>{{.}}</code>){{end}}: the
database there could not serve it, so it ran again here.{{else}}Not replayed: this request ran where the edge sent it first.{{end}}</li>
<li id="db">{{if .DB.Err}}Database state unknown: {{.DB.Err}}{{else if .DB.Replica}}Database: a <strong>replica</strong>,
replayed up to <code>{{.DB.LSN}}</code>.{{with .DB.LastCommit}} Lag: its last replayed commit is {{.}} old (this also grows while
nobody writes).{{end}}{{else}}Database: the <strong>primary</strong>, WAL written up to <code>{{.DB.LSN}}</code>.{{end}}</li>
<li id="bookmark">{{if .Bookmark}}Bookmark <code>{{.Bookmark}}</code> (cookie <code>pgfly_lsn</code>): where the primary's WAL
was after your last write.{{if eq .BookmarkSeen "yes"}} <span class="yes">This database has replayed it, so this page
shows your write.</span>{{else if eq .BookmarkSeen "no"}} <span class="no">This database has not replayed it yet.</span>{{end}}
{{- else}}No bookmark yet: pgfly sets one (cookie <code>pgfly_lsn</code>) when you write.{{end}}</li>
</ul>
</div>
<h2>{{len .Items}} {{plural (len .Items) "entry" "entries"}}</h2>
<ul id="items">
{{- range .Items}}
<li>{{.Name}} <small>(#{{.ID}}, written in {{.Region}})</small></li>
{{- end}}
</ul>
<p><small>Sign from a replica region and watch: its database refuses the INSERT, pgfly answers
<code>fly-replay</code>, the edge runs the same request in the primary region, and the page you come back
to shows your entry once this region's replica has replayed your bookmark.</small></p>
</body>
</html>
`))

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
