package regions_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/internal/sampleapp"
	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
)

// TestReadAfterWriteWhileReplayIsPaused stops WAL replay on the replica, so that a client's
// write cannot reach it, and follows the client's next read; then it delays replay instead, so
// that the write arrives during the read's wait.
func TestReadAfterWriteWhileReplayIsPaused(t *testing.T) {
	t.Run("the monitor knows the replica will not get there: the read is replayed at once", func(t *testing.T) {
		w := start(t, regions.Options{})
		replay := replayControl(t)
		client := browser(t)
		replay.pause(t)

		item := createItem(t, client, w.EdgeURL, unique("paused"))
		if n := rowsNamed(t, cluster.Replica, item.Name); n != 0 {
			t.Fatalf("got %d rows on the paused replica, want 0", n)
		}
		before := scrape(t, w.Replica.AdminURL)
		begin := time.Now()
		got := doWith(t, client, http.MethodGet, itemURL(w.EdgeURL, item.ID), nil, nil)
		t.Logf("the read took %v with ConsistencyWait %v", time.Since(begin), router.DefaultConsistencyWait)
		wantReply(t, got, http.StatusOK, "iad", "fra>iad")
		wantItem(t, got, item)

		lines := w.logs.FilterMessage("replaying in the primary region").
			FilterField(zap.String("path", itemPath(item.ID))).All()
		if len(lines) != 1 {
			t.Fatalf("got %d replay log lines for the read, want 1", len(lines))
		}
		if f := lines[0].ContextMap(); f["reason"] != string(router.ReasonLag) || f["target_region"] != "iad" {
			t.Fatalf("got log fields %v, want reason %q and target_region iad", f, string(router.ReasonLag))
		}
		after := scrape(t, w.Replica.AdminURL)
		for _, m := range []struct {
			name   string
			labels map[string]string
		}{
			{"pgfly_replay_decisions_total", map[string]string{"reason": string(router.ReasonLag), "outcome": "replayed"}},
			{"pgfly_bookmark_wait_seconds", map[string]string{"outcome": "unreachable"}},
		} {
			if d := delta(before, after, m.name, m.labels); d != 1 {
				t.Errorf("%s%v: got an increase of %v, want 1", m.name, m.labels, d)
			}
		}
		if d := delta(before, after, "pgfly_bookmark_wait_seconds", map[string]string{"outcome": "timeout"}); d != 0 {
			t.Errorf("bookmark waits that timed out: got an increase of %v, want 0 (a paused replica is not waited for)", d)
		}
	})

	t.Run("the replica catches up during the wait: the read is served here", func(t *testing.T) {
		const wait, delay = 5 * time.Second, 300 * time.Millisecond
		w := start(t, regions.Options{ConsistencyWait: wait})
		client := browser(t)
		applyDelay(t, delay) // replay goes on, each commit applied 300 ms late: behind, not paused

		item := createItem(t, client, w.EdgeURL, unique("delayed"))
		before := scrape(t, w.Replica.AdminURL)
		begin := time.Now()
		got := doWith(t, client, http.MethodGet, itemURL(w.EdgeURL, item.ID), nil, nil)
		t.Logf("the read waited %v for a replica that applies each commit %v late", time.Since(begin), delay)
		wantReply(t, got, http.StatusOK, "fra", "fra")
		wantItem(t, got, item)

		after := scrape(t, w.Replica.AdminURL)
		if d := delta(before, after, "pgfly_bookmark_wait_seconds", map[string]string{"outcome": "caught_up"}); d != 1 {
			t.Errorf("caught-up bookmark waits: got an increase of %v, want 1", d)
		}
		if d := delta(before, after, "pgfly_replay_decisions_total", map[string]string{"reason": string(router.ReasonLag)}); d != 0 {
			t.Errorf("replays for lag: got an increase of %v, want 0", d)
		}
	})
}

