package router

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Timeout defaults for Config.
const (
	// DefaultIdleTimeout is how long a keep-alive connection may wait for its next request. It
	// is longer than the 90 s idle pools of Go's http.Transport and of hyper's client, on which
	// reverse proxies are commonly built, so that the proxy in front closes an idle connection
	// first and does not send a request on one the shim is closing.
	DefaultIdleTimeout = 120 * time.Second
	// DefaultBodyTimeout is how long a whole request body may take to arrive.
	DefaultBodyTimeout = 60 * time.Second
	// DefaultAppTimeout is how long the app may take to start its answer: generous, since a
	// slow report is an app's business; a hung app is not.
	DefaultAppTimeout = 60 * time.Second
	// NoTimeout, as Config.IdleTimeout, BodyTimeout or AppTimeout, disables that timeout.
	NoTimeout time.Duration = -1

	// readHeaderTimeout bounds the arrival of a request's headers.
	readHeaderTimeout = 30 * time.Second
)

// Timeout names a timeout that answered a request, for metrics.
type Timeout string

// Timeouts that answer requests.
const (
	TimeoutBody Timeout = "body" // the request body did not arrive in time: 408
	TimeoutApp  Timeout = "app"  // the app did not start its answer in time: 504
)

// timeouts are Config's timeouts resolved: 0 is none.
type timeouts struct {
	idle, body, app time.Duration
}

func resolveTimeouts(cfg Config) timeouts {
	resolve := func(d, def time.Duration) time.Duration {
		switch {
		case d == 0:
			return def
		case d < 0:
			return 0
		}
		return d
	}
	return timeouts{
		idle: resolve(cfg.IdleTimeout, DefaultIdleTimeout),
		body: resolve(cfg.BodyTimeout, DefaultBodyTimeout),
		app:  resolve(cfg.AppTimeout, DefaultAppTimeout),
	}
}

// limitBody gives the request's whole body until BodyTimeout from now to arrive, however
// steadily it trickles in: a read deadline on the client's connection, lifted as soon as the
// body has been read to its end, so that the response (server-sent events, a long download)
// is not bounded by it. A body still arriving at the deadline fails its read, the app's copy
// of the request is cut short (the app's own body read fails: it never sees a complete
// request), and appFailed answers 408.
// The caller calls the returned served once its handler is returning: the Transport may still
// be reading the body then (an app that answered before reading it all), and a
// ResponseController must not be used after ServeHTTP has returned.
func (s *Shim) limitBody(w http.ResponseWriter, r *http.Request, req *request) (served func()) {
	rc := http.NewResponseController(w)
	deadline := time.Now().Add(s.timeouts.body)
	if err := rc.SetReadDeadline(deadline); err != nil {
		return func() {} // not a connection of net/http's own server: nothing to bound
	}
	req.bodyDeadline = deadline
	b := &deadlineBody{ReadCloser: r.Body, rc: rc, req: req}
	r.Body = b
	return func() {
		b.mu.Lock()
		b.served = true
		b.mu.Unlock()
	}
}

// deadlineBody records that the body has been read to its end, after which a timeout is not
// the body's, and lifts the connection's read deadline: from then on, reading the connection
// only watches for the client hanging up, and must not time out. (net/http's server clears the
// deadline too when it starts that watch, but does not promise to.) Only one goroutine reads
// it at a time: the Transport's, or bufferBody.
type deadlineBody struct {
	io.ReadCloser
	rc  *http.ResponseController
	req *request

	mu     sync.Mutex
	served bool // the handler has returned: rc is not to be used any more
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.req.bodyDone.Load() {
		b.req.bodyDone.Store(true)
		b.mu.Lock()
		if !b.served {
			b.rc.SetReadDeadline(time.Time{})
		}
		b.mu.Unlock()
	}
	return n, err
}

// bodyLate reports a body with a deadline that had not arrived in full by then.
func (r *request) bodyLate() bool {
	return !r.bodyDeadline.IsZero() && !r.bodyDone.Load() && !time.Now().Before(r.bodyDeadline)
}

// bodyTimedOut answers 408 to a request whose body did not arrive in time, and closes the
// connection, on which the rest of the body may still be coming.
func (s *Shim) bodyTimedOut(w http.ResponseWriter, req *request) {
	s.log.Info("request body not received in time: answered 408", zap.String("method", req.method), zap.String("path", req.path),
		zap.Duration("body_timeout", s.timeouts.body), zap.Duration("duration", time.Since(req.start)))
	s.observeTimeout(TimeoutBody)
	w.Header().Set("Connection", "close")
	http.Error(w, fmt.Sprintf("pgfly: the request body did not arrive within %v (--http-body-timeout)", s.timeouts.body),
		http.StatusRequestTimeout)
}

// appTimedOut reports the Transport's response-header timeout: a deadline error that is not a
// network operation's, as a dial timeout is.
func appTimedOut(err error) bool {
	var op *net.OpError
	return errors.Is(err, context.DeadlineExceeded) && !errors.As(err, &op)
}

// appTooSlow answers 504 to a request whose app did not start its answer within AppTimeout.
// The Transport has closed its connection to the app, which sees its request cancelled.
func (s *Shim) appTooSlow(w http.ResponseWriter, r *http.Request) {
	s.log.Warn("app did not answer in time: answered 504", zap.String("app", s.cfg.App.String()), zap.String("method", r.Method),
		zap.String("path", r.URL.Path), zap.Duration("app_timeout", s.timeouts.app))
	s.observeTimeout(TimeoutApp)
	http.Error(w, fmt.Sprintf("pgfly: the app at %s did not start its answer within %v (--app-timeout)", s.cfg.App, s.timeouts.app),
		http.StatusGatewayTimeout)
}

func (s *Shim) observeTimeout(t Timeout) {
	if s.cfg.ObserveTimeout != nil {
		s.cfg.ObserveTimeout(t)
	}
}
