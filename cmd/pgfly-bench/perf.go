package main

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// perfEvents are the kernel software counters of a proxy that section 1 reads per
// transaction: they count work, not time, so they hardly move with the machine's load.
const perfEvents = "raw_syscalls:sys_enter,context-switches,task-clock"

// counters are a process's syscalls, context switches and CPU time over one run; syscalls
// is NaN where they could not be counted (no perf).
type counters struct {
	syscalls, switches, cpuSec float64
}

// findPerf returns the perf binary when `perf stat` can count perfEvents here, else "" and
// why not: the report then falls back to /proc (context switches and CPU time, no syscalls).
func findPerf(ctx context.Context) (string, string) {
	p, err := exec.LookPath("perf")
	if err != nil {
		return "", "perf is not installed (apt-get install -y linux-perf)"
	}
	out, err := exec.CommandContext(ctx, p, "stat", "-x,", "-e", perfEvents, "--", "true").CombinedOutput()
	if err != nil || strings.Contains(string(out), "<not supported>") || strings.Contains(string(out), "<not counted>") {
		return "", fmt.Sprintf("perf stat cannot count %s here: %s", perfEvents, firstLine(string(out)))
	}
	return p, ""
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return line
}

// withPerf is the command line args run under perf, which counts pid's events while it runs
// into the file it returns and passes its output through.
// Cancelling ctx interrupts perf, which then stops what it runs; SIGKILL would leave it running.
func withPerf(ctx context.Context, perf string, pid int, dir string, args []string) (*exec.Cmd, string) {
	out := filepath.Join(dir, "perf.csv")
	cmd := exec.CommandContext(ctx, perf, append([]string{"stat", "-x,", "-e", perfEvents, "-p", strconv.Itoa(pid), "-o", out, "--"}, args...)...)
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 10 * time.Second
	return cmd, out
}

// readPerf reads perf stat's CSV (-x,): count,unit,event,...; task-clock is in milliseconds.
func readPerf(path string) (counters, error) {
	c := counters{syscalls: math.NaN(), switches: math.NaN(), cpuSec: math.NaN()}
	f, err := os.Open(path)
	if err != nil {
		return c, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ",")
		if len(fields) < 3 {
			continue
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			continue // a comment, or <not counted>
		}
		switch {
		case strings.HasPrefix(fields[2], "raw_syscalls:sys_enter"):
			c.syscalls = v
		case strings.HasPrefix(fields[2], "context-switches"):
			c.switches = v
		case strings.HasPrefix(fields[2], "task-clock"):
			c.cpuSec = v / 1000
		}
	}
	if math.IsNaN(c.syscalls) || math.IsNaN(c.switches) || math.IsNaN(c.cpuSec) {
		return c, fmt.Errorf("%s: not every counter of %s", path, perfEvents)
	}
	return c, sc.Err()
}

// procSwitches is the context switches of every thread of pid so far, from /proc: the
// fallback without perf.
func procSwitches(pid int) (float64, error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil || len(tasks) == 0 {
		return 0, fmt.Errorf("no threads of %d in /proc", pid)
	}
	var n float64
	for _, t := range tasks {
		for _, field := range []string{"voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"} {
			v, err := procField(t, field)
			if err != nil {
				continue // the thread ended meanwhile
			}
			n += v
		}
	}
	return n, nil
}

// procField reads a "Name:\tvalue" line of a /proc status file.
func procField(path, name string) (float64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("%s: no %s", path, name)
}

// procCounters is the fallback without perf: CPU time and context switches so far, no
// syscalls.
func procCounters(pid int) (counters, error) {
	cpu, err := cpuSeconds(pid)
	if err != nil {
		return counters{}, err
	}
	sw, err := procSwitches(pid)
	if err != nil {
		return counters{}, err
	}
	return counters{syscalls: math.NaN(), switches: sw, cpuSec: cpu}, nil
}
