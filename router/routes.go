package router

import (
	"container/list"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// Learning defaults. A route key is learned as a write route once at least LearnRefusals of
// its last LearnWindow local runs were refused with evidence naming it, and those refusals are
// at least half of the runs in the window. A learned route is replayed up front; one request
// in ProbeEvery is served locally instead (a probe), and UnlearnProbes clean probes in a row
// bring the route back to local service.
const (
	DefaultMaxRoutes = 1024
	LearnWindow      = 8
	LearnRefusals    = 3
	ProbeEvery       = 25
	UnlearnProbes    = 2
	maxKeyLen        = 256
)

// routeKey is a request's method and path with the segments that look like ids replaced by
// "*", e.g. "POST /posts/*/copy": the form RoutePatterns accepts, so that an operator can copy
// a learned key into --replay-routes. ok is false for a path too long to be worth a key.
func routeKey(method, path string) (key string, ok bool) {
	var buf [maxKeyLen]byte
	b, ok := appendRouteKey(buf[:0], method, path)
	return string(b), ok
}

// appendRouteKey appends the route key of method and path to b, which it returns; ok is false,
// and b unchanged, when they have none (see routeKey). Keys are at most maxKeyLen bytes.
func appendRouteKey(b []byte, method, path string) (_ []byte, ok bool) {
	if len(method)+1+len(path) > maxKeyLen {
		return b, false
	}
	if strings.ContainsAny(path, ", \t\n\r") {
		return b, false // not expressible as a --replay-routes pattern
	}
	start := len(b)
	b = append(b, method...)
	b = append(b, ' ')
	first := true
	for seg := range strings.SplitSeq(path, "/") {
		if !first {
			b = append(b, '/')
		}
		first = false
		if seg == "*" || seg == "**" {
			return b[:start], false // would read as a wildcard in a pattern
		}
		if looksLikeID(seg) {
			b = append(b, '*')
		} else {
			b = append(b, seg...)
		}
	}
	return b, true
}

// looksLikeID reports whether a path segment is an identifier rather than a fixed part of a
// route: an integer, a UUID, a hex string of 16 or more characters, or a token of 16 or more
// base64url characters with a digit and a letter and few dashes (a slug of words such as
// "top-10-posts-of-2024" has a dash every few characters; a random token rarely does).
func looksLikeID(seg string) bool {
	if seg == "" {
		return false
	}
	digits, letters, dashes, hex := 0, 0, 0, true
	for i := 0; i < len(seg); i++ {
		switch c := seg[i]; {
		case '0' <= c && c <= '9':
			digits++
		case 'a' <= c && c <= 'f', 'A' <= c && c <= 'F':
			letters++
		case 'g' <= c && c <= 'z', 'G' <= c && c <= 'Z', c == '_', c == '=':
			letters++
			hex = false
		case c == '-':
			dashes++
			hex = false
		default:
			return false
		}
	}
	switch {
	case digits == len(seg), isUUID(seg):
		return true
	case len(seg) < 16 || digits == 0:
		return false
	case hex:
		return true
	default:
		return letters > 0 && dashes*8 <= len(seg)
	}
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
				return false
			}
		}
	}
	return true
}

// RoutePatterns is a list of route patterns, as --replay-routes and --local-routes take them:
// comma-separated "METHOD /path", where "*" stands for one path segment, a trailing "/**" for
// the rest of the path (none included), and a method of "*" for any method.
type RoutePatterns []routePattern

type routePattern struct {
	text   string
	method string // "*" for any
	segs   []string
	rest   bool // a trailing /**
}

