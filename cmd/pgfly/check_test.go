package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/delay"
	"github.com/pgfly/pgfly/internal/pgcluster"
)

// checked is `pgfly check --json` as the binary printed it, with its exit status.
type checked struct {
	code   int
	ok     bool
	byName map[string]checkResult
	stdout string
}

func runCheck(t *testing.T, env []string, args ...string) checked {
	t.Helper()
	p := startProc(t, env, pgflyBin, append([]string{"check", "--json"}, args...)...)
	c := checked{code: p.wait(t, time.Minute), byName: make(map[string]checkResult), stdout: p.stdout.String()}
	var out struct {
		OK     bool          `json:"ok"`
		Checks []checkResult `json:"checks"`
	}
	if err := json.Unmarshal([]byte(c.stdout), &out); err != nil {
		t.Fatalf("pgfly check --json: %v\nstdout: %s\nstderr: %s", err, c.stdout, p.stderr.String())
	}
	c.ok = out.OK
	for _, r := range out.Checks {
		c.byName[r.Check] = r
	}
	return c
}

// want checks that each named check has its verdict, and its detail the fragment.
func (c checked) want(t *testing.T, check string, v verdict, fragment string) {
	t.Helper()
	r, ok := c.byName[check]
	switch {
	case !ok:
		t.Errorf("no %q check in %s", check, c.stdout)
	case r.Verdict != v || !strings.Contains(r.Detail, fragment):
		t.Errorf("%s: got %s %q, want %s with %q", check, r.Verdict, r.Detail, v, fragment)
	case v != verdictOK && r.Fix == "":
		t.Errorf("%s: %s with no fix to say what to do", check, v)
	}
}

func delayed(t *testing.T, target string, d time.Duration) string {
	t.Helper()
	r, err := delay.New(delay.Config{Listen: "127.0.0.1:0", Target: target, Delay: d})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Listen(); err != nil {
		t.Fatal(err)
	}
	go r.Serve()
	t.Cleanup(func() { r.Close() })
	return r.Addr().String()
}

