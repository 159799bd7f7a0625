package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"

	"github.com/pgfly/pgfly/internal/edge"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/router"
)

// warmRounds are requests of every kind sent before measuring: connections, prepared
// statements and pools warm up.
const warmRounds = 3

// kind is one request of section 4 and where it must have run.
type kind struct {
	setup     string
	write     bool
	edge      func(*twoRegions) string
	wantTrail string // the regions it ran in, from the edge's X-Edge-Trail
}

// seedClaim runs sections 4 and 5 on one two-region setup.
func (b *bench) seedClaim(ctx context.Context) error {
	b.logf("sections 4 and 5: two regions, %v one way", b.cfg.delay)
	t, err := b.startTwoRegions(ctx, b.cfg.delay)
	if err != nil {
		return err
	}
	defer func() {
		if err := t.Close(); err != nil {
			b.logf("stop the two regions: %v", err)
		}
	}()
	transport := &http.Transport{MaxIdleConnsPerHost: 4, DisableCompression: true}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: 30 * time.Second}
	if b.cfg.sections[4] {
		if err := b.compareSetups(ctx, t, client); err != nil {
			return err
		}
	}
	if b.cfg.sections[5] {
		if err := b.bookmarkCost(ctx, t, client); err != nil {
			return err
		}
	}
	return nil
}

const (
	setupPgfly   = "pgfly"
	setupRouted  = "DB-level routing"
	setupPrimary = "everything in the primary region"
)