// ParseRoutePatterns reads a comma-separated list of route patterns; "" is an empty list.
func ParseRoutePatterns(s string) (RoutePatterns, error) {
	var ps RoutePatterns
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		method, path, ok := strings.Cut(item, " ")
		path = strings.TrimSpace(path)
		if !ok || method == "" || !strings.HasPrefix(path, "/") {
			return nil, fmt.Errorf("route pattern %q: want METHOD /path, e.g. POST /posts/*", item)
		}
		if method != "*" && strings.ToUpper(method) != method {
			return nil, fmt.Errorf("route pattern %q: the method must be upper case or *", item)
		}
		p := routePattern{text: method + " " + path, method: method}
		if path == "/**" {
			p.rest, path = true, ""
		} else if rest, found := strings.CutSuffix(path, "/**"); found {
			p.rest, path = true, rest
		}
		if path != "" {
			p.segs = strings.Split(path, "/")[1:]
		}
		if slices.Contains(p.segs, "**") {
			return nil, fmt.Errorf("route pattern %q: ** may only end a pattern", item)
		}
		ps = append(ps, p)
	}
	return ps, nil
}

// String is the list in the form ParseRoutePatterns reads.
func (ps RoutePatterns) String() string {
	texts := make([]string, len(ps))
	for i, p := range ps {
		texts[i] = p.text
	}
	return strings.Join(texts, ",")
}

// Match reports whether any pattern matches the request's method and path.
func (ps RoutePatterns) Match(method, path string) bool { return ps.index(method, path) >= 0 }

// index is the position of the first pattern that matches, or -1.
func (ps RoutePatterns) index(method, path string) int {
	for i, p := range ps {
		if p.match(method, path) {
			return i
		}
	}
	return -1
}

func (p routePattern) match(method, path string) bool {
	if p.method != "*" && p.method != method {
		return false
	}
	if !strings.HasPrefix(path, "/") {
		return false
	}
	rest := path[1:]
	if len(p.segs) == 0 {
		return p.rest || rest == ""
	}
	for i, want := range p.segs {
		seg, after, more := strings.Cut(rest, "/")
		if want != "*" && want != seg {
			return false
		}
		last := i == len(p.segs)-1
		switch {
		case last && p.rest:
			return true // /** matches the rest, none included
		case last:
			return !more
		case !more:
			return false
		}
		rest = after
	}
	return false
}

// routes is the table of learned write routes: bounded, least recently used evicted.
type routes struct {
	max int

	mu    sync.Mutex
	byKey map[string]*list.Element // of *route
	lru   list.List                // front: most recently used
}

// route is what the table knows of one route key.
type route struct {
	key        string
	window     uint8 // the last runs' outcomes, newest in bit 0: 1 refused
	runs       int   // runs in window, at most LearnWindow
	learned    bool
	sinceProbe int // up-front replays since the last probe
	clean      int // clean probes in a row

	// Totals for GET /routes.
	requests, refused, upFront, probes uint64
}

func newRoutes(max int) *routes {
	return &routes{max: max, byKey: make(map[string]*list.Element)}
}

// get returns the key's route, making it the most recently used; create adds it when missing.
// It holds t.mu.
func (t *routes) get(key string, create bool) *route {
	if e, ok := t.byKey[key]; ok {
		t.lru.MoveToFront(e)
		return e.Value.(*route)
	}
	if !create {
		return nil
	}
	if t.lru.Len() >= t.max {
		t.evict()
	}
	r := &route{key: key}
	t.byKey[key] = t.lru.PushFront(r)
	return r
}

// evict forgets the least recently used key that is not a learned route, so that ordinary
// traffic to many paths does not push learned routes out; when every key is learned, the
// least recently used one goes.
func (t *routes) evict() {
	victim := t.lru.Back()
	for e := victim; e != nil; e = e.Prev() {
		if !e.Value.(*route).learned {
			victim = e
			break
		}
	}
	delete(t.byKey, victim.Value.(*route).key)
	t.lru.Remove(victim)
}

// intern returns key as a string: the table's own copy when it knows the route, so that the
// requests to a known route allocate no key of their own.
func (t *routes) intern(key []byte) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e, ok := t.byKey[string(key)]; ok {
		return e.Value.(*route).key
	}
	return string(key)
}

