package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// report is the markdown the command prints, and the targets it checked.
type report struct {
	b       strings.Builder
	targets []target
}

// target is one goal from the issue, checked against a figure measured in this run.
type target struct {
	section string
	goal    string
	met     bool
	figure  string
}

func (r *report) printf(format string, args ...any) { fmt.Fprintf(&r.b, format, args...) }

// table writes a markdown table.
func (r *report) table(header []string, rows [][]string) {
	r.printf("| %s |\n|", strings.Join(header, " | "))
	for range header {
		r.printf("---|")
	}
	r.printf("\n")
	for _, row := range rows {
		r.printf("| %s |\n", strings.Join(row, " | "))
	}
	r.printf("\n")
}

// check records a target and prints it as a list item.
func (r *report) check(section, goal string, met bool, figure string) {
	r.targets = append(r.targets, target{section, goal, met, figure})
	r.printf("- Target: %s: **%s** (%s)\n", goal, metWord(met), figure)
}

func metWord(met bool) string {
	if met {
		return "met"
	}
	return "missed"
}

// summary writes every target checked, in one table.
func (r *report) summary() {
	r.printf("## Targets\n\n")
	rows := make([][]string, 0, len(r.targets))
	for _, t := range r.targets {
		rows = append(rows, []string{t.section, t.goal, metWord(t.met), t.figure})
	}
	r.table([]string{"section", "target", "result", "figure"}, rows)
}

// median returns the median of xs (the mean of the middle two for an even count), NaN for
// none.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// percentile returns the nearest-rank p-th percentile (0 < p <= 100) of sorted xs, NaN for
// none.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// durations turns durations into sorted microseconds.
func durations(ds []time.Duration) []float64 {
	xs := make([]float64, len(ds))
	for i, d := range ds {
		xs[i] = float64(d) / float64(time.Microsecond)
	}
	slices.Sort(xs)
	return xs
}

func mean(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	var s float64
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

// Number formats for the tables; NaN prints as "n/a".
func f0(x float64) string { return format("%.0f", x) }
func f1(x float64) string { return format("%.1f", x) }
func f2(x float64) string { return format("%.2f", x) }
func f3(x float64) string { return format("%.3f", x) }

func format(f string, x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "n/a"
	}
	return fmt.Sprintf(f, x)
}

// ratio formats a/b as "0.93×".
func ratio(a, b float64) string {
	if b == 0 {
		return "n/a"
	}
	return format("%.2f×", a/b)
}

// ms formats microseconds as milliseconds.
func ms(us float64) string { return format("%.2f", us/1000) }

func sortFloats(xs []float64) { slices.Sort(xs) }
