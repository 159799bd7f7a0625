package wire

import (
	"bytes"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// The primary URL's password serves only sessions of its own user that the upstream made
// prove who they are: a trust line on the replica never becomes a password on the primary.
func TestPrimaryLoginPassword(t *testing.T) {
	srv, err := NewServer(Config{Upstream: "postgres://127.0.0.1:1/db", Primary: "postgres://app:secret@127.0.0.1:2/db?application_name=pgfly"}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		user       string
		challenged bool
		want       string
	}{
		{"app", true, "secret"},
		{"app", false, ""},   // the replica trusted the client
		{"other", true, ""},  // the URL's password is app's
		{"other", false, ""}, // neither
	} {
		ss := &session{srv: srv, challenged: tt.challenged, params: map[string]string{"user": tt.user, "database": "db", "application_name": "worker", "search_path": "jobs"}}
		ss.info.User, ss.info.Database = tt.user, "db"
		cfg := srv.primaryLogin(ss)
		if cfg.Password != tt.want {
			t.Errorf("user %s, challenged %v: password %q, want %q", tt.user, tt.challenged, cfg.Password, tt.want)
		}
		if cfg.User != tt.user || cfg.Database != "db" || cfg.Host != "127.0.0.1" || cfg.Port != 2 {
			t.Errorf("user %s: logs in as %s to %s on %s:%d", tt.user, cfg.User, cfg.Database, cfg.Host, cfg.Port)
		}
		if len(cfg.RuntimeParams) != 2 || cfg.RuntimeParams["application_name"] != "worker" || cfg.RuntimeParams["search_path"] != "jobs" {
			t.Errorf("startup parameters %v, want the client's own (application_name=worker, search_path=jobs)", cfg.RuntimeParams)
		}
	}
}

// The writer follows the client's unnamed statement through what it writes, in whole messages
// or in the parts the pump writes a large one in.
func TestUnnamedStatementTracking(t *testing.T) {
	enc := func(msgs ...pgproto3.FrontendMessage) []byte {
		var b []byte
		for _, m := range msgs {
			b, _ = m.Encode(b)
		}
		return b
	}
	unnamed := enc(&pgproto3.Parse{Query: "INSERT INTO t VALUES ($1)"})
	large := enc(&pgproto3.Parse{Query: "SELECT '" + strings.Repeat("x", 20000) + "'"})
	named := enc(&pgproto3.Parse{Name: "stmtcache_1", Query: "SELECT '" + strings.Repeat("y", 20000) + "'"})
	tooLarge := enc(&pgproto3.Parse{Query: "SELECT '" + strings.Repeat("x", maxUnnamed) + "'"})
	for _, tc := range []struct {
		name   string
		writes [][]byte
		want   []byte
		lost   bool
	}{
		{"a Parse of the unnamed statement", [][]byte{enc(&pgproto3.Describe{ObjectType: 'S'}), unnamed, enc(&pgproto3.Sync{})}, unnamed, false},
		{"a named Parse leaves it", [][]byte{unnamed, enc(&pgproto3.Parse{Name: "s1", Query: "SELECT 1"}, &pgproto3.Sync{})}, unnamed, false},
		{"a simple Query drops it", [][]byte{unnamed, enc(&pgproto3.Query{String: "SELECT 1"})}, nil, false},
		{"a Close drops it", [][]byte{unnamed, enc(&pgproto3.Close{ObjectType: 'S'}, &pgproto3.Sync{})}, nil, false},
		{"a Close of a portal leaves it", [][]byte{unnamed, enc(&pgproto3.Close{ObjectType: 'P'}, &pgproto3.Sync{})}, unnamed, false},
		{"a large one in parts", [][]byte{large[:8192], large[8192:16384], append(append([]byte(nil), large[16384:]...), enc(&pgproto3.Sync{})...)}, large, false},
		{"a header alone", [][]byte{unnamed[:headerLen], unnamed[headerLen:]}, unnamed, false},
		{"a named Parse's header alone", [][]byte{unnamed, named[:headerLen], named[headerLen:]}, unnamed, false},
		{"the header alone of one too large", [][]byte{tooLarge[:headerLen], tooLarge[headerLen:]}, nil, true},
		{"one too large to keep", [][]byte{tooLarge[:8192], tooLarge[8192:]}, nil, true},
		{"a Query after one too large", [][]byte{tooLarge, enc(&pgproto3.Query{String: "SELECT 1"})}, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := &upstreamWriter{}
			for _, b := range tc.writes {
				w.track(b)
			}
			if !bytes.Equal(w.unnamed, tc.want) || w.unnamedLost != tc.lost || w.rest != 0 {
				t.Fatalf("got %d bytes, lost %v, %d to come; want %d bytes, lost %v", len(w.unnamed), w.unnamedLost, w.rest, len(tc.want), tc.lost)
			}
		})
	}
}

// setsCustom finds the ways SQL sets a custom setting that pgfly can see, and leaves settings
// that pg_settings shows alone.
func TestSetsCustom(t *testing.T) {
	for sql, want := range map[string]bool{
		"SET app.tenant = 'acme'":                        true,
		"set session app.tenant to 'acme'":               true,
		"SET LOCAL app.tenant = 'acme'":                  true,
		`SET "app"."tenant" = 'acme'`:                    true,
		"SET app . tenant = 'acme'":                      true,
		"SET/**/app.tenant = 'acme'":                     true,
		"SET /* why */ SESSION app.tenant = 'acme'":      true,
		`SET "ténant".x = 'acme'`:                        true,
		"SET ténant.x = 'acme'":                          true,
		"SELECT set_config('app.tenant', 'acme', false)": true,
		`SET "app.tenant" = 'acme'`:                      true,
		`SET SESSION "app.tenant" TO 'acme'`:             true,
		"SET -- why\napp.tenant = 'acme'":                true,
		"SET search_path = app, public":                  false,
		"SET application_name = 'x.y'":                   false,
		"SET TIME ZONE 'UTC'":                            false,
		"UPDATE t SET n = 1 WHERE id = 2":                false,
		"SELECT 'settle.x'":                              false,
	} {
		if got := setsCustom.MatchString(sql); got != want {
			t.Errorf("%q: %v, want %v", sql, got, want)
		}
	}
}
