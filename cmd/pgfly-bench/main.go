// Command pgfly-bench measures pgfly against what people would otherwise use and prints
// markdown tables: the Postgres relay against a direct connection and PgBouncer (Debian's
// pgbench), memory per idle session, the HTTP shim's cost, the seed's claim (replaying the
// whole write request in the primary region against routing its statements there, across a
// userspace delay between two loopback "regions"), and the cost of read-your-writes
// bookmarks, and a mixed load of reads and writes with pgfly's learned write routes on and
// off.
//
// It starts everything it needs: a PostgreSQL primary and replica (internal/pgcluster), the
// pgfly binary (built from this module) and PgBouncer as child processes whose CPU and
// memory it reads from /proc, and the two-region setup of internal/regions (the sample app,
// pgfly sidecars and the local edge, in process, with a cross-region link it delays). Figures are medians of interleaved repetitions (A B A B ...), quoted as ratios
// against a baseline measured in the same run. It needs Linux, pgbench and pgbouncer, and
// root or the postgres account's rights to run PgBouncer and the servers.
//
// Usage:
//
//	go run ./cmd/pgfly-bench [--quick] [--delay=40ms] [--out=FILE]
//
// --quick finishes in under a minute and is what CI runs. --out also writes SVG charts of
// sections 1, 4 and 6 (gonum's plot) into the file's directory, which the markdown links by
// relative names. It never talks to anything but 127.0.0.1.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "pgfly-bench:", err)
		os.Exit(1)
	}
}

// config is the command line.
type config struct {
	quick    bool
	smoke    bool
	delay    time.Duration
	out      string
	pgfly    string
	pgflyEnv []string // KEY=VALUE settings for the pgfly child processes
	sections map[int]bool
	args     []string
}

// DefaultDelay is the one-way delay between the two regions.
const DefaultDelay = 40 * time.Millisecond

