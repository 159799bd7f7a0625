package regions_test

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/internal/sampleapp"
	"github.com/pgfly/pgfly/router"
)

// countingApp runs the sample app and counts the requests each region's app ran, by
// "METHOD /path".
type countingApp struct {
	mu   sync.Mutex
	runs map[string]map[string]int // region -> request -> runs
}

func (c *countingApp) app(db *sql.DB, region string) http.Handler {
	h := sampleapp.New(db, region, zap.NewNop())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		if c.runs == nil {
			c.runs = map[string]map[string]int{}
		}
		if c.runs[region] == nil {
			c.runs[region] = map[string]int{}
		}
		c.runs[region][r.Method+" "+r.URL.Path]++
		c.mu.Unlock()
		h.ServeHTTP(w, r)
	})
}

func (c *countingApp) ran(region, request string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.runs[region][request]
}

// mixedLoad is what one run of the mixed load saw.
type mixedLoad struct {
	reads, readsReplayed   int
	writes, writesLocalRun int // writes, and those the replica region's app ran first
}

// runMixedLoad sends clients×perClient requests through the edge, 9 of 10 of them GET /items
// and 1 of 10 POST /items, after warmUp POSTs one at a time, and checks every answer and
// that each write committed exactly once.
func runMixedLoad(t *testing.T, w *world, app *countingApp, clients, perClient, warmUp int) mixedLoad {
	t.Helper()
	prefix := unique("mixed")
	for i := range warmUp {
		got := postForm(t, w.EdgeURL+"/items", url.Values{"name": {fmt.Sprintf("%s-warm-%d", prefix, i)}})
		wantReply(t, got, http.StatusCreated, "iad", "")
	}
	localBefore := app.ran("fra", "POST /items")
	var (
		mu    sync.Mutex
		load  mixedLoad
		names []string
		wg    sync.WaitGroup
		errs  = make(chan error, clients*perClient)
	)
	for c := range clients {
		wg.Go(func() {
			for i := range perClient {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				var got reply
				var err error
				write := (c+i)%10 == 0
				name := fmt.Sprintf("%s-%d-%d", prefix, c, i)
				if write {
					got, err = send(ctx, http.DefaultClient, http.MethodPost, w.EdgeURL+"/items",
						strings.NewReader(url.Values{"name": {name}}.Encode()), formHeader())
				} else {
					got, err = send(ctx, http.DefaultClient, http.MethodGet, w.EdgeURL+"/items", nil, nil)
				}
				cancel()
				switch {
				case err != nil:
					errs <- err
					return
				case write && (got.status != http.StatusCreated || got.region != "iad"):
					errs <- fmt.Errorf("POST %s: got %d from %q (%q), want 201 from iad", name, got.status, got.region, got.body)
					return
				case !write && got.status != http.StatusOK:
					errs <- fmt.Errorf("GET /items: got %d (%q), want 200", got.status, got.body)
					return
				}
				mu.Lock()
				if write {
					load.writes++
					names = append(names, name)
				} else {
					load.reads++
					if got.region != "fra" {
						load.readsReplayed++
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	load.writesLocalRun = app.ran("fra", "POST /items") - localBefore
	for _, name := range names {
		if n := rowsNamed(t, cluster.Primary, name); n != 1 {
			t.Fatalf("%s: %d rows on the primary, want exactly 1", name, n)
		}
	}
	return load
}

// TestMixedLoadReadsStayLocal is the promise of the project under concurrency: 8 clients, 90%
// reads and 10% writes, and with learned write routes the reads stay in the replica region
// while the writes skip the replica region's app. With precise matching (the sample app writes
// sqlcommenter trace comments, as OpenTelemetry's instrumentation does, and pgx runs them as
// named prepared statements) no read at all is replayed. With overlap matching only the
// probes of the learned route (1 in router.ProbeEvery) can taint the reads beside them.
func TestMixedLoadReadsStayLocal(t *testing.T) {
	const clients, perClient, warmUp = 8, 50, 10
	for _, tc := range []struct {
		name     string
		learning bool
		precise  bool
		// maxReplayedPercent bounds the share of reads replayed; -1 only reports it.
		maxReplayedPercent float64
	}{
		{"learning, precise", true, true, 1},
		{"learning, overlap", true, false, -1},
		{"no learning, overlap", false, false, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			app := &countingApp{}
			w := start(t, regions.Options{InjectTraceparent: tc.precise, DisableLearning: !tc.learning, App: app.app})
			load := runMixedLoad(t, w, app, clients, perClient, warmUp)
			share := 100 * float64(load.readsReplayed) / float64(load.reads)
			t.Logf("%s: %d of %d reads replayed (%.1f%%); the replica region's app ran %d of %d writes before they were replayed",
				tc.name, load.readsReplayed, load.reads, share, load.writesLocalRun, load.writes)
			if tc.maxReplayedPercent >= 0 && share >= tc.maxReplayedPercent {
				t.Errorf("%.1f%% of reads replayed, want under %v%%", share, tc.maxReplayedPercent)
			}
			if !tc.learning {
				if load.writesLocalRun != load.writes {
					t.Errorf("without learning the replica region's app ran %d of %d writes, want all", load.writesLocalRun, load.writes)
				}
				return
			}
			// A learned route reaches the replica region's app only as a probe.
			if max := (load.writes + router.ProbeEvery - 1) / router.ProbeEvery; load.writesLocalRun > max {
				t.Errorf("the replica region's app ran %d of %d writes to a learned route, want at most %d (1 in %d)",
					load.writesLocalRun, load.writes, max, router.ProbeEvery)
			}
			rep := routesOf(t, w.Replica.AdminURL)
			if len(rep.Learned) != 1 || rep.Learned[0].Route != "POST /items" {
				t.Errorf("GET /routes: learned %+v, want POST /items alone", rep.Learned)
			}
			if got := rep.ReplayRoutes; got != "POST /items" {
				t.Errorf("GET /routes: replay_routes %q, want %q", got, "POST /items")
			}
		})
	}
}

// routesOf reads GET /routes from a region's admin endpoint.
func routesOf(tb testing.TB, adminURL string) router.RoutesReport {
	tb.Helper()
	got := do(tb, http.MethodGet, adminURL+"/routes", nil, nil)
	if got.status != http.StatusOK {
		tb.Fatalf("GET /routes: %d %q", got.status, got.body)
	}
	var rep router.RoutesReport
	if err := json.Unmarshal([]byte(got.body), &rep); err != nil {
		tb.Fatalf("GET /routes: %v in %q", err, got.body)
	}
	return rep
}

// flipApp has two routes whose writing can be switched: POST /flip writes while writes is
// on, and GET /visit writes on every tenth request (a GET that touches a session now and
// then). Every request answers with the region header.
type flipApp struct {
	writes atomic.Bool
	visits atomic.Int64
	ran    [2]atomic.Int64 // requests the replica region's app ran: POST /flip, GET /visit
}

func (a *flipApp) app(db *sql.DB, region string) http.Handler {
	write := func(w http.ResponseWriter, r *http.Request, name string) {
		if _, err := db.ExecContext(r.Context(), "insert into items (name, region) values ($1, $2)", name, region); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusCreated)
	}
	read := func(w http.ResponseWriter, r *http.Request) {
		var n int
		if err := db.QueryRowContext(r.Context(), "select count(*) from items").Scan(&n); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, n)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /flip", func(w http.ResponseWriter, r *http.Request) {
		if region == "fra" {
			a.ran[0].Add(1)
		}
		if a.writes.Load() {
			write(w, r, r.FormValue("name"))
			return
		}
		read(w, r)
	})
	mux.HandleFunc("GET /visit", func(w http.ResponseWriter, r *http.Request) {
		if region == "fra" {
			a.ran[1].Add(1)
		}
		if name := r.URL.Query().Get("name"); name != "" {
			write(w, r, name)
			return
		}
		read(w, r)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(sampleapp.RegionHeader, region)
		mux.ServeHTTP(w, r)
	})
}

func TestLearnedRoutes(t *testing.T) {
	t.Run("a learned route stops reaching the replica region's app and comes back when it stops writing", func(t *testing.T) {
		app := &flipApp{}
		app.writes.Store(true)
		w := start(t, regions.Options{App: app.app})
		flip := func(name string) reply {
			return postForm(t, w.EdgeURL+"/flip", url.Values{"name": {name}})
		}
		prefix := unique("flip")
		for i := range router.LearnRefusals {
			wantReply(t, flip(fmt.Sprintf("%s-%d", prefix, i)), http.StatusCreated, "iad", "fra>iad")
		}
		if rep := routesOf(t, w.Replica.AdminURL); len(rep.Learned) != 1 || rep.Learned[0].Route != "POST /flip" {
			t.Fatalf("learned %+v after %d refusals, want POST /flip", rep.Learned, router.LearnRefusals)
		}
		before := app.ran[0].Load()
		const later = 100
		for i := range later {
			name := fmt.Sprintf("%s-later-%d", prefix, i)
			wantReply(t, flip(name), http.StatusCreated, "iad", "")
			wantRows(t, cluster.Primary, name, 1)
		}
		probes := app.ran[0].Load() - before
		if max := int64(later / router.ProbeEvery); probes < 1 || probes > max {
			t.Errorf("the replica region's app ran %d of %d requests to the learned route, want 1 to %d", probes, later, max)
		}

		app.writes.Store(false)
		back := -1
		for i := range 4 * router.ProbeEvery * router.UnlearnProbes {
			got := flip("")
			if got.status != http.StatusOK {
				t.Fatalf("a read-only POST /flip: got %d %q", got.status, got.body)
			}
			if len(routesOf(t, w.Replica.AdminURL).Learned) == 0 {
				back = i
				break
			}
		}
		if back < 0 {
			t.Fatal("POST /flip is still learned after it stopped writing")
		}
		t.Logf("POST /flip came back to local service after %d requests that did not write", back+1)
		for range 5 {
			wantReply(t, flip(""), http.StatusOK, "fra", "fra")
		}
	})

	t.Run("a GET that writes once in a while is not learned", func(t *testing.T) {
		app := &flipApp{}
		w := start(t, regions.Options{App: app.app})
		prefix := unique("visit")
		var names []string
		for i := range 100 {
			target := w.EdgeURL + "/visit"
			if i%10 == 9 {
				name := fmt.Sprintf("%s-%d", prefix, i)
				names = append(names, name)
				target += "?name=" + name
				wantReply(t, do(t, http.MethodGet, target, nil, nil), http.StatusCreated, "iad", "fra>iad")
				continue
			}
			wantReply(t, do(t, http.MethodGet, target, nil, nil), http.StatusOK, "fra", "fra")
		}
		for _, name := range names {
			wantRows(t, cluster.Primary, name, 1)
		}
		rep := routesOf(t, w.Replica.AdminURL)
		if len(rep.Learned) != 0 {
			t.Errorf("learned %+v, want nothing", rep.Learned)
		}
		if n := app.ran[1].Load(); n != 100 {
			t.Errorf("the replica region's app ran %d of 100 visits, want all", n)
		}
	})

	t.Run("configured routes", func(t *testing.T) {
		app := &flipApp{}
		app.writes.Store(true)
		replay, _ := router.ParseRoutePatterns("POST /flip")
		local, _ := router.ParseRoutePatterns("GET /visit")
		w := start(t, regions.Options{App: app.app, ReplayRoutes: replay, LocalRoutes: local})
		name := unique("configured")
		wantReply(t, postForm(t, w.EdgeURL+"/flip", url.Values{"name": {name}}), http.StatusCreated, "iad", "fra>iad")
		wantRows(t, cluster.Primary, name, 1)
		if n := app.ran[0].Load(); n != 0 {
			t.Errorf("the replica region's app ran a --replay-routes request %d times, want 0", n)
		}
		// A local route is never replayed up front, and a refusal is still replayed.
		for i := range 2 * router.LearnRefusals {
			name := fmt.Sprintf("%s-visit-%d", name, i)
			wantReply(t, do(t, http.MethodGet, w.EdgeURL+"/visit?name="+name, nil, nil), http.StatusCreated, "iad", "fra>iad")
			wantRows(t, cluster.Primary, name, 1)
		}
		rep := routesOf(t, w.Replica.AdminURL)
		if len(rep.Learned) != 0 {
			t.Errorf("learned %+v, want nothing (the refused route is local)", rep.Learned)
		}
		if len(rep.Configured) != 1 || rep.Configured[0] != (router.PatternStats{Pattern: "POST /flip", Requests: 1}) {
			t.Errorf("configured %+v, want POST /flip with 1 request", rep.Configured)
		}
		if len(rep.Local) != 1 || rep.Local[0] != (router.PatternStats{Pattern: "GET /visit", Requests: 2 * router.LearnRefusals}) {
			t.Errorf("local %+v, want GET /visit with %d requests", rep.Local, 2*router.LearnRefusals)
		}
	})
}

// refusal is one thing a hot standby refuses, as an app's request would do it, followed by a
// marker row so that the test can count how many times the request committed.
type refusal struct {
	name string
	run  func(ctx context.Context, c *sql.Conn, marker, region string) error
}

func insertMarker(ctx context.Context, c interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
}, marker, region string) error {
	_, err := c.ExecContext(ctx, "insert into items (name, region) values ($1, $2)", marker, region)
	return err
}

// execThenMark runs statements on the connection, then the marker insert, in one explicit
// transaction when tx is set.
func execThenMark(tx bool, stmts ...string) func(ctx context.Context, c *sql.Conn, marker, region string) error {
	return func(ctx context.Context, c *sql.Conn, marker, region string) error {
		if tx {
			stmts = append([]string{"begin"}, stmts...)
		}
		for _, s := range stmts {
			if _, err := c.ExecContext(ctx, s); err != nil {
				return err
			}
		}
		if err := insertMarker(ctx, c, marker, region); err != nil {
			return err
		}
		if tx {
			_, err := c.ExecContext(ctx, "commit")
			return err
		}
		return nil
	}
}

// refusals are the standby refusals of PostgreSQL 15 (25006, 0A000, 55000) as apps meet them.
var refusals = []refusal{
	{"insert", execThenMark(false)},
	{"nextval", execThenMark(false, "select nextval('items_id_seq')")},
	{"select-for-update", execThenMark(true, "select id from items where false for update")},
	{"listen", execThenMark(false, "listen pgfly_e2e", "unlisten pgfly_e2e")},
	{"notify", execThenMark(false, "notify pgfly_e2e")},
	{"lock-table", execThenMark(true, "lock table items in exclusive mode")},
	{"temp-table", execThenMark(false, "create temporary table pgfly_e2e_tmp (x int)", "drop table pgfly_e2e_tmp")},
	{"read-write-transaction", execThenMark(false, "begin read write", "commit")},
	{"set-transaction-read-write", execThenMark(true, "set transaction read write")},
	{"wal-position", execThenMark(false, "select pg_current_wal_lsn()")},
	{"serializable", func(ctx context.Context, c *sql.Conn, marker, region string) error {
		tx, err := c.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelSerializable})
		if err != nil {
			return err
		}
		defer tx.Rollback() //nolint:errcheck // a no-op after Commit
		if err := insertMarker(ctx, tx, marker, region); err != nil {
			return err
		}
		return tx.Commit()
	}},
	{"copy-from", func(ctx context.Context, c *sql.Conn, marker, region string) error {
		return c.Raw(func(dc any) error {
			pg := dc.(*stdlib.Conn).Conn().PgConn()
			_, err := pg.CopyFrom(ctx, strings.NewReader(marker+"\t"+region+"\n"), "copy items (name, region) from stdin")
			return err
		})
	}},
}