// compareSetups is section 4.
func (b *bench) compareSetups(ctx context.Context, t *twoRegions, client *http.Client) error {
	r := &b.rep
	kinds := []kind{
		{setupPgfly, true, func(t *twoRegions) string { return t.EdgeURL }, replicaRegion + ">" + primaryRegion},
		{setupRouted, true, func(t *twoRegions) string { return t.routedEdge }, replicaRegion},
		{setupPrimary, true, func(t *twoRegions) string { return t.primaryEdge }, primaryRegion},
		{setupPgfly, false, func(t *twoRegions) string { return t.EdgeURL }, replicaRegion},
		{setupRouted, false, func(t *twoRegions) string { return t.routedEdge }, replicaRegion},
		{setupPrimary, false, func(t *twoRegions) string { return t.primaryEdge }, primaryRegion},
	}
	lat := make([][]time.Duration, len(kinds))
	rng := rand.New(rand.NewPCG(1, 2)) // the same orders in every run
	for round := range warmRounds + b.prof.requests {
		if round == warmRounds {
			b.logf("section 4: measuring %d requests of each kind", b.prof.requests)
		}
		for _, i := range rng.Perm(len(kinds)) { // interleaved: one of each kind per round, shuffled
			k := kinds[i]
			took, _, err := send(ctx, client, k.edge(t), k.write, nil, k.wantTrail)
			if err != nil {
				return fmt.Errorf("%s, %s request: %w", k.setup, kindName(k.write), err)
			}
			if round >= warmRounds {
				lat[i] = append(lat[i], took)
			}
		}
	}
	type stat struct{ p50, p99 float64 }
	st := make([]stat, len(kinds))
	for i := range kinds {
		us := durations(lat[i])
		st[i] = stat{percentile(us, 50), percentile(us, 99)}
	}

	r.printf("## 4. The seed's claim: replay the request, or route its statements\n\n")
	r.printf("Two regions on loopback (internal/regions), %s (primary) and %s (replica), with a one-way delay of %v on "+
		"every cross-region TCP connection, each of which crosses the setup's cross-region link: the edge to the primary "+
		"region, the replica-region app's connection to the primary under DB-level routing, the replica-region pgfly's "+
		"monitor connection to the primary, and the WAL stream (the replica's primary_conninfo points at a link of its "+
		"own). The delay is a userspace relay (internal/delay): this kernel has no qdiscs, so tc netem cannot delay. %s "+
		"Users are in %s: each setup has its own local edge (internal/edge) beside them. A write request (POST /work) does "+
		"read, write, read, read, write, each statement on its own; a read request (GET /work) does read, read, read.\n\n",
		primaryRegion, replicaRegion, b.cfg.delay, linkPath(t.Link), replicaRegion)
	r.printf("- **pgfly**: in each region the sample app behind pgfly; in %s the write is refused by the replica, the "+
		"shim answers fly-replay and the edge replays the whole request once in %s.\n", replicaRegion, primaryRegion)
	r.printf("- **DB-level routing**: the sample app in %s with two handles, the local replica and the remote primary; "+
		"the write and every statement after it go to the primary (the app's explicit switch, "+
		"`sampleapp.WithPrimary`). pgpool-II was not used: for statements outside an explicit transaction its default "+
		"(`disable_load_balance_on_write = transaction`) sends the reads after a write to the replica, and `always` "+
		"sends every later read of that session, a pooled app connection, to the far primary until it closes; neither "+
		"is a fair stand-in for routing the reads of one request.\n", replicaRegion)
	r.printf("- **everything in the primary region**: the sample app beside the primary, no pgfly; every request " +
		"crosses the delay.\n\n")
	r.printf("%d requests of each kind after %d warm-up rounds, interleaved (one of each kind per round, in a shuffled "+
		"order, so that no kind always follows a long idle wait), one at a time; latency measured "+
		"at the user, through the edge.\n\n", b.prof.requests, warmRounds)

	var rows [][]string
	wRouted, wPgfly := st[1], st[0]
	for i, k := range kinds[:3] {
		rows = append(rows, []string{k.setup, k.wantTrail, ms(st[i].p50), ms(st[i].p99), ratio(st[i].p50, wRouted.p50), ratio(st[i].p99, wRouted.p99)})
	}
	r.printf("Write requests:\n\n")
	r.table([]string{"setup", "ran in", "p50 ms", "p99 ms", "p50 vs DB-level routing", "p99 vs DB-level routing"}, rows)
	rows = nil
	rLocal := st[4]
	for _, i := range []int{4, 3, 5} {
		k := kinds[i]
		name := k.setup
		if i == 4 {
			name = "local read (the app beside the replica, no pgfly)"
		}
		rows = append(rows, []string{name, k.wantTrail, ms(st[i].p50), ms(st[i].p99), ratio(st[i].p50, rLocal.p50), ratio(st[i].p99, rLocal.p99)})
	}
	r.printf("Read requests:\n\n")
	r.table([]string{"setup", "ran in", "p50 ms", "p99 ms", "p50 vs local read", "p99 vs local read"}, rows)
	for i, k := range kinds[:3] {
		b.charts.seed = append(b.charts.seed, seedPoint{write: true, setup: k.setup, p50MS: st[i].p50 / 1000, p99MS: st[i].p99 / 1000})
	}
	for _, i := range []int{4, 3, 5} {
		setup := kinds[i].setup
		if i == 4 {
			setup = "local read, no pgfly"
		}
		b.charts.seed = append(b.charts.seed, seedPoint{setup: setup, p50MS: st[i].p50 / 1000, p99MS: st[i].p99 / 1000})
	}
	b.chart(chartSeed, "Write and read latency, p50 and p99, by setup: pgfly, DB-level routing, everything in the primary region, a local read")
	r.printf("A read through pgfly pays the shim's HTTP hop and, per statement, one more socket pair in the relay " +
		"(sections 3 and 1 measure each).\n\n")

	r.check("4", fmt.Sprintf("pgfly's write request ≤ 0.35 of DB-level routing's latency (p50, %v one way)", b.cfg.delay),
		wPgfly.p50/wRouted.p50 <= 0.35,
		fmt.Sprintf("%.2f at p50 (%s ms vs %s ms); %.2f at p99", wPgfly.p50/wRouted.p50, ms(wPgfly.p50), ms(wRouted.p50), wPgfly.p99/wRouted.p99))
	rPgfly := st[3]
	r.check("4", "pgfly's read request within 5% of a local read (p50)", rPgfly.p50/rLocal.p50 <= 1.05,
		fmt.Sprintf("%.2f× (%s ms vs %s ms, +%.0f µs)", rPgfly.p50/rLocal.p50, ms(rPgfly.p50), ms(rLocal.p50), rPgfly.p50-rLocal.p50))
	r.printf("\n")
	return nil
}

