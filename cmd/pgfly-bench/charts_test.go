package main

import (
	"encoding/xml"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// handMadeCharts are figures of the shape the sections hand over, made up.
func handMadeCharts() charts {
	var c charts
	for _, w := range []struct {
		workload string
		clients  int
	}{{"-S -M prepared", 1}, {"-S -M simple", 16}, {"-N -M prepared", 16}} {
		c.relay = append(c.relay,
			relayPoint{w.workload, w.clients, "direct", 20000, math.NaN()},
			relayPoint{w.workload, w.clients, "pgfly", 15000, 44},
			relayPoint{w.workload, w.clients, "PgBouncer (session)", 16000, 29},
			relayPoint{w.workload, w.clients, "bare Go TCP relay", 15500, 41},
		)
	}
	c.seed = []seedPoint{
		{true, setupPgfly, 83.8, 86.3}, {true, setupRouted, 327.1, 329.5}, {true, setupPrimary, 83.0, 86.2},
		{false, "local read, no pgfly", 1.09, 3.84}, {false, setupPgfly, 1.44, 2.41}, {false, setupPrimary, 82.6, 85.2},
	}
	c.mixed = []mixedPoint{{"on", 0, 3.0 / 80}, {"off", 43.0 / 720, 1}}
	return c
}

// TestChartsWrite draws hand-made figures and checks that each chart is a well-formed SVG
// document that names what it shows; a section that handed over nothing gets no chart.
func TestChartsWrite(t *testing.T) {
	full := handMadeCharts()
	tests := []struct {
		name   string
		charts charts
		want   map[string][]string // file: texts it must contain
	}{
		{
			name:   "every section",
			charts: full,
			want: map[string][]string{
				chartRelayTPS:  {"direct", "pgfly", "PgBouncer (session)", "bare Go TCP relay", "transactions per second", "-S -M prepared", "1 client", "16 clients"},
				chartRelayCost: {"pgfly", "PgBouncer (session)", "bare Go TCP relay", "CPU µs per transaction", "44"},
				chartSeed:      {"p50", "p99", "pgfly", "DB-level", "local read, no", "write requests", "read requests", "ms", "327.1"},
				chartMixed:     {"learned write routes on", "learned write routes off", "% of requests", "6.0%", "100.0%"},
			},
		},
		{
			name:   "only the mixed load",
			charts: charts{mixed: full.mixed},
			want:   map[string][]string{chartMixed: {"learned write routes on", "learned write routes off"}},
		},
		{
			name: "nothing measured",
			want: map[string][]string{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			written, err := tt.charts.write(dir)
			if err != nil {
				t.Fatalf("write: %v", err)
			}
			var got, want []string
			for _, w := range written {
				got = append(got, filepath.Base(w))
			}
			for f := range tt.want {
				want = append(want, f)
			}
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Fatalf("got charts %v, want %v", got, want)
			}
			entries, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			if len(entries) != len(want) {
				t.Errorf("got %d files in the directory, want %d", len(entries), len(want))
			}
			for file, texts := range tt.want {
				root, text := readSVG(t, filepath.Join(dir, file))
				if root != "svg" {
					t.Errorf("%s: got root element <%s>, want <svg>", file, root)
				}
				for _, s := range texts {
					if !strings.Contains(text, s) {
						t.Errorf("%s: no %q in its text:\n%s", file, s, text)
					}
				}
			}
		})
	}
}

// readSVG parses an XML document and returns its root element's name and the text of its
// <text> elements, a line each.
func readSVG(t testing.TB, path string) (root, text string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d := xml.NewDecoder(f)
	var texts []string
	inText := false
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s is not well-formed XML: %v", path, err)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			if root == "" {
				root = tok.Name.Local
			}
			inText = tok.Name.Local == "text"
		case xml.EndElement:
			inText = false
		case xml.CharData:
			if inText {
				texts = append(texts, string(tok))
			}
		}
	}
	return root, strings.Join(texts, "\n")
}