func TestCheck(t *testing.T) {
	c := testCluster(t)
	su := pgcluster.RoleSuperuser.Name
	replica := c.Replica.URL(su, "", pgcluster.Database)
	primary := c.Primary.URL(su, "", pgcluster.Database)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) }))
	defer app.Close()
	replicaRegion := []string{"--region", "fra", "--primary-region", "iad", "--app", app.URL}

	t.Run("a replica region set up right", func(t *testing.T) {
		got := runCheck(t, []string{"DATABASE_URL=postgres://app@127.0.0.1:5432/app"},
			append(replicaRegion, "--upstream", replica, "--primary", primary)...)
		if got.code != 0 || !got.ok {
			t.Errorf("exit status %d, ok %v: want 0 and true", got.code, got.ok)
		}
		got.want(t, "regions", verdictOK, "fra is a replica region")
		got.want(t, "upstream", verdictOK, "round trip")
		got.want(t, "upstream role", verdictOK, "a replica (in recovery)")
		got.want(t, "primary", verdictOK, "takes writes")
		got.want(t, "distance", verdictOK, "both near")
		got.want(t, "lag", verdictOK, "behind the primary")
		got.want(t, "one cluster", verdictOK, "one cluster (system ")
		got.want(t, "credentials", verdictOK, "as "+su)
		got.want(t, "credentials", verdictOK, "forwarding is off") // the shim replays instead
		got.want(t, "app", verdictOK, "HTTP 204")
		got.want(t, "database url", verdictOK, "points at pgfly")
		got.want(t, "fly", verdictOK, "not on Fly")
	})
	t.Run("a replica region whose upstream is the primary", func(t *testing.T) {
		got := runCheck(t, nil, append(replicaRegion, "--upstream", primary, "--primary", primary)...)
		if got.code != 1 || got.ok {
			t.Errorf("exit status %d, ok %v: want 1 and false", got.code, got.ok)
		}
		got.want(t, "upstream role", verdictFail, "a primary (not in recovery) in replica region fra")
	})
	t.Run("the primary region whose upstream is a replica (a stale PRIMARY_REGION)", func(t *testing.T) {
		got := runCheck(t, nil, "--region", "iad", "--primary-region", "iad", "--app", app.URL, "--upstream", replica, "--primary", primary)
		got.want(t, "upstream role", verdictFail, "a replica (in recovery) in the primary region iad")
	})
	t.Run("a --primary that is a standby", func(t *testing.T) {
		got := runCheck(t, nil, append(replicaRegion, "--upstream", replica, "--primary", replica)...)
		got.want(t, "primary", verdictFail, "is in recovery")
	})
	t.Run("a local replica as far away as the primary", func(t *testing.T) {
		far := func(target string) string {
			return "postgres://" + su + "@" + delayed(t, target, 10*time.Millisecond) + "/" + pgcluster.Database + "?sslmode=disable"
		}
		got := runCheck(t, nil, append(replicaRegion, "--upstream", far(c.Replica.Addr()), "--primary", far(c.Primary.Addr()))...)
		got.want(t, "distance", verdictWarn, "as far away as the primary")
		near := runCheck(t, nil, append(replicaRegion, "--upstream", replica, "--primary", far(c.Primary.Addr()))...)
		near.want(t, "distance", verdictOK, "the replica is nearer than the primary")
		if got.code != 0 {
			t.Errorf("exit status %d with a warning alone, want 0", got.code)
		}
		strict := runCheck(t, nil, append(replicaRegion, "--strict", "--upstream", far(c.Replica.Addr()), "--primary", far(c.Primary.Addr()))...)
		if strict.code != 1 {
			t.Errorf("exit status %d with a warning and --strict, want 1", strict.code)
		}
	})
	t.Run("an app DATABASE_URL on a Unix socket: its directory and its port must be pgfly's", func(t *testing.T) {
		dir := t.TempDir()
		flags := append(replicaRegion, "--upstream", replica, "--primary", primary, "--listen", dir, "--unix-port", "6000")
		got := runCheck(t, []string{"DATABASE_URL=postgres://app@/app?host=" + dir + "&port=6000"}, flags...)
		got.want(t, "database url", verdictOK, "pgfly's Unix socket in "+dir)
		got = runCheck(t, []string{"DATABASE_URL=postgres://app@/app?host=" + dir}, flags...) // port 5432
		got.want(t, "database url", verdictFail, "port 5432, not at pgfly")
	})
	t.Run("an app DATABASE_URL that points at the database", func(t *testing.T) {
		got := runCheck(t, []string{"DATABASE_URL=" + replica}, append(replicaRegion, "--upstream", replica, "--primary", primary)...)
		got.want(t, "database url", verdictFail, "not at pgfly")
	})
	t.Run("no app behind the shim, and a primary that does not answer", func(t *testing.T) {
		got := runCheck(t, nil, "--region", "fra", "--primary-region", "iad", "--app", "http://"+freeAddr(t),
			"--upstream", replica, "--primary", "postgres://"+su+"@"+freeAddr(t)+"/x")
		got.want(t, "app", verdictFail, "does not answer")
		got.want(t, "primary", verdictFail, "does not answer")
		if _, ok := got.byName["credentials"]; ok {
			t.Errorf("a credentials check for a primary that cannot be reached: %+v, want none (the primary's line says it)", got.byName["credentials"])
		}
	})
	t.Run("a primary that refuses pgfly's password", func(t *testing.T) {
		role := pgcluster.RoleSCRAM
		got := runCheck(t, nil, append(replicaRegion, "--upstream", c.Replica.URL(role.Name, role.Password, pgcluster.Database),
			"--primary", c.Primary.URL(role.Name, "not-"+role.Password, pgcluster.Database))...)
		got.want(t, "credentials", verdictFail, "refused pgfly's login as "+role.Name)
		if strings.Contains(got.stdout, "not-"+role.Password) {
			t.Errorf("the report shows the password: %s", got.stdout)
		}
	})
	t.Run("a jobs listener: its forwarded sessions log in to the primary with --primary's password", func(t *testing.T) {
		got := runCheck(t, nil, append(replicaRegion, "--upstream", replica, "--primary", primary, "--jobs-listen", "127.0.0.1:0")...)
		got.want(t, "credentials", verdictOK, "forwarding is on for --jobs-listen: a session of "+su+" that moves to the primary logs in there with --primary's password")
		role := pgcluster.RoleSCRAM
		other := runCheck(t, nil, append(replicaRegion, "--upstream", c.Replica.URL(role.Name, role.Password, pgcluster.Database),
			"--primary", primary, "--jobs-listen", "127.0.0.1:0")...)
		other.want(t, "credentials", verdictWarn, "a forwarded session of "+role.Name+" has no password for the primary")
	})
	t.Run("what serve refuses, check refuses: exit status 2", func(t *testing.T) {
		for _, args := range [][]string{
			append(replicaRegion, "--upstream", replica, "--consistency", "bogus"),
			append(replicaRegion, "--upstream", replica, "--replay-mode", "proxy"),    // no --primary-http
			append(replicaRegion[:0:0], "--region", "fra", "--primary-region", "iad"), // no --upstream
		} {
			p := startProc(t, nil, pgflyBin, append([]string{"check"}, args...)...)
			if code := p.wait(t, time.Minute); code != 2 {
				t.Errorf("pgfly check %s: exit status %d, want 2\nstderr: %s", strings.Join(args, " "), code, p.stderr.String())
			}
		}
	})
	t.Run("on Fly without PRIMARY_REGION", func(t *testing.T) {
		got := runCheck(t, []string{"FLY_APP_NAME=my-app", "FLY_REGION=fra", "FLY_MACHINE_ID=m1"},
			"--primary-region", "iad", "--app", app.URL, "--upstream", replica, "--primary", primary)
		got.want(t, "fly", verdictFail, "without $PRIMARY_REGION")
	})
	t.Run("fly.toml", func(t *testing.T) {
		flags := append(replicaRegion, "--upstream", replica, "--primary", primary, "--http-listen", ":8080", "--admin-listen", ":9187")
		got := runCheck(t, nil, append(flags, "--fly-toml", filepath.Join("..", "..", "deploy", "fly.toml"))...)
		got.want(t, "fly.toml port", verdictOK, "internal_port 8080 is pgfly's shim")
		got.want(t, "fly.toml health", verdictOK, "[checks.pgfly] checks pgfly's /health on port 9187")

		bad := filepath.Join(t.TempDir(), "fly.toml")
		_, appPort, _ := strings.Cut(strings.TrimPrefix(app.URL, "http://"), ":")
		toml := "app = \"x\" # pgfly would be nice\n[http_service]\n  internal_port = " + appPort + "\n  [[http_service.checks]]\n    path = \"/up\"\n"
		if err := os.WriteFile(bad, []byte(toml), 0o600); err != nil {
			t.Fatal(err)
		}
		got = runCheck(t, nil, append(flags, "--fly-toml", bad)...)
		got.want(t, "fly.toml port", verdictFail, "is the app's: the edge bypasses pgfly")
		got.want(t, "fly.toml health", verdictWarn, "checks the app on port "+appPort+" directly")

		// Any TOML: a multi-line array, an inline table, a TCP service beside the HTTP one
		// (not pgfly's business), and a loopback admin listener Fly's checks cannot reach.
		other := filepath.Join(t.TempDir(), "fly.toml")
		toml = `app = "x"
[http_service]
  internal_port = 8080
  processes = [
    "app",
  ]
  concurrency = { type = "requests", soft_limit = 200 }
[[services]]
  internal_port = 6379
  protocol = "tcp"
  [[services.ports]]
    port = 6379
[checks.pgfly]
  type = "http"
  port = 9187
  path = "/health"
`
		if err := os.WriteFile(other, []byte(toml), 0o600); err != nil {
			t.Fatal(err)
		}
		got = runCheck(t, nil, append(replicaRegion, "--upstream", replica, "--primary", primary, "--http-listen", ":8080",
			"--admin-listen", "127.0.0.1:9187", "--fly-toml", other)...)
		got.want(t, "fly.toml port", verdictOK, "internal_port 8080 is pgfly's shim")
		got.want(t, "fly.toml health", verdictOK, "[checks.pgfly] checks pgfly's /health on port 9187")
		got.want(t, "fly.toml listen", verdictWarn, "--admin-listen 127.0.0.1:9187 is loopback only")
		if strings.Contains(got.stdout, "6379") {
			t.Errorf("the TCP service was judged: %s", got.stdout)
		}
	})
	t.Run("bad usage exits 2, in every command", func(t *testing.T) {
		for _, args := range [][]string{{"check", "--no-such-flag"}, {"no-such-command"}, {"serve"}, {"edge"},
			{"serve", "--upstream", replica, "--shutdown-timeout=-1s"}, {"run", "--", "true"}, {"run", "true"}} {
			p := startProc(t, nil, pgflyBin, args...)
			if code := p.wait(t, time.Minute); code != 2 {
				t.Errorf("pgfly %s: exit status %d, want 2\nstderr: %s", strings.Join(args, " "), code, p.stderr.String())
			}
		}
	})
	t.Run("run --check derives the primary from DATABASE_URL", func(t *testing.T) {
		p := startProc(t, []string{"DATABASE_URL=" + primary, "FLY_REGION=fra", "PRIMARY_REGION=iad"},
			pgflyBin, "run", "--check", "--upstream", replica, "--app", app.URL)
		code := p.wait(t, time.Minute)
		out := p.stdout.String()
		for _, w := range []string{"ok    upstream role", "ok    one cluster", "ok    database url    pgfly run points the app's DATABASE_URL at pgfly",
			"ok    app             pgfly run starts the app", "0 failed"} {
			if !strings.Contains(out, w) {
				t.Errorf("stdout: want %q in\n%s", w, out)
			}
		}
		if code != 0 {
			t.Errorf("exit status %d, want 0", code)
		}
	})
}

// TestCheckTwoClusters: an upstream and a primary of different clusters fail, since a
// bookmark of one means nothing to the other.
func TestCheckTwoClusters(t *testing.T) {
	c := testCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	other, err := pgcluster.Start(ctx, pgcluster.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	su := pgcluster.RoleSuperuser.Name
	got := runCheck(t, nil, "--region", "fra", "--primary-region", "iad", "--http-listen=",
		"--upstream", c.Replica.URL(su, "", pgcluster.Database), "--primary", other.Primary.URL(su, "", pgcluster.Database))
	got.want(t, "one cluster", verdictFail, "are different clusters")
	if got.code != 1 {
		t.Errorf("exit status %d, want 1", got.code)
	}
}
