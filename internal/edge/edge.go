// Package edge is a local stand-in for Fly's edge proxy, for development, the
// demo and tests. It is not a product and not a model of Fly's proxy: it
// imitates only what pgfly relies on. Each request goes to one region of a
// fixed set (the default, or the one a fly-prefer-region or fly-force-region
// request header names); when a region's response carries a fly-replay
// header, the edge drops that response and sends the same request to the
// region it names, with a fly-replay-src header, as Fly's proxy does.
//
// What it does not do: instances, apps, elsewhere=, fallback=, timeout=, the
// JSON replay form, load balancing, TLS termination, health checks. It adds
// an X-Edge-Trail response header listing the regions a request ran in,
// which Fly's proxy does not. It must never face untrusted clients: it
// trusts every header it is sent, except fly-replay-src, which it removes
// from client requests because it sets that header itself.
package edge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/flyreplay"
)

// DefaultMaxHops is the number of replays the edge follows for one request
// when Config.MaxHops is zero. Fly documents no limit; the stand-in has one
// so that a replay loop ends with 508 instead of running forever.
const DefaultMaxHops = 3

// DefaultMaxReplayBody is the largest request body, in bytes, the edge keeps
// so that it can send the request again, when Config.MaxReplayBody is zero.
// It is Fly's limit: requests with bodies over 1 MB cannot be replayed.
const DefaultMaxReplayBody int64 = 1 << 20

// DefaultListen is the address Listen binds when Config.Listen is empty.
const DefaultListen = "127.0.0.1:0"

// TrailHeader is the response header in which the edge lists the regions a
// request ran in, in order, separated by ">", e.g. "fra>iad".
const TrailHeader = "X-Edge-Trail"

// Header names of Fly's proxy protocol.
const (
	replayHeader       = flyreplay.Header
	replaySrcHeader    = flyreplay.SrcHeader
	preferRegionHeader = "Fly-Prefer-Region"
	forceRegionHeader  = "Fly-Force-Region"
)

// discardLimit bounds how much of a replayed response's body the edge reads
// so that its connection can be reused; a longer body closes the connection.
const discardLimit = 64 << 10

// ErrClosed is returned by Listen after Close.
var ErrClosed = errors.New("edge: closed")

// Config configures an Edge.
type Config struct {
	// Listen is the address Listen binds, e.g. "127.0.0.1:0"; empty means
	// DefaultListen.
	Listen string
	// Regions maps a region name to the base URL of that region's instance
	// (the pgfly shim), e.g. "fra" -> "http://127.0.0.1:8081".
	Regions map[string]string
	// Default is the region requests go to unless a header says otherwise.
	Default string
	// MaxHops is the number of replays followed per request; zero means
	// DefaultMaxHops.
	MaxHops int
	// MaxReplayBody is the largest request body, in bytes, that can be
	// replayed; zero means DefaultMaxReplayBody. A larger body is streamed
	// to the first region and a replay of it is answered with 502.
	MaxReplayBody int64
	// OnHop, when set, is told every hop as it returns, before its response goes on. It must
	// be quick.
	OnHop func(Hop)
}

// Hop is one request the edge sent to a region: the first, or a replay.
type Hop struct {
	Method, Path string
	N            int    // 0 for the first hop, 1 for the first replay, ...
	From         string // the region that asked for this replay; "" for the first hop
	To           string
	State        string // the fly-replay state From gave
	Status       int    // 0 when Err is set
	Replay       string // the response's fly-replay header, "" when it was the answer
	Err          error
	Duration     time.Duration
}

// fields are the hop's log fields.
func (h Hop) fields() []zap.Field {
	f := []zap.Field{zap.String("method", h.Method), zap.String("path", h.Path), zap.Int("hop", h.N),
		zap.String("from", h.From), zap.String("to", h.To), zap.String("state", h.State)}
	if h.Err != nil {
		return append(f, zap.Duration("duration", h.Duration), zap.Error(h.Err))
	}
	return append(f, zap.Int("status", h.Status), zap.String("replay", h.Replay), zap.Duration("duration", h.Duration))
}

// hopped logs a hop and hands it to OnHop.
func (e *Edge) hopped(h Hop) {
	e.log.Info("hop", h.fields()...)
	if e.cfg.OnHop != nil {
		e.cfg.OnHop(h)
	}
}

