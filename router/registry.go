package router

import (
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// request is one request through the shim.
type request struct {
	in           *http.Request // as received, with this request in its context
	method, path string
	url          *url.URL // as the client sent it
	key          string   // its route key, or "" when it has none
	start        time.Time
	traceID      string
	replayed     bool   // it came from a pgfly replay already: never replay it again
	upgrade      bool   // a protocol upgrade (WebSocket): never replayed
	secure       bool   // the client's request was HTTPS
	body         []byte // the buffered body, in ModeProxy
	bodyTooLarge bool   // the body exceeded MaxReplayBody and is streamed
	probe        bool   // a learned write route's request served locally to see if it still writes
	configured   bool   // it matched --local-routes or --replay-routes: not evidence for learning

	bodyDeadline time.Time   // when its whole body must have arrived; zero for none
	bodyDone     atomic.Bool // its body has been read to its end

	mu        sync.Mutex
	started   bool       // the response has been decided and may be on its way
	taint     *Violation // the first standby refusal that tainted it, if any
	match     Match
	named     bool // the refusal named this request: a precise match or the only candidate
	appFailed bool // the app answered a server error or did not answer
	appStatus int  // the app's status code, once it answered
	gone      bool // the client went away before the app answered
	wrote     bool // a write committed in this region while it ran: never replayed
	// down is the first upstream failure that tainted it: replayed only if the app failed
	// it, and never evidence about its route.
	down      *Violation
	downMatch Match
}

type ctxKey struct{}

// requestOf returns the shim's record of a request it is serving.
func requestOf(r *http.Request) *request {
	req, _ := r.Context().Value(ctxKey{}).(*request)
	return req
}

func (s *Shim) newRequest(r *http.Request) *request {
	return &request{
		method:   r.Method,
		path:     r.URL.Path,
		url:      r.URL,
		key:      s.routeKey(r.Method, r.URL.Path),
		start:    time.Now(),
		traceID:  traceIDOf(r.Header.Get(traceparentHeader)),
		replayed: replayedByPgfly(r.Header),
		upgrade:  r.Header.Get("Upgrade") != "",
		secure:   r.TLS != nil || r.Header.Get("Fly-Forwarded-Proto") == "https" || r.Header.Get("X-Forwarded-Proto") == "https",
	}
}

// routeKey is a request's route key, or "" when it has none; the route table's copy when it
// knows the route.
func (s *Shim) routeKey(method, path string) string {
	var buf [maxKeyLen]byte
	key, ok := appendRouteKey(buf[:0], method, path)
	switch {
	case !ok:
		return ""
	case s.routes != nil:
		return s.routes.intern(key)
	}
	return string(key)
}

// ServedHere is the number of requests the app in this region answered without a replay: the
// requests kept local.
func (s *Shim) ServedHere() uint64 { return s.servedHere.Load() }

// InFlight is the number of requests being served by the app.
func (s *Shim) InFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.inflight)
}

func (s *Shim) track(req *request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inflight[req] = struct{}{}
}

// untrack forgets a request the app has answered and tells the route table what it learned
// from it.
func (s *Shim) untrack(req *request) {
	s.mu.Lock()
	delete(s.inflight, req)
	s.mu.Unlock()
	if s.routes == nil || req.key == "" || req.configured || req.upgrade || req.replayed || s.primary() {
		return
	}
	req.mu.Lock()
	down := req.down != nil
	refused := req.taint != nil && (req.named || req.appFailed && !req.gone)
	clean := req.taint == nil
	req.mu.Unlock()
	if down {
		return // the database was unreachable: nothing learned about the route
	}
	if !refused && !clean {
		return // tainted among others and answered normally: no evidence either way
	}
	if changed, learned := s.routes.record(req.key, req.probe, refused); changed {
		if learned {
			s.log.Info("learned a write route: its requests now go to the primary region before the app runs them",
				zap.String("route", req.key), zap.String("region", s.cfg.Region), zap.Int("probe_every", ProbeEvery))
		} else {
			s.log.Info("a learned write route stopped writing: serving it locally again",
				zap.String("route", req.key), zap.String("region", s.cfg.Region))
		}
	}
}

