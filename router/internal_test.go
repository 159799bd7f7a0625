package router

import (
	"net/http"
	"regexp"
	"strings"
	"testing"
)

// These test the shim's header parsing directly; shim_test.go tests the shim from outside.

func TestTraceIDOf(t *testing.T) {
	const id = "4bf92f3577b34da6a3ce929d0e0e4736"
	for _, tc := range []struct {
		name, header, want string
	}{
		{"valid", "00-" + id + "-00f067aa0ba902b7-01", id},
		{"valid, unsampled", "00-" + id + "-00f067aa0ba902b7-00", id},
		{"surrounding spaces", "  00-" + id + "-00f067aa0ba902b7-01 ", id},
		{"uppercase is read as lowercase", "00-" + strings.ToUpper(id) + "-00F067AA0BA902B7-01", id},
		{"a later version with more fields", "01-" + id + "-00f067aa0ba902b7-01-what-comes-next", id},
		{"empty", "", ""},
		{"garbage", "not a traceparent", ""},
		{"three fields", "00-" + id + "-00f067aa0ba902b7", ""},
		{"trace id one short", "00-" + id[:31] + "-00f067aa0ba902b7-01", ""},
		{"trace id one long", "00-" + id + "a-00f067aa0ba902b7-01", ""},
		{"parent id one short", "00-" + id + "-00f067aa0ba902b-01", ""},
		{"version one long", "000-" + id + "-00f067aa0ba902b7-01", ""},
		{"all-zero trace id", "00-" + strings.Repeat("0", 32) + "-00f067aa0ba902b7-01", ""},
		{"trace id not hex", "00-" + strings.Repeat("g", 32) + "-00f067aa0ba902b7-01", ""},
		{"trace id with a sign", "00-+" + id[1:] + "-00f067aa0ba902b7-01", ""},
		{"fields swapped", "00-00f067aa0ba902b7-" + id + "-01", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := traceIDOf(tc.header); got != tc.want {
				t.Errorf("traceIDOf(%q): got %q, want %q", tc.header, got, tc.want)
			}
		})
	}
}

func TestReplayedByPgfly(t *testing.T) {
	for _, tc := range []struct {
		name   string
		header http.Header
		want   bool
	}{
		{"no replay headers", http.Header{}, false},
		{"pgfly's read-only state", http.Header{"Fly-Replay-Src": {"instance=abc;region=fra;t=1700000000000000;state=pgfly_read_only"}}, true},
		{"pgfly's lag state", http.Header{"Fly-Replay-Src": {"instance=abc;region=fra;t=1;state=pgfly_lag"}}, true},
		{"state first", http.Header{"Fly-Replay-Src": {"state=pgfly_read_only;instance=abc;region=fra"}}, true},
		{"spaces around fields", http.Header{"Fly-Replay-Src": {"instance=abc; region=fra; state=pgfly_read_only"}}, true},
		{"quoted state", http.Header{"Fly-Replay-Src": {`instance=abc;region=fra;state="pgfly_read_only"`}}, true},
		{"someone else's state", http.Header{"Fly-Replay-Src": {"instance=abc;region=fra;t=1;state=captured_write"}}, false},
		{"someone else's quoted state", http.Header{"Fly-Replay-Src": {`instance=abc;region=fra;state="captured_write"`}}, false},
		{"no state", http.Header{"Fly-Replay-Src": {"instance=abc;region=fra;t=1"}}, false},
		{"an empty state", http.Header{"Fly-Replay-Src": {"instance=abc;region=fra;state="}}, false},
		{"pgfly named elsewhere than in the state", http.Header{"Fly-Replay-Src": {"instance=pgfly;region=pgfly_read_only;state=other"}}, false},
		{"pgfly's state in the second header line", http.Header{"Fly-Replay-Src": {
			"instance=a;region=fra;state=other", "instance=b;region=fra;state=pgfly_read_only"}}, true},
		{"pgfly's state in the second of two joined values", http.Header{"Fly-Replay-Src": {
			"instance=a;region=fra;state=other, instance=b;region=fra;state=pgfly_read_only"}}, true},
		{"pgfly's state opening the second of two joined values", http.Header{"Fly-Replay-Src": {
			"instance=a;state=other, state=pgfly_read_only;instance=b"}}, true},
		{"two values, neither pgfly's", http.Header{"Fly-Replay-Src": {
			"instance=a;region=fra;state=other", "instance=b;region=fra;state=more"}}, false},
		{"fly could not deliver a replay", http.Header{"Fly-Replay-Failed": {"region=iad;reason=timeout"}}, true},
		{"fly could not deliver someone else's replay", http.Header{
			"Fly-Replay-Failed": {"1"}, "Fly-Replay-Src": {"state=captured_write"}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := replayedByPgfly(tc.header); got != tc.want {
				t.Errorf("replayedByPgfly(%v): got %v, want %v", tc.header, got, tc.want)
			}
		})
	}
}

func TestTraceIDOfAllocatesNothing(t *testing.T) {
	tp := "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	if n := testing.AllocsPerRun(100, func() { traceIDOf(tp) }); n != 0 {
		t.Errorf("got %v allocations per traceparent, want 0", n)
	}
}

func TestNewTraceparent(t *testing.T) {
	format := regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-01$`)
	seen := make(map[string]bool)
	for range 100 {
		tp := newTraceparent()
		if !format.MatchString(tp) {
			t.Fatalf("got %q, want 00-<32 hex>-<16 hex>-01", tp)
		}
		if id := traceIDOf(tp); id != tp[3:35] {
			t.Fatalf("traceIDOf(%q): got %q, want %q", tp, id, tp[3:35])
		}
		if seen[tp] {
			t.Fatalf("got %q twice, want a fresh traceparent on every call", tp)
		}
		seen[tp] = true
	}
}