// Edge is the stand-in proxy. Its lifecycle is New, Listen, Serve, Close;
// Handler serves without a listener of its own (e.g. under httptest).
type Edge struct {
	cfg       Config
	log       *zap.Logger
	regions   map[string]*url.URL
	names     []string // sorted region names, for messages
	transport *http.Transport
	handler   *httputil.ReverseProxy
	srv       *http.Server

	mu     sync.Mutex
	ln     net.Listener
	closed bool
}

// New validates cfg and returns an Edge that is not yet listening. Every
// region needs a non-empty name without spaces or any of `,;=">` and an
// absolute http or https URL; Default must be one of them.
func New(cfg Config, log *zap.Logger) (*Edge, error) {
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("edge")
	if len(cfg.Regions) == 0 {
		return nil, errors.New("edge: no regions configured")
	}
	regions := make(map[string]*url.URL, len(cfg.Regions))
	names := make([]string, 0, len(cfg.Regions))
	for name, raw := range cfg.Regions {
		if name == "" || strings.ContainsAny(name, " \t,;=\">") {
			return nil, fmt.Errorf("edge: invalid region name %q: want a non-empty name without spaces or any of ,;=\">", name)
		}
		u, err := url.Parse(raw)
		if err != nil {
			return nil, fmt.Errorf("edge: region %s: parse URL: %w", name, err)
		}
		if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("edge: region %s: URL %q: want an absolute http:// or https:// URL", name, raw)
		}
		regions[name] = u
		names = append(names, name)
	}
	slices.Sort(names)
	if cfg.Default == "" {
		return nil, errors.New("edge: no default region configured")
	}
	if _, ok := regions[cfg.Default]; !ok {
		return nil, fmt.Errorf("edge: default region %q is not one of the regions (%s)", cfg.Default, strings.Join(names, ", "))
	}
	switch {
	case cfg.MaxHops < 0:
		return nil, fmt.Errorf("edge: MaxHops %d: want zero (the default) or more", cfg.MaxHops)
	case cfg.MaxHops == 0:
		cfg.MaxHops = DefaultMaxHops
	}
	switch {
	case cfg.MaxReplayBody < 0:
		return nil, fmt.Errorf("edge: MaxReplayBody %d: want zero (the default) or more", cfg.MaxReplayBody)
	case cfg.MaxReplayBody == 0:
		cfg.MaxReplayBody = DefaultMaxReplayBody
	}
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}

	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.Proxy = nil // regions are local instances, never behind a proxy

	e := &Edge{
		cfg:       cfg,
		log:       log,
		regions:   regions,
		names:     names,
		transport: transport,
	}
	e.handler = &httputil.ReverseProxy{
		Rewrite:       e.rewrite,
		Transport:     &replayTransport{e: e},
		FlushInterval: -1,
		ErrorHandler:  e.serveError,
		ErrorLog:      zap.NewStdLog(log),
	}
	e.srv = &http.Server{
		Handler:           e.handler,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          zap.NewStdLog(log),
	}
	return e, nil
}

// Handler returns the proxy as an http.Handler.
func (e *Edge) Handler() http.Handler { return e.handler }

// Listen binds Config.Listen.
func (e *Edge) Listen() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return ErrClosed
	}
	if e.ln != nil {
		return errors.New("edge: already listening")
	}
	ln, err := net.Listen("tcp", e.cfg.Listen)
	if err != nil {
		return fmt.Errorf("edge: listen %s: %w", e.cfg.Listen, err)
	}
	e.ln = ln
	e.log.Info("listening", zap.String("addr", ln.Addr().String()),
		zap.String("default", e.cfg.Default), zap.Strings("regions", e.names))
	return nil
}

// Addr returns the bound address, or nil before Listen.
func (e *Edge) Addr() net.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ln == nil {
		return nil
	}
	return e.ln.Addr()
}

// Serve serves HTTP on the listener bound by Listen until Close, and then
// returns nil.
func (e *Edge) Serve() error {
	e.mu.Lock()
	ln, closed := e.ln, e.closed
	e.mu.Unlock()
	if closed {
		return nil
	}
	if ln == nil {
		return errors.New("edge: Serve called before Listen")
	}
	if err := e.srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("edge: serve: %w", err)
	}
	return nil
}

