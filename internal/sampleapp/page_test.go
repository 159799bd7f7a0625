package sampleapp_test

import (
	"net/http"
	"regexp"
	"strings"
	"testing"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/pgcluster/pgtest"
	"github.com/pgfly/pgfly/internal/sampleapp"
)

// browserAccept is what a browser sends with a form post.
const browserAccept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"

// cookieHeader turns the Set-Cookie headers of resp into a Cookie header value.
func cookieHeader(resp *http.Response) string {
	var parts []string
	for _, c := range resp.Cookies() {
		if c.MaxAge >= 0 {
			parts = append(parts, c.Name+"="+c.Value)
		}
	}
	return strings.Join(parts, "; ")
}

// TestPage checks what the guestbook page shows of its request and its database.
func TestPage(t *testing.T) {
	cluster := pgtest.Start(t, pgcluster.Options{})
	su := pgcluster.RoleSuperuser.Name
	primaryDB := openDB(t, cluster.Primary.URL(su, "", pgcluster.Database))
	if err := sampleapp.Migrate(t.Context(), primaryDB); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	if err := cluster.WaitReplayed(t.Context()); err != nil {
		t.Fatal(err)
	}
	primary := startApp(t, primaryDB, "iad")
	replica := startApp(t, openDB(t, cluster.Replica.URL(su, "", pgcluster.Database)), "fra")

	tests := []struct {
		name    string
		base    string
		header  map[string]string
		want    []string // regular expressions the page must match
		wantNot []string
	}{
		{name: "a replica says so and shows its replay position",
			base: replica,
			want: []string{`<li id="db">Database: a <strong>replica</strong>,\s+replayed up to <code>[0-9A-F]+/[0-9A-F]+</code>`,
				`No bookmark yet`, `Not replayed: this request ran where the edge sent it first`}},
		{name: "the primary says so",
			base: primary,
			want: []string{`Database: the <strong>primary</strong>, WAL written up to <code>[0-9A-F]+/[0-9A-F]+</code>`}},
		{name: "a replayed request names where it came from",
			base:    primary,
			header:  map[string]string{"Fly-Replay-Src": "instance=fra-1;region=fra;t=1700000000000000;state=pgfly_read_only"},
			want:    []string{`Replayed from <strong>fra</strong> \(state <code>pgfly_read_only</code>\)`},
			wantNot: []string{`Not replayed`}},
		{name: "a bookmark the replica has replayed",
			base:   replica,
			header: map[string]string{"Cookie": "pgfly_lsn=0/1"},
			want:   []string{`Bookmark <code>0/1</code>`, `This database has replayed it`}},
		{name: "a bookmark the replica has not replayed",
			base:   replica,
			header: map[string]string{"Cookie": "pgfly_lsn=FFFFFFFF/0"},
			want:   []string{`Bookmark <code>FFFFFFFF/0</code>`, `This database has not replayed it yet`}},
		{name: "a malformed bookmark is shown escaped and judged by nobody",
			base:    replica,
			header:  map[string]string{"Cookie": "pgfly_lsn=<x>"},
			want:    []string{`Bookmark <code>&lt;x&gt;</code>`},
			wantNot: []string{`This database has`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := send(t, tt.base, request{method: "GET", path: "/", header: tt.header})
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("GET /: got %d %q, want 200", resp.StatusCode, body)
			}
			for _, re := range tt.want {
				if !regexp.MustCompile(re).MatchString(body) {
					t.Errorf("GET /: got %s, want it to match %s", body, re)
				}
			}
			for _, s := range tt.wantNot {
				if strings.Contains(body, s) {
					t.Errorf("GET /: got %s, want no %q", body, s)
				}
			}
		})
	}

	t.Run("a form post leaves a flash for the next page only", func(t *testing.T) {
		resp, body := send(t, primary, request{method: "POST", path: "/items",
			header: map[string]string{"Content-Type": "application/x-www-form-urlencoded", "Accept": browserAccept,
				"Fly-Replay-Src": "instance=fra-1;region=fra;t=1;state=pgfly_read_only"},
			body: "name=flash-guest"})
		if resp.StatusCode != http.StatusSeeOther {
			t.Fatalf("POST /items: got %d %q, want 303", resp.StatusCode, body)
		}
		cookies := cookieHeader(resp)
		if !strings.Contains(cookies, "guestbook_flash=") {
			t.Fatalf("POST /items: got cookies %q, want a guestbook_flash", cookies)
		}
		resp, body = send(t, primary, request{method: "GET", path: "/", header: map[string]string{"Cookie": cookies}})
		for _, re := range []string{`Your entry #\d+ was written by the app in <strong>iad</strong>`,
			`Your post was <strong>replayed</strong>: it ran first in <strong>fra</strong>`, `state <code>pgfly_read_only</code>`} {
			if !regexp.MustCompile(re).MatchString(body) {
				t.Errorf("GET / after the post: got %s, want it to match %s", body, re)
			}
		}
		cleared := false
		for _, c := range resp.Cookies() {
			cleared = cleared || c.Name == "guestbook_flash" && c.MaxAge < 0
		}
		if !cleared {
			t.Errorf("GET / after the post: got Set-Cookie %q, want the flash cleared", resp.Header.Values("Set-Cookie"))
		}
		if _, body := send(t, primary, request{method: "GET", path: "/"}); strings.Contains(body, `id="flash"`) {
			t.Errorf("GET / without the cookie: got a flash, want none")
		}
	})

	t.Run("a post that ran where it was sent says it was not replayed", func(t *testing.T) {
		resp, _ := send(t, primary, request{method: "POST", path: "/items",
			header: map[string]string{"Content-Type": "application/x-www-form-urlencoded", "Accept": browserAccept},
			body:   "name=direct-guest"})
		_, body := send(t, primary, request{method: "GET", path: "/", header: map[string]string{"Cookie": cookieHeader(resp)}})
		if !strings.Contains(body, "Your post was not replayed") {
			t.Errorf("GET / after the post: got %s, want it to say the post was not replayed", body)
		}
	})
}
