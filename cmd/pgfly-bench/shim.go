package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/router"
)

// shimWorkers is the concurrency of the throughput load.
const shimWorkers = 8

// bigResponse is the size of the large response.
const bigResponse = 1 << 20

// loadResult is one HTTP load: requests per second and latencies.
type loadResult struct {
	rps, p50, p99 float64 // p50 and p99 in µs
}

// shimCost is section 3: the app directly against the app through the shim.
func (b *bench) shimCost(ctx context.Context) error {
	r := &b.rep
	b.logf("section 3: the shim's cost")
	big := bytes.Repeat([]byte("x"), bigResponse)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /tiny", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", "3")
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /big", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(big)))
		w.Write(big)
	})
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	app := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go app.Serve(appLn)
	defer app.Close()
	appURL, _ := url.Parse("http://" + appLn.Addr().String())

	// In the primary region, so that the shim proxies and never replays: the cost of being
	// on the path.
	shim, err := router.New(router.Config{Listen: "127.0.0.1:0", App: appURL, Region: "iad", PrimaryRegion: "iad"}, zap.NewNop())
	if err != nil {
		return err
	}
	if err := shim.Listen(); err != nil {
		return err
	}
	go shim.Serve()
	defer shim.Close()

	// The floor of any proxy on the path: a bare TCP relay, no HTTP.
	bare, err := bareRelay(appLn.Addr().String(), spliceCopy)
	if err != nil {
		return err
	}
	defer bare.Close()

	transport := &http.Transport{MaxIdleConnsPerHost: shimWorkers * 2, DisableCompression: true}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: 30 * time.Second}
	targets := []struct{ name, base string }{
		{"app directly", appURL.String()},
		{"through the shim", "http://" + shim.Addr().String()},
		{"through a bare TCP relay", "http://" + bare.Addr().String()},
	}
	sizes := []struct {
		name, path string
		size       int
	}{
		{"tiny (3 B)", "/tiny", 3},
		{"1 MiB", "/big", bigResponse},
	}

	type key struct{ size, target, workers int }
	runs := map[key][]loadResult{}
	for si, s := range sizes {
		for rep := range b.prof.shimReps {
			for ti, t := range targets {
				for _, workers := range []int{1, shimWorkers} {
					b.logf("section 3: %s %s, %d clients, repetition %d/%d", s.name, t.name, workers, rep+1, b.prof.shimReps)
					// Warm the connections first.
					if _, err := b.load(ctx, client, t.base+s.path, s.size, workers, 0, workers*2); err != nil {
						return err
					}
					res, err := b.load(ctx, client, t.base+s.path, s.size, workers, b.prof.shimTime, b.prof.shimRequests)
					if err != nil {
						return fmt.Errorf("%s %s: %w", s.name, t.name, err)
					}
					k := key{si, ti, workers}
					runs[k] = append(runs[k], res)
				}
			}
		}
	}
	med := func(k key) loadResult {
		var rps, p50, p99 []float64
		for _, x := range runs[k] {
			rps, p50, p99 = append(rps, x.rps), append(p50, x.p50), append(p99, x.p99)
		}
		return loadResult{median(rps), median(p50), median(p99)}
	}

	r.printf("## 3. The shim's cost\n\n")
	dur := b.prof.shimTime.String()
	if b.prof.shimTime == 0 {
		dur = fmt.Sprintf("%d requests", b.prof.shimRequests)
	}
	r.printf("A plain net/http app answering a 3-byte or a 1 MiB body, reached directly and through pgfly's shim "+
		"(router.Shim in the primary region, so it proxies and never replays), in process, over loopback keep-alive "+
		"connections. A bare TCP relay (two io.Copy goroutines per connection, which splice; no HTTP) shows the floor of any proxy "+
		"on the path: the cost of moving the bytes through one more socket pair. Each load lasts %s, at 1 client "+
		"(latency) and at %d concurrent clients (throughput); medians of %d interleaved repetitions.\n\n",
		dur, shimWorkers, b.prof.shimReps)
	var rows [][]string
	added, floor := make([]float64, len(sizes)), make([]float64, len(sizes))
	for si, s := range sizes {
		d1, d8 := med(key{si, 0, 1}), med(key{si, 0, shimWorkers})
		for ti, t := range targets {
			one, many := med(key{si, ti, 1}), med(key{si, ti, shimWorkers})
			add := ""
			if ti > 0 {
				add = f0(one.p50 - d1.p50)
			}
			switch ti {
			case 1:
				added[si] = one.p50 - d1.p50
			case 2:
				floor[si] = one.p50 - d1.p50
			}
			rows = append(rows, []string{s.name, t.name, f0(one.rps), f0(one.p50), f0(one.p99), add,
				f0(many.rps), ratio(many.rps, d8.rps), f0(many.p50), f0(many.p99)})
		}
	}
	r.table([]string{"response", "via", "req/s (1 client)", "p50 µs", "p99 µs", "added p50 µs",
		fmt.Sprintf("req/s (%d clients)", shimWorkers), "vs direct", "p50 µs", "p99 µs"}, rows)
	for si, s := range sizes {
		r.check("3", fmt.Sprintf("the shim adds < 100 µs at p50 (%s response, 1 client)", s.name), added[si] < 100,
			fmt.Sprintf("%.0f µs added; a bare TCP relay adds %.0f µs", added[si], floor[si]))
	}
	r.printf("\n")
	return nil
}

