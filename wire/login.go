package wire

import (
	"encoding/binary"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// loginTimer bounds the upstream's silence while a session logs in (Config.ConnectTimeout).
// From the StartupMessage to the first ReadyForQuery, each wait for the server has a read
// deadline on the upstream connection; while the server waits for the client (a password, a
// SASL step) there is none, since a person may be typing. A frozen server (SIGSTOP) still
// accepts connections and acknowledges bytes, so without this a login would wait forever
// for a client that has no connect timeout of its own (libpq and node-postgres by default).
type loginTimer struct {
	conn    net.Conn
	timeout time.Duration
	over    atomic.Bool // the first ReadyForQuery came, or the session is stopping

	mu       sync.Mutex // orders deadline changes against end
	deadline time.Time  // zero while it is the client's turn, or once the login is over
}

// arm starts a wait for the server.
func (l *loginTimer) arm() { l.set(true) }

// authRequest acts on an AuthenticationRequest (body of an 'R' message): the client's turn
// for a request it must answer, still the server's for AuthenticationOk and SASLFinal.
func (l *loginTimer) authRequest(body []byte) {
	if len(body) < 4 {
		return // the pump's caller reports the malformed message
	}
	switch binary.BigEndian.Uint32(body) {
	case 0, 12: // AuthenticationOk, AuthenticationSASLFinal: more comes without an answer
		l.set(true)
	default: // cleartext or MD5 password, GSS, SSPI, SASL and SASLContinue
		l.set(false)
	}
}

func (l *loginTimer) set(serversTurn bool) {
	if l.conn == nil || l.over.Load() {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.over.Load() {
		return
	}
	l.deadline = time.Time{}
	if serversTurn {
		l.deadline = time.Now().Add(l.timeout)
	}
	l.conn.SetReadDeadline(l.deadline)
}

// end stops the timer for good: at the first ReadyForQuery, when the deadline is lifted, or
// when the session stops (stopping), whose own deadline it must then leave alone. It costs
// one atomic load once the login is over, as it is called at every ReadyForQuery.
func (l *loginTimer) end(stopping bool) {
	if l.conn == nil || l.over.Load() {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.over.Swap(true) {
		return
	}
	if !stopping {
		l.deadline = time.Time{}
		l.conn.SetReadDeadline(time.Time{})
	}
}

// retarget moves the timer to c, a new upstream connection for a login under way.
func (l *loginTimer) retarget(c net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.conn = c
	if !l.over.Load() {
		c.SetReadDeadline(l.deadline)
	}
}

// expired reports whether a wait for the server outlived the timeout, which explains an
// upstream read that failed on its deadline.
func (l *loginTimer) expired() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return !l.deadline.IsZero() && !time.Now().Before(l.deadline)
}

// stripChannelBinding removes SCRAM-SHA-256-PLUS from an AuthenticationSASL body: the
// client's channel is not the upstream's, so a channel-bound proof could never verify.
// It returns nil when there is nothing to change.
func stripChannelBinding(body []byte) ([]byte, error) {
	if len(body) < 4 || binary.BigEndian.Uint32(body) != 10 { // 10: AuthenticationSASL
		return nil, nil
	}
	var sasl pgproto3.AuthenticationSASL
	if err := sasl.Decode(body); err != nil {
		return nil, &protocolError{"invalid AuthenticationSASL: " + err.Error()}
	}
	kept := sasl.AuthMechanisms[:0]
	for _, m := range sasl.AuthMechanisms {
		if m != "SCRAM-SHA-256-PLUS" {
			kept = append(kept, m)
		}
	}
	if len(kept) == len(sasl.AuthMechanisms) {
		return nil, nil
	}
	sasl.AuthMechanisms = kept
	return sasl.Encode(nil)
}