// ReadOnly taints the requests a standby refusal may belong to. It is called by the relay
// before the error reaches the app, so the taint is in place before the app answers.
//
// The candidates are the requests in flight whose response has not started, without
// WebSockets and without those that started after the refused statement was sent. The one
// whose trace id the statement carried is tainted alone; else every candidate is.
func (s *Shim) ReadOnly(v Violation) {
	// Lazy: the common refusal, which taints requests, logs at debug only.
	log := s.log.WithLazy(zap.Uint64("session", v.SessionID), zap.String("sqlstate", v.Code), zap.String("error", v.Message))
	if s.primary() {
		if v.Code == codeReadOnly { // other codes on a primary are ordinary errors
			log.Error("read-only violation in the primary region: not replaying; is the primary read-only (disk full, default_transaction_read_only)?",
				zap.String("region", s.cfg.Region))
			s.observe(Decision{Outcome: OutcomePrimary, Reason: ReasonReadOnly, Code: v.Code, Message: v.Message})
		}
		return
	}
	candidates := s.candidates(v.SentAt)
	var precise *request
	matches := 0
	for _, r := range candidates {
		if v.TraceID != "" && r.traceID == v.TraceID {
			precise, matches = r, matches+1
		}
	}

	if matches == 1 {
		if !precise.taintWith(&v, MatchPrecise, true) {
			log.Warn("standby refusal matched a request whose response has started: cannot replay it",
				zap.String("method", precise.method), zap.String("path", precise.path), zap.String("trace_id", v.TraceID))
			s.observe(Decision{Outcome: OutcomeStarted, Reason: ReasonReadOnly, Match: MatchPrecise,
				Method: precise.method, Path: precise.path, Code: v.Code, Message: v.Message})
		}
		s.observeRefusal(1)
		return
	}
	tainted, started := 0, 0
	for _, r := range candidates {
		if r.taintWith(&v, MatchOverlap, len(candidates) == 1) {
			tainted++
		} else {
			started++
		}
	}
	s.observeRefusal(tainted)
	switch {
	case tainted > 0:
		if ce := log.Check(zap.DebugLevel, "standby refusal tainted requests"); ce != nil {
			ce.Write(zap.Int("requests", tainted), zap.Int("in_flight", len(candidates)))
		}
	case started > 0:
		log.Warn("standby refusal while only started responses are in flight: cannot replay them",
			zap.Int("started", started))
		s.observe(Decision{Outcome: OutcomeStarted, Reason: ReasonReadOnly, Match: MatchOverlap, Code: v.Code, Message: v.Message})
	default:
		log.Warn("standby refusal with no HTTP request in flight (a background job or console?): the error reaches its client as it is")
		s.observe(Decision{Outcome: OutcomeNoRequest, Reason: ReasonReadOnly, Code: v.Code, Message: v.Message})
	}
}

// candidates are the requests in flight that a database event at sentAt may belong to:
// all but WebSockets and those that started after it (none is excluded when sentAt is zero).
func (s *Shim) candidates(sentAt time.Time) []*request {
	s.mu.Lock()
	defer s.mu.Unlock()
	candidates := make([]*request, 0, len(s.inflight))
	for r := range s.inflight {
		if r.upgrade || !sentAt.IsZero() && r.start.After(sentAt) {
			continue
		}
		candidates = append(candidates, r)
	}
	return candidates
}

