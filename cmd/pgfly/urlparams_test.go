package main

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/pgcluster"
)

// A DATABASE_URL written for Rails carries Active Record's own settings
// (?pool=5&timeout=3000). pgfly's own connections must not send them to the
// server, which would refuse the session (FATAL 42704) and leave /health at
// 503.

// railsParams are Active Record's own query parameters, from its guide.
var railsParams = []string{"pool=5", "timeout=3000"}

// waitHealthy waits for /health on admin to answer 200 with role; when it
// does not, the last answer is logged.
func waitHealthy(tb testing.TB, p *proc, admin, role string) {
	tb.Helper()
	var last reply
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("last /health answer: %d %s", last.status, last.body)
		}
	})
	p.waitFor(tb, 15*time.Second, "/health to answer 200 with role "+role, func() bool {
		if !answers("http://" + admin + "/health") {
			return false
		}
		last = send(tb, http.MethodGet, "http://"+admin+"/health", "", nil)
		var h struct{ Role string }
		return last.status == http.StatusOK && json.Unmarshal([]byte(last.body), &h) == nil && h.Role == role
	})
}

// assertNoPassword fails the test if the process logged role's password.
func assertNoPassword(tb testing.TB, p *proc, role pgcluster.Role) {
	tb.Helper()
	if strings.Contains(p.stderr.String(), role.Password) {
		tb.Errorf("stderr: got the password of %s in %s, want it never logged", role.Name, p.stderr.String())
	}
}

func TestServeRailsURL(t *testing.T) {
	c := testCluster(t)
	role := pgcluster.RoleSCRAM
	listen, admin := freeAddr(t), freeAddr(t)
	p := startProc(t, nil, pgflyBin, "serve", "--listen="+listen, "--http-listen=", "--admin-listen="+admin,
		"--upstream="+c.Replica.URL(role.Name, role.Password, pgcluster.Database, railsParams...),
		"--primary="+c.Primary.URL(role.Name, role.Password, pgcluster.Database, railsParams...))
	waitHealthy(t, p, admin, "replica")

	conn := connect(t, clientURL(listen, role))
	assertSelect1(t, conn)
	if p.logLine("ignoring application framework parameters in the URL") == nil {
		t.Errorf("stderr: got no line saying the framework parameters are ignored, want one")
	}
	assertNoPassword(t, p, role)
}

func TestRunRailsDatabaseURL(t *testing.T) {
	c := testCluster(t)
	role := pgcluster.RoleSCRAM
	listen, admin := freeAddr(t), freeAddr(t)
	env := []string{"FLY_REGION=iad", "PRIMARY_REGION=iad",
		"DATABASE_URL=" + c.Primary.URL(role.Name, role.Password, pgcluster.Database, railsParams...)}
	p := startProc(t, env, pgflyBin, "run", "--listen="+listen, "--http-listen=", "--admin-listen="+admin,
		"--", "sh", "-c", `printf '%s\n' "$DATABASE_URL"; exec sleep 60`)
	waitHealthy(t, p, admin, "primary")

	// The app's URL keeps the app's own settings: they are the framework's to read.
	p.waitFor(t, 10*time.Second, "the app to print its DATABASE_URL", func() bool { return strings.Contains(p.stdout.String(), "\n") })
	if got := p.stdout.String(); !strings.Contains(got, "pool=5") || !strings.Contains(got, "timeout=3000") || !strings.Contains(got, listen) {
		t.Errorf("the app's DATABASE_URL: got %q, want it pointing at %s with pool=5 and timeout=3000", got, listen)
	}
	assertNoPassword(t, p, role)
}
