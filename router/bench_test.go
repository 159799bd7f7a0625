package router_test

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/pgfly/pgfly/router"
)

// BenchmarkShim measures what the shim adds to a request that needs no replay: one client, on
// keep-alive loopback connections, sends GETs to the app directly and through the shim, for a
// tiny answer and a 1 MiB one. Besides ns/op it reports the p50 and p99 latency of a request.
// Allocations are the whole process's: client, shim and app.
func BenchmarkShim(b *testing.B) {
	sizes := []struct {
		name string
		size int
	}{
		{"tiny", 2},
		{"1MiB", 1 << 20},
	}
	answers := make(map[string][]byte)
	for _, s := range sizes {
		answers["/"+s.name] = bytes.Repeat([]byte("x"), s.size)
	}
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body := answers[r.URL.Path]
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	}))
	defer app.Close()
	appURL, err := url.Parse(app.URL)
	if err != nil {
		b.Fatal(err)
	}
	shim, err := router.New(router.Config{Listen: "127.0.0.1:0", App: appURL, Region: "fra", PrimaryRegion: "iad"}, nil)
	if err != nil {
		b.Fatal(err)
	}
	if err := shim.Listen(); err != nil {
		b.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- shim.Serve() }()
	defer func() {
		shim.Close()
		if err := <-served; err != nil {
			b.Errorf("Serve: %v", err)
		}
	}()

	for _, route := range []struct{ name, url string }{
		{"direct", app.URL},
		{"shim", "http://" + shim.Addr().String()},
	} {
		b.Run(route.name, func(b *testing.B) {
			for _, s := range sizes {
				b.Run(s.name, func(b *testing.B) {
					benchmarkGets(b, route.url+"/"+s.name, int64(s.size))
				})
			}
		})
	}
}

// benchmarkGets sends b.N sequential GETs to u over one keep-alive connection, checks each
// answer's length, and reports the p50 and p99 latency.
func benchmarkGets(b *testing.B, u string, size int64) {
	transport := &http.Transport{MaxIdleConnsPerHost: 4, DisableCompression: true}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport}
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		b.Fatal(err)
	}
	get := func() {
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || n != size {
			b.Fatalf("got %d with %d bytes (%v), want 200 with %d", resp.StatusCode, n, err, size)
		}
	}
	get() // connect outside the measurement
	latencies := make([]time.Duration, b.N)
	if size > 1<<10 {
		b.SetBytes(size)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		start := time.Now()
		get()
		latencies[i] = time.Since(start)
	}
	b.StopTimer()
	slices.Sort(latencies)
	quantile := func(q float64) float64 {
		return float64(latencies[int(q*float64(len(latencies)-1))].Nanoseconds()) / 1e3
	}
	b.ReportMetric(quantile(0.50), "p50-µs")
	b.ReportMetric(quantile(0.99), "p99-µs")
}
