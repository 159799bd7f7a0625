package wire

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
)

var (
	errTooManyFiles = syscall.EMFILE
	errShutdown     = errors.New("pgfly is shutting down")
	errFenced       = errors.New("pgfly fenced the upstream")
	errLinkDead     = errors.New("the upstream acknowledged nothing")
	errStopping     = errors.New("the session is stopping")
)

// session is one client connection and its upstream connection.
type session struct {
	srv      *Server
	info     SessionInfo
	client   net.Conn
	upstream net.Conn
	startup  []byte            // the client's StartupMessage, forwarded raw
	params   map[string]string // its parameters

	// upMu orders a forwarding session's change of upstream (swapUpstream) against stop and
	// the link watch, which act on the upstream from other goroutines.
	upMu sync.Mutex
	// fwd follows a forwarding session (Config.Primary); nil otherwise.
	fwd *forwarder
	// onPrimary: the session is relayed to the primary (moved, or from its start because the
	// upstream was unreachable), not to the upstream that Fenced is about.
	onPrimary atomic.Bool
	direct    bool // relayed to the primary from its start; it counts under MaxForwarded
	// challenged: the upstream asked the client for a password (or a SASL or GSS exchange)
	// before accepting its login; owned by the upstream-to-client goroutine.
	challenged bool

	// proto follows the conversation and says what its messages mean; the copy goroutines
	// feed it from inspectClient and inspectServer.
	proto protocol

	// Shared between the two copy goroutines.
	terminated  atomic.Bool // the client sent Terminate
	fenceAtIdle atomic.Bool // Fenced came while it was busy: it ends at its next ReadyForQuery
	stopping    atomic.Bool // stop was called: nothing more of the client's is forwarded
	clientSpoke atomic.Bool // the client sent a message after stop, which was not forwarded

	// deferred is a FATAL 57P the server sent while the session was idle, held back from
	// the client until relay reports it (see report). Owned by the upstream-to-client
	// goroutine.
	deferred *UpstreamFailure

	login loginTimer // bounds the upstream's silence until the first ReadyForQuery

	stopOnce  sync.Once
	stopCause error
}

// handle serves one accepted connection. full: MaxClientConn connections were open when it
// was accepted, so a startup is answered 53300 (a cancel request is still forwarded).
func (s *Server) handle(c net.Conn, full bool) {
	start := time.Now()
	ss := &session{srv: s, client: c}
	ss.info.ClientAddr = c.RemoteAddr().String()
	if _, unix := c.(*net.UnixConn); unix {
		ss.info.ClientAddr = "[local]" // as Postgres names a Unix-socket client
	}
	ss.info.Start = start
	ss.info.Upstream = s.upstream.name
	defer c.Close()
	defer s.started(c)

	startupTimeout := s.cfg.StartupTimeout
	if full { // only to be told 53300: a storm of silent connections past the limit costs less
		startupTimeout = min(startupTimeout, time.Second)
	}
	c.SetDeadline(start.Add(startupTimeout))
	if err := ss.negotiate(); err != nil {
		ss.rejectStartup(err)
		return
	}
	c.SetDeadline(time.Time{})
	if ss.startup == nil { // a cancel request, already handled
		return
	}

	if full {
		s.stats.refused.Add(1)
		s.log.Warn("too many clients", zap.String("client", ss.info.ClientAddr), zap.Int("max_client_conn", s.cfg.MaxClientConn))
		ss.client.Write(errorMessage("FATAL", codeTooManyConnections,
			fmt.Sprintf("sorry, too many clients already: pgfly holds at most %d connections (--max-client-conn)", s.cfg.MaxClientConn)))
		return
	}

	fenced := s.cfg.Fence != nil && s.cfg.Fence()
	if fenced {
		ss.startup = withParam(ss.startup, "default_transaction_read_only", "on")
		s.log.Warn("fenced session: it starts read-only, as the upstream should be a standby and is a primary",
			zap.String("client", ss.info.ClientAddr), zap.String("upstream", s.upstream.name))
	}

	up, err := s.upstream.dial(context.Background())
	if err != nil && s.primaryUp != nil {
		up, err = ss.dialDirect(err)
	}
	if err != nil {
		s.stats.connectErrors.Add(1)
		s.log.Warn("upstream unreachable", zap.String("client", ss.info.ClientAddr),
			zap.String("upstream", s.upstream.name), zap.Error(err))
		msg := fmt.Sprintf("pgfly could not connect to upstream %s: %v", s.upstream.name, err)
		ss.emit(UpstreamFailure{Cause: FailConnect, Code: codeConnectionFailure, Message: msg}, false)
		ss.client.Write(errorMessage("FATAL", codeConnectionFailure, msg))
		return
	}
	ss.upstream = up
	ss.login = loginTimer{conn: up, timeout: s.upstream.timeout}
	defer func() {
		ss.upstreamConn().Close()
		if ss.fwd != nil {
			ss.fwd.end()
		}
		if ss.direct { // both pumps have returned
			s.forwarded.Add(-1)
		}
	}()
	if !s.register(ss, c) {
		ss.client.Write(errorMessage("FATAL", codeCannotConnectNow, "pgfly is shutting down"))
		return
	}
	defer s.unregister(ss)
	if !fenced && !ss.direct && s.cfg.Fence != nil && s.cfg.Fence() {
		ss.stop(errFenced) // the fence came up while it connected, after Fenced looked
	}

	ss.info.ID = s.nextID.Add(1)
	s.stats.sessions.Add(1)
	s.log.Info("session opened", zap.Uint64("session", ss.info.ID), zap.String("client", ss.info.ClientAddr),
		zap.String("user", ss.info.User), zap.String("database", ss.info.Database),
		zap.String("application_name", ss.info.ApplicationName), zap.String("upstream", ss.info.Upstream))
	s.obs.SessionOpened(ss.info)

	end := ss.relay()
	end.SessionInfo = ss.info
	end.Duration = time.Since(start)
	s.log.Info("session closed", zap.Uint64("session", ss.info.ID), zap.String("client", ss.info.ClientAddr),
		zap.String("user", ss.info.User), zap.String("database", ss.info.Database),
		zap.String("upstream", ss.info.Upstream), zap.Duration("duration", end.Duration),
		zap.Int64("bytes_in", end.BytesIn), zap.Int64("bytes_out", end.BytesOut),
		zap.String("reason", end.Reason))
	s.obs.SessionClosed(end)
}