// Close stops the listener and closes every connection at once (hijacked
// connections, e.g. WebSockets, end when either side closes them). It is
// idempotent and returns the first error.
func (e *Edge) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil
	}
	e.closed = true
	err := e.srv.Close()
	if e.ln != nil {
		if cerr := e.ln.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) && err == nil {
			err = cerr
		}
	}
	e.transport.CloseIdleConnections()
	if err != nil {
		return fmt.Errorf("edge: close: %w", err)
	}
	return nil
}

// routeKey is the context key under which rewrite leaves a *route for the
// transport.
type routeKey struct{}

// route is what the transport needs to know about the client's request.
type route struct {
	region string   // first region to try; may be unknown (fly-force-region)
	path   *url.URL // the client's request URL: path and query
}

// rewrite picks the first region and leaves it, with the client's URL, in
// the outgoing request's context; the transport sets the URL per hop.
func (e *Edge) rewrite(pr *httputil.ProxyRequest) {
	region := e.cfg.Default
	if r := strings.TrimSpace(pr.In.Header.Get(preferRegionHeader)); r != "" {
		if _, ok := e.regions[r]; ok {
			region = r
		}
	}
	if r := strings.TrimSpace(pr.In.Header.Get(forceRegionHeader)); r != "" {
		region = r
	}
	pr.SetXForwarded()
	pr.Out.Header.Del(replaySrcHeader)
	in := *pr.In.URL
	pr.Out = pr.Out.WithContext(context.WithValue(pr.Out.Context(), routeKey{}, &route{region: region, path: &in}))
}

// hopError is a failure the edge answers itself, with the trail so far.
type hopError struct {
	status int
	msg    string
	trail  []string
}

func (e *hopError) Error() string { return e.msg }

// serveError is the ReverseProxy's ErrorHandler.
func (e *Edge) serveError(w http.ResponseWriter, r *http.Request, err error) {
	var he *hopError
	if !errors.As(err, &he) {
		he = &hopError{status: http.StatusBadGateway, msg: "edge: " + err.Error()}
	}
	if len(he.trail) > 0 {
		w.Header().Set(TrailHeader, strings.Join(he.trail, ">"))
	}
	e.log.Warn("request failed", zap.String("method", r.Method), zap.String("path", r.URL.Path),
		zap.Int("status", he.status), zap.Strings("trail", he.trail), zap.String("error", he.msg))
	http.Error(w, he.msg, he.status)
}

// replayTransport sends a request to its region and follows fly-replay.
type replayTransport struct{ e *Edge }

// RoundTrip sends req to the region rewrite chose and, while the response
// asks for a replay, to the region it names. It returns the first response
// without a fly-replay header, or a *hopError (502 for a fly-replay header
// that flyreplay.Parse rejects).
func (t *replayTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	e := t.e
	rt, _ := req.Context().Value(routeKey{}).(*route)
	if rt == nil {
		rt = &route{region: e.cfg.Default, path: req.URL}
	}
	body, err := readBody(req, e.cfg.MaxReplayBody)
	if err != nil {
		return nil, &hopError{status: http.StatusBadRequest, msg: "edge: read request body: " + err.Error()}
	}

	var (
		region = rt.region
		from   string
		state  string
		trail  []string
	)
	for replays := 0; ; replays++ {
		base, ok := e.regions[region]
		if !ok {
			body.close()
			msg := fmt.Sprintf("edge: unknown region %q (this edge knows %s)", region, strings.Join(e.names, ", "))
			if from != "" {
				msg = fmt.Sprintf("edge: region %s asked to replay the request in region %q, which this edge does not know (it knows %s)",
					from, region, strings.Join(e.names, ", "))
			}
			return nil, &hopError{status: http.StatusBadGateway, msg: msg, trail: trail}
		}
		trail = append(trail, region)

		hop := req.Clone(req.Context())
		hop.URL = new(url.URL)
		*hop.URL = *rt.path
		(&httputil.ProxyRequest{Out: hop}).SetURL(base)
		hop.Host = req.Host
		hop.Header.Del(replaySrcHeader)
		if from != "" {
			hop.Header.Set(replaySrcHeader, replaySrc(from, state, time.Now()))
		}
		body.attach(hop)

		start := time.Now()
		resp, err := e.transport.RoundTrip(hop)
		h := Hop{Method: req.Method, Path: rt.path.Path, N: replays, From: from, To: region, State: state,
			Err: err, Duration: time.Since(start)}
		if err != nil {
			e.hopped(h)
			return nil, &hopError{status: http.StatusBadGateway,
				msg: fmt.Sprintf("edge: region %s: %v", region, err), trail: trail}
		}
		replay := resp.Header.Get(replayHeader)
		resp.Header.Del(replayHeader)
		h.Status, h.Replay = resp.StatusCode, replay
		e.hopped(h)
		if replay == "" {
			resp.Header.Set(TrailHeader, strings.Join(trail, ">"))
			return resp, nil
		}
		discard(resp)

		to, err := flyreplay.Parse(replay)
		switch {
		case err != nil:
			body.close()
			return nil, &hopError{status: http.StatusBadGateway, trail: trail,
				msg: fmt.Sprintf("edge: region %s asked to replay the request with a fly-replay header the edge cannot read (fly-replay: %s): %v",
					region, replay, err)}
		case !body.replayable():
			return nil, &hopError{status: http.StatusBadGateway, trail: trail,
				msg: fmt.Sprintf("edge: region %s asked to replay the request (fly-replay: %s), but its body is over the replay limit of %d bytes",
					region, replay, e.cfg.MaxReplayBody)}
		case replays >= e.cfg.MaxHops:
			body.close()
			return nil, &hopError{status: http.StatusLoopDetected, trail: trail,
				msg: fmt.Sprintf("edge: loop detected: region %s asked for another replay (fly-replay: %s) after %d replays (%s); giving up",
					region, replay, replays, strings.Join(trail, ">"))}
		}
		from, region, state = region, e.pickRegion(to.Region), to.State
	}
}

