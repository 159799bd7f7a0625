package sampleapp

import (
	"context"
	"testing"
)

func TestWithTrace(t *testing.T) {
	const query = "SELECT 1"
	tests := []struct {
		name   string
		header string
		want   string
	}{
		{name: "valid", header: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
			want: "SELECT 1 /*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/"},
		{name: "absent", header: "", want: query},
		{name: "comment breakout", header: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/ DROP TABLE items --", want: query},
		{name: "uppercase hex", header: "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01", want: query},
		{name: "version ff", header: "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", want: query},
		{name: "zero trace id", header: "00-00000000000000000000000000000000-00f067aa0ba902b7-01", want: query},
		{name: "zero parent id", header: "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", want: query},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			if validTraceparent(tt.header) {
				ctx = context.WithValue(ctx, traceparentKey{}, tt.header)
			}
			if got := withTrace(ctx, query); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestPrefersHTML(t *testing.T) {
	tests := []struct {
		name   string
		accept string
		want   bool
	}{
		{name: "browser", accept: "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", want: true},
		{name: "none", accept: "", want: false},
		{name: "anything", accept: "*/*", want: false},
		{name: "JSON", accept: "application/json", want: false},
		{name: "JSON first", accept: "application/json, text/html;q=0.5", want: false},
		{name: "HTML over JSON", accept: "application/json;q=0.5, text/html", want: true},
		{name: "tie goes to JSON", accept: "text/html, application/json", want: false},
		{name: "HTML refused", accept: "text/html;q=0", want: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := prefersHTML(tt.accept); got != tt.want {
				t.Errorf("prefersHTML(%q): got %v, want %v", tt.accept, got, tt.want)
			}
		})
	}
}

func TestParseReplaySrc(t *testing.T) {
	tests := []struct {
		name   string
		header string
		want   *replayInfo
	}{
		{name: "absent", header: "", want: nil},
		{name: "blank", header: "  ", want: nil},
		{name: "as the edge writes it", header: "instance=fra-1;region=fra;t=1700000000000000;state=pgfly_read_only",
			want: &replayInfo{From: "fra", State: "pgfly_read_only", Instance: "fra-1"}},
		{name: "quoted state", header: `region=fra;state="a;\"b\""`, want: &replayInfo{From: "fra", State: `a;"b"`}},
		{name: "no region", header: "instance=x", want: &replayInfo{From: "another region", Instance: "x"}},
		{name: "unreadable", header: `region=fra;state="x`, want: &replayInfo{From: "another region"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := parseReplaySrc(tt.header)
			if (got == nil) != (tt.want == nil) || (got != nil && *got != *tt.want) {
				t.Errorf("parseReplaySrc(%q): got %+v, want %+v", tt.header, got, tt.want)
			}
		})
	}
}
