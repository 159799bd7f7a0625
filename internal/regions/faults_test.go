package regions_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/regions"
)

// replayedFor counts the replays the replica region's shim logged for reason.
func (w *world) replayedFor(reason string) int {
	n := 0
	for _, e := range w.logs.FilterMessage("replaying in the primary region").All() {
		if e.ContextMap()["reason"] == reason {
			n++
		}
	}
	return n
}

// TestReplicaRestartMidLoad restarts the replica while clients write and read through the
// edge, with learned routes off so that every POST runs in the replica region first. The
// replica region's requests that meet the outage (a refused connection, a session the
// restart ended, a server still starting up) are replayed in the primary region: every POST
// is answered 201 and written once, every GET 200.
func TestReplicaRestartMidLoad(t *testing.T) {
	w := start(t, regions.Options{DisableLearning: true})
	prefix := unique("restart")
	const clients = 4
	var (
		mu    sync.Mutex
		names []string
		errs  []string
		reqs  int
		wg    sync.WaitGroup
	)
	stop := make(chan struct{})
	for c := range clients {
		wg.Go(func() {
			for i := 0; i < 2000; i++ { // bounded: the restart takes a second or two
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				name := fmt.Sprintf("%s-%d-%d", prefix, c, i)
				post, err := send(ctx, http.DefaultClient, http.MethodPost, w.EdgeURL+"/items",
					strings.NewReader(url.Values{"name": {name}}.Encode()), formHeader())
				var get reply
				if err == nil {
					get, err = send(ctx, http.DefaultClient, http.MethodGet, w.EdgeURL+"/items", nil, nil)
				}
				cancel()
				mu.Lock()
				reqs += 2
				names = append(names, name)
				switch {
				case err != nil:
					errs = append(errs, err.Error())
				case post.status != http.StatusCreated:
					errs = append(errs, fmt.Sprintf("POST %s: %d from %q: %q", name, post.status, post.region, post.body))
				case get.status != http.StatusOK:
					errs = append(errs, fmt.Sprintf("GET /items: %d from %q: %q", get.status, get.region, get.body))
				}
				mu.Unlock()
			}
		})
	}
	time.Sleep(500 * time.Millisecond) // the load is running
	if err := cluster.Replica.Stop(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(250 * time.Millisecond)
	if err := cluster.Replica.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cluster.WaitStreaming(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // and runs on against the restarted replica
	close(stop)
	wg.Wait()

	t.Logf("%d requests, %d replayed with pgfly_replica_down", reqs, w.replayedFor("replica_down"))
	for i, e := range errs {
		if i == 10 {
			t.Errorf("... and %d more", len(errs)-10)
			break
		}
		t.Errorf("during a replica restart: %s", e)
	}
	if w.replayedFor("replica_down") == 0 {
		t.Errorf("no request was replayed with reason replica_down: the load did not meet the outage")
	}
	for _, name := range names {
		if n := rowsNamed(t, cluster.Primary, name); n != 1 {
			t.Errorf("%s: %d rows on the primary, want exactly 1", name, n)
		}
	}
}

// TestTwoPrimariesAreFenced promotes the replica while the primary still runs, in a setup of
// its own. The replica region notices two primaries, ends its open sessions and starts new
// ones read-only, so its writes are refused and replayed to the real primary: no row is
// written on the promoted server, each POST once on the primary, and /health says why.
func TestTwoPrimariesAreFenced(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	own, err := pgcluster.Start(ctx, pgcluster.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { own.Close() })
	w := startOn(t, own, regions.Options{})
	prefix := unique("fence")
	post := func(name string) reply {
		t.Helper()
		return postForm(t, w.EdgeURL+"/items", url.Values{"name": {name}})
	}
	wantReply(t, post(prefix+"-before"), http.StatusCreated, "iad", "")
	// The replica region's app holds pooled sessions opened before the promotion.
	wantReply(t, do(t, http.MethodGet, w.EdgeURL+"/items", nil, nil), http.StatusOK, "fra", "")

	if err := own.Replica.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !w.Replica.Sidecar.Status().TwoPrimaries {
		if time.Now().After(deadline) {
			t.Fatal("the replica region did not notice two primaries within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	var names []string
	for i := range 10 {
		name := fmt.Sprintf("%s-%d", prefix, i)
		names = append(names, name)
		wantReply(t, post(name), http.StatusCreated, "iad", "")
	}
	for _, name := range names {
		if n := rowsNamed(t, own.Primary, name); n != 1 {
			t.Errorf("%s: %d rows on the primary, want 1", name, n)
		}
		if n := rowsNamed(t, own.Replica, name); n != 0 {
			t.Errorf("%s: %d rows on the promoted replica, want 0: the region was not fenced", name, n)
		}
	}
	resp, err := http.Get(w.Replica.AdminURL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	var h struct{ Status string }
	json.NewDecoder(resp.Body).Decode(&h)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || h.Status != "two_primaries" {
		t.Errorf("replica region /health: got %d %q, want 503 two_primaries", resp.StatusCode, h.Status)
	}
}
