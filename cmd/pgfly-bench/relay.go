package main

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

// pgbenchDB is the database pgbench's tables live in.
const pgbenchDB = "pgbench"

// pgbenchConfig is one pgbench workload.
type pgbenchConfig struct {
	select1 bool   // -S (select only); otherwise -N (simple update, no branch/teller contention)
	mode    string // -M
	clients int
}

func (c pgbenchConfig) String() string { return "`" + c.plain() + "`" }

// plain is the workload's pgbench flags, e.g. "-S -M prepared".
func (c pgbenchConfig) plain() string {
	s := "-N"
	if c.select1 {
		s = "-S"
	}
	return fmt.Sprintf("%s -M %s", s, c.mode)
}

// pgbenchResult is what one pgbench run measured.
type pgbenchResult struct {
	tps      float64
	tx       int
	avgUS    float64 // mean transaction latency from the per-transaction log
	p99US    float64
	cpuSec   float64 // proxy CPU seconds over the run; NaN without a proxy
	cpuPer1k float64 // proxy CPU seconds per 1,000 transactions; NaN without a proxy
	peakMiB  float64 // proxy peak RSS during the run; NaN without a proxy
	// syscallsPerTx and switchesPerTx are the proxy's per transaction (perf's software
	// counters; without perf, switches from /proc and no syscalls); NaN without a proxy.
	syscallsPerTx, switchesPerTx float64
}

// endpoint is where pgbench connects: Postgres itself or a proxy in front of it.
type endpoint struct {
	name string
	addr string
	proc *process // the proxy's process, nil for Postgres itself
	// inProcess: the proxy runs inside this benchmark, which is otherwise idle during a
	// pgbench run: its CPU is read from our own /proc entry, its RSS is not measured.
	inProcess bool
}

// cpuPID is the process whose CPU time is the proxy's, 0 for none.
func (e endpoint) cpuPID() int {
	switch {
	case e.proc != nil:
		return e.proc.pid()
	case e.inProcess:
		return os.Getpid()
	}
	return 0
}

