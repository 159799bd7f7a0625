package lag

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestCheckPrimaries plays polls of the upstream and the primary, each sent
// and finished at given milliseconds, and checks the two-primaries verdict
// after each.
func TestCheckPrimaries(t *testing.T) {
	t0 := time.Now()
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	var (
		old      = identity{systemID: 7, timeline: 1, started: at(-5000)}
		promoted = identity{systemID: 7, timeline: 2, started: at(-4000)}
		other    = identity{systemID: 8, timeline: 1, started: at(-3000)}
		restart  = identity{systemID: 7, timeline: 1, started: at(-10)}   // old, restarted
		twin     = identity{systemID: 7, timeline: 2, started: at(-2000)} // promoted apart from promoted, same timeline
	)
	type poll struct {
		primary    bool // of the primary; else of the upstream
		sent, done int
		role       Role
		id         identity
		down       bool
		wantTwo    bool
		wantReason string // what the reason must say, when wantTwo
	}
	for _, tt := range []struct {
		name  string
		polls []poll
	}{
		{"a promoted replica beside its primary counts once fresh polls of both confirm it", []poll{
			{primary: true, sent: 0, done: 1, role: RolePrimary, id: old},
			{sent: 2, done: 3, role: RolePrimary, id: promoted},           // seen at 3
			{sent: 4, done: 5, role: RolePrimary, id: promoted},           // the upstream confirms
			{primary: true, sent: 2, done: 6, role: RolePrimary, id: old}, // in flight when seen: no proof
			{primary: true, sent: 7, done: 8, role: RolePrimary, id: old, wantTwo: true, wantReason: "timelines 2 and 1"},
		}},
		{"another system counts", []poll{
			{sent: 0, done: 1, role: RolePrimary, id: promoted},
			{primary: true, sent: 0, done: 2, role: RolePrimary, id: other},
			{sent: 3, done: 4, role: RolePrimary, id: promoted},
			{primary: true, sent: 5, done: 6, role: RolePrimary, id: other, wantTwo: true, wantReason: "different systems"},
		}},
		{"two servers promoted apart on one timeline count", []poll{
			{sent: 0, done: 1, role: RolePrimary, id: promoted},
			{primary: true, sent: 0, done: 2, role: RolePrimary, id: twin},
			{sent: 3, done: 4, role: RolePrimary, id: promoted},
			{primary: true, sent: 5, done: 6, role: RolePrimary, id: twin, wantTwo: true, wantReason: "different servers"},
		}},
		{"one server by two addresses never counts", []poll{
			{sent: 0, done: 1, role: RolePrimary, id: old},
			{primary: true, sent: 0, done: 2, role: RolePrimary, id: old},
			{sent: 3, done: 4, role: RolePrimary, id: old},
			{primary: true, sent: 5, done: 6, role: RolePrimary, id: old},
		}},
		{"two polls straddling a restart of one server do not count", []poll{
			{primary: true, sent: 0, done: 1, role: RolePrimary, id: old},
			{sent: 2, done: 3, role: RolePrimary, id: restart}, // seen at 3
			{primary: true, sent: 4, done: 5, role: RolePrimary, id: restart},
			{sent: 6, done: 7, role: RolePrimary, id: restart},
		}},
		{"the verdict holds while a server is down and ends with a demoted primary", []poll{
			{sent: 0, done: 1, role: RolePrimary, id: promoted},
			{primary: true, sent: 0, done: 2, role: RolePrimary, id: old},
			{sent: 3, done: 4, role: RolePrimary, id: promoted},
			{primary: true, sent: 5, done: 6, role: RolePrimary, id: old, wantTwo: true},
			{primary: true, sent: 7, done: 8, down: true, wantTwo: true},
			{sent: 9, done: 10, down: true, wantTwo: true},
			{sent: 11, done: 12, role: RolePrimary, id: promoted, wantTwo: true},
			{primary: true, sent: 13, done: 14, role: RolePrimary, id: old, wantTwo: true},
			{primary: true, sent: 15, done: 16, role: RoleReplica, id: old},
		}},
		{"the verdict ends with an upstream in recovery", []poll{
			{sent: 0, done: 1, role: RolePrimary, id: promoted},
			{primary: true, sent: 0, done: 2, role: RolePrimary, id: old},
			{sent: 3, done: 4, role: RolePrimary, id: promoted},
			{primary: true, sent: 5, done: 6, role: RolePrimary, id: old, wantTwo: true},
			{sent: 7, done: 8, role: RoleReplica, id: promoted},
		}},
		{"a primary in recovery never counts", []poll{
			{sent: 0, done: 1, role: RolePrimary, id: promoted},
			{primary: true, sent: 0, done: 2, role: RoleReplica, id: old},
			{sent: 3, done: 4, role: RolePrimary, id: promoted},
			{primary: true, sent: 5, done: 6, role: RoleReplica, id: old},
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m, err := New(Config{Upstream: "postgres://u@127.0.0.1:1/db", Primary: "postgres://u@127.0.0.1:2/db"}, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			for i, p := range tt.polls {
				s := serverState{polled: true, startedAt: at(p.sent), checkedAt: at(p.done), role: p.role, id: p.id}
				if p.down {
					s.err, s.role = errors.New("down"), RoleUnknown
				}
				if p.primary {
					m.pri = s
				} else {
					m.up = s
				}
				m.checkPrimaries(s.checkedAt)
				st := m.snapshot()
				if st.TwoPrimaries != p.wantTwo || st.TwoPrimaries != (st.TwoPrimariesReason != "") {
					t.Fatalf("after poll %d (%+v): got TwoPrimaries %v (%q), want %v", i, p, st.TwoPrimaries, st.TwoPrimariesReason, p.wantTwo)
				}
				if p.wantTwo && !strings.Contains(st.TwoPrimariesReason, p.wantReason) {
					t.Errorf("after poll %d: reason %q lacks %q", i, st.TwoPrimariesReason, p.wantReason)
				}
			}
		})
	}
}
