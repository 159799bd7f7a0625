package wire

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"
)

// sessionState is what of a backend's session state a move carries to the other backend, or
// why it cannot move.
type sessionState struct {
	settings map[string]string // name to value: what the session SET (startup parameters are the client's on every backend)
	prepared map[string]preparedStatement
	blocker  string // what cannot be carried, "" when nothing
	lsn      string // the primary's WAL position when it was read (checkQuery only)
}

type preparedStatement struct {
	statement string
	types     string // parameter type OIDs, comma-separated
}

// stateQuery reads a session's state: the settings it SET, its role and session user (which
// pg_settings does not show), its prepared statements, and what pgfly cannot carry to another
// backend.
const stateQuery = `SELECT 's', name::text, setting, NULL, NULL FROM pg_catalog.pg_settings WHERE source = 'session'
UNION ALL SELECT 's', 'session_authorization', pg_catalog.current_setting('session_authorization'), NULL, NULL
UNION ALL SELECT 's', 'role', pg_catalog.current_setting('role'), NULL, NULL
UNION ALL SELECT 'p', name::text, statement, NULL, pg_catalog.array_to_string(parameter_types::oid[], ',') FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql
UNION ALL SELECT 'b', 'a statement made by SQL PREPARE', name::text, NULL, NULL FROM pg_catalog.pg_prepared_statements WHERE from_sql
UNION ALL SELECT 'b', 'a cursor WITH HOLD', name::text, NULL, NULL FROM pg_catalog.pg_cursors WHERE is_holdable
UNION ALL SELECT 'b', 'an advisory lock', objid::text, NULL, NULL FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()
UNION ALL SELECT 'b', 'a temporary table', relname::text, NULL, NULL FROM pg_catalog.pg_class WHERE relpersistence = 't' AND relnamespace = pg_catalog.pg_my_temp_schema()
UNION ALL SELECT 'b', 'a LISTEN', c::text, NULL, NULL FROM pg_catalog.pg_listening_channels() c`

// checkQuery is stateQuery on the primary, with its WAL position: a session moves back to the
// replica once the replica has replayed that far. It is the insert position, which is past the
// session's last commit even when that was made with synchronous_commit off and sits unwritten,
// and is taken back to the end of the last record when that record ended on a WAL page's
// boundary, where a replica that replayed it reports the boundary (as lag's insertEnd does).
const checkQuery = stateQuery + `
UNION ALL SELECT 'l', (l - CASE WHEN o = 40 THEN 40 WHEN o > b AND o % b = 24 THEN 24 ELSE 0 END)::text, NULL, NULL, NULL
	FROM (SELECT l, (pg_catalog.pg_walfile_name_offset(l)).file_offset AS o, pg_catalog.current_setting('wal_block_size')::int AS b
		FROM (SELECT pg_catalog.pg_current_wal_insert_lsn() AS l) i) w`

// stateRow adds one DataRow of stateQuery or checkQuery to st.
func (st *sessionState) row(body []byte) error {
	cols, err := dataRow(body, 5)
	if err != nil {
		return err
	}
	switch cols[0] {
	case "s":
		if st.settings == nil {
			st.settings = map[string]string{}
		}
		st.settings[cols[1]] = cols[2]
	case "p":
		if st.prepared == nil {
			st.prepared = map[string]preparedStatement{}
		}
		st.prepared[cols[1]] = preparedStatement{statement: cols[2], types: cols[4]}
	case "b":
		if st.blocker == "" {
			st.blocker = cols[1] + " (" + cols[2] + ")"
		}
	case "l":
		st.lsn = cols[1]
	}
	return nil
}

// readState runs query, stateQuery or checkQuery, on a backend's idle session, and then
// unnamed, the client's Parse of the unnamed statement (when not empty), which the query
// dropped: its answer is not readState's. The other messages are passed to other, when it is
// not nil.
func (f *forwarder) readState(c net.Conn, timeout time.Duration, query string, other func(msg []byte) error, unnamed []byte) (sessionState, error) {
	var st sessionState
	var failed error
	msgs, zs := withUnnamed(queryMessage(query), 1, unnamed)
	answered := 0
	_, err := f.exchange(c, msgs, zs, timeout, func(msg []byte) error {
		switch {
		case msg[0] == 'E' && answered == 0:
			failed = newSQLError(msg[headerLen:])
		case msg[0] == 'D' && answered == 0:
			return st.row(msg[headerLen:])
		case msg[0] == 'Z':
			answered++
			fallthrough
		default:
			if other != nil {
				return other(msg)
			}
		}
		return nil
	})
	if err == nil {
		err = failed
	}
	return st, err
}

