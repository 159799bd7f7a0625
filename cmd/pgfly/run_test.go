package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
	"github.com/pgfly/pgfly/internal/sampleapp"
)

func TestDefaultUpstream(t *testing.T) {
	const flyURL = "postgres://app:s%40cret@my-db.internal:5432/app?sslmode=disable"
	tests := []struct {
		name                         string
		original, region, primaryRgn string
		want                         string
		wantErr                      string
	}{
		{name: "primary region: the URL itself", original: flyURL, region: "iad", primaryRgn: "iad", want: flyURL},
		{name: "no region (not on Fly): the URL itself", original: flyURL, region: "", primaryRgn: "iad", want: flyURL},
		{name: "no primary region: the URL itself", original: flyURL, region: "fra", primaryRgn: "", want: flyURL},
		{name: "replica region, .internal host: the nearest member on 5433", original: flyURL, region: "fra", primaryRgn: "iad",
			want: "postgres://app:s%40cret@top1.nearest.of.my-db.internal:5433/app?sslmode=disable"},
		{name: "replica region, host already nearest: not prefixed twice",
			original: "postgres://app@top1.nearest.of.my-db.internal/app", region: "fra", primaryRgn: "iad",
			want: "postgres://app@top1.nearest.of.my-db.internal:5433/app"},
		{name: "replica region, other host: same host on 5433",
			original: "postgresql://app:pw@db.example.com:6432/app?application_name=web&sslmode=require", region: "fra", primaryRgn: "iad",
			want: "postgresql://app:pw@db.example.com:5433/app?application_name=web&sslmode=require"},
		{name: "replica region, IPv6 host", original: "postgres://app@[fdaa::3]:5432/app", region: "fra", primaryRgn: "iad",
			want: "postgres://app@[fdaa::3]:5433/app"},
		{name: "replica region, several hosts", original: "postgres://app@a.internal:5432,b.internal:5432/app", region: "fra", primaryRgn: "iad",
			wantErr: "no single host"},
		{name: "replica region, a Unix socket", original: "postgres:///app?host=/run/postgresql", region: "fra", primaryRgn: "iad",
			wantErr: "no single host"},
		{name: "replica region, not a URL", original: "host=db dbname=app", region: "fra", primaryRgn: "iad",
			wantErr: "not a postgres:// URL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, how, err := defaultUpstream(tt.original, tt.region, tt.primaryRgn)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %q, %v; want an error saying %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("got %q, %v; want %q", got, err, tt.want)
			}
			if how == "" {
				t.Errorf("got no explanation of the choice")
			}
		})
	}
}