// negotiate reads startup packets until the StartupMessage, answering SSLRequest and
// GSSENCRequest and forwarding a CancelRequest.
func (ss *session) negotiate() error {
	for range 4 { // at most SSL, GSS, then the startup message; more is a confused client
		p, err := readStartup(ss.client)
		if err != nil {
			return err
		}
		switch {
		case p.code == codeSSL:
			_, isTLS := ss.client.(*tls.Conn)
			if ss.srv.cfg.TLS == nil || isTLS {
				if _, err := ss.client.Write([]byte{'N'}); err != nil {
					return err
				}
				continue
			}
			if _, err := ss.client.Write([]byte{'S'}); err != nil {
				return err
			}
			tc := tls.Server(ss.client, ss.srv.cfg.TLS)
			if err := tc.Handshake(); err != nil {
				return fmt.Errorf("tls handshake: %w", err)
			}
			ss.client = tc
		case p.code == codeGSSEnc:
			if _, err := ss.client.Write([]byte{'N'}); err != nil {
				return err
			}
		case p.code == codeCancel:
			if len(p.raw) < 16 {
				return &protocolError{"invalid length of cancel request packet"}
			}
			ss.srv.forwardCancel(p.raw, ss.info.ClientAddr)
			return nil
		case p.code>>16 == protoMajor3:
			params, err := startupParams(p.raw)
			if err != nil {
				return err
			}
			ss.startup, ss.params = p.raw, params
			ss.info.User = params["user"]
			ss.info.Database = params["database"]
			if ss.info.Database == "" {
				ss.info.Database = ss.info.User
			}
			ss.info.ApplicationName = params["application_name"]
			return nil
		default:
			return &unsupportedProtocolError{p.code}
		}
	}
	return &protocolError{"too many startup packets"}
}

type unsupportedProtocolError struct{ version uint32 }

func (e *unsupportedProtocolError) Error() string {
	return fmt.Sprintf("unsupported frontend protocol %d.%d: pgfly supports 3.x", e.version>>16, e.version&0xffff)
}

