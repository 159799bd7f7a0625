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
	const storm = 1000 // then warnFirst+warnThereafter more, of which some are written
	for range storm {
		log.Warn("upstream unreachable")
	}
	log.Warn("another warning") // counts nothing: its own message was never dropped
	for range warnFirst + warnThereafter {
		log.Warn("upstream unreachable") // the next written one of these carries the count
	}
	for range 3 {
		log.Info("session opened") // records are never sampled
	}
	log.Warn("another warning")
	log.Error("an error")

	var warned, opened, other, errs int
	var reported, reportedOther int64
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var e map[string]any
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if n, ok := e["sampled_away"].(float64); ok {
			if e["msg"] == "upstream unreachable" {
				reported += int64(n)
			} else {
				reportedOther += int64(n)
			}
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
	const total = storm + warnFirst + warnThereafter
	if warned < warnFirst || warned > 2*warnFirst+total/warnThereafter+1 {
		t.Errorf("%d of %d repeated warnings written, want about %d", warned, total, warnFirst+total/warnThereafter)
	}
	if opened != 3 || other != 2 || errs != 1 {
		t.Errorf("got %d info, %d other warning and %d error lines, want 3, 2 and 1: only repeats are sampled", opened, other, errs)
	}
	// Every drop is reported on a later written line of its message, but for those after
	// the last one written (fewer than warnThereafter).
	if dropped := int64(total - warned); reported > dropped || reported <= dropped-warnThereafter {
		t.Errorf("sampled_away adds up to %d, want the %d dropped but for fewer than %d at the end", reported, dropped, warnThereafter)
	}
	if reportedOther != 0 {
		t.Errorf("another message's line carries sampled_away %d, want the count only on lines of the dropped message", reportedOther)
	}
}
