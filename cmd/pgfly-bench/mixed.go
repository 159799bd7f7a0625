package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/internal/sampleapp"
	"github.com/pgfly/pgfly/router"
)

// Section 6's load: mixedClients clients at once, one request in mixedWriteEvery a write, after
// mixedWarmUp requests of each route one at a time.
const (
	mixedClients    = 8
	mixedWriteEvery = 10
	mixedWarmUp     = 10
	// mixedProbeLimit is the bound on the replica region's runs of a learned route:
	// at most one in mixedProbeLimit of its requests (pgfly probes one in router.ProbeEvery).
	mixedProbeLimit = 20
)

// writeRoute is the write route of section 6, as pgfly keys it.
const writeRoute = "POST /items"

// appRuns counts the requests an app ran, by method.
type appRuns struct {
	mu sync.Mutex
	n  map[string]int
}

func newAppRuns() *appRuns { return &appRuns{n: map[string]int{}} }

// wrap counts every request before h runs it.
func (c *appRuns) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		c.n[r.Method]++
		c.mu.Unlock()
		h.ServeHTTP(w, r)
	})
}

func (c *appRuns) get(method string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[method]
}

// mixedRun is one run of section 6 and what it measured.
type mixedRun struct {
	learning bool

	learned    bool // pgfly listed the write route as learned after the warm-up
	warmRan    int  // warm-up writes the replica region's app ran
	reads      []time.Duration
	writes     []time.Duration
	replayed   int // reads answered by the primary region's app
	replicaRan int // writes of the load the replica region's app ran (and that were then replayed)
}

func (m *mixedRun) name() string {
	if m.learning {
		return "on"
	}
	return "off"
}