// rejectStartup tells the client why its startup failed, where the protocol allows it.
func (ss *session) rejectStartup(err error) {
	var pe *protocolError
	var ue *unsupportedProtocolError
	switch {
	case errors.As(err, &pe):
		ss.srv.log.Warn("bad startup packet", zap.String("client", ss.info.ClientAddr), zap.Error(err))
		ss.client.Write(errorMessage("FATAL", codeProtocolViolation, pe.msg))
	case errors.As(err, &ue):
		ss.srv.log.Warn("bad startup packet", zap.String("client", ss.info.ClientAddr), zap.Error(err))
		ss.client.Write(errorMessage("FATAL", codeFeatureUnsupported, ue.Error()))
	case errors.Is(err, io.EOF):
		// A port probe or health check: nothing to say.
	default:
		ss.srv.log.Debug("startup failed", zap.String("client", ss.info.ClientAddr), zap.Error(err))
	}
}

// relay runs the two copy goroutines until one ends, stops the other, and then decides what
// the client is told and whether the upstream's running query must be cancelled.
func (ss *session) relay() SessionEnd {
	ss.proto.startup()
	if _, err := ss.upstream.Write(ss.startup); err != nil {
		ss.client.Write(errorMessage("FATAL", codeConnectionFailure,
			fmt.Sprintf("pgfly lost upstream %s: %v", ss.srv.upstream.name, err)))
		return SessionEnd{Reason: "upstream write failed: " + err.Error()}
	}
	ss.login.arm()
	in := &pump{src: ss.client, dst: ss.upstream, buf: make([]byte, DefaultBufferSize),
		max: ss.srv.cfg.MaxMessageSize, watch: &ss.srv.watchIn, inspect: ss.inspectClient,
		total: &ss.srv.stats.bytesIn}
	out := &pump{src: ss.upstream, dst: ss.client, buf: make([]byte, DefaultBufferSize),
		max: ss.srv.cfg.MaxMessageSize, watch: &ss.srv.watchOut, whole: &ss.srv.watchOut, inspect: ss.inspectServer,
		total: &ss.srv.stats.bytesOut}
	if ss.srv.primaryUp != nil && !ss.direct {
		ss.fwd = newForwarder(ss)
		ss.fwd.out, in.dst = out, ss.fwd.w
		out.watch, out.inspect, out.tap = &watchAll, ss.fwd.inspect, ss.fwd.tap
	}
	in.n = int64(len(ss.startup))
	ss.srv.stats.bytesIn.Add(uint64(len(ss.startup)))

	done := make(chan pumpResult, 2)
	go copyClientToUpstream(in, done)
	go copyUpstreamToClient(out, done)
	first := <-done
	ss.stop(nil) // unblock the other reader; the connections stay writable
	<-done

	// stop has returned, so stopCause is settled; both pumps have returned, so this goroutine
	// is the only writer left.
	end := SessionEnd{BytesIn: in.n, BytesOut: out.n}
	tell := func(code, msg string) {
		if !out.midMessage {
			ss.client.SetWriteDeadline(time.Now().Add(time.Second))
			ss.client.Write(errorMessage("FATAL", code, msg))
		}
	}
	// Which connection failed: a pump returns when it cannot read its source or write to its
	// destination, and the client's is the source of one and the destination of the other.
	var we *writeError
	clientSide := first.fromClient != errors.As(first.err, &we)
	var pe *protocolError
	switch {
	case ss.stopCause == errShutdown:
		end.Reason = "shutdown"
		tell(codeAdminShutdown, "terminating connection because pgfly is shutting down")
	case ss.stopCause == errFenced:
		end.Reason = "fenced"
		ss.failed(FailFenced, codeAdminShutdown, fmt.Sprintf("terminating connection because upstream %s is a primary beside the real one: "+
			"reconnect, new sessions are read-only and their writes go to the primary region", ss.srv.upstream.name), tell)
	case ss.stopCause == errLinkDead:
		end.Reason = "upstream connection lost: nothing acknowledged"
		ss.failed(FailLost, codeConnectionFailure, fmt.Sprintf("pgfly lost the connection to upstream %s: it acknowledged nothing for %v",
			ss.srv.upstream.name, ss.srv.cfg.TCPUserTimeout), tell)
	case ss.terminated.Load():
		end.Reason = "client terminated"
	case clientSide && errors.As(first.err, &pe):
		end.Reason, end.ProtocolError = "client protocol violation: "+pe.msg, true
		ss.srv.log.Warn("client protocol violation", zap.Uint64("session", ss.info.ID), zap.Error(first.err))
		tell(codeProtocolViolation, "pgfly: "+pe.msg)
		ss.cancelIfBusy()
	case clientSide:
		end.Reason = "client disconnected"
		if first.err == io.ErrUnexpectedEOF {
			end.Reason = "client disconnected mid-message"
		}
		ss.cancelIfBusy()
	case errors.Is(first.err, errPrimaryLost):
		end.Reason = first.err.Error()
		ss.failed(FailLost, codeConnectionFailure, "pgfly lost the connection to the primary while it sent it this session's statement: "+
			"whether the statement ran there is unknown", tell)
	case errors.As(first.err, &pe):
		end.Reason, end.ProtocolError = "upstream protocol violation: "+pe.msg, true
		ss.srv.log.Error("upstream protocol violation", zap.Uint64("session", ss.info.ID), zap.Error(first.err))
		tell(codeProtocolViolation, "pgfly: upstream sent an invalid message: "+pe.msg)
	case errors.Is(first.err, os.ErrDeadlineExceeded) && ss.login.expired():
		end.Reason = "upstream login timeout"
		ss.srv.stats.connectErrors.Add(1)
		ss.srv.log.Warn("upstream login timeout", zap.Uint64("session", ss.info.ID),
			zap.String("upstream", ss.srv.upstream.name), zap.Duration("timeout", ss.login.timeout))
		ss.failed(FailLoginTimeout, codeConnectionFailure, fmt.Sprintf("pgfly: upstream %s did not answer within %v while the session logged in (timeout)",
			ss.srv.upstream.name, ss.login.timeout), tell)
	case errors.Is(first.err, io.EOF) && ss.proto.fatal:
		end.Reason = "upstream closed the session"
		if ss.deferred != nil { // a FATAL 57P that the idle client has not been shown
			ss.report(*ss.deferred, tell)
		}
	default:
		end.Reason = "upstream connection lost"
		if first.err != nil && !errors.Is(first.err, io.EOF) {
			end.Reason += ": " + first.err.Error()
		}
		switch {
		case ss.deferred != nil: // a held FATAL 57P, then a reset rather than a clean close
			ss.report(*ss.deferred, tell)
		case !ss.proto.fatal:
			ss.failed(FailLost, codeConnectionFailure, fmt.Sprintf("pgfly lost the connection to upstream %s", ss.srv.upstream.name), tell)
		}
	}
	return end
}

