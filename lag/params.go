package lag

import (
	"errors"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// A DATABASE_URL is often written for an application framework, which reads
// some query parameters for itself (its pool size, its timeouts) and passes
// the rest on. pgx, like libpq, sends every query parameter it does not know
// to the server as a run-time parameter, and the server refuses the session
// with FATAL 42704 for a name that is not a setting. The monitor's sessions
// therefore drop the frameworks' parameters up front (dropFrameworkParams)
// and, should the server still refuse one, connect again without it
// (refusedParams).

// frameworkParams are the query parameters that application frameworks read
// from DATABASE_URL for themselves; none is a Postgres setting.
var frameworkParams = map[string]struct{}{
	// Active Record (Rails).
	"pool":                {},
	"timeout":             {},
	"prepared_statements": {},
	"reaping_frequency":   {},
	"checkout_timeout":    {},
	"idle_timeout":        {},
	"variables":           {},
	"encoding":            {},
	"advisory_locks":      {},
	"statement_limit":     {},
	// Django (dj-database-url).
	"conn_max_age": {},
	// Prisma.
	"connection_limit":     {},
	"pool_timeout":         {},
	"schema":               {},
	"pgbouncer":            {},
	"statement_cache_size": {},
	"socket_timeout":       {},
}

// alwaysSent reports whether the run-time parameter name is sent even after
// the server refused a parameter it cannot name: libpq's application_name
// and options, and dotted names, which are extension settings that the
// server accepts as placeholders.
func alwaysSent(name string) bool {
	return name == "application_name" || name == "options" || strings.Contains(name, ".")
}

// dropFrameworkParams deletes the frameworks' parameters (frameworkParams)
// from params, the run-time parameters of a pgx config, and returns their
// names, sorted. Every other parameter stays. Names are compared as the
// server compares setting names, ignoring case.
func dropFrameworkParams(params map[string]string) []string {
	var dropped []string
	for name := range params {
		if _, ok := frameworkParams[strings.ToLower(name)]; ok {
			dropped = append(dropped, name)
		}
	}
	for _, name := range dropped {
		delete(params, name)
	}
	slices.Sort(dropped)
	return dropped
}

// refusedParams returns the run-time parameters in params to drop after a
// connection attempt failed with err, sorted, or nil when err is not the
// server refusing a parameter (SQLSTATE 42704, undefined_object). The
// server's message names the parameter (`unrecognized configuration
// parameter "pool"`), but in the server's language, so the names of params
// are looked for in it: first in double quotes, then as a whole word. When
// none is found, every parameter that is not alwaysSent is dropped.
func refusedParams(err error, params map[string]string) []string {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42704" {
		return nil
	}
	msg := strings.ToLower(pgErr.Message)
	var quoted, named, rest []string
	for name := range params {
		lower := strings.ToLower(name)
		switch {
		case strings.Contains(msg, `"`+lower+`"`):
			quoted = append(quoted, name)
		case containsWord(msg, lower):
			named = append(named, name)
		case !alwaysSent(lower):
			rest = append(rest, name)
		}
	}
	drop := quoted
	if len(drop) == 0 {
		drop = named
	}
	if len(drop) == 0 {
		drop = rest
	}
	slices.Sort(drop)
	return drop
}

// containsWord reports whether word occurs in s with no name character
// (ASCII letter, digit, '_', '.' or '$') right before or after it.
func containsWord(s, word string) bool {
	if word == "" {
		return false
	}
	for i := 0; ; {
		j := strings.Index(s[i:], word)
		if j < 0 {
			return false
		}
		start, end := i+j, i+j+len(word)
		if (start == 0 || !isNameByte(s[start-1])) && (end == len(s) || !isNameByte(s[end])) {
			return true
		}
		i = start + 1
	}
}

// isNameByte reports whether b may be part of a setting's name.
func isNameByte(b byte) bool {
	return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || b == '_' || b == '.' || b == '$'
}
