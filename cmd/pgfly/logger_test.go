package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestRepeatedWarningsAreSampled(t *testing.T) {
	var buf bytes.Buffer
	log, err := newLogger("info", &buf)
	if err != nil {
		t.Fatal(err)
	}
	const storm = 1000
	for range storm {
		log.Warn("upstream unreachable")
	}
	for range 3 {
		log.Info("session opened") // records are never sampled
	}
	log.Warn("another warning")
	log.Error("an error")

	var warned, opened, other, errs int
	var reported int64
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var e map[string]any
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if n, ok := e["sampled_away"].(float64); ok {
			reported += int64(n)
		}
		switch e["msg"] {
		case "upstream unreachable":
			warned++
		case "session opened":
			opened++
		case "another warning":
			other++
		case "an error":
			errs++
		}
	}
	// Within one second: the first warnFirst lines, then one in warnThereafter (the storm may
	// straddle a second, which lets through up to warnFirst more).
	if warned < warnFirst || warned > 2*warnFirst+storm/warnThereafter {
		t.Errorf("%d of %d repeated warnings written, want about %d", warned, storm, warnFirst+storm/warnThereafter)
	}
	if opened != 3 || other != 1 || errs != 1 {
		t.Errorf("got %d info, %d other warning and %d error lines, want 3, 1 and 1: only repeats are sampled", opened, other, errs)
	}
	if reported != int64(storm-warned) {
		t.Errorf("sampled_away adds up to %d, want the %d dropped", reported, storm-warned)
	}
}