// failed reports an UpstreamFailure with what the client is told (FATAL code, msg), and tells
// it (see report).
func (ss *session) failed(cause, code, msg string, tell func(code, msg string)) {
	ss.report(UpstreamFailure{SessionID: ss.info.ID, Cause: cause, Code: code, Message: msg}, tell)
}

// deadSessionHold is how long the client of a session whose upstream failed while it was idle
// is held before it is told, should it not speak first (see report).
const deadSessionHold = time.Minute

// report reports f to the observer and tells the client. Both pumps have returned, so the
// session's state is settled. A busy session's failure belongs to the request using it now:
// it is reported at once, before the client is told. An idle session's (a connection resting
// in the app's pool) belongs to whichever request uses the connection next, which has not
// come yet: its client is held, told nothing, until it sends its next message (up to
// deadSessionHold, or until pgfly shuts down), and the failure is reported then, when that
// request is in flight, and only then told. A client that sends Terminate is let go quietly.
// A forwarding session whose client is owed a ReadyForQuery that pgfly's own exchange was to
// precede (forwarder.owed) is not idle: its client is told at once.
func (ss *session) report(f UpstreamFailure, tell func(code, msg string)) {
	if !(ss.fwd != nil && ss.fwd.owed) && !ss.proto.busy() && !ss.clientSpoke.Load() {
		switch ss.awaitClient() {
		case heldLeft:
			return
		case heldSilent: // nobody used the connection in time, or pgfly is closing
			tell(f.Code, f.Message)
			return
		}
	}
	ss.emit(f, ss.proto.mayHaveWritten())
	tell(f.Code, f.Message)
}

// What the client of an idle session whose upstream failed did while awaitClient held it.
const (
	heldSpoke  = iota // it sent a message: a request is using the connection now
	heldLeft          // it sent Terminate or hung up
	heldSilent        // nothing for deadSessionHold, or pgfly is closing
)

