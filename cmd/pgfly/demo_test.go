package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// scenarioSteps splits a scenario transcript into its numbered steps: "1." starts step 1.
func scenarioSteps(transcript string) map[int]string {
	steps := make(map[int]string)
	n := 0
	for line := range strings.SplitSeq(transcript, "\n") {
		if m := regexp.MustCompile(`^(\d+)\. `).FindStringSubmatch(line); m != nil {
			n, _ = strconv.Atoi(m[1])
		} else if line == "" || !strings.HasPrefix(line, " ") {
			n = 0
		}
		if n > 0 {
			steps[n] += line + "\n"
		}
	}
	return steps
}

func TestDemoScenario(t *testing.T) {
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// With --install, which has nothing to do where the tests run: they need the server.
	if err := run(ctx, []string{"demo", "--scenario", "--install"}, &stdout, &stderr); err != nil {
		t.Fatalf("pgfly demo --scenario --install: %v\nstdout:\n%s\nstderr:\n%s", err, &stdout, &stderr)
	}
	transcript := stdout.String()
	t.Logf("transcript:\n%s", transcript)
	if !strings.Contains(transcript, "pgfly demo --install: the PostgreSQL server binaries are in ") ||
		!strings.Contains(transcript, "; nothing to install\n") {
		t.Errorf("got no line saying --install found the server binaries and installed nothing")
	}
	for _, w := range []string{"pgfly check, region fra:\n", "ok    upstream role   a replica (in recovery), as region fra needs\n",
		"pgfly check, region iad:\n", "ok    upstream role   a primary (not in recovery), as region iad needs\n"} {
		if !strings.Contains(transcript, w) {
			t.Errorf("got no %q: the demo prints pgfly check for both regions at start", w)
		}
	}
	if strings.Contains(transcript, "FAIL  ") {
		t.Errorf("a check of the demo's own setup failed")
	}
	steps := scenarioSteps(transcript)
	if len(steps) != 4 {
		t.Fatalf("got %d steps, want 4", len(steps))
	}
	guest := regexp.MustCompile(`sign the guestbook as (scenario-guest-\d+)`).FindStringSubmatch(steps[2])
	if guest == nil {
		t.Fatalf("step 2: got %q, want it to name the guest it signs as", steps[2])
	}
	tests := []struct {
		step int
		want []string // lines or fragments the step must have
	}{
		{1, []string{"   GET /\n", "-> 200 OK, ran in fra (X-Edge-Trail: fra, X-App-Region: fra)", "replayed: no, nothing in it wrote"}},
		{2, []string{"   POST /items\n", "edge  POST /items -> fra: 409 with fly-replay: region=iad;state=pgfly_read_only",
			"-> 303 See Other, ran in fra then iad (X-Edge-Trail: fra>iad, X-App-Region: iad)",
			"replayed: yes, fra>iad: the database in fra is a read-only replica and refused the write (SQLSTATE 25006)",
			"bookmark: pgfly_lsn="}},
		{3, []string{"   GET /\n", "X-App-Region: fra", "the page shows " + guest[1] + ": yes"}},
		{4, []string{"   GET /items\n", "-> 200 OK, ran in fra (X-Edge-Trail: fra, X-App-Region: fra)", "replayed: no"}},
	}
	for _, tt := range tests {
		for _, w := range tt.want {
			if !strings.Contains(steps[tt.step], w) {
				t.Errorf("step %d: got\n%s\nwant it to contain %q", tt.step, steps[tt.step], w)
			}
		}
	}
	if !strings.Contains(transcript, "Scenario done: the write was replayed fra>iad, and the next read, served in fra, saw it.") {
		t.Errorf("got no closing line saying the scenario is done")
	}
	m := regexp.MustCompile(`removed (/\S+)`).FindStringSubmatch(transcript)
	if m == nil {
		t.Fatalf("got no line saying the data directory was removed")
	}
	if _, err := os.Stat(m[1]); !os.IsNotExist(err) {
		t.Errorf("stat %s after the scenario: got %v, want it gone", m[1], err)
	}
}