// relayOverhead is section 1: pgbench direct, through pgfly and through PgBouncer.
func (b *bench) relayOverhead(ctx context.Context) error {
	r := &b.rep
	b.logf("section 1: relay overhead")
	if err := b.exec(ctx, b.cluster.Primary, "postgres", "DROP DATABASE IF EXISTS "+pgbenchDB, "CREATE DATABASE "+pgbenchDB); err != nil {
		return err
	}
	init := exec.CommandContext(ctx, b.pgbench, "-i", "-q", "-s", "1", "-h", b.cluster.Primary.Host,
		"-p", strconv.Itoa(b.cluster.Primary.Port), "-U", pgcluster.RoleSuperuser.Name, pgbenchDB)
	init.Env = pgEnv()
	if out, err := init.CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench -i: %w: %s", err, out)
	}

	pgfly, pgflyAddr, err := b.startPgfly(ctx, "section1", b.cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgbenchDB), "")
	if err != nil {
		return err
	}
	defer pgfly.stop()
	bouncer, bouncerAddr, err := b.startPgbouncer(ctx, b.cluster.Primary)
	if err != nil {
		return err
	}
	defer bouncer.stop()
	bare, err := bareRelay(b.cluster.Primary.Addr(), copyLoop)
	if err != nil {
		return err
	}
	defer bare.Close()
	pgflyUnix, pgflyUnixAddr, err := b.startPgflyUnix(ctx, "section1-socket", b.cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgbenchDB))
	if err != nil {
		return err
	}
	defer pgflyUnix.stop()
	// The first three are direct, pgfly and PgBouncer, in that order: the targets below
	// compare them by index.
	targets := []endpoint{
		{name: "direct", addr: b.cluster.Primary.Addr()},
		{name: pgflyName(b.cfg.pgflyEnv), addr: pgflyAddr, proc: pgfly},
		{name: "PgBouncer (session)", addr: bouncerAddr, proc: bouncer},
		{name: "bare Go TCP relay", addr: bare.Addr().String(), inProcess: true},
		{name: "pgfly, Unix socket", addr: pgflyUnixAddr, proc: pgflyUnix},
	}

	configs := append(append([]pgbenchConfig{}, b.prof.reads...), b.prof.writes...)
	results := make(map[pgbenchConfig][]pgbenchResult, len(configs)) // per config, per target: median
	cpuTotal, txTotal := make([]float64, len(targets)), make([]float64, len(targets))
	for _, c := range configs {
		runs := make([][]pgbenchResult, len(targets))
		for rep := range b.prof.reps {
			for i, t := range targets { // interleaved: A B C A B C ...
				b.logf("section 1: %s -c %d, %s, repetition %d/%d", c, c.clients, t.name, rep+1, b.prof.reps)
				res, err := b.runPgbench(ctx, t, c)
				if err != nil {
					return fmt.Errorf("pgbench %s -c %d via %s: %w", c, c.clients, t.name, err)
				}
				runs[i] = append(runs[i], res)
				cpuTotal[i] += res.cpuSec
				txTotal[i] += float64(res.tx)
			}
		}
		for i := range targets {
			results[c] = append(results[c], medianResult(runs[i]))
		}
	}

	r.printf("## 1. Relay overhead (pgbench)\n\n")
	dur := fmt.Sprintf("%d s", b.prof.pgbenchSeconds)
	if b.prof.pgbenchSeconds == 0 {
		dur = fmt.Sprintf("%d transactions per client", b.prof.pgbenchTx)
	}
	r.printf("Debian's pgbench (scale 1) against the primary directly, through `pgfly serve --http-listen= --admin-listen=` "+
		"(a child process), and through PgBouncer in session mode (`pool_mode = session`, a child process, the fair peer of "+
		"a 1:1 relay), all on loopback with trust authentication. Each run lasts %s; each figure is the median of %d "+
		"interleaved repetitions (direct, pgfly, PgBouncer, bare relay, direct, ...). The bare Go TCP relay (in the "+
		"benchmark's own process, two goroutines per connection copying through an 8 KiB buffer with read and write, "+
		"no protocol at all; its CPU is the otherwise idle benchmark process's, its RSS is not measured) shows the floor "+
		"of a Go relay on this machine. \"pgfly, Unix socket\" is a second pgfly with `--listen <dir>`, which pgbench "+
		"reaches as `-h <dir>`. pgbench uses `-j 2` from 2 clients up. Latencies "+
		"come from pgbench's per-transaction log (`-l`). %s Peak "+
		"RSS is VmHWM from /proc/<pid>/status, reset before each run through /proc/<pid>/clear_refs.\n\n", dur, b.prof.reps, b.countersText())
	var rows [][]string
	for _, c := range configs {
		res := results[c]
		direct, pg := res[0], res[2]
		for i, t := range targets {
			x := res[i]
			vsBouncer := ""
			if i == 1 {
				vsBouncer = ratio(x.tps, pg.tps)
			}
			rows = append(rows, []string{c.String(), strconv.Itoa(c.clients), t.name, f0(x.tps), ratio(x.tps, direct.tps), vsBouncer,
				f0(x.avgUS), f0(x.p99US), f1(x.syscallsPerTx), f2(x.switchesPerTx), f1(x.cpuPer1k * 1000), f1(x.peakMiB)})
		}
	}
	r.table([]string{"workload", "clients", "via", "TPS", "TPS vs direct", "TPS vs PgBouncer", "avg latency µs", "p99 latency µs",
		"proxy syscalls / tx", "proxy context switches / tx", "proxy CPU µs / tx", "proxy peak RSS MiB"}, rows)
	for _, c := range configs {
		for i, t := range targets {
			x := results[c][i]
			b.charts.relay = append(b.charts.relay, relayPoint{workload: c.plain(), clients: c.clients, via: t.name,
				tps: x.tps, cpuUSPerTx: x.cpuPer1k * 1000}) // s per 1,000 tx × 1,000 = µs per tx
		}
	}
	b.chart(chartRelayTPS, "TPS by workload and client count: direct, pgfly, PgBouncer, bare Go TCP relay")
	b.chart(chartRelayCost, "Proxy CPU µs per transaction by workload and client count: pgfly, PgBouncer, bare Go TCP relay")

	// Targets.
	worstBouncer, worstDirect := math.Inf(1), math.Inf(1)
	var worstBouncerAt, worstDirectAt string
	worstAdded := math.Inf(-1)
	var worstAddedAt string
	at16 := 0
	for _, c := range configs {
		res := results[c]
		at := fmt.Sprintf("%s -c %d", c, c.clients)
		if c.clients == 16 {
			at16++
			if x := res[1].tps / res[2].tps; x < worstBouncer {
				worstBouncer, worstBouncerAt = x, at
			}
			if x := res[1].tps / res[0].tps; x < worstDirect {
				worstDirect, worstDirectAt = x, at
			}
		}
		if c.clients == 1 {
			if x := res[1].avgUS - res[0].avgUS; x > worstAdded {
				worstAdded, worstAddedAt = x, at
			}
		}
	}
	if at16 > 0 {
		r.check("1", "TPS through pgfly ≥ PgBouncer's at 16 clients", worstBouncer >= 1.0,
			fmt.Sprintf("lowest ratio %.2f, at %s", worstBouncer, worstBouncerAt))
		r.check("1", "TPS through pgfly ≥ 0.8 of direct at 16 clients", worstDirect >= 0.8,
			fmt.Sprintf("lowest ratio %.2f, at %s", worstDirect, worstDirectAt))
	}
	if worstAddedAt != "" {
		r.check("1", "added average latency through pgfly at 1 client < 25 µs", worstAdded < 25,
			fmt.Sprintf("largest %.1f µs, at %s", worstAdded, worstAddedAt))
	}
	pgflyCPU, bouncerCPU := cpuTotal[1]/txTotal[1]*1000, cpuTotal[2]/txTotal[2]*1000
	r.check("1", "pgfly's CPU per transaction ≤ PgBouncer's", pgflyCPU <= bouncerCPU,
		fmt.Sprintf("%.3f vs %.3f CPU s per 1k transactions over all runs, ratio %.2f", pgflyCPU, bouncerCPU, pgflyCPU/bouncerCPU))
	for _, m := range []struct {
		what string
		of   func(pgbenchResult) float64
	}{
		{"syscalls", func(x pgbenchResult) float64 { return x.syscallsPerTx }},
		{"context switches", func(x pgbenchResult) float64 { return x.switchesPerTx }},
		{"CPU time", func(x pgbenchResult) float64 { return x.cpuPer1k }},
	} {
		worst, at, counted := math.Inf(-1), "", false
		for _, c := range configs {
			if c.clients != 1 && c.clients != 16 {
				continue
			}
			if x := m.of(results[c][1]) / m.of(results[c][2]); !math.IsNaN(x) && !math.IsInf(x, 0) {
				counted = true
				if x > worst {
					worst, at = x, fmt.Sprintf("%s -c %d", c, c.clients)
				}
			}
		}
		target := fmt.Sprintf("pgfly's %s per transaction ≤ PgBouncer's at 1 and 16 clients", m.what)
		switch {
		case counted:
			r.check("1", target, worst <= 1, fmt.Sprintf("highest ratio pgfly / PgBouncer %.2f, at %s", worst, at))
		case m.what == "syscalls" && b.perf == "":
			// Not counted without perf, and said so in the section's text.
		default:
			r.printf("- Target: %s: not judged (no figure to compare)\n", target)
		}
	}
	for _, c := range configs {
		tcp, unix := results[c][1], results[c][4]
		r.printf("- %s -c %d, pgfly on a Unix socket vs TCP: TPS %s, syscalls / tx %s, CPU / tx %s\n", c, c.clients,
			ratio(unix.tps, tcp.tps), ratio(unix.syscallsPerTx, tcp.syscallsPerTx), ratio(unix.cpuPer1k, tcp.cpuPer1k))
	}
	r.printf("\n")
	return nil
}

