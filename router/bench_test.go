package router_test

import (
	"bytes"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/pgfly/pgfly/router"
)

// BenchmarkShim measures what the shim adds to a request that needs no replay: one client, on
// keep-alive loopback connections, sends GETs to the app directly and through the shim, for a
// tiny answer and a 1 MiB one. Besides ns/op it reports the p50 and p99 latency of a request.
// Allocations are the whole process's: client, shim and app.
//
// "shim" is the bare shim in a replica region. "sidecar" is the shim as `pgfly serve` runs it
// there: a replica for bookmarks, an info-level logger, and requests as an edge sends them (a
// traceparent, X-Forwarded-*, a session cookie but no bookmark): an ordinary read, neither
// tainted nor waiting, whose debug lines must cost nothing.
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
	shim := serveShim(b, router.Config{Listen: "127.0.0.1:0", App: appURL, Region: "fra", PrimaryRegion: "iad"}, nil)
	infoLog := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(io.Discard), zap.InfoLevel))
	sidecar := serveShim(b, router.Config{Listen: "127.0.0.1:0", App: appURL, Region: "fra", PrimaryRegion: "iad",
		Replica: newFakeReplica(0x16B374D848)}, infoLog)
	edge := http.Header{
		"Traceparent":         {"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
		"X-Forwarded-For":     {"203.0.113.7"},
		"X-Forwarded-Proto":   {"https"},
		"Fly-Forwarded-Proto": {"https"},
		"Cookie":              {"session=8f14e45fceea167a5a36dedd4bea2543; theme=dark"},
	}

	for _, route := range []struct {
		name, url string
		header    http.Header
	}{
		{"direct", app.URL, nil},
		{"shim", "http://" + shim.Addr().String(), nil},
		{"sidecar", "http://" + sidecar.Addr().String(), edge},
	} {
		b.Run(route.name, func(b *testing.B) {
			for _, s := range sizes {
				b.Run(s.name, func(b *testing.B) {
					benchmarkGets(b, route.url+"/"+s.name, route.header, int64(s.size))
				})
			}
		})
	}
}

// serveShim starts a shim for a benchmark and stops it when the benchmark ends.
func serveShim(b *testing.B, cfg router.Config, log *zap.Logger) *router.Shim {
	b.Helper()
	shim, err := router.New(cfg, log)
	if err != nil {
		b.Fatal(err)
	}
	if err := shim.Listen(); err != nil {
		b.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- shim.Serve() }()
	b.Cleanup(func() {
		shim.Close()
		if err := <-served; err != nil {
			b.Errorf("Serve: %v", err)
		}
	})
	return shim
}

// benchmarkGets sends b.N sequential GETs to u, with header, over one keep-alive connection,
// checks each answer's length, and reports the p50 and p99 latency.
func benchmarkGets(b *testing.B, u string, header http.Header, size int64) {
	transport := &http.Transport{MaxIdleConnsPerHost: 4, DisableCompression: true}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport}
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		b.Fatal(err)
	}
	maps.Copy(req.Header, header)
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