// TestReadYourWritesChecker has several clients, each with its own cookies, write an item and
// read it back at once while replay on the replica is paused and resumed over and over. With
// session consistency no read may miss its client's write; with eventual consistency the
// misses are counted and reported.
func TestReadYourWritesChecker(t *testing.T) {
	const (
		clients   = 4
		rounds    = 25
		paused    = 150 * time.Millisecond
		running   = 50 * time.Millisecond
		maxCycles = 50 // 10 s of injected lag at most
	)
	type figure struct {
		reads, misses, local, replayed int
	}
	figures := map[router.Consistency]*figure{}
	for _, consistency := range []router.Consistency{router.ConsistencySession, router.ConsistencyEventual} {
		t.Run(string(consistency), func(t *testing.T) {
			w := start(t, regions.Options{Consistency: consistency})
			replay := replayControl(t)
			browsers := make([]*http.Client, clients)
			for i := range browsers {
				browsers[i] = browser(t)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()

			stop := make(chan struct{})
			injected := make(chan injection, 1)
			go func() { injected <- replay.inject(ctx, stop, paused, running, maxCycles) }()

			var (
				mu sync.Mutex
				f  figure
				wg sync.WaitGroup
			)
			prefix := unique("ryw-" + string(consistency))
			for i, c := range browsers {
				wg.Go(func() {
					for r := range rounds {
						res, err := writeThenRead(ctx, c, w.EdgeURL, fmt.Sprintf("%s-%d-%d", prefix, i, r))
						if err != nil {
							t.Errorf("client %d, round %d: %v", i, r, err)
							return
						}
						mu.Lock()
						f.reads++
						switch {
						case res.missed:
							f.misses++
						case res.region == "fra":
							f.local++
						default:
							f.replayed++
						}
						mu.Unlock()
					}
				})
			}
			wg.Wait()
			close(stop)
			inj := <-injected
			if inj.err != nil {
				t.Errorf("inject lag: %v", inj.err)
			}
			t.Logf("%s: %d reads, %d missed the client's own write, %d served in fra, %d in iad; %d pause/resume cycles",
				consistency, f.reads, f.misses, f.local, f.replayed, inj.cycles)
			if f.reads != clients*rounds {
				t.Fatalf("got %d reads, want %d", f.reads, clients*rounds)
			}
			if consistency == router.ConsistencySession && f.misses != 0 {
				t.Errorf("got %d of %d reads that missed the client's own write, want 0", f.misses, f.reads)
			}
			figures[consistency] = &f
		})
	}
	session, eventual := figures[router.ConsistencySession], figures[router.ConsistencyEventual]
	if session == nil || eventual == nil {
		t.Fatal("a checker run did not finish")
	}
	t.Logf("read-your-writes checker: session: %d misses of %d reads; eventual: %d misses of %d reads",
		session.misses, session.reads, eventual.misses, eventual.reads)
}

// readResult is how a read of the client's own write went.
type readResult struct {
	missed bool   // 404, or another item than the one written
	region string // the app region that answered
}

// writeThenRead creates an item through the edge and reads it back at once. Anything but 201
// from iad for the write, or 200 or 404 for the read, is an error.
func writeThenRead(ctx context.Context, c *http.Client, edgeURL, name string) (readResult, error) {
	got, err := send(ctx, c, http.MethodPost, edgeURL+"/items", strings.NewReader(url.Values{"name": {name}}.Encode()), formHeader())
	if err != nil {
		return readResult{}, err
	}
	if got.status != http.StatusCreated || got.region != "iad" {
		return readResult{}, fmt.Errorf("POST: got %d from %q (%q), want 201 from iad", got.status, got.region, got.body)
	}
	var want sampleapp.Item
	if err := json.Unmarshal([]byte(got.body), &want); err != nil {
		return readResult{}, fmt.Errorf("POST: decode %q: %w", got.body, err)
	}
	got, err = send(ctx, c, http.MethodGet, itemURL(edgeURL, want.ID), nil, nil)
	if err != nil {
		return readResult{}, err
	}
	switch got.status {
	case http.StatusNotFound:
		return readResult{missed: true, region: got.region}, nil
	case http.StatusOK:
		var item sampleapp.Item
		if err := json.Unmarshal([]byte(got.body), &item); err != nil {
			return readResult{}, fmt.Errorf("GET: decode %q: %w", got.body, err)
		}
		return readResult{missed: item.ID != want.ID || item.Name != name, region: got.region}, nil
	default:
		return readResult{}, fmt.Errorf("GET: got %d from %q via %q (%q), want 200 or 404", got.status, got.region, got.trail, got.body)
	}
}

// TestMalformedAndForgedBookmarks sends bookmarks the shim never handed out.
func TestMalformedAndForgedBookmarks(t *testing.T) {
	const wait = 2 * time.Second
	w := start(t, regions.Options{ConsistencyWait: wait})
	st := w.Replica.Sidecar.Status()
	history := fmt.Sprintf("@%d:%d", st.Timeline, st.SystemID) // the replica's timeline and system

	for _, tc := range []struct {
		name, value string
	}{
		{"not an LSN", "garbage"},
		{"empty", ""},
		{"no slash", "16B374D848"},
		{"three parts", "1/2/3"},
		{"a sign", "-1/0"},
		{"a 0x prefix", "0x1/0"},
		{"nine hex digits", "100000000/0"},
		{"very long", strings.Repeat("F", 4000)},
		{"a position the replica has passed", "0/0" + history},
		{"a timeline that is not a number", "0/0@x:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := do(t, http.MethodGet, w.EdgeURL+"/healthz", nil, http.Header{"Cookie": {router.BookmarkCookie + "=" + tc.value}})
			wantReply(t, got, http.StatusOK, "fra", "fra")
		})
	}

	t.Run("a far-future bookmark delays only its sender, then goes to the primary region", func(t *testing.T) {
		before := scrape(t, w.Replica.AdminURL)
		forged := make(chan reply, 1)
		forgedErr := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			got, err := send(ctx, http.DefaultClient, http.MethodGet, w.EdgeURL+"/healthz", nil,
				http.Header{"Cookie": {router.BookmarkCookie + "=FFFFFFFF/FFFFFFFF" + history}})
			if err != nil {
				forgedErr <- err
				return
			}
			forged <- got
		}()
		// Meanwhile, a client without the bookmark is served here, while the forged one
		// still waits out its ConsistencyWait.
		wantReply(t, do(t, http.MethodGet, w.EdgeURL+"/healthz", nil, nil), http.StatusOK, "fra", "fra")
		select {
		case got := <-forged:
			t.Fatalf("the forged bookmark was answered (%d from %q) before a plain request, want it to wait %v", got.status, got.region, wait)
		case err := <-forgedErr:
			t.Fatal(err)
		default:
		}
		var got reply
		select {
		case got = <-forged:
		case err := <-forgedErr:
			t.Fatal(err)
		}
		wantReply(t, got, http.StatusOK, "iad", "fra>iad")
		after := scrape(t, w.Replica.AdminURL)
		if d := delta(before, after, "pgfly_bookmark_wait_seconds", map[string]string{"outcome": "timeout"}); d != 1 {
			t.Errorf("timed-out bookmark waits: got an increase of %v, want 1", d)
		}
		if d := delta(before, after, "pgfly_replay_decisions_total", map[string]string{"reason": string(router.ReasonLag), "outcome": "replayed"}); d != 1 {
			t.Errorf("replays for lag: got an increase of %v, want 1", d)
		}
	})

	// A position the replica passed long ago, but on another timeline (a failover) or of
	// another system, or of no known timeline (a bookmark from before they carried one), is
	// not compared: it goes to the primary region at once.
	for _, value := range []string{
		fmt.Sprintf("0/0@%d:%d", st.Timeline+1, st.SystemID),
		fmt.Sprintf("0/0@%d:%d", st.Timeline, st.SystemID+1),
		"0/0",
	} {
		t.Run("the bookmark "+value+" is replayed at once", func(t *testing.T) {
			before := scrape(t, w.Replica.AdminURL)
			got := do(t, http.MethodGet, w.EdgeURL+"/healthz", nil, http.Header{"Cookie": {router.BookmarkCookie + "=" + value}})
			wantReply(t, got, http.StatusOK, "iad", "fra>iad")
			after := scrape(t, w.Replica.AdminURL)
			if d := delta(before, after, "pgfly_bookmark_wait_seconds", map[string]string{"outcome": "other_history"}); d != 1 {
				t.Errorf("bookmark waits for another history: got an increase of %v, want 1", d)
			}
		})
	}
}