// countersText says where section 1's per-transaction counters come from.
func (b *bench) countersText() string {
	if b.perf != "" {
		return "Proxy syscalls, context switches and CPU time are the kernel's software counters for the proxy's process " +
			"(`perf stat -e " + perfEvents + " -p <pid>` around the pgbench run), divided by its transactions."
	}
	return "Proxy context switches and CPU time come from /proc (voluntary and nonvoluntary switches of every thread; " +
		"utime+stime), divided by the run's transactions; syscalls are not counted: " + b.noPerf + "."
}

// pgflyName names pgfly's rows, with the environment it was given.
func pgflyName(env []string) string {
	if len(env) == 0 {
		return "pgfly"
	}
	return "pgfly (" + strings.Join(env, " ") + ")"
}

// medianResult takes the median of each figure over repetitions.
func medianResult(rs []pgbenchResult) pgbenchResult {
	pick := func(f func(pgbenchResult) float64) float64 {
		xs := make([]float64, len(rs))
		for i, r := range rs {
			xs[i] = f(r)
		}
		return median(xs)
	}
	return pgbenchResult{
		tps:      pick(func(r pgbenchResult) float64 { return r.tps }),
		avgUS:    pick(func(r pgbenchResult) float64 { return r.avgUS }),
		p99US:    pick(func(r pgbenchResult) float64 { return r.p99US }),
		cpuPer1k: pick(func(r pgbenchResult) float64 { return r.cpuPer1k }),
		peakMiB:  pick(func(r pgbenchResult) float64 { return r.peakMiB }),

		syscallsPerTx: pick(func(r pgbenchResult) float64 { return r.syscallsPerTx }),
		switchesPerTx: pick(func(r pgbenchResult) float64 { return r.switchesPerTx }),
	}
}

