package router

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/lag"
)

// Bookmark defaults.
const (
	DefaultConsistencyWait = 500 * time.Millisecond
	// BookmarkCookie holds the primary's WAL position after the client's last write, with
	// its timeline and system identifier (lag.Position).
	BookmarkCookie = "pgfly_lsn"
	// BookmarkMaxAge is how long a bookmark matters: replicas are far less behind than this.
	BookmarkMaxAge = 5 * time.Minute
)

// Wait is one bookmark wait: the request's path (never the bookmark itself), how long it
// waited, and how it ended.
type Wait struct {
	Path    string
	Waited  time.Duration
	Outcome WaitOutcome
}

// WaitOutcome is how a bookmark wait ended.
type WaitOutcome string

// Wait outcomes.
const (
	WaitCaughtUp    WaitOutcome = "caught_up"   // the replica replayed the bookmark: served here
	WaitTimeout     WaitOutcome = "timeout"     // ConsistencyWait passed: replayed
	WaitUnreachable WaitOutcome = "unreachable" // the monitor knew it would not be reached in time: replayed at once
	// WaitOtherHistory: the bookmark is of another timeline or system than the replica's (a
	// failover), or of an unknown one, so its LSN cannot be compared: replayed at once, and
	// the primary region's answer brings a fresh bookmark.
	WaitOtherHistory WaitOutcome = "other_history"
	WaitCancelled    WaitOutcome = "cancelled" // the client went away
)

// bookmark returns the WAL position a request must see, when this shim honours bookmarks and
// the request carries a valid one. The caller has checked that this is a replica region.
func (s *Shim) bookmark(req *request) (lag.Position, bool) {
	if s.cfg.Consistency != ConsistencySession || s.cfg.Replica == nil {
		return lag.Position{}, false
	}
	if !hasBookmark(req.in.Header) {
		return lag.Position{}, false
	}
	c, err := req.in.Cookie(BookmarkCookie)
	if err != nil {
		return lag.Position{}, false
	}
	pos, err := lag.ParsePosition(c.Value)
	if err != nil {
		if ce := s.log.Check(zap.DebugLevel, "malformed bookmark ignored"); ce != nil {
			ce.Write(zap.String("path", req.path))
		}
		return lag.Position{}, false
	}
	return pos, true
}

// hasBookmark reports whether a Cookie header may hold the bookmark. Most requests carry
// cookies and few a bookmark: looking for its name first spares parsing every cookie.
func hasBookmark(h http.Header) bool {
	return slices.ContainsFunc(h["Cookie"], func(line string) bool { return strings.Contains(line, BookmarkCookie) })
}

// waitFor waits, up to ConsistencyWait, for the replica to replay pos.
func (s *Shim) waitFor(ctx context.Context, req *request, pos lag.Position) WaitOutcome {
	start := time.Now()
	wctx, cancel := context.WithTimeout(ctx, s.cfg.ConsistencyWait)
	defer cancel()
	err := s.cfg.Replica.WaitForPosition(wctx, pos)
	waited := time.Since(start)
	outcome := WaitCaughtUp
	switch {
	case err == nil:
	case ctx.Err() != nil:
		outcome = WaitCancelled
	case errors.Is(err, lag.ErrOtherHistory):
		outcome = WaitOtherHistory
	case errors.Is(err, lag.ErrUnreachable):
		outcome = WaitUnreachable
	default:
		outcome = WaitTimeout
	}
	if s.cfg.ObserveWait != nil {
		s.cfg.ObserveWait(Wait{Path: req.path, Waited: waited, Outcome: outcome})
	}
	// Check first: a debug line's fields, passed to Debug, are built even when it is off.
	if ce := s.log.Check(zap.DebugLevel, "bookmark wait"); ce != nil {
		ce.Write(zap.String("path", req.path), // never the cookie's contents
			zap.Duration("waited", waited), zap.String("outcome", string(outcome)))
	}
	return outcome
}

// setBookmark gives the client the primary's WAL position after its write, so that its next
// request, wherever it lands, sees that write.
func (s *Shim) setBookmark(resp *http.Response, req *request) {
	ctx, cancel := context.WithTimeout(resp.Request.Context(), time.Second)
	defer cancel()
	pos, err := s.cfg.Replica.PrimaryPosition(ctx)
	if err != nil {
		s.log.Warn("no bookmark: cannot read the primary's WAL position", zap.String("path", req.path), zap.Error(err))
		return
	}
	c := http.Cookie{
		Name:     BookmarkCookie,
		Value:    pos.String(),
		Path:     "/",
		MaxAge:   int(BookmarkMaxAge / time.Second),
		HttpOnly: true,
		SameSite: http.SameSiteLaxMode,
		Secure:   req.secure,
	}
	resp.Header.Add("Set-Cookie", c.String())
}

// wantsBookmark: in the primary region, a request replayed here or one that may have written.
func (s *Shim) wantsBookmark(req *request) bool {
	return s.cfg.Consistency == ConsistencySession && s.cfg.Replica != nil && s.primary() &&
		(req.replayed || req.method != http.MethodGet && req.method != http.MethodHead)
}