// processesUsing lists the processes whose command line mentions s.
func processesUsing(s string) []string {
	var found []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(s)) {
			found = append(found, e.Name()+": "+string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '})))
		}
	}
	return found
}

func TestDemoStopsOnSignal(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(map[syscall.Signal]string{syscall.SIGTERM: "SIGTERM", syscall.SIGINT: "SIGINT"}[sig], func(t *testing.T) {
			addr := freeAddr(t)
			p := startProc(t, nil, pgflyBin, "demo", "--listen", addr)
			p.waitFor(t, 2*time.Minute, "the demo to say it is running", func() bool { return strings.Contains(p.stdout.String(), "pgfly demo is running") })
			if got := send(t, "GET", "http://"+addr+"/", "", nil); got.status != 200 || !strings.Contains(got.body, "Guestbook") {
				t.Fatalf("GET / on the edge: got %d %q, want the guestbook page", got.status, got.body)
			}
			page := regexp.MustCompile(`live page (http://\S+/)`).FindStringSubmatch(p.stdout.String())
			if page == nil {
				t.Fatalf("got no live page's address in the demo's output:\n%s", p.stdout.String())
			}
			if got := send(t, "GET", page[1]+"state.json", "", nil); got.status != 200 || !strings.Contains(got.body, `"replica":"fra"`) {
				t.Errorf("GET %sstate.json: got %d %q, want the page's state", page[1], got.status, got.body)
			}
			m := regexp.MustCompile(`data in (/\S+),`).FindStringSubmatch(p.stdout.String())
			if m == nil {
				t.Fatalf("got no data directory in the demo's output")
			}
			dir := m[1]
			if len(processesUsing(dir)) == 0 {
				t.Fatalf("got no process using %s while the demo runs, want its PostgreSQL servers", dir)
			}

			p.signal(t, sig)
			if code := p.wait(t, time.Minute); code != 0 {
				t.Errorf("exit status after %v: got %d, want 0", sig, code)
			}
			assertFree(t, addr)
			if _, err := os.Stat(dir); !os.IsNotExist(err) {
				t.Errorf("stat %s after exit: got %v, want it removed", dir, err)
			}
			if left := processesUsing(dir); len(left) > 0 {
				t.Errorf("processes using %s after exit: got %q, want none", dir, left)
			}
			if !strings.Contains(p.stdout.String(), "removed "+dir) {
				t.Errorf("stdout: got %q, want it to say %s was removed", p.stdout.String(), dir)
			}
		})
	}
}

func TestDemoFailsClearly(t *testing.T) {
	tests := []struct {
		name   string
		env    []string
		args   []string
		listen func(tb testing.TB) string
		want   []string // fragments of stderr
	}{
		{name: "no PostgreSQL binaries", env: []string{"PGFLY_PG_BIN=/nonexistent"}, listen: freeAddr,
			want: []string{"PostgreSQL server binaries not found (looked in /nonexistent)", "apt-get install -y postgresql", "PGFLY_PG_BIN"}},
		{name: "--install, with $PGFLY_PG_BIN naming a directory without them", env: []string{"PGFLY_PG_BIN=/nonexistent"}, args: []string{"--install"},
			listen: freeAddr, want: []string{"--install: PostgreSQL server binaries not found (looked in /nonexistent)", "installing a package would not change it"}},
		{name: "a busy port", listen: holdAddr,
			want: []string{"already in use", "pick another address with --listen"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := startProc(t, tt.env, pgflyBin, append([]string{"demo", "--listen", tt.listen(t)}, tt.args...)...)
			if code := p.wait(t, time.Minute); code == 0 {
				t.Errorf("exit status: got 0, want non-zero")
			}
			for _, w := range tt.want {
				if !strings.Contains(p.stderr.String(), w) {
					t.Errorf("stderr: got %q, want it to say %q", p.stderr.String(), w)
				}
			}
			if strings.Contains(p.stdout.String(), "data in") {
				t.Errorf("stdout: got %q, want nothing started", p.stdout.String())
			}
		})
	}
}