// awaitClient holds the client of a session whose upstream failed while it was idle until it
// speaks. The session is over but for this wait: its upstream connection and its place among
// the open sessions (and under MaxClientConn) are given up first.
func (ss *session) awaitClient() int {
	ss.upstreamConn().Close()
	ss.srv.unregister(ss)
	var b [1]byte
	for hold := time.Now().Add(deadSessionHold); time.Now().Before(hold); {
		select {
		case <-ss.srv.closed:
			return heldSilent
		default:
		}
		step := time.Now().Add(time.Second)
		if step.After(hold) {
			step = hold
		}
		ss.client.SetReadDeadline(step)
		n, err := ss.client.Read(b[:])
		switch {
		case n > 0 && b[0] == 'X':
			return heldLeft
		case n > 0:
			return heldSpoke
		case !errors.Is(err, os.ErrDeadlineExceeded):
			return heldLeft
		}
	}
	return heldSilent
}

// emit hands f, stamped now with what the protocol says of the session, to the observer.
// wrote is the protocol's mayHaveWritten, taken by the caller: for a shutdown's FATAL, as it
// stood before the error rolled an implicit transaction back.
func (ss *session) emit(f UpstreamFailure, wrote bool) {
	// A login still under way has run no statement: not busy in that sense.
	f.Time, f.Wrote, f.Busy = time.Now(), wrote, ss.proto.busy() && ss.login.over.Load()
	f.InHotStandby = ss.proto.standbyInBlock()
	if u := ss.proto.units.current(); f.Busy && u.hasTrace {
		f.TraceID = string(u.trace[:])
	}
	ss.srv.obs.UpstreamFailed(f)
}

// pumpResult is how a copy goroutine ended.
type pumpResult struct {
	fromClient bool // the client-to-upstream pump; err says which side it failed on
	err        error
}

// copyClientToUpstream and copyUpstreamToClient are the session's two copy goroutines, named
// so that a goroutine dump says which direction each one is.
func copyClientToUpstream(p *pump, done chan<- pumpResult) { done <- pumpResult{true, p.run()} }

func copyUpstreamToClient(p *pump, done chan<- pumpResult) { done <- pumpResult{false, p.run()} }

// stop makes both copy goroutines return soon: it expires their read deadlines, which keeps
// the connections writable for a last error message. The first cause wins.
func (ss *session) stop(cause error) {
	ss.stopOnce.Do(func() {
		ss.stopCause = cause
		ss.stopping.Store(true)
		ss.login.end(true) // so that it cannot move the deadline set below
		past := time.Unix(1, 0)
		ss.client.SetReadDeadline(past)
		ss.upMu.Lock()
		defer ss.upMu.Unlock()
		ss.upstream.SetReadDeadline(past)
		if cause == errShutdown || cause == errFenced {
			// A goroutine blocked writing to a client that reads nothing must end too.
			ss.client.SetWriteDeadline(time.Now().Add(time.Second))
		}
		if cause == errLinkDead { // and one blocked writing into the dead link
			ss.upstream.SetWriteDeadline(past)
		}
	})
}

// upstreamConn is the session's upstream connection, for a goroutine other than the pumps.
func (ss *session) upstreamConn() net.Conn {
	ss.upMu.Lock()
	defer ss.upMu.Unlock()
	return ss.upstream
}

// swapUpstream makes c the session's upstream and returns the one before; a session stopping
// meanwhile stops reading c too.
func (ss *session) swapUpstream(c net.Conn) net.Conn {
	ss.upMu.Lock()
	defer ss.upMu.Unlock()
	old := ss.upstream
	ss.upstream = c
	if ss.stopping.Load() {
		c.SetReadDeadline(time.Unix(1, 0))
	}
	return old
}

// setDeadline sets a deadline of a connection (set: its SetReadDeadline or SetWriteDeadline)
// for one of pgfly's own exchanges on a session's behalf, unless the session is stopping,
// whose deadlines it must leave alone.
func (ss *session) setDeadline(set func(time.Time) error, t time.Time) bool {
	ss.upMu.Lock()
	defer ss.upMu.Unlock()
	if ss.stopping.Load() {
		return false
	}
	set(t)
	return true
}

