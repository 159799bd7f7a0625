package wire

import (
	"context"
	"encoding/binary"
	"sync"
	"time"

	"go.uber.org/zap"
)

// cancelKeys knows the cancel key (BackendKeyData's process id and secret) of each live
// session, so that a CancelRequest is forwarded only for a session that is live now: a stale
// or guessed key goes nowhere. It has its own mutex.
type cancelKeys struct {
	mu        sync.Mutex
	byKey     map[string]*session
	bySession map[*session]string
}

// set records key as ss's, replacing the one it had (a server may send BackendKeyData again).
func (k *cancelKeys) set(ss *session, key string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.byKey == nil {
		k.byKey, k.bySession = make(map[string]*session), make(map[*session]string)
	}
	k.forgetLocked(ss)
	k.byKey[key], k.bySession[ss] = ss, key
}

// forget drops ss's key, once it is no longer live.
func (k *cancelKeys) forget(ss *session) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.forgetLocked(ss)
}

func (k *cancelKeys) forgetLocked(ss *session) {
	if old, ok := k.bySession[ss]; ok {
		if k.byKey[old] == ss {
			delete(k.byKey, old)
		}
		delete(k.bySession, ss)
	}
}

// session returns the live session key belongs to, or nil.
func (k *cancelKeys) session(key string) *session {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.byKey[key]
}

// of returns ss's key, "" before the server sent one.
func (k *cancelKeys) of(ss *session) string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.bySession[ss]
}

// forwardCancel relays a client's CancelRequest (raw, the whole packet) to the upstream, but
// only when its key belongs to a live session.
func (s *Server) forwardCancel(raw []byte, from string) {
	ss := s.keys.session(string(raw[8:]))
	if ss == nil {
		s.log.Debug("cancel request ignored: no live session has that key", zap.String("client", from))
		return
	}
	s.log.Debug("cancel request forwarded", zap.Uint64("session", ss.info.ID), zap.String("client", from))
	if err := ss.sendCancel(raw); err != nil {
		s.log.Warn("cancel request failed", zap.Uint64("session", ss.info.ID), zap.Error(err))
	}
}

// cancelIfBusy cancels the query the upstream may still be running for a client that is
// gone, so that no backend goes on working for nobody.
func (ss *session) cancelIfBusy() {
	if !ss.proto.busy() {
		return
	}
	key := ss.srv.keys.of(ss)
	if key == "" {
		return
	}
	raw := make([]byte, 8+len(key))
	binary.BigEndian.PutUint32(raw[0:4], uint32(len(raw)))
	binary.BigEndian.PutUint32(raw[4:8], codeCancel)
	copy(raw[8:], key)
	if err := ss.sendCancel(raw); err != nil {
		ss.srv.log.Warn("cancel of abandoned query failed", zap.Uint64("session", ss.info.ID), zap.Error(err))
		return
	}
	ss.srv.log.Info("cancelled the query of a client that disconnected", zap.Uint64("session", ss.info.ID))
}

// sendCancel sends the CancelRequest packet raw, which carries the key the client knows, to
// the server ss's backend is on now: for a session moved to the primary, with the primary
// backend's key instead.
func (ss *session) sendCancel(raw []byte) error {
	to := ss.srv.upstream
	if ss.onPrimary.Load() {
		to = ss.srv.primaryUp
		if ss.fwd != nil {
			if key, _ := ss.fwd.primaryKey.Load().(string); key != "" {
				raw = append(raw[:8:8], key...)
				binary.BigEndian.PutUint32(raw[0:4], uint32(len(raw)))
			}
		}
	}
	return to.sendCancel(raw)
}

// sendCancel opens a new connection and sends it the CancelRequest packet raw.
func (u *upstream) sendCancel(raw []byte) error {
	c, err := u.dial(context.Background())
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(u.timeout))
	if _, err := c.Write(raw); err != nil {
		return err
	}
	// The server closes the connection once it has read the request; waiting for that
	// keeps the cancel from racing the caller's next step.
	var b [1]byte
	c.Read(b[:])
	return nil
}