// mixedLoad is section 6: reads and writes from several clients at once through the pgfly
// setup, with learned write routes on and then off.
func (b *bench) mixedLoad(ctx context.Context) error {
	r := &b.rep
	runs := []*mixedRun{{learning: true}, {learning: false}}
	for _, m := range runs {
		b.logf("section 6: mixed load, learning %s, %d clients × %d requests", m.name(), mixedClients, b.prof.mixedRequests)
		if err := b.runMixed(ctx, m); err != nil {
			return fmt.Errorf("learning %s: %w", m.name(), err)
		}
	}
	on, off := runs[0], runs[1]

	r.printf("## 6. Mixed load\n\n")
	r.printf("The pgfly setup of section 4 under %d clients at once, each sending its requests one after another "+
		"through the edge in %s: one request in %d is a write (POST /items, a form with a fresh name, Accept: "+
		"application/json), the others read (GET /items, every item). A one-way delay of %v on the edge's connection to "+
		"%s and on the replica-region pgfly's monitor connection to the primary (the setup's cross-region link); the WAL "+
		"stream does not cross it here (the "+
		"reads carry no bookmark, the clients keep no cookies, so the replica's lag changes nothing that is measured). "+
		"Two runs, learned write routes on (pgfly's default) and off (`--learn-routes=false`), each on a fresh setup "+
		"(sidecars, apps and edge started anew, the items table emptied) and each after a warm-up, one at a time, of %d "+
		"writes then %d reads: with learning on, %s is learned after %d refusals and from then on replayed before the "+
		"app in %s runs it, but for one request in %d, a probe. %d requests per client.\n\n",
		mixedClients, replicaRegion, mixedWriteEvery, b.cfg.delay, primaryRegion, mixedWarmUp, mixedWarmUp, writeRoute,
		router.LearnRefusals, replicaRegion, router.ProbeEvery, b.prof.mixedRequests)
	r.printf("A read is replayed when the app in %s answered it: a standby refusal of a write in flight beside it "+
		"tainted it (no request carries a traceparent and pgfly injects none, its default, so a refusal cannot name "+
		"its request and taints every request in flight whose response has not started). The last column counts the "+
		"writes of the load that the app in %s ran before they were replayed: the POSTs its handler received.\n\n",
		primaryRegion, replicaRegion)
	var rows [][]string
	for _, m := range runs {
		rd, wr := durations(m.reads), durations(m.writes)
		rows = append(rows, []string{m.name(), fmt.Sprint(len(m.reads)),
			fmt.Sprintf("%d (%s%%)", m.replayed, f1(100*m.readShare())),
			ms(percentile(rd, 50)), ms(percentile(rd, 99)), ms(percentile(wr, 50)), ms(percentile(wr, 99)),
			fmt.Sprintf("%d of %d", m.replicaRan, len(m.writes))})
	}
	r.table([]string{"learning", "reads", "reads replayed", "read p50 ms", "read p99 ms", "write p50 ms", "write p99 ms",
		"writes the replica region's app ran first"}, rows)
	for _, m := range runs {
		b.charts.mixed = append(b.charts.mixed, mixedPoint{learning: m.name(), readsReplayed: m.readShare(),
			writesRanFirst: float64(m.replicaRan) / float64(len(m.writes))})
	}
	b.chart(chartMixed, "Share of reads replayed and of writes the replica region's app ran first, learned write routes on and off")
	r.printf("In the warm-up the app in %s ran %d of the %d writes with learning on (pgfly then listed %s as learned: %s) "+
		"and %d of %d with learning off.\n\n", replicaRegion, on.warmRan, mixedWarmUp, writeRoute, yesNo(on.learned),
		off.warmRan, mixedWarmUp)

	r.check("6", fmt.Sprintf("under 1%% of reads replayed with learning on (%d clients, 1 in %d a write)", mixedClients, mixedWriteEvery),
		on.readShare() < 0.01,
		fmt.Sprintf("%s%% (%d of %d); %s%% with learning off", f2(100*on.readShare()), on.replayed, len(on.reads), f2(100*off.readShare())))
	limit := int(math.Ceil(float64(len(on.writes)) / mixedProbeLimit))
	r.check("6", fmt.Sprintf("the replica region's app runs the learned route at most 1 in %d of its writes (pgfly probes 1 in %d)",
		mixedProbeLimit, router.ProbeEvery),
		on.replicaRan <= limit,
		fmt.Sprintf("%d of %d writes, at most %d allowed; %d of %d with learning off", on.replicaRan, len(on.writes), limit,
			off.replicaRan, len(off.writes)))
	wOn, wOff := percentile(durations(on.writes), 50), percentile(durations(off.writes), 50)
	r.check("6", "a write on a learned route is faster than today's replay (p50, learning on against off)", wOn < wOff,
		fmt.Sprintf("%s ms vs %s ms, %s", ms(wOn), ms(wOff), ratio(wOn, wOff)))
	r.printf("\n")
	return nil
}

// readShare is the share of reads replayed, NaN for none.
func (m *mixedRun) readShare() float64 {
	if len(m.reads) == 0 {
		return math.NaN()
	}
	return float64(m.replayed) / float64(len(m.reads))
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// runMixed starts a fresh pgfly setup with learning as m says, warms it up and runs the load.
func (b *bench) runMixed(ctx context.Context, m *mixedRun) (err error) {
	apps := map[string]*appRuns{primaryRegion: newAppRuns(), replicaRegion: newAppRuns()}
	setup, err := regions.Start(ctx, regions.Options{
		Cluster:         b.cluster,
		DisableLearning: !m.learning,
		App: func(db *sql.DB, region string) http.Handler {
			return apps[region].wrap(sampleapp.New(db, region, nil))
		},
		Link: &regions.LinkConfig{Delay: b.cfg.delay},
	})
	if err != nil {
		return err
	}
	defer func() {
		if cErr := setup.Close(); cErr != nil {
			b.logf("stop the mixed-load setup: %v", cErr)
		}
	}()
	if err := b.exec(ctx, b.cluster.Primary, pgcluster.Database, "TRUNCATE items"); err != nil {
		return fmt.Errorf("empty the items table: %w", err)
	}
	if err := b.cluster.WaitReplayed(ctx); err != nil {
		return err
	}
	replicaApp := apps[replicaRegion]

	transport := &http.Transport{MaxIdleConnsPerHost: mixedClients, DisableCompression: true}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: 30 * time.Second}

	for i := range mixedWarmUp {
		if _, _, err := sendItems(ctx, client, setup.EdgeURL, true, fmt.Sprintf("warm-%s-%d", m.name(), i)); err != nil {
			return fmt.Errorf("warm-up write: %w", err)
		}
	}
	m.warmRan = replicaApp.get(http.MethodPost)
	for range mixedWarmUp {
		if _, _, err := sendItems(ctx, client, setup.EdgeURL, false, ""); err != nil {
			return fmt.Errorf("warm-up read: %w", err)
		}
	}
	if m.learned, err = routeLearned(ctx, setup.Replica.AdminURL, writeRoute); err != nil {
		return err
	}

	ranBefore := replicaApp.get(http.MethodPost)
	if err := b.mixedClients(ctx, client, setup.EdgeURL, m); err != nil {
		return err
	}
	m.replicaRan = replicaApp.get(http.MethodPost) - ranBefore
	return nil
}

