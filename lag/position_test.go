package lag_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/pgfly/pgfly/lag"
)

func TestPositionText(t *testing.T) {
	for _, tc := range []struct {
		text string
		want lag.Position
	}{
		{"16/B374D848@2:7299913487211118352", lag.Position{LSN: 0x16B374D848, Timeline: 2, SystemID: 7299913487211118352}},
		{"0/1@1", lag.Position{LSN: 1, Timeline: 1}},
		{"0/1", lag.Position{LSN: 1}}, // an older pgfly's bookmark: timeline unknown
	} {
		got, err := lag.ParsePosition(tc.text)
		if err != nil || got != tc.want {
			t.Errorf("ParsePosition(%q): got %+v, %v; want %+v", tc.text, got, err, tc.want)
		}
		if s := got.String(); s != tc.text {
			t.Errorf("String of %+v: got %q, want %q", got, s, tc.text)
		}
	}
	for _, bad := range []string{"0/1@", "0/1@0", "0/1@x", "0/1@1:", "0/1@1:0", "0/1@1:-3", "0/1@4294967296", "@1:2", "0/1@1:2:3"} {
		if p, err := lag.ParsePosition(bad); err == nil {
			t.Errorf("ParsePosition(%q): got %+v, want an error", bad, p)
		}
	}
}

func TestPositionsCompareOnOneHistory(t *testing.T) {
	m := startMonitor(t, lag.Config{Upstream: monitorURL(cluster.Replica), Primary: monitorURL(cluster.Primary)})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pos, err := m.PrimaryPosition(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st := m.Status()
	if pos.Timeline == 0 || pos.Timeline != st.Timeline || pos.SystemID == 0 || pos.SystemID != st.SystemID {
		t.Fatalf("the primary's position %+v, the replica's timeline %d of system %d: want one history, known", pos, st.Timeline, st.SystemID)
	}
	if err := m.WaitForPosition(ctx, pos); err != nil {
		t.Fatalf("WaitForPosition of the primary's position on its own replica: %v", err)
	}
	for _, other := range []lag.Position{
		{LSN: 1, Timeline: pos.Timeline + 1, SystemID: pos.SystemID}, // long replayed, but on a timeline the replica is not on
		{LSN: 1, Timeline: pos.Timeline, SystemID: pos.SystemID + 1},
		{LSN: 1}, // unknown timeline
	} {
		start := time.Now()
		if err := m.WaitForPosition(ctx, other); !errors.Is(err, lag.ErrOtherHistory) {
			t.Errorf("WaitForPosition(%v): got %v, want ErrOtherHistory", other, err)
		}
		if waited := time.Since(start); waited > 5*time.Second {
			t.Errorf("WaitForPosition(%v) took %v, want an answer without waiting", other, waited)
		}
	}
}