// refusalApp serves POST /refuse/{name}: the refusal of that name, on a connection of its own
// that is discarded afterwards, answering 500 with the database's error as an app would.
func refusalApp(db *sql.DB, region string) http.Handler {
	mux := http.NewServeMux()
	for _, rf := range refusals {
		mux.HandleFunc("POST /refuse/"+rf.name, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set(sampleapp.RegionHeader, region)
			c, err := db.Conn(r.Context())
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			defer func() {
				c.Raw(func(any) error { return driver.ErrBadConn }) // discard it: no state leaks into the next request
				c.Close()
			}()
			if err := rf.run(r.Context(), c, r.FormValue("name"), region); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			w.WriteHeader(http.StatusCreated)
		})
	}
	return mux
}

// TestEveryStandbyRefusalIsReplayed: each thing a hot standby refuses makes the request run
// again in the primary region, where it commits exactly once, in both replay modes.
func TestEveryStandbyRefusalIsReplayed(t *testing.T) {
	for _, mode := range []router.Mode{router.ModeFly, router.ModeProxy} {
		t.Run(string(mode), func(t *testing.T) {
			w := start(t, regions.Options{Mode: mode, App: refusalApp})
			for _, rf := range refusals {
				marker := unique(rf.name)
				got := postForm(t, w.EdgeURL+"/refuse/"+rf.name, url.Values{"name": {marker}})
				if got.status != http.StatusCreated || got.region != "iad" {
					t.Errorf("%s: got %d from %q (%q), want 201 from iad", rf.name, got.status, got.region, got.body)
					continue
				}
				if n := rowsNamed(t, cluster.Primary, marker); n != 1 {
					t.Errorf("%s: %d rows on the primary, want exactly 1", rf.name, n)
				}
			}
		})
	}
}