func TestAppDatabaseURL(t *testing.T) {
	tests := []struct {
		name      string
		original  string
		pgflyAddr string
		tls       bool
		want      string
	}{
		{name: "user, password, database and parameters stay; TLS is off toward pgfly",
			original:  "postgres://app:s%40c%2Fret@my-db.internal:5432/app_db?application_name=web&sslmode=require&connect_timeout=5",
			pgflyAddr: "127.0.0.1:5432",
			want:      "postgres://app:s%40c%2Fret@127.0.0.1:5432/app_db?application_name=web&connect_timeout=5&sslmode=disable"},
		{name: "no sslmode: disable",
			original: "postgresql://app@db/app", pgflyAddr: "127.0.0.1:6543",
			want: "postgresql://app@127.0.0.1:6543/app?sslmode=disable"},
		{name: "what would send the app elsewhere or refuse a replica goes",
			original:  "postgres://app@db:5432/app?host=other&hostaddr=10.0.0.1&port=7&target_session_attrs=read-write&options=-c%20statement_timeout%3D5s",
			pgflyAddr: "127.0.0.1:5432",
			want:      "postgres://app@127.0.0.1:5432/app?options=-c+statement_timeout%3D5s&sslmode=disable"},
		{name: "TLS-only parameters go with TLS",
			original:  "postgres://app@db/app?sslmode=verify-full&sslrootcert=/ca.pem&channel_binding=require&sslnegotiation=direct",
			pgflyAddr: "127.0.0.1:5432",
			want:      "postgres://app@127.0.0.1:5432/app?sslmode=disable&sslrootcert=%2Fca.pem"},
		{name: "with --tls-cert the app's sslmode stays",
			original:  "postgres://app@db/app?sslmode=require&channel_binding=require",
			pgflyAddr: "127.0.0.1:5432", tls: true,
			want: "postgres://app@127.0.0.1:5432/app?channel_binding=require&sslmode=require"},
		{name: "a Unix socket: its directory as the host, its port as the port",
			original: "postgres://app:pw@db:5432/app?host=other&sslmode=require", pgflyAddr: "/tmp/pgfly-1/.s.PGSQL.5432",
			want: "postgres://app:pw@/app?host=%2Ftmp%2Fpgfly-1&port=5432&sslmode=disable"},
		{name: "a Unix socket, with no user or database in the original",
			original: "postgres://db.internal:5432", pgflyAddr: "/tmp/pgfly-1/.s.PGSQL.5432",
			want: "postgres:///?host=%2Ftmp%2Fpgfly-1&port=5432&sslmode=disable"},
		{name: "an IPv6 listener",
			original: "postgres://app@db/app", pgflyAddr: "[::1]:5432",
			want: "postgres://app@[::1]:5432/app?sslmode=disable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := appDatabaseURL(tt.original, tt.pgflyAddr, tt.tls)
			if err != nil || got != tt.want {
				t.Errorf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestRunRejects(t *testing.T) {
	busyApp := holdAddr(t)
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{name: "no command", env: map[string]string{"DATABASE_URL": "postgres://app@127.0.0.1:1/app"},
			args: []string{"--http-listen="}, want: "pgfly run needs the app's command after --"},
		{name: "nothing after --", env: map[string]string{"DATABASE_URL": "postgres://app@127.0.0.1:1/app"},
			args: []string{"--http-listen=", "--"}, want: "pgfly run needs the app's command after --"},
		{name: "a command without --", env: map[string]string{"DATABASE_URL": "postgres://app@127.0.0.1:1/app"},
			args: []string{"--http-listen=", "node", "server.js"}, want: "the app's command goes after --"},
		{name: "no DATABASE_URL", env: map[string]string{"DATABASE_URL": ""},
			args: []string{"--http-listen=", "--", "true"}, want: "$DATABASE_URL is not set"},
		{name: "a DATABASE_URL that is not a URL, outside the primary region",
			env:  map[string]string{"DATABASE_URL": "host=db dbname=app", "FLY_REGION": "fra", "PRIMARY_REGION": "iad"},
			args: []string{"--http-listen=", "--", "true"}, want: "not a postgres:// URL"},
		{name: "the app's port is taken",
			env:  map[string]string{"DATABASE_URL": "postgres://app@127.0.0.1:1/app", "FLY_REGION": "iad", "PRIMARY_REGION": "iad"},
			args: []string{"--listen=127.0.0.1:0", "--http-listen=127.0.0.1:0", "--admin-listen=", "--app=http://" + busyApp, "--", "true"},
			want: "something already listens on " + busyApp},
		{name: "no start timeout", env: map[string]string{"DATABASE_URL": "postgres://app@127.0.0.1:1/app"},
			args: []string{"--http-listen=", "--app-start-timeout=0s", "--", "true"}, want: "--app-start-timeout"},
		{name: "a negative shim timeout, as in serve", env: map[string]string{"DATABASE_URL": "postgres://app@127.0.0.1:1/app"},
			args: []string{"--http-listen=", "--http-body-timeout=-1s", "--", "true"}, want: "--http-body-timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			var stderr bytes.Buffer
			err := run(context.Background(), append([]string{"run"}, tt.args...), io.Discard, &stderr)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want an error saying %q", err, tt.want)
			}
		})
	}
}

// TestRunChild runs pgfly run with small shell scripts as the app.
func TestRunChild(t *testing.T) {
	// A closed loopback port: pgfly never needs its upstream here.
	db := freeAddr(t)
	noShim := []string{"--http-listen=", "--admin-listen="}

	t.Run("the app gets DATABASE_URL pointing at pgfly, and PORT", func(t *testing.T) {
		listen := freeAddr(t)
		env := []string{"FLY_REGION=fra", "PRIMARY_REGION=iad",
			"DATABASE_URL=postgres://app:s%40cret@" + db + "/app?sslmode=require&application_name=web"}
		args := append([]string{"run", "--listen=" + listen, "--app=http://127.0.0.1:4321"}, noShim...)
		p := startProc(t, env, pgflyBin, append(args, "--", "sh", "-c", `printf 'DATABASE_URL=%s\nPORT=%s\n' "$DATABASE_URL" "$PORT"; exit 7`)...)
		if code := p.wait(t, 30*time.Second); code != 7 {
			t.Errorf("exit status: got %d, want the app's 7", code)
		}
		want := "DATABASE_URL=postgres://app:s%40cret@" + listen + "/app?application_name=web&sslmode=disable\nPORT=4321\n"
		if got := p.stdout.String(); got != want {
			t.Errorf("the app's environment: got %q, want %q", got, want)
		}
		chosen := p.logLine("upstream chosen")
		wantUp := "postgres://app:xxxxx@127.0.0.1:5433/app?sslmode=require&application_name=web"
		if chosen == nil || chosen["upstream"] != wantUp || !strings.Contains(chosen["how"].(string), "nearest replica") {
			t.Errorf("log line \"upstream chosen\": got %v, want upstream %s, the nearest replica", chosen, wantUp)
		}
		if strings.Contains(p.stderr.String(), "s%40cret") || strings.Contains(p.stderr.String(), "s@cret") {
			t.Errorf("stderr: got the password in %s, want it never logged", p.stderr.String())
		}
	})

	t.Run("with --jobs-listen the app gets PGFLY_JOBS_DATABASE_URL pointing at it", func(t *testing.T) {
		listen, jobs := freeAddr(t), freeAddr(t)
		env := []string{"DATABASE_URL=postgres://app:s%40cret@" + db + "/app?sslmode=require&application_name=web"}
		args := append([]string{"run", "--listen=" + listen, "--jobs-listen=" + jobs}, noShim...)
		p := startProc(t, env, pgflyBin, append(args, "--", "sh", "-c", `printf 'DATABASE_URL=%s\nPGFLY_JOBS_DATABASE_URL=%s\n' "$DATABASE_URL" "$PGFLY_JOBS_DATABASE_URL"`)...)
		if code := p.wait(t, 30*time.Second); code != 0 {
			t.Errorf("exit status: got %d, want the app's 0", code)
		}
		want := "DATABASE_URL=postgres://app:s%40cret@" + listen + "/app?application_name=web&sslmode=disable\n" +
			"PGFLY_JOBS_DATABASE_URL=postgres://app:s%40cret@" + jobs + "/app?application_name=web&sslmode=disable\n"
		if got := p.stdout.String(); got != want {
			t.Errorf("the app's environment: got %q, want %q", got, want)
		}
		if strings.Contains(p.stderr.String(), "s%40cret") || strings.Contains(p.stderr.String(), "s@cret") {
			t.Errorf("stderr: got the password in %s, want it never logged", p.stderr.String())
		}
	})

	t.Run("without --jobs-listen the app gets no PGFLY_JOBS_DATABASE_URL, not even an inherited one", func(t *testing.T) {
		env := []string{"DATABASE_URL=postgres://app@" + db + "/app", "PGFLY_JOBS_DATABASE_URL=postgres://stale@" + db + "/app"}
		args := append([]string{"run", "--listen=127.0.0.1:0"}, noShim...)
		p := startProc(t, env, pgflyBin, append(args, "--", "sh", "-c", `printf '%s\n' "${PGFLY_JOBS_DATABASE_URL-unset}"`)...)
		if code := p.wait(t, 30*time.Second); code != 0 {
			t.Errorf("exit status: got %d, want the app's 0", code)
		}
		if got := p.stdout.String(); got != "unset\n" {
			t.Errorf("the app's PGFLY_JOBS_DATABASE_URL: got %q, want it unset", got)
		}
	})

	exits := []struct {
		name   string
		script string
		want   int
	}{
		{name: "the app exits 0", script: "exit 0", want: 0},
		{name: "the app exits 3", script: "exit 3", want: 3},
		{name: "the app is killed", script: "kill -KILL $$", want: 128 + int(syscall.SIGKILL)},
	}
	for _, tt := range exits {
		t.Run(tt.name+": pgfly exits with its status", func(t *testing.T) {
			env := []string{"DATABASE_URL=postgres://app@" + db + "/app"}
			args := append([]string{"run", "--listen=127.0.0.1:0"}, noShim...)
			p := startProc(t, env, pgflyBin, append(args, "--", "sh", "-c", tt.script)...)
			if code := p.wait(t, 30*time.Second); code != tt.want {
				t.Errorf("exit status: got %d, want %d", code, tt.want)
			}
			// An app that finishes its work and exits 0 is not an error.
			errorLines := strings.Contains(p.stderr.String(), `"level":"error"`)
			if errorLines != (tt.want != 0) {
				t.Errorf("error-level log lines: got %v for status %d, want them only for a failure:\n%s", errorLines, tt.want, p.stderr.String())
			}
		})
	}

	signals := []struct {
		sig  syscall.Signal
		trap string
		want int
	}{
		{sig: syscall.SIGTERM, trap: "TERM", want: 42},
		{sig: syscall.SIGINT, trap: "INT", want: 43},
	}
	for _, tt := range signals {
		t.Run("SIG"+tt.trap+" is passed on to the app", func(t *testing.T) {
			env := []string{"DATABASE_URL=postgres://app@" + db + "/app"}
			args := append([]string{"run", "--listen=127.0.0.1:0"}, noShim...)
			script := `trap 'echo got ` + tt.trap + `; exit ` + strconv.Itoa(tt.want) + `' ` + tt.trap + `; echo ready; while :; do sleep 0.05; done`
			p := startProc(t, env, pgflyBin, append(args, "--", "sh", "-c", script)...)
			p.waitFor(t, 30*time.Second, "the app to be ready", func() bool { return strings.Contains(p.stdout.String(), "ready") })
			p.signal(t, tt.sig)
			if code := p.wait(t, 30*time.Second); code != tt.want {
				t.Errorf("exit status: got %d, want the app's %d", code, tt.want)
			}
			if !strings.Contains(p.stdout.String(), "got "+tt.trap) {
				t.Errorf("the app's output: got %q, want it to have caught SIG%s", p.stdout.String(), tt.trap)
			}
		})
	}

	t.Run("an app that never listens is stopped", func(t *testing.T) {
		env := []string{"DATABASE_URL=postgres://app@" + db + "/app"}
		p := startProc(t, env, pgflyBin, "run", "--listen=127.0.0.1:0", "--http-listen=127.0.0.1:0", "--admin-listen=",
			"--primary-region=iad", "--app=http://"+freeAddr(t), "--app-start-timeout=300ms", "--", "sleep", "30")
		if code := p.wait(t, 30*time.Second); code != 1 {
			t.Errorf("exit status: got %d, want 1", code)
		}
		if !strings.Contains(p.stderr.String(), "the app did not listen on") {
			t.Errorf("stderr: got %q, want it to say the app did not listen", p.stderr.String())
		}
	})

	t.Run("an app that cannot start", func(t *testing.T) {
		env := []string{"DATABASE_URL=postgres://app@" + db + "/app"}
		args := append([]string{"run", "--listen=127.0.0.1:0"}, noShim...)
		p := startProc(t, env, pgflyBin, append(args, "--", "/nonexistent/app")...)
		if code := p.wait(t, 30*time.Second); code != 1 {
			t.Errorf("exit status: got %d, want 1", code)
		}
		if !strings.Contains(p.stderr.String(), "start the app") {
			t.Errorf("stderr: got %q, want it to say the app could not start", p.stderr.String())
		}
	})
}

// TestRunSampleApp runs the sample app under pgfly run against a real primary and replica.
func TestRunSampleApp(t *testing.T) {
	app := buildBinary(t, "../../internal/sampleapp/cmd/sampleapp", "sampleapp")
	cluster := pgtest.Start(t, pgcluster.Options{})
	su := pgcluster.RoleSuperuser.Name
	primaryURL := cluster.Primary.URL(su, "", pgcluster.Database)
	db, err := sql.Open("pgx", primaryURL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := sampleapp.Migrate(t.Context(), db); err != nil {
		t.Fatal(err)
	}
	if err := cluster.WaitReplayed(t.Context()); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		region   string
		extra    []string // more flags
		socket   bool     // --socket instead of --listen
		wantRole string
		check    func(t *testing.T, r reply)
	}{
		{name: "replica region: a write is answered with fly-replay", region: "fra",
			extra: []string{"--upstream=" + cluster.Replica.URL(su, "", pgcluster.Database)}, wantRole: "replica",
			check: func(t *testing.T, r reply) {
				if r.status != http.StatusConflict || r.header.Get("Fly-Replay") != "region=iad;state=pgfly_read_only" {
					t.Errorf("POST /items: got %d %q fly-replay %q, want 409 with fly-replay: region=iad;state=pgfly_read_only",
						r.status, r.body, r.header.Get("Fly-Replay"))
				}
			}},
		{name: "primary region: a write is served here, with a bookmark", region: "iad", wantRole: "primary",
			check: func(t *testing.T, r reply) {
				if r.status != http.StatusCreated || !strings.Contains(strings.Join(r.header.Values("Set-Cookie"), ";"), "pgfly_lsn=") {
					t.Errorf("POST /items: got %d %q cookies %q, want 201 with a pgfly_lsn bookmark", r.status, r.body, r.header.Values("Set-Cookie"))
				}
			}},
		{name: "--socket: the app reaches pgfly on a Unix socket in a private directory", region: "iad", socket: true, wantRole: "primary",
			check: func(t *testing.T, r reply) {
				if r.status != http.StatusCreated {
					t.Errorf("POST /items: got %d %q, want 201", r.status, r.body)
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			relay, shim, admin, appAddr := freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t)
			env := []string{"DATABASE_URL=" + primaryURL, "FLY_REGION=" + tt.region, "PRIMARY_REGION=iad"}
			listen := "--listen=" + relay
			if tt.socket {
				listen = "--socket"
			}
			args := append([]string{"run", listen, "--http-listen=" + shim, "--admin-listen=" + admin,
				"--app=http://" + appAddr}, tt.extra...)
			p := startProc(t, env, pgflyBin, append(args, "--", app)...)
			p.waitLog(t, 30*time.Second, "app is listening")
			var socketDir string
			if tt.socket {
				dbURL, _ := p.logLine("app started")["database_url"].(string)
				u, err := url.Parse(dbURL)
				if err != nil || u.Host != "" || !filepath.IsAbs(u.Query().Get("host")) {
					t.Fatalf("the app's DATABASE_URL: got %q, want host=<a directory> and no TCP host", dbURL)
				}
				socketDir = u.Query().Get("host")
				if fi, err := os.Stat(filepath.Join(socketDir, ".s.PGSQL."+u.Query().Get("port"))); err != nil || fi.Mode()&os.ModeSocket == 0 {
					t.Fatalf("pgfly's socket in %s: %v, want it there", socketDir, err)
				}
			}

			got := send(t, http.MethodGet, "http://"+shim+"/items", "", nil)
			if got.status != http.StatusOK || got.header.Get(sampleapp.RegionHeader) != tt.region {
				t.Errorf("GET /items through the shim: got %d %q from %q, want 200 from %s", got.status, got.body, got.header.Get(sampleapp.RegionHeader), tt.region)
			}
			tt.check(t, send(t, http.MethodPost, "http://"+shim+"/items", `{"name":"run-`+tt.region+`"}`,
				http.Header{"Content-Type": {"application/json"}}))
			health := send(t, http.MethodGet, "http://"+admin+"/health", "", nil)
			var h struct{ Role string }
			if err := json.Unmarshal([]byte(health.body), &h); err != nil || health.status != http.StatusOK || h.Role != tt.wantRole {
				t.Errorf("GET /health: got %d %s, want 200 with role %s", health.status, health.body, tt.wantRole)
			}

			p.signal(t, syscall.SIGTERM)
			if code := p.wait(t, 30*time.Second); code != 0 {
				t.Errorf("exit status after SIGTERM: got %d, want 0 (the app's)", code)
			}
			if p.logLine("shutting down") == nil {
				t.Errorf("the app's log: got no \"shutting down\", want it to have had SIGTERM")
			}
			for _, addr := range []string{relay, shim, admin, appAddr} {
				assertFree(t, addr)
			}
			if _, err := os.Stat(socketDir); socketDir != "" && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the socket's directory %s after exit: %v, want it removed", socketDir, err)
			}
		})
	}
}