// UpstreamFailed taints the requests that may have used a session for which pgfly could not
// reach the nearby database, or lost it, so that they are replayed in the primary region
// (state pgfly_replica_down) if the app fails them: a replica outage costs a detour, not an
// error. The request whose trace id the session's statement in flight carried is tainted
// alone; else every candidate is, by overlap, as the failure may come before any statement.
// A tainted request that the app still answers with less than a server error keeps its
// answer, and none is evidence that a route writes. unsafe: the session may have written (a
// write committed, or a statement was cut off on a primary); then nothing is tainted and the
// requests in flight are never replayed, as after WriteCommitted.
func (s *Shim) UpstreamFailed(v Violation, unsafe bool) {
	if s.primary() {
		return // nowhere else to go
	}
	if unsafe {
		n := s.markWrote(v.Time)
		s.log.Error("lost a session that may have written in a replica region: the requests in flight are not replayed",
			zap.Uint64("session", v.SessionID), zap.String("error", v.Message), zap.Int("requests", n))
		return
	}
	v.Down = true
	candidates := s.candidates(v.SentAt)
	if v.TraceID != "" {
		var precise []*request
		for _, r := range candidates {
			if r.traceID == v.TraceID {
				precise = append(precise, r)
			}
		}
		if len(precise) == 1 {
			candidates = precise
		}
	}
	tainted, started := 0, 0
	for _, r := range candidates {
		if r.taintWith(&v, MatchOverlap, false) {
			tainted++
		} else {
			started++
		}
	}
	if ce := s.log.Check(zap.DebugLevel, "upstream failure tainted requests"); ce != nil {
		ce.Write(zap.Uint64("session", v.SessionID), zap.String("sqlstate", v.Code),
			zap.Int("requests", tainted), zap.Int("started", started))
	}
	if tainted == 0 && started > 0 {
		s.observe(Decision{Outcome: OutcomeStarted, Reason: ReasonReplicaDown, Match: MatchOverlap})
	}
}

// WriteCommitted makes the requests in flight that started before at unreplayable: in a
// replica region a write committed only because the upstream is a primary now (promoted, and
// perhaps not yet seen as two primaries), and a replay of the request that made it would write
// twice. The caller leaves out writes from an upstream it sees in recovery.
func (s *Shim) WriteCommitted(at time.Time) {
	if s.cfg.Region == s.cfg.PrimaryRegion {
		return // writes are the rule here, and nothing is replayed
	}
	n := s.markWrote(at)
	s.log.Warn("a write committed in a replica region: is the upstream a primary? The requests in flight will not be replayed",
		zap.String("region", s.cfg.Region), zap.Int("requests", n))
}

// markWrote makes the requests in flight that started before at unreplayable, and counts them.
func (s *Shim) markWrote(at time.Time) int {
	candidates := s.candidates(at)
	for _, r := range candidates {
		r.mu.Lock()
		r.wrote = true
		r.mu.Unlock()
	}
	return len(candidates)
}

func (s *Shim) observeRefusal(tainted int) {
	if s.cfg.ObserveRefusal != nil {
		s.cfg.ObserveRefusal(tainted)
	}
}

// taintWith marks the request for replay unless its response has started. The first
// violation wins; named records that the refusal named this request.
func (r *request) taintWith(v *Violation, match Match, named bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started {
		return false
	}
	switch {
	case v.Down:
		if r.down == nil {
			r.down, r.downMatch = v, match
		}
	case r.taint == nil:
		r.taint, r.match = v, match
	}
	r.named = r.named || named
	return true
}

// begin marks the response as decided and returns the violation that tainted it, if any.
// status is the app's status code, or 0 when the app did not answer; a server error or no
// answer counts as the app failing. It may be called more than once.
func (r *request) begin(status int) (*Violation, Match) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.started = true
	if status != 0 && r.appStatus == 0 {
		r.appStatus = status
	}
	r.appFailed = r.appFailed || r.appStatus == 0 || r.appStatus >= 500
	switch {
	case r.wrote:
		return nil, "" // its answer stands: a replay could write twice
	case r.taint != nil:
		return r.taint, r.match
	case r.down != nil && r.appFailed:
		return r.down, r.downMatch
	}
	return nil, "" // untainted, or the database went away but not from under this answer
}

// clientGone records that the client went away before the app answered: not the app failing,
// so no evidence about its route.
func (r *request) clientGone() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.gone = true
}

// status is the app's status code, or 0 when it has not answered.
func (r *request) status() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.appStatus
}