// pickRegion returns the first known region of a fly-replay region list, or
// the whole list when none is known (so that the error names it).
func (e *Edge) pickRegion(list []string) string {
	for _, r := range list {
		if _, ok := e.regions[r]; ok {
			return r
		}
	}
	return strings.Join(list, ",")
}

// replaySrc formats the fly-replay-src header of a replayed request.
func replaySrc(from, state string, now time.Time) string {
	return flyreplay.Src{Instance: from + "-local", Region: from, Time: now, State: state}.String()
}

// discard reads a little of a response that is being replayed, so that its
// connection can be reused, and closes it.
func discard(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, discardLimit))
	_ = resp.Body.Close()
}

// requestBody is a request body as the transport sends it: either all of it
// in buf, or the first bytes in buf and the rest still in the client's
// stream (then it can be sent once only).
type requestBody struct {
	none     bool          // the request has no body
	streamed bool          // the body was over the limit: it can be sent once only
	buf      []byte        // the buffered bytes
	rest     io.ReadCloser // the client's body until it is handed to a hop
}

// readBody buffers req's body up to limit bytes; a longer body is left
// streaming.
func readBody(req *http.Request, limit int64) (*requestBody, error) {
	if req.Body == nil || req.Body == http.NoBody {
		return &requestBody{none: true}, nil
	}
	buf, err := io.ReadAll(io.LimitReader(req.Body, limit+1))
	if err != nil {
		_ = req.Body.Close()
		return nil, err
	}
	if int64(len(buf)) > limit {
		return &requestBody{streamed: true, buf: buf, rest: req.Body}, nil
	}
	_ = req.Body.Close()
	return &requestBody{buf: buf}, nil
}

func (b *requestBody) replayable() bool { return !b.streamed }

// close releases a streaming body that will not be sent.
func (b *requestBody) close() {
	if b.rest != nil {
		_ = b.rest.Close()
	}
}

// attach sets hop's body. A streamed body is handed over to the first hop;
// the caller never replays it (see replayable).
func (b *requestBody) attach(hop *http.Request) {
	switch {
	case b.none:
		hop.Body = nil
		hop.GetBody = nil
	case b.streamed:
		hop.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(b.buf), b.rest), b.rest}
		hop.GetBody = nil
		b.rest = nil // handed over: the transport closes it
	default:
		buf := b.buf
		hop.ContentLength = int64(len(buf))
		hop.TransferEncoding = nil
		hop.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf)), nil }
		hop.Body, _ = hop.GetBody()
		if len(buf) == 0 {
			hop.Body = http.NoBody
		}
	}
}