// dialDirect relays a forwarding session whose upstream is unreachable (err) to the primary
// from its start: its client logs in there itself.
func (ss *session) dialDirect(err error) (net.Conn, error) {
	s := ss.srv
	if !s.takePlace(ss.fwd, ss.info.ID) {
		return nil, fmt.Errorf("%w; and %d sessions are on the primary already (--max-forwarded-sessions)", err, s.cfg.MaxForwarded)
	}
	up, perr := s.primaryUp.dial(context.Background())
	if perr != nil {
		s.forwarded.Add(-1)
		return nil, fmt.Errorf("%w; and the primary: %v", err, perr)
	}
	ss.direct = true // the caller undoes it, and the count, if it cannot use up
	ss.onPrimary.Store(true)
	ss.info.Upstream = s.primaryUp.name
	s.log.Info("upstream unreachable: session relayed to the primary", zap.String("client", ss.info.ClientAddr),
		zap.String("user", ss.info.User), zap.String("primary", s.primaryUp.name), zap.Error(err))
	s.obs.Forwarded(Forward{Time: time.Now(), User: ss.info.User, Outcome: ForwardDirect, Reason: err.Error()})
	return up, nil
}

// watchAll marks every message type: a forwarding session looks at each of the server's.
var watchAll = func() (w [256]bool) {
	for i := range w {
		w[i] = true
	}
	return w
}()

// inspectClient acts on the client's messages before they are forwarded.
func (ss *session) inspectClient(typ byte, msg []byte, whole bool) ([]byte, error) {
	if ss.stopping.Load() {
		// The session is ending (fenced, shut down, a dead link): a statement read just
		// before must not reach the upstream, where it could still commit. The client has
		// spoken, though, and waits for an answer (see report).
		if typ == 'X' {
			ss.terminated.Store(true) // leaving: nobody waits for an answer
		} else {
			ss.clientSpoke.Store(true)
		}
		return nil, errStopping
	}
	switch typ {
	case 'X':
		ss.terminated.Store(true)
	case 'p': // an answer to an authentication request: the server's turn again
		ss.login.arm()
	default:
		ss.proto.client(typ, msg[headerLen:], whole)
	}
	return nil, nil
}

// inspectServer acts on the server's messages before they are forwarded: it follows the login
// and records the cancel key itself, and acts on what the protocol says the others mean.
func (ss *session) inspectServer(typ byte, msg []byte, _ bool) ([]byte, error) {
	body := msg[headerLen:]
	switch typ {
	case 'K':
		if len(body) < 8 {
			return nil, &protocolError{"invalid BackendKeyData"}
		}
		ss.srv.keys.set(ss, string(body))
		return nil, nil
	case 'R':
		if len(body) >= 4 && binary.BigEndian.Uint32(body) != 0 {
			ss.challenged = true // the client had to prove who it is
		}
		ss.login.authRequest(body)
		return stripChannelBinding(body)
	}
	r, err := ss.proto.server(typ, body)
	if err != nil {
		return nil, err
	}
	if typ == 'Z' {
		if r.idle && ss.fenceAtIdle.Load() {
			ss.stop(errFenced) // Fenced came while a statement ran; its answer still goes out
		}
		ss.login.end(false)
	}
	if r.committed {
		ss.srv.obs.WriteCommitted(WriteCommitted{SessionID: ss.info.ID, Time: time.Now()})
	}
	if r.shutdown {
		f := UpstreamFailure{SessionID: ss.info.ID, Cause: FailShutdown, Code: string(r.err.code), Message: string(r.err.message)}
		if r.hold { // relay reports it when the client next speaks (see report)
			ss.deferred = &f
			return suppressed, nil
		}
		ss.emit(f, r.wrote)
	}
	if r.refusal && ss.fwd == nil { // a forwarding session has no HTTP request to replay
		v := ReadOnlyViolation{
			SessionID: ss.info.ID,
			Time:      time.Now(),
			SentAt:    r.unit.sent,
			Code:      string(r.err.code),
			Message:   string(r.err.message),
			TxStatus:  r.status,
		}
		if r.unit.hasTrace {
			v.TraceID = string(r.unit.trace[:])
		}
		ss.srv.obs.ReadOnly(v)
	}
	return nil, nil
}

// suppressed is an inspect replacement that forwards nothing.
var suppressed = []byte{}
