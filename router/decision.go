package router

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/flyreplay"
)

// Reason says why a request is sent to the primary region. It is written into fly-replay's
// state (pgfly_<reason>), the logs and the metrics.
type Reason string

// Replay reasons.
const (
	ReasonReadOnly Reason = "read_only" // the replica refused one of its statements
	ReasonLag      Reason = "lag"       // the replica does not reach the client's bookmark in time
	ReasonRoute    Reason = "route"     // a learned or configured write route, sent before the app ran it
	// ReasonReplicaDown: pgfly could not reach the nearby database, or lost it, while the
	// request ran, or the monitor saw it down before the request was run.
	ReasonReplicaDown Reason = "replica_down"
)

// Match says how a refusal was matched to a request.
type Match string

// Matches.
const (
	MatchPrecise Match = "precise" // by the trace id the refused statement carried
	MatchOverlap Match = "overlap" // by being in flight at the time
)

// Outcome is what became of a request or a refusal.
type Outcome string

// Outcomes.
const (
	OutcomeReplayed    Outcome = "replayed"     // sent to the primary region
	OutcomeNotReplayed Outcome = "not_replayed" // proxy mode: the primary region could not be reached
	OutcomeLoopBlocked Outcome = "loop_blocked" // it was a pgfly replay already
	OutcomeTooLarge    Outcome = "too_large"    // proxy mode: its body, already read by the app, is over the limit
	OutcomeStarted     Outcome = "started"      // its response had started: too late
	OutcomeNoRequest   Outcome = "no_request"   // a refusal with no HTTP request in flight
	OutcomePrimary     Outcome = "primary"      // a read-only refusal in the primary region
)

// Decision is what the shim did about one request or refusal, for metrics and for whoever
// shows what happened (the demo's transcript). Its first four fields are the metrics' labels;
// the rest say which request and refusal it was about.
type Decision struct {
	Outcome Outcome
	Reason  Reason
	Match   Match  // "" when no refusal was matched
	Route   string // "learned" or "configured" for ReasonRoute, else ""

	Method, Path string // the request's; "" when the decision is about no one request
	RouteKey     string // the route, e.g. "POST /items", for ReasonRoute
	// Code and Message are the standby refusal's SQLSTATE and text, for ReasonReadOnly (and
	// for ReasonReplicaDown, the failure's when it had one).
	Code, Message string
}

// cause is why a request is to be sent to the primary region.
type cause struct {
	reason Reason
	match  Match
	v      *Violation // the refusal, for ReasonReadOnly
	route  string     // "learned" or "configured", for ReasonRoute
}

// upFront: the app has not run the request, so its body has not been read.
func (c cause) upFront() bool { return c.v == nil }

// errTainted makes the app proxy drop a tainted request's response and hand it to appFailed.
var errTainted = errors.New("tainted by a standby refusal")

// replay is the one place that sends a request to the primary region, or says why it cannot:
// before the app ran it, or in place of the app's answer to a tainted request. Nothing reaches
// w before it.
func (s *Shim) replay(w http.ResponseWriter, req *request, c cause) {
	d := Decision{Reason: c.reason, Match: c.match, Route: c.route, Method: req.method, Path: req.path}
	fields := []zap.Field{zap.String("method", req.method), zap.String("path", req.path),
		zap.String("region", s.cfg.Region), zap.String("target_region", s.cfg.PrimaryRegion),
		zap.String("reason", string(c.reason)), zap.String("mode", string(s.cfg.Mode))}
	if c.v != nil {
		d.Code, d.Message = c.v.Code, c.v.Message
		fields = append(fields, zap.Uint64("session", c.v.SessionID), zap.String("sqlstate", c.v.Code), zap.String("match", string(c.match)))
		if status := req.status(); status != 0 {
			fields = append(fields, zap.Int("app_status", status))
		}
	}
	if c.route != "" {
		d.RouteKey = req.key
		fields = append(fields, zap.String("route", req.key), zap.String("route_source", c.route))
	}
	log := s.log.With(fields...)
	defer func() { s.observe(d) }()
	switch {
	case req.replayed:
		d.Outcome = OutcomeLoopBlocked
		log.Error("replayed request hit a read-only database again: not replaying twice", zap.Duration("duration", time.Since(req.start)))
		http.Error(w, "pgfly: this request was already replayed to the primary region and still hit a read-only database; not replaying it again",
			http.StatusServiceUnavailable)
	case s.cfg.Mode == ModeFly:
		d.Outcome = OutcomeReplayed
		log.Info("replaying in the primary region", zap.Duration("duration", time.Since(req.start)))
		w.Header().Set(flyreplay.Header, flyreplay.Replay{Region: []string{s.cfg.PrimaryRegion}, State: state(c.reason)}.String())
		w.Header().Set("Cache-Control", "no-store")
		http.Error(w, fmt.Sprintf("pgfly: retry in region %s: %s", s.cfg.PrimaryRegion, why(c.reason)), http.StatusConflict)
	case req.bodyTooLarge && !c.upFront():
		d.Outcome = OutcomeTooLarge
		log.Error("cannot replay: request body over the replay limit", zap.Int64("limit", s.cfg.MaxReplayBody))
		w.Header().Set("Cache-Control", "no-store")
		http.Error(w, fmt.Sprintf("pgfly: this request must go to region %s and its body is over the %d-byte replay limit (--max-replay-body)",
			s.cfg.PrimaryRegion, s.cfg.MaxReplayBody), http.StatusServiceUnavailable)
	default:
		start := time.Now()
		var failed replayFailure
		ctx := context.WithValue(context.WithValue(req.in.Context(), reasonKey{}, c.reason), failureKey{}, &failed)
		out := req.in.WithContext(ctx)
		if !req.bodyTooLarge { // a streamed body is still unread: only an up-front replay gets here with one
			out.Body, out.ContentLength = io.NopCloser(bytes.NewReader(req.body)), int64(len(req.body))
			if len(req.body) == 0 {
				out.Body = http.NoBody
			}
		}
		s.primaryProxy.ServeHTTP(w, out)
		if failed.err != nil {
			d.Outcome = OutcomeNotReplayed
			log.Error("replay to the primary region failed", zap.Error(failed.err), zap.Duration("duration", time.Since(req.start)))
			return
		}
		d.Outcome = OutcomeReplayed
		log.Info("replayed in the primary region", zap.Duration("replay_duration", time.Since(start)), zap.Duration("duration", time.Since(req.start)))
	}
}