// pgEnv is the environment of pgbench: no TLS, nothing from the caller's PG* variables.
func pgEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PG") {
			env = append(env, kv)
		}
	}
	return append(env, "PGSSLMODE=disable", "PGCONNECT_TIMEOUT=10")
}

var (
	tpsRE    = regexp.MustCompile(`(?m)^tps = ([0-9.]+) \(without initial connection time\)`)
	txRE     = regexp.MustCompile(`(?m)^number of transactions actually processed: ([0-9]+)`)
	failedRE = regexp.MustCompile(`(?m)^number of failed transactions: ([0-9]+)`)
)

// runPgbench runs one pgbench against t and measures t's process around it.
func (b *bench) runPgbench(ctx context.Context, t endpoint, c pgbenchConfig) (pgbenchResult, error) {
	res := pgbenchResult{cpuSec: math.NaN(), cpuPer1k: math.NaN(), peakMiB: math.NaN(), syscallsPerTx: math.NaN(), switchesPerTx: math.NaN()}
	logDir, err := os.MkdirTemp(b.tmp, "pgbench-log-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(logDir)
	host, port, _ := net.SplitHostPort(t.addr)
	args := []string{"-n", "-h", host, "-p", port, "-U", pgcluster.RoleSuperuser.Name,
		"-M", c.mode, "-c", strconv.Itoa(c.clients), "-j", strconv.Itoa(min(c.clients, 2)),
		"-l", "--log-prefix", filepath.Join(logDir, "tx")}
	if c.select1 {
		args = append(args, "-S")
	} else {
		args = append(args, "-N")
	}
	if b.prof.pgbenchSeconds > 0 {
		args = append(args, "-T", strconv.Itoa(b.prof.pgbenchSeconds))
	} else {
		args = append(args, "-t", strconv.Itoa(b.prof.pgbenchTx))
	}
	args = append(args, pgbenchDB)
	cmd := exec.CommandContext(ctx, b.pgbench, args...)

	var before counters
	var perfOut string
	if t.proc != nil {
		if err := resetPeak(t.proc.pid()); err != nil {
			return res, fmt.Errorf("reset the peak RSS of %s: %w", t.name, err)
		}
	}
	pid := t.cpuPID()
	switch {
	case pid != 0 && b.perf != "":
		cmd, perfOut = withPerf(ctx, b.perf, pid, logDir, append([]string{b.pgbench}, args...))
	case pid != 0:
		if before, err = procCounters(pid); err != nil {
			return res, err
		}
	}
	cmd.Env, cmd.Dir = pgEnv(), logDir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return res, fmt.Errorf("%w: %s", err, out)
	}
	var used counters
	switch {
	case perfOut != "":
		if used, err = readPerf(perfOut); err != nil {
			return res, err
		}
	case pid != 0:
		after, err := procCounters(pid)
		if err != nil {
			return res, err
		}
		used = counters{syscalls: math.NaN(), switches: after.switches - before.switches, cpuSec: after.cpuSec - before.cpuSec}
		if used.switches < 0 { // a thread ended between the readings, taking its count along
			used.switches = math.NaN()
		}
	}
	if pid != 0 {
		res.cpuSec = used.cpuSec
	}
	if t.proc != nil {
		hwm, err := memKiB(t.proc.pid(), "VmHWM")
		if err != nil {
			return res, err
		}
		res.peakMiB = float64(hwm) / 1024
	}
	if m := failedRE.FindSubmatch(out); m != nil && string(m[1]) != "0" {
		return res, fmt.Errorf("%s transactions failed: %s", m[1], out)
	}
	m := tpsRE.FindSubmatch(out)
	n := txRE.FindSubmatch(out)
	if m == nil || n == nil {
		return res, fmt.Errorf("no tps or transaction count in pgbench's output: %s", out)
	}
	res.tps, _ = strconv.ParseFloat(string(m[1]), 64)
	res.tx, _ = strconv.Atoi(string(n[1]))
	if res.tx == 0 {
		return res, fmt.Errorf("no transactions: %s", out)
	}
	res.cpuPer1k = res.cpuSec / (float64(res.tx) / 1000)
	if pid != 0 {
		res.syscallsPerTx, res.switchesPerTx = used.syscalls/float64(res.tx), used.switches/float64(res.tx)
	}
	lat, err := readTxLog(logDir)
	if err != nil {
		return res, err
	}
	res.avgUS, res.p99US = mean(lat), percentile(lat, 99)
	return res, nil
}