// TestBookmarkCookie checks the cookie the primary region hands out, on its shim directly.
func TestBookmarkCookie(t *testing.T) {
	w := start(t, regions.Options{})
	iad := w.Primary.ShimURL

	for _, tc := range []struct {
		name   string
		header http.Header
		secure bool
	}{
		{"plain HTTP", nil, false},
		{"X-Forwarded-Proto http", http.Header{"X-Forwarded-Proto": {"http"}}, false},
		{"X-Forwarded-Proto https", http.Header{"X-Forwarded-Proto": {"https"}}, true},
		{"Fly-Forwarded-Proto https", http.Header{"Fly-Forwarded-Proto": {"https"}}, true},
	} {
		t.Run("a POST over "+tc.name, func(t *testing.T) {
			walBefore := primaryInsertLSN(t)
			h := formHeader()
			for k, v := range tc.header {
				h[k] = v
			}
			got := do(t, http.MethodPost, iad+"/items", strings.NewReader(url.Values{"name": {unique("cookie")}}.Encode()), h)
			wantReply(t, got, http.StatusCreated, "iad", "")
			c := bookmarkIn(got.header)
			if c == nil {
				t.Fatalf("got Set-Cookie %q, want a %s cookie", got.header.Values("Set-Cookie"), router.BookmarkCookie)
			}
			pos, err := lag.ParsePosition(c.Value)
			if err != nil {
				t.Fatalf("bookmark %q: %v", c.Value, err)
			}
			if pos.LSN <= walBefore {
				t.Errorf("got bookmark %v, want past the primary's WAL position %v before the write", pos, walBefore)
			}
			if st := w.Replica.Sidecar.Status(); pos.Timeline == 0 || pos.Timeline != st.Timeline || pos.SystemID != st.SystemID {
				t.Errorf("got bookmark %v, want it on the replica's timeline %d of system %d", pos, st.Timeline, st.SystemID)
			}
			if c.Path != "/" || !c.HttpOnly || c.SameSite != http.SameSiteLaxMode || c.MaxAge <= 0 || c.Secure != tc.secure {
				t.Errorf("got Path=%q HttpOnly=%v SameSite=%v Max-Age=%d Secure=%v, want Path=\"/\" HttpOnly=true SameSite=%v Max-Age>0 Secure=%v",
					c.Path, c.HttpOnly, c.SameSite, c.MaxAge, c.Secure, http.SameSiteLaxMode, tc.secure)
			}
		})
	}

	t.Run("a GET that was not replayed gets none", func(t *testing.T) {
		got := do(t, http.MethodGet, iad+"/healthz", nil, nil)
		wantReply(t, got, http.StatusOK, "iad", "")
		if c := bookmarkIn(got.header); c != nil {
			t.Fatalf("got bookmark %v, want none", c)
		}
	})

	t.Run("a GET replayed here gets one", func(t *testing.T) {
		got := do(t, http.MethodGet, iad+"/healthz", nil,
			http.Header{"Fly-Replay-Src": {"instance=fra-1;region=fra;t=1;state=pgfly_lag"}})
		wantReply(t, got, http.StatusOK, "iad", "")
		if c := bookmarkIn(got.header); c == nil {
			t.Fatalf("got Set-Cookie %q, want a %s cookie", got.header.Values("Set-Cookie"), router.BookmarkCookie)
		}
	})
}