// load sends GET url from workers clients for d (or n requests in all when d is zero) and
// checks every response's status and length.
func (b *bench) load(ctx context.Context, client *http.Client, url string, size, workers int, d time.Duration, n int) (loadResult, error) {
	var (
		mu    sync.Mutex
		lat   []time.Duration
		first error
		sent  int
	)
	deadline := time.Now().Add(d)
	more := func() bool {
		mu.Lock()
		defer mu.Unlock()
		if first != nil || ctx.Err() != nil {
			return false
		}
		if d > 0 {
			return time.Now().Before(deadline)
		}
		sent++
		return sent <= n
	}
	start := time.Now()
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for more() {
				t0 := time.Now()
				err := get(ctx, client, url, size)
				took := time.Since(t0)
				if err != nil {
					mu.Lock()
					first = errors.Join(first, err)
					mu.Unlock()
					return
				}
				mine = append(mine, took)
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if first != nil {
		return loadResult{}, first
	}
	if err := ctx.Err(); err != nil {
		return loadResult{}, err
	}
	us := durations(lat)
	return loadResult{rps: float64(len(lat)) / elapsed.Seconds(), p50: percentile(us, 50), p99: percentile(us, 99)}, nil
}

// get fetches url and checks for 200 and size bytes.
func get(ctx context.Context, client *http.Client, url string, size int) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: read body: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK || n != int64(size) {
		return fmt.Errorf("GET %s: got %s with %d bytes, want 200 OK with %d", url, resp.Status, n, size)
	}
	return nil
}

// bareRelay relays every connection to target with two goroutines that copy: a proxy that
// does nothing but move bytes. Close the listener to stop it; open connections end when
// either side closes.
func bareRelay(target string, copy func(dst, src *net.TCPConn)) (net.Listener, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				conn, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer conn.Close()
				down, up := c.(*net.TCPConn), conn.(*net.TCPConn)
				done := make(chan struct{}, 2)
				go func() { copy(up, down); up.CloseWrite(); done <- struct{}{} }()
				go func() { copy(down, up); down.CloseWrite(); done <- struct{}{} }()
				<-done
				<-done
			}()
		}
	}()
	return ln, nil
}

// spliceCopy is io.Copy, which splices between TCP sockets on Linux.
func spliceCopy(dst, src *net.TCPConn) { io.Copy(dst, src) }

// copyLoop copies with read and write through an 8 KiB buffer, as pgfly's relay does.
func copyLoop(dst, src *net.TCPConn) {
	buf := make([]byte, 8<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
