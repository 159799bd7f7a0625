package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgfly/pgfly/internal/pgcluster"
)

// connectWorkers is how many sessions are opened at once.
const connectWorkers = 16

// memorySample is pgfly's memory at one moment, from /proc and from its own /metrics.
type memorySample struct {
	rssKiB     int64
	heapInuse  float64 // go_memstats_heap_inuse_bytes
	stackInuse float64 // go_memstats_stack_inuse_bytes
	goroutines float64
}

// memoryPerSession is section 2: pgfly's RSS with many idle sessions open.
func (b *bench) memoryPerSession(ctx context.Context) error {
	r := &b.rep
	n := b.prof.sessions
	b.logf("section 2: memory with %d idle sessions", n)
	adminPort, err := freePort()
	if err != nil {
		return err
	}
	admin := net.JoinHostPort("127.0.0.1", strconv.Itoa(adminPort))
	upstream := b.cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database)
	pgfly, addr, err := b.startPgfly(ctx, "section2", upstream, admin)
	if err != nil {
		return err
	}
	defer pgfly.stop()

	// One session first, so that what every session shares (the upstream's TLS-free dialer,
	// pools, the monitor's connection) is in the idle figure.
	warm, err := connectIdle(ctx, addr, 1)
	if err != nil {
		return err
	}
	closeAll(warm)
	time.Sleep(b.prof.settle)
	idle, err := sampleMemory(ctx, pgfly.pid(), admin)
	if err != nil {
		return err
	}
	began := time.Now()
	conns, err := connectIdle(ctx, addr, n)
	defer closeAll(conns)
	if err != nil {
		return err
	}
	opened := time.Since(began)
	time.Sleep(b.prof.settle)
	busy, err := sampleMemory(ctx, pgfly.pid(), admin)
	if err != nil {
		return err
	}
	perKiB := float64(busy.rssKiB-idle.rssKiB) / float64(n)
	perGo := (busy.heapInuse + busy.stackInuse - idle.heapInuse - idle.stackInuse) / float64(n) / 1024

	r.printf("## 2. Memory per session\n\n")
	r.printf("pgfly (`pgfly serve`, a child process, relaying to the real primary, whose max_connections the benchmark raises) "+
		"with %d idle sessions open, each a completed startup (pgconn) left idle; RSS from /proc/<pid>/status, heap and "+
		"stack from pgfly's own /metrics, each read %v after the last change. Opening the %d sessions took %v. "+
		"One measurement.\n\n", n, b.prof.settle, n, opened.Round(time.Millisecond))
	r.table([]string{"", "RSS MiB", "Go heap in use MiB", "Go stacks MiB", "goroutines"}, [][]string{
		{"idle", f1(float64(idle.rssKiB) / 1024), f1(idle.heapInuse / (1 << 20)), f1(idle.stackInuse / (1 << 20)), f0(idle.goroutines)},
		{fmt.Sprintf("%d sessions", n), f1(float64(busy.rssKiB) / 1024), f1(busy.heapInuse / (1 << 20)), f1(busy.stackInuse / (1 << 20)), f0(busy.goroutines)},
		{"per session (KiB)", f1(perKiB), "", "", f1((busy.goroutines - idle.goroutines) / float64(n))},
	})
	r.printf("Go's heap plus stacks in use grew by %.1f KiB per session. RSS counts only the pages touched: the part "+
		"of a fresh buffer never written is not resident.\n\n", perGo)
	r.check("2", "pgfly's RSS per idle session < 48 KiB", perKiB < 48, fmt.Sprintf("%.1f KiB per session over %d sessions", perKiB, n))
	r.printf("\n")
	return nil
}

// connectIdle opens n sessions through addr, connectWorkers at a time.
func connectIdle(ctx context.Context, addr string, n int) ([]*pgconn.PgConn, error) {
	host, port, _ := net.SplitHostPort(addr)
	connStr := fmt.Sprintf("host=%s port=%s user=%s dbname=%s sslmode=disable connect_timeout=30",
		host, port, pgcluster.RoleSuperuser.Name, pgcluster.Database)
	conns := make([]*pgconn.PgConn, n)
	errs := make(chan error, connectWorkers)
	next := make(chan int)
	var wg sync.WaitGroup
	for range connectWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				c, err := pgconn.Connect(ctx, connStr)
				if err != nil {
					errs <- fmt.Errorf("open session %d of %d: %w", i+1, n, err)
					return
				}
				conns[i] = c
			}
		}()
	}
	var err error
feed:
	for i := range n {
		select {
		case next <- i:
		case err = <-errs:
			break feed
		}
	}
	close(next)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return conns, err
}

// closeAll closes the sessions that were opened, connectWorkers at a time.
func closeAll(conns []*pgconn.PgConn) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sem := make(chan struct{}, connectWorkers)
	var wg sync.WaitGroup
	for _, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			c.Close(ctx)
			<-sem
		}()
	}
	wg.Wait()
}

// sampleMemory reads pgfly's RSS and its Go memory metrics.
func sampleMemory(ctx context.Context, pid int, admin string) (memorySample, error) {
	var s memorySample
	var err error
	if s.rssKiB, err = memKiB(pid, "VmRSS"); err != nil {
		return s, err
	}
	m, err := scrape(ctx, "http://"+admin+"/metrics")
	if err != nil {
		return s, err
	}
	s.heapInuse = m["go_memstats_heap_inuse_bytes"]
	s.stackInuse = m["go_memstats_stack_inuse_bytes"]
	s.goroutines = m["go_goroutines"]
	return s, nil
}

// scrape reads a Prometheus text exposition into a map from the series (name and labels, as
// written) to its value.
func scrape(ctx context.Context, url string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: %s", url, resp.Status)
	}
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}
