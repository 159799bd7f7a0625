package wire

import (
	"testing"
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
