package router

import (
	"fmt"
	"testing"
)

func TestRouteKey(t *testing.T) {
	for _, tc := range []struct {
		name, method, path, want string
	}{
		{"fixed path", "GET", "/items", "GET /items"},
		{"root", "GET", "/", "GET /"},
		{"integer id", "POST", "/posts/42/copy", "POST /posts/*/copy"},
		{"uuid", "DELETE", "/posts/3f2504e0-4f89-11d3-9a0c-0305e82c3301", "DELETE /posts/*"},
		{"long hex", "GET", "/blobs/9f86d081884c7d659a2feaa0c55ad015", "GET /blobs/*"},
		{"base64url token", "POST", "/invites/aZ3kQ9xP_2mLw7Rt", "POST /invites/*"},
		{"two ids", "PATCH", "/orgs/7/members/1234", "PATCH /orgs/*/members/*"},
		{"a name is not an id", "POST", "/users/alice/follow", "POST /users/alice/follow"},
		{"a slug with digits is not an id", "GET", "/posts/top-10-posts-of-2024", "GET /posts/top-10-posts-of-2024"},
		{"a short hex word is not an id", "GET", "/cafe", "GET /cafe"},
		{"a long word without digits is not an id", "GET", "/internationalization", "GET /internationalization"},
		{"trailing slash kept", "GET", "/items/", "GET /items/"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := routeKey(tc.method, tc.path)
			if !ok || got != tc.want {
				t.Errorf("routeKey(%q, %q) = %q, %v; want %q", tc.method, tc.path, got, ok, tc.want)
			}
		})
	}
	if _, ok := routeKey("GET", "/"+string(make([]byte, maxKeyLen))); ok {
		t.Errorf("got a key for a path over %d bytes, want none", maxKeyLen)
	}
	// GET /routes offers learned keys as a --replay-routes value: a path that would not read
	// back as the same pattern gets no key (and is never learned).
	for _, path := range []string{"/tags/a,b/follow", "/files/**/x", "/files/*", "/a b/c"} {
		if key, ok := routeKey("POST", path); ok {
			t.Errorf("routeKey(POST, %q) = %q, want none", path, key)
		}
	}
}

// An ordinary request to a route the table knows pays for no key of its own.
func TestKnownRouteKeyAllocatesNothing(t *testing.T) {
	s := &Shim{routes: newRoutes(DefaultMaxRoutes)}
	key := s.routeKey("GET", "/items/42")
	s.routes.admit(key)
	if got := s.routeKey("GET", "/items/7"); got != "GET /items/*" {
		t.Fatalf("routeKey: got %q, want %q", got, "GET /items/*")
	}
	if n := testing.AllocsPerRun(100, func() { s.routeKey("GET", "/items/7") }); n != 0 {
		t.Errorf("got %v allocations for a known route's key, want 0", n)
	}
}

func TestRoutePatterns(t *testing.T) {
	ps, err := ParseRoutePatterns("POST /posts/*/copy, * /admin/**, GET /exact, DELETE /**")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := ps.String(), "POST /posts/*/copy,* /admin/**,GET /exact,DELETE /**"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	for _, tc := range []struct {
		method, path string
		want         bool
	}{
		{"POST", "/posts/1/copy", true},
		{"POST", "/posts/1/copy/more", false},
		{"GET", "/posts/1/copy", false},
		{"POST", "/posts/copy", false},
		{"PUT", "/admin", true},
		{"GET", "/admin/users/1", true},
		{"GET", "/administrator", false},
		{"GET", "/exact", true},
		{"GET", "/exact/", false},
		{"DELETE", "/anything/at/all", true},
		{"DELETE", "/", true},
	} {
		if got := ps.Match(tc.method, tc.path); got != tc.want {
			t.Errorf("Match(%q, %q) = %v, want %v", tc.method, tc.path, got, tc.want)
		}
	}
	for _, bad := range []string{"/no-method", "POST", "POST no-slash", "post /lower", "GET /a/**/b"} {
		if _, err := ParseRoutePatterns(bad); err == nil {
			t.Errorf("ParseRoutePatterns(%q): got no error, want one", bad)
		}
	}
	if ps, err := ParseRoutePatterns(" "); err != nil || len(ps) != 0 {
		t.Errorf("ParseRoutePatterns(blank) = %v, %v; want an empty list", ps, err)
	}
}