// sqlError is a server's ErrorResponse to one of pgfly's own requests.
type sqlError struct{ message, code string }

func newSQLError(body []byte) *sqlError {
	e := parseError(body)
	return &sqlError{string(e.message), string(e.code)}
}

func (e *sqlError) Error() string { return fmt.Sprintf("%s (SQLSTATE %s)", e.message, e.code) }

// loginState is what stateQuery reads of a backend just logged in as user: no settings, user
// its session user, and no role set.
func loginState(user string) sessionState {
	return sessionState{settings: map[string]string{"session_authorization": user, "role": "none"}}
}

// settingsTo returns the messages that make a backend whose settings are have take those of
// want, one request answered with one ReadyForQuery; nil when they are the same. The session
// user and then the role come last (setting the first resets the second), so that the other
// settings are made with the rights of the login.
func settingsTo(want, have map[string]string) []byte {
	var msgs []byte
	reset := false
	for name := range have {
		if _, ok := want[name]; !ok {
			if !reset {
				msgs, _ = (&pgproto3.Parse{Name: "", Query: "SELECT pg_catalog.set_config(name, reset_val, false) FROM pg_catalog.pg_settings WHERE name = $1"}).Encode(msgs)
				reset = true
			}
			msgs, _ = (&pgproto3.Bind{Parameters: [][]byte{[]byte(name)}}).Encode(msgs)
			msgs, _ = (&pgproto3.Execute{}).Encode(msgs)
		}
	}
	names := make([]string, 0, len(want))
	for name := range want {
		if name != "session_authorization" && name != "role" {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	parsed := false
	authorized := false // setting the session user resets the role, which must be set again
	for _, name := range append(names, "session_authorization", "role") {
		v, ok := want[name]
		if hv, had := have[name]; !ok || had && hv == v && !(name == "role" && authorized) {
			continue
		}
		authorized = authorized || name == "session_authorization"
		if !parsed {
			msgs, _ = (&pgproto3.Parse{Name: "", Query: "SELECT pg_catalog.set_config($1, $2, false)"}).Encode(msgs)
			parsed = true
		}
		msgs, _ = (&pgproto3.Bind{Parameters: [][]byte{[]byte(name), []byte(v)}}).Encode(msgs)
		msgs, _ = (&pgproto3.Execute{}).Encode(msgs)
	}
	if msgs != nil {
		msgs, _ = (&pgproto3.Sync{}).Encode(msgs)
	}
	return msgs
}

// statementsTo returns the messages that make a backend whose prepared statements are have
// hold those of want, but for the names in fresh, which it must not hold at all (the requests
// about to be sent there prepare them); and how many ReadyForQuery messages answer them. Only
// statements made by a Parse message are carried: one made by SQL PREPARE keeps the session
// where it is (stateQuery's blocker), as its text is the whole Query it came in.
func statementsTo(want, have map[string]preparedStatement, fresh map[string]bool) (msgs []byte, zs int) {
	for name, hs := range have {
		if ws, ok := want[name]; ok && ws == hs && !fresh[name] {
			continue
		}
		msgs, _ = (&pgproto3.Close{ObjectType: 'S', Name: name}).Encode(msgs)
	}
	for name, ws := range want {
		if hs, ok := have[name]; ok && hs == ws || fresh[name] {
			continue
		}
		var oids []uint32
		for _, t := range strings.Split(ws.types, ",") {
			if oid, err := strconv.ParseUint(t, 10, 32); err == nil {
				oids = append(oids, uint32(oid))
			}
		}
		msgs, _ = (&pgproto3.Parse{Name: name, Query: ws.statement, ParameterOIDs: oids}).Encode(msgs)
	}
	if msgs == nil {
		return nil, 0
	}
	msgs, _ = (&pgproto3.Sync{}).Encode(msgs)
	return msgs, 1
}

// dataRow reads the n text columns of a DataRow body; NULL is "".
func dataRow(body []byte, n int) ([]string, error) {
	if len(body) < 2 || int(binary.BigEndian.Uint16(body)) != n {
		return nil, &protocolError{"unexpected DataRow"}
	}
	body = body[2:]
	cols := make([]string, n)
	for i := range cols {
		if len(body) < 4 {
			return nil, &protocolError{"invalid DataRow"}
		}
		size := int(int32(binary.BigEndian.Uint32(body)))
		body = body[4:]
		if size < 0 {
			continue
		}
		if size > len(body) {
			return nil, &protocolError{"invalid DataRow"}
		}
		cols[i], body = string(body[:size]), body[size:]
	}
	return cols, nil
}

// send writes msgs on c for one of pgfly's own exchanges, bounded by timeout.
func (f *forwarder) send(c net.Conn, msgs []byte, timeout time.Duration) error {
	if !f.ss.setDeadline(c.SetWriteDeadline, time.Now().Add(timeout)) {
		return errStopping
	}
	defer c.SetWriteDeadline(time.Time{})
	_, err := c.Write(msgs)
	return err
}

// receive reads answers from c until zs ReadyForQuery messages, passing each message (header
// included) to each. With each nil, an ErrorResponse is returned as an error once its
// ReadyForQuery has come. It returns the last ReadyForQuery's status. It is bounded by timeout.
func (f *forwarder) receive(c net.Conn, zs int, timeout time.Duration, each func(msg []byte) error) (TxStatus, error) {
	if !f.ss.setDeadline(c.SetReadDeadline, time.Now().Add(timeout)) {
		return TxUnknown, errStopping
	}
	defer c.SetReadDeadline(time.Time{})
	var failed error
	status := TxUnknown
	for zs > 0 {
		msg, err := readMessage(c, &f.buf, f.ss.srv.cfg.MaxMessageSize)
		if err != nil {
			return TxUnknown, err
		}
		if each != nil {
			if err := each(msg); err != nil {
				return TxUnknown, err
			}
		}
		switch msg[0] {
		case 'E':
			if failed == nil && each == nil {
				failed = newSQLError(msg[headerLen:])
			}
		case 'Z':
			zs--
			if len(msg) > headerLen {
				status = TxStatus(msg[headerLen])
			}
		}
	}
	return status, failed
}

// exchange is send, then receive.
func (f *forwarder) exchange(c net.Conn, msgs []byte, zs int, timeout time.Duration, each func(msg []byte) error) (TxStatus, error) {
	if err := f.send(c, msgs, timeout); err != nil {
		return TxUnknown, err
	}
	return f.receive(c, zs, timeout, each)
}

// readMessage reads one whole message from r into *buf, which it grows as needed.
func readMessage(r io.Reader, buf *[]byte, max int) ([]byte, error) {
	if cap(*buf) < headerLen {
		*buf = make([]byte, 4096)
	}
	b := (*buf)[:headerLen]
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(b[1:]))
	if n < 4 || n > max {
		return nil, &protocolError{fmt.Sprintf("invalid message length %d for message type %q", n, b[0])}
	}
	if cap(*buf) < 1+n {
		nb := make([]byte, 1+n)
		copy(nb, b)
		*buf = nb
	}
	b = (*buf)[:1+n]
	if _, err := io.ReadFull(r, b[headerLen:]); err != nil {
		return nil, unexpected(err)
	}
	return b, nil
}

// syncMessage is a Sync.
var syncMessage = []byte{'S', 0, 0, 0, 4}

// withUnnamed appends to msgs, which zs ReadyForQuery messages answer, unnamed (the client's
// Parse of the unnamed statement) and a Sync, when unnamed is not empty.
func withUnnamed(msgs []byte, zs int, unnamed []byte) ([]byte, int) {
	if len(unnamed) == 0 {
		return msgs, zs
	}
	return append(append(msgs, unnamed...), syncMessage...), zs + 1
}

// ignoreErrors is an exchange's each that lets the server's errors pass: they are not the
// exchange's to report.
func ignoreErrors([]byte) error { return nil }

// queryMessage encodes a simple Query.
func queryMessage(sql string) []byte {
	b, _ := (&pgproto3.Query{String: sql}).Encode(nil)
	return b
}

// A recording is split into requests: each ends with a Query, Sync or FunctionCall.

// countUnits counts the requests in rec, -1 when rec is not whole messages.
func countUnits(rec []byte) int {
	n := 0
	for len(rec) >= headerLen {
		size := 1 + int(binary.BigEndian.Uint32(rec[1:]))
		if size < headerLen || size > len(rec) {
			return -1
		}
		switch rec[0] {
		case 'Q', 'S', 'F':
			n++
		}
		rec = rec[size:]
	}
	if len(rec) > 0 {
		return -1
	}
	return n
}

// lastUnit is where the last request of rec begins, -1 when rec does not end with a whole
// request.
func lastUnit(rec []byte) int {
	start, end := 0, -1
	for pos := 0; pos+headerLen <= len(rec); {
		size := 1 + int(binary.BigEndian.Uint32(rec[pos+1:]))
		if size < headerLen || pos+size > len(rec) {
			return -1
		}
		switch rec[pos] {
		case 'Q', 'S', 'F':
			if pos+size == len(rec) {
				end = start
			}
			start = pos + size
		}
		pos += size
	}
	return end
}

// parsedNames are the statement names rec's Parse messages create.
func parsedNames(rec []byte) map[string]bool {
	names := map[string]bool{}
	for len(rec) >= headerLen {
		size := 1 + int(binary.BigEndian.Uint32(rec[1:]))
		if size < headerLen || size > len(rec) {
			break
		}
		if rec[0] == 'P' {
			if name, _, ok := cbytes(rec[headerLen:size]); ok && len(name) > 0 {
				names[string(name)] = true
			}
		}
		rec = rec[size:]
	}
	return names
}

// primaryConn is a backend on the primary, logged in, for a forwarding session.
type primaryConn struct {
	conn net.Conn
	key  string // BackendKeyData: process id and secret
}

// loginError is a failure to log in to the primary as a session's user.
type loginError struct{ err error }

func (e *loginError) Error() string { return e.err.Error() }
func (e *loginError) Unwrap() error { return e.err }

// close gives up the primary backend of a session.
func (p *primaryConn) close(ss *session) {
	p.conn.Close()
	ss.srv.forwarded.Add(-1)
}

// primaryLogin is how ss logs in to the primary: as its own user, to its own database, with
// its own startup parameters, and with the primary URL's password only when the URL's user is
// ss's and the upstream made the client prove who it is before accepting it (a password, SASL,
// GSS). A client the upstream trusted without proof (a trust line) gets no password: it has on
// the primary only what the primary's own pg_hba.conf gives a password-less login.
func (s *Server) primaryLogin(ss *session) *pgconn.Config {
	cfg := s.primaryCfg.Copy()
	cfg.User, cfg.Database = ss.info.User, ss.info.Database
	if ss.info.User != s.primaryCfg.User || !ss.challenged {
		cfg.Password = ""
	}
	cfg.RuntimeParams = make(map[string]string, len(ss.params))
	for k, v := range ss.params {
		if k != "user" && k != "database" {
			cfg.RuntimeParams[k] = v
		}
	}
	cfg.DialFunc = s.primaryUp.dialer.DialContext
	return cfg
}

// dialPrimary opens a backend on the primary for ss (see primaryLogin).
func (s *Server) dialPrimary(ss *session) (*primaryConn, error) {
	cfg := s.primaryLogin(ss)
	ctx, cancel := context.WithTimeout(context.Background(), s.primaryUp.timeout)
	defer cancel()
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		var pe *pgconn.PgError
		if errors.As(err, &pe) && (pe.Code == "28P01" || pe.Code == "28000") {
			return nil, &loginError{fmt.Errorf("pgfly cannot log in to the primary as %q: %s (SQLSTATE %s)", ss.info.User, pe.Message, pe.Code)}
		}
		if strings.Contains(err.Error(), "password") || strings.Contains(err.Error(), "SASL") {
			return nil, &loginError{fmt.Errorf("pgfly cannot log in to the primary as %q: %v", ss.info.User, err)}
		}
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("the primary refused the session: %s (SQLSTATE %s)", pe.Message, pe.Code)
		}
		return nil, fmt.Errorf("the primary is unreachable: %v", err)
	}
	if err := pc.SyncConn(ctx); err != nil {
		pc.Close(ctx)
		return nil, fmt.Errorf("the primary is unreachable: %v", err)
	}
	hc, err := pc.Hijack()
	if err != nil {
		pc.Close(ctx)
		return nil, err
	}
	if hc.ParameterStatuses["in_hot_standby"] == "on" {
		hc.Conn.Close()
		return nil, errors.New("the primary is in recovery")
	}
	key := make([]byte, 4, 4+len(hc.SecretKey))
	binary.BigEndian.PutUint32(key, hc.PID)
	return &primaryConn{conn: hc.Conn, key: string(append(key, hc.SecretKey...))}, nil
}

// warnLogin logs, once per user, that pgfly cannot log in to the primary for that user's
// sessions, and how to fix it.
func (s *Server) warnLogin(user string, err error) {
	if _, seen := s.loginWarned.LoadOrStore(user, true); seen {
		return
	}
	s.log.Warn("forwarded sessions of this user get the standby's refusal: give --primary a URL with this user and its password",
		zap.String("user", user), zap.Error(err))
}
