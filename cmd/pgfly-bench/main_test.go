package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestSmoke runs the whole command in its smoke profile (every section, tiny runs), so that
// the benchmark cannot rot: every tool it drives still starts, every request it sends still
// gets the answer it expects, and every table and target still comes out. It checks the
// report's shape and that what was measured is there; the figures themselves mean nothing
// at this size.
func TestSmoke(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	out := filepath.Join(t.TempDir(), "bench.md")
	var stdout, stderr bytes.Buffer
	err := run(ctx, []string{"--smoke", "--delay=5ms", "--out", out}, &stdout, &stderr)
	if err != nil {
		t.Fatalf("run: %v\nstderr:\n%s", err, stderr.String())
	}
	report := stdout.String()
	written, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("read --out file: %v", err)
	}
	if string(written) != report {
		t.Errorf("--out file differs from stdout:\n%s\nvs\n%s", written, report)
	}

	t.Run("every section is there", func(t *testing.T) {
		for _, h := range []string{"# pgfly benchmarks", "## 1. ", "## 2. ", "## 3. ", "## 4. ", "## 5. ", "## 6. ", "## Targets"} {
			if !strings.Contains(report, "\n"+h) && !strings.HasPrefix(report, h) {
				t.Errorf("no %q heading in the report:\n%s", h, report)
			}
		}
		for _, s := range []string{"Command: `go run ./cmd/pgfly-bench --smoke --delay=5ms --out ", "PostgreSQL: 1", "PgBouncer 1."} {
			if !strings.Contains(report, s) {
				t.Errorf("the header lacks %q:\n%s", s, report)
			}
		}
	})

	t.Run("every target is judged", func(t *testing.T) {
		// Section 1: four targets (16 clients, 1 client and CPU) and one per counter per
		// transaction (syscalls only where perf can count them), 2: one, 3: two (two response
		// sizes), 4: two, 6: three (reads replayed, replica runs, write latency), 7: four (a
		// connection per job or one for all, in a transaction or not).
		counters := 2
		if perf, _ := findPerf(t.Context()); perf != "" {
			counters = 3
		}
		want := map[string]int{"1": 4 + counters, "2": 1, "3": 2, "4": 2, "6": 3, "7": 4}
		got := map[string]int{}
		row := regexp.MustCompile(`(?m)^\| ([1-7]) \| [^|]+ \| (met|missed) \| [^|]*[0-9][^|]* \|$`)
		for _, m := range row.FindAllStringSubmatch(report, -1) {
			got[m[1]]++
		}
		for s, n := range want {
			if got[s] != n {
				t.Errorf("section %s: got %d judged targets in the summary, want %d:\n%s", s, got[s], n, report)
			}
		}
		if n := strings.Count(report, "- Target: "); n != 16+counters {
			t.Errorf("got %d target lines under the sections, want %d", n, 16+counters)
		}
	})

	t.Run("the charts are beside the report, which links them", func(t *testing.T) {
		for _, file := range []string{chartRelayTPS, chartRelayCost, chartSeed, chartMixed} {
			if root, _ := readSVG(t, filepath.Join(filepath.Dir(out), file)); root != "svg" {
				t.Errorf("%s: got root element <%s>, want <svg>", file, root)
			}
			if !strings.Contains(report, "]("+file+")") {
				t.Errorf("the report has no image link to %s", file)
			}
		}
	})

	t.Run("pgbench ran through every endpoint", func(t *testing.T) {
		row := regexp.MustCompile("(?m)^\\| `-[SN] -M [a-z]+` \\| [0-9]+ \\| ([^|]+) \\| ([0-9]+) \\|")
		seen := map[string]int{}
		for _, m := range row.FindAllStringSubmatch(report, -1) {
			tps, _ := strconv.Atoi(m[2])
			if tps <= 0 {
				t.Errorf("%s: got TPS %d, want more than 0", m[1], tps)
			}
			seen[strings.TrimSpace(m[1])]++
		}
		for _, via := range []string{"direct", "pgfly", "PgBouncer (session)"} {
			if seen[via] != 3 {
				t.Errorf("got %d pgbench rows via %s, want 3 (two reads, one write):\n%s", seen[via], via, report)
			}
		}
	})

	t.Run("memory and latency figures are measured", func(t *testing.T) {
		for _, re := range []string{
			`(?m)^\| 20 sessions \| [0-9.]+ \|`,                             // section 2
			`(?m)^\| 1 MiB \| through the shim \| [0-9]+ \| [0-9]+ \|`,      // section 3
			`(?m)^\| pgfly \| fra>iad \| [0-9.]+ \| [0-9.]+ \|`,             // section 4, write
			`(?m)^\| DB-level routing \| fra \| [0-9.]+ \|`,                 // section 4
			`(?m)^\| everything in the primary region \| iad \| [0-9.]+ \|`, // section 4
			`(?m)^\| none( \| [0-9.]+){6} \| 3 of 3 \|$`,                    // section 5
			`(?m)^\| 5ms on every cross-region connection( \| [0-9.]+){6} \| 3 of 3 \|$`,
			`(?m)^\| 5ms on the WAL stream only( \| [0-9.]+){6} \| 3 of 3 \|$`,
			// Section 6: 8 clients × 5 requests, one in ten a write; with learning off the
			// replica region's app runs every write first.
			`(?m)^\| on \| 36 \| [0-9]+ \([0-9.]+%\)( \| [0-9.]+){4} \| [0-9]+ of 4 \|$`,
			`(?m)^\| off \| 36 \| [0-9]+ \([0-9.]+%\)( \| [0-9.]+){4} \| 4 of 4 \|$`,
		} {
			if !regexp.MustCompile(re).MatchString(report) {
				t.Errorf("no line matching %s in the report:\n%s", re, report)
			}
		}
	})
}