// createItem posts a new item through the edge with c, checks that the primary region
// answered and handed out a bookmark, and returns the item.
func createItem(tb testing.TB, c *http.Client, edgeURL, name string) sampleapp.Item {
	tb.Helper()
	got := doWith(tb, c, http.MethodPost, edgeURL+"/items", strings.NewReader(url.Values{"name": {name}}.Encode()), formHeader())
	wantReply(tb, got, http.StatusCreated, "iad", "fra>iad")
	var item sampleapp.Item
	if err := json.Unmarshal([]byte(got.body), &item); err != nil {
		tb.Fatalf("decode %q: %v", got.body, err)
	}
	if n := rowsNamed(tb, cluster.Primary, name); n != 1 {
		tb.Fatalf("got %d rows on the primary, want 1", n)
	}
	if c.Jar != nil {
		u, _ := url.Parse(edgeURL)
		found := false
		for _, ck := range c.Jar.Cookies(u) {
			found = found || ck.Name == router.BookmarkCookie
		}
		if !found {
			tb.Fatalf("got cookies %v after the write, want a %s bookmark", c.Jar.Cookies(u), router.BookmarkCookie)
		}
	}
	return item
}

// wantItem checks that a reply is the item.
func wantItem(tb testing.TB, got reply, want sampleapp.Item) {
	tb.Helper()
	var item sampleapp.Item
	if err := json.Unmarshal([]byte(got.body), &item); err != nil {
		tb.Fatalf("decode %q: %v", got.body, err)
	}
	if item.ID != want.ID || item.Name != want.Name {
		tb.Fatalf("got item %+v, want %+v", item, want)
	}
}

func itemPath(id int64) string { return "/items/" + strconv.FormatInt(id, 10) }

func itemURL(base string, id int64) string { return base + itemPath(id) }