func TestLearningRule(t *testing.T) {
	const key = "GET /touch"
	t.Run("a route refused every time is learned after LearnRefusals runs", func(t *testing.T) {
		rt := newRoutes(DefaultMaxRoutes)
		for i := 1; i <= LearnRefusals; i++ {
			if up, _ := rt.admit(key); up {
				t.Fatalf("request %d went up front before the route was learned", i)
			}
			changed, learned := rt.record(key, false, true)
			if want := i == LearnRefusals; changed != want || learned != want {
				t.Fatalf("after %d refusals: changed %v learned %v, want %v", i, changed, learned, want)
			}
		}
	})
	t.Run("a route that writes one time in four is never learned", func(t *testing.T) {
		rt := newRoutes(DefaultMaxRoutes)
		for i := range 400 {
			rt.admit(key)
			if _, learned := rt.record(key, false, i%4 == 0); learned {
				t.Fatalf("learned after %d requests, want never", i+1)
			}
		}
	})
	t.Run("probes are one in ProbeEvery, and clean probes unlearn", func(t *testing.T) {
		rt := newRoutes(DefaultMaxRoutes)
		for range LearnRefusals {
			rt.admit(key)
			rt.record(key, false, true)
		}
		local := 0
		for i := range 10 * ProbeEvery {
			up, probe := rt.admit(key)
			if up == probe {
				t.Fatalf("request %d: up front %v, probe %v; want exactly one", i, up, probe)
			}
			if probe {
				local++
				rt.record(key, true, true) // still writes
			}
		}
		if local != 10 {
			t.Errorf("got %d probes in %d requests, want 10", local, 10*ProbeEvery)
		}
		probes := 0
		for probes < UnlearnProbes {
			if _, probe := rt.admit(key); probe {
				probes++
				changed, learned := rt.record(key, true, false)
				if want := probes == UnlearnProbes; changed != want || learned == want {
					t.Fatalf("clean probe %d: changed %v learned %v", probes, changed, learned)
				}
			}
		}
		if up, probe := rt.admit(key); up || probe {
			t.Errorf("after %d clean probes: up front %v probe %v, want local service", UnlearnProbes, up, probe)
		}
	})
	t.Run("the table is bounded and forgets the least recently used", func(t *testing.T) {
		rt := newRoutes(16)
		for range LearnRefusals {
			rt.admit(key)
			rt.record(key, false, true)
		}
		for i := range 15 {
			rt.admit(fmt.Sprintf("GET /other/%c", 'a'+i))
		}
		rt.admit(key) // keep it recent
		for i := range 1000 {
			rt.admit(fmt.Sprintf("GET /flood/x%d", i))
		}
		learned, tracked := rt.learned()
		if tracked != 16 {
			t.Errorf("tracking %d keys, want the bound of 16", tracked)
		}
		if len(learned) != 1 || learned[0].Route != key {
			t.Errorf("got learned %v after a flood of other paths, want %s kept", learned, key)
		}
		// When every key is learned, the least recently used learned one goes: still bounded.
		for i := range 40 {
			k := fmt.Sprintf("POST /learned/x%d", i)
			for range LearnRefusals {
				rt.admit(k)
				rt.record(k, false, true)
			}
		}
		if learned, tracked := rt.learned(); tracked != 16 || len(learned) != 16 {
			t.Errorf("after learning 40 more routes: %d keys tracked, %d learned, want the bound of 16", tracked, len(learned))
		}
	})
}
