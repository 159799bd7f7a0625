package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgfly/pgfly/internal/pgcluster"
)

// bench is one run of the benchmark: its configuration, the tools it found, the cluster it
// started and the report it writes.
type bench struct {
	cfg       config
	prof      profile
	stderr    io.Writer
	tmp       string
	pgflyBin  string
	pgbench   string
	pgbouncer string
	perf      string // perf, when it can count the proxies' software events; else ""
	noPerf    string // why not, for the report
	cluster   *pgcluster.Cluster
	rep       report
	charts    charts // the figures drawn beside the report, with --out
}

// chart links a chart the report's directory will hold, when there is one (--out).
func (b *bench) chart(file, alt string) {
	if b.cfg.out != "" {
		b.rep.printf("![%s](%s)\n\n", alt, file)
	}
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.stderr, "pgfly-bench: "+format+"\n", args...)
}

// newBench finds the tools, builds pgfly and starts the cluster.
func newBench(ctx context.Context, cfg config, prof profile, stderr io.Writer) (_ *bench, err error) {
	b := &bench{cfg: cfg, prof: prof, stderr: stderr}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if b.pgbench, err = lookTool("pgbench", "postgresql-client"); err != nil {
		return nil, err
	}
	if b.pgbouncer, err = lookTool("pgbouncer", "pgbouncer"); err != nil {
		return nil, err
	}
	b.perf, b.noPerf = findPerf(ctx)
	if b.tmp, err = os.MkdirTemp("", "pgfly-bench-"); err != nil {
		return nil, err
	}
	built := make(chan error, 1)
	go func() {
		if cfg.pgfly != "" {
			b.pgflyBin = cfg.pgfly
			built <- nil
			return
		}
		b.pgflyBin = filepath.Join(b.tmp, "pgfly")
		built <- buildPgfly(ctx, b.pgflyBin)
	}()

	opts := pgcluster.Options{Logf: b.logf}
	if prof.sessions > 200 && cfg.sections[2] {
		// The relay holds one upstream session per client session.
		opts.MaxConnections = prof.sessions + 300
	}
	b.logf("starting PostgreSQL primary and replica")
	b.cluster, err = pgcluster.Start(ctx, opts)
	if bErr := <-built; bErr != nil {
		return nil, errors.Join(bErr, err)
	}
	if err != nil {
		return nil, err
	}
	// Commits flush the WAL, as they do by default in production (the cluster turns it off
	// for tests; with fsync off a flush is a write to the page cache).
	if err := b.exec(ctx, b.cluster.Primary, "postgres",
		"ALTER SYSTEM SET synchronous_commit = on", "SELECT pg_reload_conf()"); err != nil {
		return nil, err
	}
	return b, nil
}

// lookTool finds a command on PATH or in /usr/sbin.
func lookTool(name, pkg string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	p := filepath.Join("/usr/sbin", name)
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found: install it with `apt-get install -y %s`", name, pkg)
}

// buildPgfly builds ./cmd/pgfly of this module into out.
func buildPgfly(ctx context.Context, out string) error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/pgfly")
	cmd.Dir = root
	if output, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build pgfly: %w: %s", err, strings.TrimSpace(string(output)))
	}
	return nil
}

// moduleRoot is the directory of this module's go.mod, found upwards from the working
// directory.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(data), "module github.com/pgfly/pgfly\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("build pgfly: run pgfly-bench inside the pgfly module, or pass --pgfly=BINARY")
		}
		dir = parent
	}
}

func (b *bench) close() {
	if b.cluster != nil {
		if err := b.cluster.Close(); err != nil {
			b.logf("stop the cluster: %v", err)
		}
	}
	if b.tmp != "" {
		os.RemoveAll(b.tmp)
	}
}

// exec runs statements as the superuser on one database of a server.
func (b *bench) exec(ctx context.Context, s *pgcluster.Server, db string, stmts ...string) error {
	conn, err := pgx.Connect(ctx, s.URL(pgcluster.RoleSuperuser.Name, "", db))
	if err != nil {
		return fmt.Errorf("connect to %s: %w", s.Name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for _, stmt := range stmts {
		if _, err := conn.Exec(ctx, stmt); err != nil {
			return fmt.Errorf("%s on %s: %w", stmt, s.Name, err)
		}
	}
	return nil
}

// header describes the machine and the run.
func (b *bench) header() {
	r := &b.rep
	r.printf("# pgfly benchmarks\n\n")
	r.printf("- Command: `%s`\n", commandLine(b.cfg.args))
	r.printf("- Profile: %s", b.prof.name)
	if b.cfg.smoke {
		r.printf(" (plumbing only: these figures mean nothing)")
	}
	r.printf("\n- Date: %s\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	r.printf("- Machine: %d CPUs (%s), %s memory, %s/%s\n", runtime.NumCPU(), cpuModel(), memTotal(), runtime.GOOS, runtime.GOARCH)
	r.printf("- Go: %s; PostgreSQL: %s; %s; %s\n", runtime.Version(), b.serverVersion(),
		toolVersion(b.pgbench, "--version"), toolVersion(b.pgbouncer, "--version"))
	r.printf("- Load average at the start: %s (other work on the machine skews every figure; interleaving spreads it "+
		"evenly over what is compared)\n", loadAverage())
	r.printf("- Everything runs on this one machine, over loopback. The cluster is the test cluster of internal/pgcluster " +
		"(fsync off, full_page_writes off), with synchronous_commit turned back on.\n\n")
}

// commandLine is how this run was started, as one would type it.
func commandLine(args []string) string {
	parts := []string{"go run ./cmd/pgfly-bench"}
	if exe, err := os.Executable(); err == nil && !strings.Contains(exe, "go-build") {
		parts[0] = filepath.Base(exe)
	}
	for _, a := range args {
		if strings.ContainsAny(a, " \t'\"") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown model"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown model"
}

func memTotal() string {
	kib, err := memKiBFile("/proc/meminfo", "MemTotal")
	if err != nil {
		return "unknown"
	}
	return fmt.Sprintf("%.1f GiB", float64(kib)/(1<<20))
}

func (b *bench) serverVersion() string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, b.cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", "postgres"))
	if err != nil {
		return "unknown"
	}
	defer conn.Close(ctx)
	var v string
	if err := conn.QueryRow(ctx, "SHOW server_version").Scan(&v); err != nil {
		return "unknown"
	}
	return v
}

// toolVersion is the first line a tool prints for --version.
func toolVersion(path, flag string) string {
	out, err := exec.Command(path, flag).Output()
	if err != nil {
		return filepath.Base(path) + " (unknown version)"
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return first
}

// loadAverage is the first three fields of /proc/loadavg.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