// readTxLog reads the latencies (µs, sorted) of pgbench's per-transaction logs in dir. Each
// line is "client_id transaction_no time script_no time_epoch time_us".
func readTxLog(dir string) ([]float64, error) {
	files, err := filepath.Glob(filepath.Join(dir, "tx.*"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("no pgbench transaction log in %s", dir)
	}
	var lat []float64
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 3 {
				continue
			}
			us, err := strconv.ParseFloat(fields[2], 64)
			if err != nil {
				continue // "failed" or "skipped"
			}
			lat = append(lat, us)
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, err
		}
	}
	if len(lat) == 0 {
		return nil, fmt.Errorf("empty pgbench transaction log in %s", dir)
	}
	sortFloats(lat)
	return lat, nil
}

// startPgfly starts the pgfly binary as a relay only (admin too when adminAddr is set).
func (b *bench) startPgfly(ctx context.Context, name, upstream, adminAddr string) (*process, string, error) {
	port, err := freePort()
	if err != nil {
		return nil, "", err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	p, err := b.startPgflyOn(ctx, name, upstream, adminAddr, []string{"--listen", addr}, addr)
	return p, addr, err
}

// startPgflyUnix is startPgfly on a Unix socket in a directory of its own; the address it
// returns is "<dir>:<port>", as pgbench takes them (-h <dir> -p <port>).
func (b *bench) startPgflyUnix(ctx context.Context, name, upstream string) (*process, string, error) {
	dir, err := os.MkdirTemp(b.tmp, "pgfly-socket-")
	if err != nil {
		return nil, "", err
	}
	p, err := b.startPgflyOn(ctx, name, upstream, "", []string{"--listen", dir}, wire.UnixSocket(dir, wire.DefaultUnixPort))
	return p, net.JoinHostPort(dir, strconv.Itoa(wire.DefaultUnixPort)), err
}

// startPgflyOn starts pgfly serve with listen's flags and waits until it answers at dial.
func (b *bench) startPgflyOn(ctx context.Context, name, upstream, adminAddr string, listen []string, dial string) (*process, error) {
	// Section 2 holds more idle sessions than pgfly's default limit in the full profile.
	maxConn := max(wire.DefaultMaxClientConn, b.prof.sessions+100)
	cmd := exec.Command(b.pgflyBin, append(append([]string{"serve"}, listen...), "--upstream", upstream,
		"--http-listen=", "--admin-listen="+adminAddr, "--log-level", "warn", "--max-client-conn", strconv.Itoa(maxConn))...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, b.cfg.pgflyEnv...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the benchmark
	p, err := startProcess("pgfly", cmd, filepath.Join(b.tmp, "pgfly-"+name+".log"))
	if err != nil {
		return nil, err
	}
	if err := waitListening(ctx, dial, p.exited, 10*time.Second); err != nil {
		p.stop()
		return nil, fmt.Errorf("pgfly: %w: %s", err, p.logTail())
	}
	return p, nil
}

// startPgbouncer starts PgBouncer in session mode in front of s, from a generated
// configuration, as the postgres account when we are root (it refuses to run as root).
func (b *bench) startPgbouncer(ctx context.Context, s *pgcluster.Server) (*process, string, error) {
	dir, err := os.MkdirTemp(b.tmp, "pgbouncer-")
	if err != nil {
		return nil, "", err
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, "", fmt.Errorf("pgbouncer refuses to run as root and there is no postgres account: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		for _, p := range []string{b.tmp, dir} {
			if err := os.Chmod(p, 0o755); err != nil {
				return nil, "", err
			}
		}
	}
	port, err := freePort()
	if err != nil {
		return nil, "", err
	}
	users := filepath.Join(dir, "users.txt")
	if err := os.WriteFile(users, []byte(`"postgres" ""`+"\n"), 0o644); err != nil {
		return nil, "", err
	}
	conf := fmt.Sprintf(`[databases]
* = host=%s port=%d

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = session
max_client_conn = 1000
default_pool_size = 200
max_db_connections = 0
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 3600
ignore_startup_parameters = extra_float_digits
`, s.Host, s.Port, port, users)
	ini := filepath.Join(dir, "pgbouncer.ini")
	if err := os.WriteFile(ini, []byte(conf), 0o644); err != nil {
		return nil, "", err
	}
	cmd := exec.Command(b.pgbouncer, ini)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL}
	p, err := startProcess("pgbouncer", cmd, filepath.Join(b.tmp, "pgbouncer.log"))
	if err != nil {
		return nil, "", err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	if err := waitListening(ctx, addr, p.exited, 10*time.Second); err != nil {
		p.stop()
		return nil, "", fmt.Errorf("pgbouncer: %w: %s", err, p.logTail())
	}
	return p, addr, nil
}