// linkPath says what else a connection across the link passes through.
func linkPath(l *regions.Link) string {
	if l.KernelCut() {
		return "Before the relay each connection crosses a veth pair into a network namespace, where the link can be cut " +
			"in the kernel (unused here): one more loopback hop."
	}
	return "Network namespaces are unavailable here, so nothing else is on the path."
}

func kindName(write bool) string {
	if write {
		return "write"
	}
	return "read"
}

// send makes a write (POST /work) or read (GET /work) request at base, with a bookmark
// cookie when one is given, and checks its status and the regions it ran in. It returns the
// latency and the bookmark cookie the response set, if any.
func send(ctx context.Context, client *http.Client, base string, write bool, bookmark *http.Cookie, wantTrail string) (time.Duration, *http.Cookie, error) {
	method, want := http.MethodGet, http.StatusOK
	if write {
		method, want = http.MethodPost, http.StatusCreated
	}
	req, err := http.NewRequestWithContext(ctx, method, base+"/work", nil)
	if err != nil {
		return 0, nil, err
	}
	if bookmark != nil {
		req.AddCookie(bookmark)
	}
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	took := time.Since(start)
	if err != nil {
		return 0, nil, err
	}
	if resp.StatusCode != want {
		return 0, nil, fmt.Errorf("%s /work: got %s %q, want %d", method, resp.Status, strings.TrimSpace(string(body)), want)
	}
	if trail := resp.Header.Get(edge.TrailHeader); wantTrail != "" && trail != wantTrail {
		return 0, nil, fmt.Errorf("%s /work ran in %q, want %q", method, trail, wantTrail)
	}
	for _, c := range resp.Cookies() {
		if c.Name == router.BookmarkCookie {
			return took, &http.Cookie{Name: c.Name, Value: c.Value}, nil
		}
	}
	return took, nil, nil
}

