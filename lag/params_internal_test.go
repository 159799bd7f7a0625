package lag

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// Which of a URL's parameters the monitor sends is decided without a server;
// TestMonitorFrameworkURL and TestMonitorRefusedParam run it against real
// ones.

func TestParseURLDropsFrameworkParams(t *testing.T) {
	const base = "postgres://app:s3cret@db.internal:5432/app?sslmode=disable&"
	for _, tt := range []struct {
		name        string
		query       string
		wantParams  map[string]string // the run-time parameters sent
		wantDropped []string
	}{
		{
			name:        "Active Record's example: pool and timeout go",
			query:       "pool=5&timeout=3000",
			wantParams:  map[string]string{"application_name": applicationName},
			wantDropped: []string{"pool", "timeout"},
		},
		{
			name: "every Active Record key goes",
			query: "pool=5&timeout=3000&prepared_statements=false&reaping_frequency=10&checkout_timeout=5" +
				"&idle_timeout=300&variables=x&encoding=unicode&advisory_locks=false&statement_limit=200",
			wantParams: map[string]string{"application_name": applicationName},
			wantDropped: []string{"advisory_locks", "checkout_timeout", "encoding", "idle_timeout", "pool",
				"prepared_statements", "reaping_frequency", "statement_limit", "timeout", "variables"},
		},
		{
			name:        "Django's conn_max_age goes",
			query:       "conn_max_age=600",
			wantParams:  map[string]string{"application_name": applicationName},
			wantDropped: []string{"conn_max_age"},
		},
		{
			name: "every Prisma key goes",
			query: "connection_limit=5&pool_timeout=10&schema=public&pgbouncer=true&statement_cache_size=0" +
				"&socket_timeout=5",
			wantParams: map[string]string{"application_name": applicationName},
			wantDropped: []string{"connection_limit", "pgbouncer", "pool_timeout", "schema", "socket_timeout",
				"statement_cache_size"},
		},
		{
			name:        "framework keys in capitals go too",
			query:       "Pool=5&TIMEOUT=3000",
			wantParams:  map[string]string{"application_name": applicationName},
			wantDropped: []string{"Pool", "TIMEOUT"},
		},
		{
			name:  "application_name, options, dotted and real settings stay",
			query: "pool=5&application_name=web&options=-c%20statement_timeout%3D5000&pg_stat_statements.track=all&search_path=public",
			wantParams: map[string]string{"application_name": "web", "options": "-c statement_timeout=5000",
				"pg_stat_statements.track": "all", "search_path": "public"},
			wantDropped: []string{"pool"},
		},
		{
			name:       "unknown names that are no framework's stay, for the server to judge",
			query:      "not_a_guc_xyz=1",
			wantParams: map[string]string{"application_name": applicationName, "not_a_guc_xyz": "1"},
		},
		{
			name:       "libpq's and pgx's own parameters are never run-time parameters",
			query:      "connect_timeout=5&target_session_attrs=any&statement_cache_capacity=10",
			wantParams: map[string]string{"application_name": applicationName},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, dropped, err := parseURL(base + tt.query)
			if err != nil {
				t.Fatalf("parseURL: %v", err)
			}
			if !maps.Equal(cfg.RuntimeParams, tt.wantParams) {
				t.Errorf("run-time parameters: got %v, want %v", cfg.RuntimeParams, tt.wantParams)
			}
			if !slices.Equal(dropped, tt.wantDropped) {
				t.Errorf("dropped: got %q, want %q", dropped, tt.wantDropped)
			}
		})
	}
}

func TestRefusedParams(t *testing.T) {
	params := map[string]string{
		"application_name":         "web",
		"options":                  "-c statement_timeout=5000",
		"pg_stat_statements.track": "all",
		"not_a_guc_xyz":            "1",
		"other_unknown":            "2",
		"search_path":              "public",
	}
	refused := func(code, msg string) error {
		return fmt.Errorf("failed to connect: %w", &pgconn.PgError{Severity: "FATAL", Code: code, Message: msg})
	}
	for _, tt := range []struct {
		name string
		err  error
		want []string
	}{
		{
			name: "English: the quoted name",
			err:  refused("42704", `unrecognized configuration parameter "not_a_guc_xyz"`),
			want: []string{"not_a_guc_xyz"},
		},
		{
			name: "the name in another case",
			err:  refused("42704", `unrecognized configuration parameter "NOT_A_GUC_XYZ"`),
			want: []string{"not_a_guc_xyz"},
		},
		{
			name: "German: the name in guillemets",
			err:  refused("42704", `unbekannter Konfigurationsparameter »other_unknown«`),
			want: []string{"other_unknown"},
		},
		{
			name: "Japanese: the name between other quotes, no spaces",
			err:  refused("42704", `設定パラメータ「other_unknown」は不明です`),
			want: []string{"other_unknown"},
		},
		{
			name: "a dotted name the server refuses by name goes",
			err:  refused("42704", `unrecognized configuration parameter "pg_stat_statements.track"`),
			want: []string{"pg_stat_statements.track"},
		},
		{
			name: "no name to be found: all but application_name, options and dotted names go",
			err:  refused("42704", `paramètre inconnu`),
			want: []string{"not_a_guc_xyz", "other_unknown", "search_path"},
		},
		{
			name: "a part of a name is not the name",
			err:  refused("42704", `unrecognized configuration parameter "not_a_guc_xyz_2"`),
			want: []string{"not_a_guc_xyz", "other_unknown", "search_path"},
		},
		{name: "another SQLSTATE: nothing", err: refused("22023", `invalid value for parameter "search_path"`)},
		{name: "not a server error: nothing", err: errors.New("dial tcp: connection refused")},
		{name: "no error: nothing"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := refusedParams(tt.err, params); !slices.Equal(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}