// why is the body's explanation of a replay.
func why(r Reason) string {
	switch r {
	case ReasonLag:
		return "the database here has not caught up with your last write"
	case ReasonRoute:
		return "this route writes, and the database here is a read-only replica"
	case ReasonReplicaDown:
		return "the database here cannot be reached"
	default:
		return "the database here refused a write"
	}
}

type reasonKey struct{}

type failureKey struct{}

// replayFailure carries a proxy-mode replay's error out of the primary proxy's error handler.
type replayFailure struct{ err error }

// modifyResponse hands a tainted request's response to appFailed, which replays it; any other
// response goes to the client, with a bookmark where one is due.
func (s *Shim) modifyResponse(resp *http.Response) error {
	req := requestOf(resp.Request)
	if req == nil {
		return nil
	}
	v, _ := req.begin(resp.StatusCode)
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return nil
	}
	if v != nil {
		return errTainted // ReverseProxy closes the app's body and calls appFailed
	}
	s.servedHere.Add(1)
	if s.wantsBookmark(req) {
		s.setBookmark(resp, req)
	}
	return nil
}

// appFailed answers a request whose app response will not be sent: one whose body did not
// arrive in time gets 408; a tainted one is replayed, whatever the app did (answered, failed
// or timed out); one the app did not answer within AppTimeout gets 504; otherwise the app could
// not be reached.
func (s *Shim) appFailed(w http.ResponseWriter, r *http.Request, err error) {
	req := requestOf(r)
	if req != nil {
		late := req.bodyLate()
		if errors.Is(err, context.Canceled) || late {
			req.clientGone()
		}
		v, match := req.begin(0)
		switch {
		case late: // the app never had the whole request: nothing to replay
			s.bodyTimedOut(w, req)
			return
		case v != nil:
			reason := ReasonReadOnly
			if v.Down {
				reason = ReasonReplicaDown
			}
			s.replay(w, req, cause{reason: reason, match: match, v: v})
			return
		}
	}
	if errors.Is(err, context.Canceled) {
		return // the client went away
	}
	if appTimedOut(err) {
		s.appTooSlow(w, r)
		return
	}
	s.log.Warn("app unreachable", zap.String("app", s.cfg.App.String()), zap.String("method", r.Method),
		zap.String("path", r.URL.Path), zap.Error(err))
	http.Error(w, "pgfly: the app did not answer: "+err.Error(), http.StatusBadGateway)
}

// rewriteToPrimary points a request at the primary region's pgfly, marked as Fly marks a replay.
func (s *Shim) rewriteToPrimary(pr *httputil.ProxyRequest) {
	pr.SetURL(s.cfg.PrimaryHTTP)
	pr.Out.Host = pr.In.Host
	keepForwarded(pr)
	reason, _ := pr.In.Context().Value(reasonKey{}).(Reason)
	pr.Out.Header.Set(flyreplay.SrcHeader, s.replaySrc(reason))
}

// primaryFailed answers a proxy-mode replay that could not reach the primary region.
func (s *Shim) primaryFailed(w http.ResponseWriter, r *http.Request, err error) {
	if f, ok := r.Context().Value(failureKey{}).(*replayFailure); ok {
		f.err = err
	}
	if errors.Is(err, context.Canceled) {
		return // the client went away
	}
	w.Header().Set("Cache-Control", "no-store")
	http.Error(w, fmt.Sprintf("pgfly: could not replay this request in the primary region (%s)", s.cfg.PrimaryRegion), http.StatusBadGateway)
}

func (s *Shim) replaySrc(reason Reason) string {
	instance := s.cfg.Instance
	if instance == "" {
		instance = "pgfly"
	}
	return flyreplay.Src{Instance: instance, Region: s.cfg.Region, Time: time.Now(), State: state(reason)}.String()
}

// state is the fly-replay state pgfly writes for a reason: pgfly_<reason>.
func state(reason Reason) string { return StatePrefix + "_" + string(reason) }

// bufferBody keeps up to MaxReplayBody bytes of the body so the request can be sent again;
// a larger body is streamed to wherever the request goes first, and cannot be sent twice.
func (s *Shim) bufferBody(r *http.Request, req *request) error {
	limit := s.cfg.MaxReplayBody
	if r.ContentLength > limit {
		req.bodyTooLarge = true
		return nil
	}
	buf, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return err
	}
	if int64(len(buf)) > limit {
		req.bodyTooLarge = true
		r.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(buf), r.Body), r.Body}
		return nil
	}
	req.body = buf
	r.Body = io.NopCloser(bytes.NewReader(buf))
	return nil
}