// bookmarkCost is section 5: how long a read waits for the replica after the client's own
// write, at no injected delay, at the configured one, and with only the WAL stream delayed.
func (b *bench) bookmarkCost(ctx context.Context, t *twoRegions, client *http.Client) error {
	r := &b.rep
	type setting struct {
		name     string
		all, wal time.Duration // delay of every cross-region connection; of the WAL stream
	}
	settings := []setting{
		{"none", 0, 0},
		{fmt.Sprintf("%v on every cross-region connection", b.cfg.delay), b.cfg.delay, b.cfg.delay},
		{fmt.Sprintf("%v on the WAL stream only", b.cfg.delay), 0, b.cfg.delay},
	}
	type sample struct {
		wait     []time.Duration // exact, from the _sum of pgfly's histogram
		with     []time.Duration // the read with the bookmark, at the user
		without  []time.Duration // a read right after a write, without the bookmark
		replayed int             // reads that did not catch up in time and ran in the primary region
	}
	res := make([]sample, len(settings))
	defer func() {
		t.Link.SetDelay(b.cfg.delay)
		t.WAL.SetDelay(b.cfg.delay)
	}()
	rng := rand.New(rand.NewPCG(3, 4))
	n := len(settings) * 2 // each setting, with and without the bookmark
	for round := range warmRounds + b.prof.bookmarkRequests {
		for _, trial := range rng.Perm(n) { // interleaved, shuffled
			i, bookmarked := trial/2, trial%2 == 0
			st, s := settings[i], &res[i]
			// Bytes already held back keep their release time (no overtaking): let them drain
			// before a shorter delay applies.
			held := max(t.WAL.Delay(), t.Link.Delay())
			t.Link.SetDelay(st.all)
			t.WAL.SetDelay(st.wal)
			if held > min(st.all, st.wal) {
				time.Sleep(held)
			}
			_, cookie, err := send(ctx, client, t.EdgeURL, true, nil, replicaRegion+">"+primaryRegion)
			if err != nil {
				return fmt.Errorf("write, delay %s: %w", st.name, err)
			}
			if cookie == nil {
				return fmt.Errorf("write, delay %s: no %s cookie in the response", st.name, router.BookmarkCookie)
			}
			if !bookmarked {
				took, _, err := send(ctx, client, t.EdgeURL, false, nil, replicaRegion)
				if err != nil {
					return fmt.Errorf("read after write without its bookmark, delay %s: %w", st.name, err)
				}
				if round >= warmRounds {
					s.without = append(s.without, took)
				}
				continue
			}
			before, err := scrape(ctx, t.Replica.AdminURL+"/metrics")
			if err != nil {
				return err
			}
			took, _, err := send(ctx, client, t.EdgeURL, false, cookie, "")
			if err != nil {
				return fmt.Errorf("read after write, delay %s: %w", st.name, err)
			}
			after, err := scrape(ctx, t.Replica.AdminURL+"/metrics")
			if err != nil {
				return err
			}
			wait, outcome, err := observedWait(before, after)
			if err != nil {
				return fmt.Errorf("read after write, delay %s: %w", st.name, err)
			}
			if round < warmRounds {
				continue
			}
			s.wait = append(s.wait, wait)
			s.with = append(s.with, took)
			if outcome != "caught_up" {
				s.replayed++
			}
		}
	}

	r.printf("## 5. Read-your-writes cost\n\n")
	r.printf("In the pgfly setup of section 4: a write request (replayed in %s, whose pgfly sets the %s bookmark cookie), "+
		"then at once a read request carrying the bookmark, which pgfly in %s holds until the replica has replayed it "+
		"(at most %v, then it is replayed in %s). The wait is exact: the growth of pgfly's "+
		"pgfly_bookmark_wait_seconds_sum across that one read. For comparison, the same write followed by a read without "+
		"the bookmark. %d of each per setting, all interleaved in a shuffled order.\n\n", primaryRegion,
		router.BookmarkCookie, replicaRegion, router.DefaultConsistencyWait, primaryRegion, b.prof.bookmarkRequests)
	var rows [][]string
	for i, st := range settings {
		s := res[i]
		w, with, without := durations(s.wait), durations(s.with), durations(s.without)
		rows = append(rows, []string{st.name, ms(percentile(w, 50)), ms(percentile(w, 99)),
			ms(percentile(with, 50)), ms(percentile(with, 99)), ms(percentile(without, 50)), ms(percentile(without, 99)),
			fmt.Sprintf("%d of %d", len(s.wait)-s.replayed, len(s.wait))})
	}
	r.table([]string{"injected one-way delay", "bookmark wait p50 ms", "p99 ms", "read with bookmark p50 ms", "p99 ms",
		"read without bookmark p50 ms", "p99 ms", "caught up in time"}, rows)
	r.printf("With the delay on every connection, the write's response and its WAL cross it side by side, so by the " +
		"time the next request arrives the replica has nearly caught up: the wait is what is left of the lag, not the " +
		"delay. With the WAL stream alone delayed, the read waits for the replica's real lag.\n\n")
	return nil
}

// observedWait finds the one bookmark wait pgfly observed between two scrapes of its
// /metrics: its duration and outcome.
func observedWait(before, after map[string]float64) (time.Duration, string, error) {
	var outcome string
	var sum float64
	for _, o := range []string{"caught_up", "timeout", "cancelled"} {
		count := `pgfly_bookmark_wait_seconds_count{outcome="` + o + `"}`
		if after[count]-before[count] >= 1 {
			if outcome != "" {
				return 0, "", fmt.Errorf("more than one bookmark wait observed")
			}
			outcome = o
			key := `pgfly_bookmark_wait_seconds_sum{outcome="` + o + `"}`
			sum = after[key] - before[key]
		}
	}
	if outcome == "" {
		return 0, "", fmt.Errorf("pgfly observed no bookmark wait")
	}
	return time.Duration(math.Round(sum * float64(time.Second))), outcome, nil
}