// admit decides, for a request to key in a replica region, whether it goes to the primary
// region up front (the route is learned and this is not a probe), and whether it is a probe.
func (t *routes) admit(key string) (upFront, probe bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r := t.get(key, true)
	r.requests++
	if !r.learned {
		return false, false
	}
	if r.sinceProbe+1 >= ProbeEvery {
		r.sinceProbe = 0
		r.probes++
		return false, true
	}
	r.sinceProbe++
	r.upFront++
	return true, false
}

// record notes the outcome of a request to key that the app ran in this region: refused with
// evidence naming it, or clean. It returns true when this outcome changed whether the route is
// learned, and the new state.
func (t *routes) record(key string, probe, refused bool) (changed, learned bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r := t.get(key, true)
	r.window <<= 1
	if refused {
		r.window |= 1
		r.refused++
	}
	r.runs = min(r.runs+1, LearnWindow)
	if r.learned {
		if !probe {
			return false, true
		}
		if refused {
			r.clean = 0
			return false, true
		}
		r.clean++
		if r.clean < UnlearnProbes {
			return false, true
		}
		r.learned, r.clean, r.window, r.runs = false, 0, 0, 0
		return true, false
	}
	n := refusals(r.window)
	if n >= LearnRefusals && 2*n >= r.runs {
		r.learned, r.sinceProbe, r.clean = true, 0, 0
		return true, true
	}
	return false, false
}

func refusals(window uint8) int {
	n := 0
	for w := window; w != 0; w &= w - 1 {
		n++
	}
	return n
}

// RouteStats is one route key as GET /routes shows it.
type RouteStats struct {
	Route    string `json:"route"`
	Learned  bool   `json:"learned"`
	Requests uint64 `json:"requests"`
	Refused  uint64 `json:"refused"`
	UpFront  uint64 `json:"replayed_up_front"`
	Probes   uint64 `json:"probes"`
}

// RoutesReport is the body of GET /routes: the learned routes with their counts, the
// configured patterns, and ReplayRoutes, a value --replay-routes accepts that keeps the
// configured routes and makes the learned ones permanent.
type RoutesReport struct {
	Learned      []RouteStats   `json:"learned"`
	Tracked      int            `json:"tracked"` // route keys remembered, learned or not
	Configured   []PatternStats `json:"configured_replay_routes"`
	Local        []PatternStats `json:"local_routes"`
	ReplayRoutes string         `json:"replay_routes"`
}

// PatternStats is one pattern of --replay-routes or --local-routes and the requests it matched
// (in a replica region; the primary region matches nothing).
type PatternStats struct {
	Pattern  string `json:"pattern"`
	Requests uint64 `json:"requests"`
}

// patternCounts counts the requests each pattern of a list matched.
type patternCounts struct {
	ps   RoutePatterns
	hits []atomic.Uint64
}

func newPatternCounts(ps RoutePatterns) *patternCounts {
	return &patternCounts{ps: ps, hits: make([]atomic.Uint64, len(ps))}
}

// match reports whether a pattern matches, and counts it.
func (c *patternCounts) match(method, path string) bool {
	i := c.ps.index(method, path)
	if i < 0 {
		return false
	}
	c.hits[i].Add(1)
	return true
}

// stats returns the patterns and their counts, never nil, for JSON.
func (c *patternCounts) stats() []PatternStats {
	out := make([]PatternStats, 0, len(c.ps))
	for i, p := range c.ps {
		out = append(out, PatternStats{Pattern: p.text, Requests: c.hits[i].Load()})
	}
	return out
}

func (t *routes) learned() (learned []RouteStats, tracked int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for e := t.lru.Front(); e != nil; e = e.Next() {
		r := e.Value.(*route)
		if r.learned {
			learned = append(learned, RouteStats{Route: r.key, Learned: true, Requests: r.requests,
				Refused: r.refused, UpFront: r.upFront, Probes: r.probes})
		}
	}
	slices.SortFunc(learned, func(a, b RouteStats) int { return strings.Compare(a.Route, b.Route) })
	return learned, t.lru.Len()
}