func parseFlags(args []string, stderr io.Writer) (config, error) {
	c := config{args: args}
	fs := flag.NewFlagSet("pgfly-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.BoolVar(&c.quick, "quick", false, "fewer and shorter runs: finishes in under a minute (CI runs this)")
	fs.BoolVar(&c.smoke, "smoke", false, "the plumbing only, with tiny runs whose figures mean nothing (the command's own test)")
	fs.DurationVar(&c.delay, "delay", DefaultDelay, "one-way delay on every cross-region connection")
	fs.StringVar(&c.out, "out", "", "also write the markdown to this file, and its charts (SVG) beside it")
	fs.StringVar(&c.pgfly, "pgfly", "", "a pgfly binary to measure; by default it is built from this module")
	fs.Func("pgfly-env", "KEY=VALUE for the environment of the pgfly child processes, e.g. GOMAXPROCS=1 (repeatable)", func(v string) error {
		if k, _, ok := strings.Cut(v, "="); !ok || k == "" {
			return fmt.Errorf("want KEY=VALUE, got %q", v)
		}
		c.pgflyEnv = append(c.pgflyEnv, v)
		return nil
	})
	sections := fs.String("sections", "1,2,3,4,5,6,7", "which sections to run, comma-separated")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.delay < 0 {
		return c, fmt.Errorf("invalid value %v for flag --delay: must not be negative", c.delay)
	}
	c.sections = map[int]bool{}
	for s := range strings.SplitSeq(*sections, ",") {
		var n int
		if _, err := fmt.Sscanf(strings.TrimSpace(s), "%d", &n); err != nil || n < 1 || n > 7 {
			return c, fmt.Errorf("invalid value %q for flag --sections: want numbers from 1 to 7", *sections)
		}
		c.sections[n] = true
	}
	return c, nil
}

// profile sizes the runs.
type profile struct {
	name string
	// Section 1: pgbench runs of pgbenchSeconds each (or pgbenchTx transactions per client
	// when pgbenchSeconds is 0), reps repetitions of each.
	pgbenchSeconds int
	pgbenchTx      int
	reps           int
	reads          []pgbenchConfig
	writes         []pgbenchConfig
	// Section 2: idle sessions held open, and how long pgfly is left alone before its memory
	// is read.
	sessions int
	settle   time.Duration
	// Section 3: each load runs for shimTime (or shimRequests requests when it is zero).
	shimTime     time.Duration
	shimRequests int
	shimReps     int
	// Sections 4 and 5: requests per setup and kind.
	requests         int
	bookmarkRequests int
	// Section 6: requests per client, for each of mixedClients clients.
	mixedRequests int
	// Section 7: jobs per way.
	jobs int
}

func profileFor(c config) profile {
	var reads []pgbenchConfig
	for _, mode := range []string{"simple", "extended", "prepared"} {
		for _, clients := range []int{1, 16, 64} {
			reads = append(reads, pgbenchConfig{select1: true, mode: mode, clients: clients})
		}
	}
	full := profile{
		name:           "full",
		pgbenchSeconds: 3, reps: 3,
		reads:    reads,
		writes:   []pgbenchConfig{{mode: "prepared", clients: 16}},
		sessions: 2000, settle: time.Second,
		shimTime: time.Second, shimReps: 3,
		requests: 100, bookmarkRequests: 50,
		mixedRequests: 100,
		jobs:          30,
	}
	switch {
	case c.smoke:
		return profile{
			name:      "smoke",
			pgbenchTx: 20, reps: 1,
			reads:    []pgbenchConfig{{select1: true, mode: "prepared", clients: 1}, {select1: true, mode: "simple", clients: 16}},
			writes:   []pgbenchConfig{{mode: "prepared", clients: 16}},
			sessions: 20, settle: 100 * time.Millisecond,
			shimRequests: 30, shimReps: 1,
			requests: 3, bookmarkRequests: 3,
			mixedRequests: 5,
			jobs:          2,
		}
	case c.quick:
		return profile{
			name:           "quick",
			pgbenchSeconds: 1, reps: 1,
			reads: []pgbenchConfig{
				{select1: true, mode: "prepared", clients: 1},
				{select1: true, mode: "simple", clients: 16},
			},
			writes:   full.writes,
			sessions: 200, settle: 300 * time.Millisecond,
			shimTime: 200 * time.Millisecond, shimReps: 1,
			requests: 6, bookmarkRequests: 6,
			mixedRequests: 30,
			jobs:          6,
		}
	}
	return full
}

// run executes the benchmark; only main turns its result into an exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	began := time.Now()
	b, err := newBench(ctx, cfg, profileFor(cfg), stderr)
	if err != nil {
		return err
	}
	defer b.close()

	b.header()
	for _, s := range []struct {
		n   int
		run func(context.Context) error
	}{
		{1, b.relayOverhead},
		{2, b.memoryPerSession},
		{3, b.shimCost},
		{4, b.seedClaim},
		{6, b.mixedLoad},
		{7, b.jobsForwarding},
	} {
		if !cfg.sections[s.n] && !(s.n == 4 && cfg.sections[5]) {
			continue
		}
		if err := s.run(ctx); err != nil {
			return fmt.Errorf("section %d: %w", s.n, err)
		}
	}
	b.rep.summary()
	b.rep.printf("Finished in %v, cluster start included; load average at the end: %s.\n",
		time.Since(began).Round(time.Second), loadAverage())

	out := b.rep.b.String()
	if _, err := io.WriteString(stdout, out); err != nil {
		return err
	}
	if cfg.out != "" {
		if err := os.WriteFile(cfg.out, []byte(out), 0o644); err != nil {
			return fmt.Errorf("flag --out: %w", err)
		}
		written, err := b.charts.write(filepath.Dir(cfg.out))
		if err != nil {
			return fmt.Errorf("flag --out: %w", err)
		}
		for _, w := range written {
			b.logf("wrote %s", w)
		}
	}
	return nil
}