func TestRedact(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{name: "URL user password", in: "postgres://app:s3cret@db:5432/app", want: "postgres://app:xxxxx@db:5432/app"},
		{name: "URL password parameter", in: "postgres://app@db/app?password=s3cret&sslmode=require", want: "postgres://app@db/app?password=xxxxx&sslmode=require"},
		{name: "keyword/value password", in: "host=db user=app password=s3cret dbname=app", want: "host=db user=app password=xxxxx dbname=app"},
		{name: "keyword/value password with an escaped space", in: `host=db password=a\ s3cret user=app`, want: "host=db password=xxxxx user=app"},
		{name: "keyword/value quoted password", in: "host=db password = 'a b\\' s3cret' dbname=app", want: "host=db password = xxxxx dbname=app"},
		{name: "no password", in: "postgres://app@db/app", want: "postgres://app@db/app"},
		{name: "the client key's password, keyword/value", in: "host=db sslpassword=s3cret user=app", want: "host=db sslpassword=xxxxx user=app"},
		{name: "the client key's password, URL", in: "postgres://app@db/app?sslpassword=s3cret", want: "postgres://app@db/app?sslpassword=xxxxx"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := redact(tt.in)
			if got != tt.want || strings.Contains(got, "s3cret") {
				t.Errorf("redact(%q): got %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}