// bookmarkIn returns the bookmark cookie a response sets, or nil.
func bookmarkIn(h http.Header) *http.Cookie {
	for _, c := range (&http.Response{Header: h}).Cookies() {
		if c.Name == router.BookmarkCookie {
			return c
		}
	}
	return nil
}

// primaryInsertLSN is the primary's WAL insert position now.
func primaryInsertLSN(tb testing.TB) lag.LSN {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn := connectTo(tb, cluster.Primary)
	defer conn.Close(ctx)
	var text string
	if err := conn.QueryRow(ctx, "select pg_current_wal_insert_lsn()::text").Scan(&text); err != nil {
		tb.Fatalf("read the primary's WAL position: %v", err)
	}
	lsn, err := lag.ParseLSN(text)
	if err != nil {
		tb.Fatal(err)
	}
	return lsn
}

// replay pauses and resumes WAL replay on the shared replica, as a superuser directly on it.
type replay struct {
	mu   sync.Mutex
	conn *pgx.Conn
}

// applyDelay sets recovery_min_apply_delay on the replica for the rest of the test, so that it
// replays each commit that late, and waits until the setting is in force.
func applyDelay(tb testing.TB, d time.Duration) {
	tb.Helper()
	set := func(value string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, cluster.Replica.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
		if err != nil {
			return err
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "alter system set recovery_min_apply_delay = '"+value+"'"); err != nil {
			return err
		}
		if _, err := conn.Exec(ctx, "select pg_reload_conf()"); err != nil {
			return err
		}
		for range 100 { // a reload is asynchronous
			var now string
			if err := conn.QueryRow(ctx, "show recovery_min_apply_delay").Scan(&now); err != nil {
				return err
			}
			if now == value || value == "0" && now == "0" {
				return nil
			}
			time.Sleep(20 * time.Millisecond)
		}
		return fmt.Errorf("recovery_min_apply_delay is not %s after a reload", value)
	}
	tb.Cleanup(func() {
		if err := set("0"); err != nil {
			tb.Errorf("reset recovery_min_apply_delay: %v", err)
		}
		waitReplayed(tb)
	})
	if err := set(fmt.Sprintf("%dms", d.Milliseconds())); err != nil {
		tb.Fatalf("set recovery_min_apply_delay: %v", err)
	}
}

// replayControl connects to the replica. Cleanup resumes replay whatever the test did, on a
// fresh connection in case the replica was restarted.
func replayControl(tb testing.TB) *replay {
	tb.Helper()
	r := &replay{conn: connectTo(tb, cluster.Replica)}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r.mu.Lock()
		r.conn.Close(ctx)
		r.mu.Unlock()
		conn, err := pgx.Connect(ctx, cluster.Replica.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
		if err != nil {
			tb.Errorf("connect to the replica to resume replay: %v", err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "select pg_wal_replay_resume()"); err != nil {
			tb.Errorf("resume replay: %v", err)
		}
	})
	return r
}

// set pauses (true) or resumes (false) replay.
func (r *replay) set(ctx context.Context, paused bool) error {
	stmt := "select pg_wal_replay_resume()"
	if paused {
		stmt = "select pg_wal_replay_pause()"
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, err := r.conn.Exec(ctx, stmt); err != nil {
		return fmt.Errorf("%s: %w", stmt, err)
	}
	return nil
}

// pause pauses replay; writes committed from now on do not reach the replica's readers.
func (r *replay) pause(tb testing.TB) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.set(ctx, true); err != nil {
		tb.Fatal(err)
	}
}

// injection is what inject did.
type injection struct {
	cycles int
	err    error
}

// inject pauses replay for paused and resumes it for running, over and over, until stop is
// closed, ctx ends or maxCycles cycles are done. It leaves replay resumed.
func (r *replay) inject(ctx context.Context, stop <-chan struct{}, paused, running time.Duration, maxCycles int) injection {
	var inj injection
	sleep := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-stop:
			return false
		case <-ctx.Done():
			return false
		}
	}
	for inj.cycles < maxCycles {
		if err := r.set(ctx, true); err != nil {
			inj.err = err
			break
		}
		inj.cycles++
		more := sleep(paused)
		if err := r.set(ctx, false); err != nil {
			inj.err = err
			break
		}
		if !more || !sleep(running) {
			break
		}
	}
	if inj.err != nil {
		// Leave replay resumed whatever failed; Cleanup tries again.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		inj.err = errors.Join(inj.err, r.set(rctx, false))
	}
	return inj
}
