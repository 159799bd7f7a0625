package main

import (
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestReadPerf reads perf stat's CSV as it writes it (-x,), and fails on one that lacks a
// counter rather than reporting zero.
func TestReadPerf(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.csv")
	os.WriteFile(good, []byte("# started on Thu Dec  3 07:01:02 2026\n\n"+
		"248123,,raw_syscalls:sys_enter,1000512345,100.00,,\n"+
		"80412,,context-switches,1000512345,100.00,0.080,M/sec\n"+
		"994.21,msec,task-clock,994210000,100.00,0.994,CPUs utilized\n"), 0o600)
	c, err := readPerf(good)
	if err != nil || c.syscalls != 248123 || c.switches != 80412 || math.Abs(c.cpuSec-0.99421) > 1e-9 {
		t.Errorf("readPerf: got %+v, %v; want 248123 syscalls, 80412 switches, 0.99421 s", c, err)
	}
	bad := filepath.Join(dir, "bad.csv")
	os.WriteFile(bad, []byte("<not counted>,,raw_syscalls:sys_enter,0,0.00,,\n80412,,context-switches,1,100.00,,\n"), 0o600)
	if _, err := readPerf(bad); err == nil {
		t.Errorf("readPerf of a file without every counter: no error")
	}
}

// TestProcCounters: the fallback without perf counts this process's switches and CPU time,
// and no syscalls.
func TestProcCounters(t *testing.T) {
	// Use some CPU first: /proc counts it in clock ticks (10 ms).
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if s, err := cpuSeconds(os.Getpid()); err == nil && s > 0 {
			break
		}
	}
	c, err := procCounters(os.Getpid())
	if err != nil || c.switches <= 0 || c.cpuSec <= 0 || !math.IsNaN(c.syscalls) {
		t.Errorf("procCounters: got %+v, %v; want switches and CPU time above 0 and syscalls NaN", c, err)
	}
}