// mixedClients runs the load: mixedClients clients, each sending b.prof.mixedRequests
// requests one after another; request n of the run (counted across the clients) is a write
// when n%mixedWriteEvery is the last of the cycle.
func (b *bench) mixedClients(ctx context.Context, client *http.Client, base string, m *mixedRun) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		seq atomic.Int64
		mu  sync.Mutex // guards m
		wg  sync.WaitGroup
	)
	for range mixedClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var reads, writes []time.Duration
			replayed := 0
			defer func() {
				mu.Lock()
				m.reads, m.writes, m.replayed = append(m.reads, reads...), append(m.writes, writes...), m.replayed+replayed
				mu.Unlock()
			}()
			for range b.prof.mixedRequests {
				n := seq.Add(1) - 1
				write := n%mixedWriteEvery == mixedWriteEvery-1
				took, region, err := sendItems(ctx, client, base, write, fmt.Sprintf("load-%s-%d", m.name(), n))
				if err != nil {
					cancel(fmt.Errorf("%s request %d: %w", kindName(write), n, err))
					return
				}
				if write {
					writes = append(writes, took)
					continue
				}
				reads = append(reads, took)
				if region == primaryRegion {
					replayed++
				}
			}
		}()
	}
	wg.Wait()
	return context.Cause(ctx) // the first client's error, or the caller's cancellation
}

// sendItems makes a write (POST /items with name) or a read (GET /items) at base and checks
// its answer: a write 201 from the primary region's app, a read 200 from either. It returns
// the latency and the region whose app answered.
func sendItems(ctx context.Context, client *http.Client, base string, write bool, name string) (time.Duration, string, error) {
	method, want := http.MethodGet, http.StatusOK
	var body io.Reader
	if write {
		method, want = http.MethodPost, http.StatusCreated
		body = strings.NewReader(url.Values{"name": {name}}.Encode())
	}
	req, err := http.NewRequestWithContext(ctx, method, base+"/items", body)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Accept", "application/json")
	if write {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	took := time.Since(start)
	if err != nil {
		return 0, "", err
	}
	region := resp.Header.Get(sampleapp.RegionHeader)
	if resp.StatusCode != want {
		return 0, "", fmt.Errorf("%s /items: got %s from %q, want %d", method, resp.Status, region, want)
	}
	switch {
	case write && region != primaryRegion:
		return 0, "", fmt.Errorf("POST /items answered by the app in %q, want %q", region, primaryRegion)
	case region != primaryRegion && region != replicaRegion:
		return 0, "", fmt.Errorf("GET /items answered by the app in %q, want %q or %q", region, replicaRegion, primaryRegion)
	}
	return took, region, nil
}

// routeLearned reports whether pgfly's GET /routes at admin lists route as learned.
func routeLearned(ctx context.Context, admin, route string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, admin+"/routes", nil)
	if err != nil {
		return false, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false, fmt.Errorf("pgfly's /routes: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("pgfly's /routes: got %s, want 200", resp.Status)
	}
	var rep router.RoutesReport
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		return false, fmt.Errorf("pgfly's /routes: %w", err)
	}
	for _, r := range rep.Learned {
		if r.Route == route && r.Learned {
			return true, nil
		}
	}
	return false, nil
}
