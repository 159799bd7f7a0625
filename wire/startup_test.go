package wire_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

// Request codes a client sends in place of a protocol version.
const (
	sslRequestCode    = 80877103
	gssEncRequestCode = 80877104
	cancelRequestCode = 80877102
)

func TestSSLRequestWithoutTLSIsAnsweredN(t *testing.T) {
	r := primaryRelay(t)

	t.Run("raw SSLRequest", func(t *testing.T) {
		c := dialRaw(t, r.Addr().String())
		if got := c.requestAnswers(t, sslRequestCode); got != "N" {
			t.Fatalf("SSLRequest answer: got %q, want %q", got, "N")
		}
		// The answer was exactly one byte: a plain startup on the same connection works.
		c.login(t, pgcluster.RoleSuperuser)
		c.query(t, "select 1")
	})

	t.Run("pgx sslmode=prefer", func(t *testing.T) {
		conn := connectURL(t, r.url(pgcluster.RoleSuperuser, "sslmode=prefer"))
		if _, ok := conn.PgConn().Conn().(*tls.Conn); ok {
			t.Fatalf("client connection is TLS, want plain")
		}
		var one int
		if err := conn.QueryRow(context.Background(), "select 1").Scan(&one); err != nil {
			t.Fatalf("select 1: %v", err)
		}
	})

	t.Run("pgx sslmode=require", func(t *testing.T) {
		err := connectErr(t, r.url(pgcluster.RoleSuperuser, "sslmode=require"), "connect with sslmode=require", "a refusal of TLS")
		if !strings.Contains(err.Error(), "refused TLS") {
			t.Fatalf("connect with sslmode=require: got %v, want an error saying TLS was refused", err)
		}
	})
}

func TestSSLRequestWithTLS(t *testing.T) {
	cert, certFile := selfSignedCert(t)
	r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"),
		wire.Config{TLS: &tls.Config{Certificates: []tls.Certificate{cert}}})

	t.Run("raw SSLRequest", func(t *testing.T) {
		c := dialRaw(t, r.Addr().String())
		if got := c.requestAnswers(t, sslRequestCode); got != "S" {
			t.Fatalf("SSLRequest answer: got %q, want %q", got, "S")
		}
	})

	tests := []struct {
		name   string
		params []string
	}{
		{"require", []string{"sslmode=require"}},
		{"verify-full", []string{"sslmode=verify-full", "sslrootcert=" + certFile}},
	}
	for _, tt := range tests {
		t.Run("pgx sslmode="+tt.name, func(t *testing.T) {
			conn := connectURL(t, r.url(pgcluster.RoleSuperuser, tt.params...))
			tc, ok := conn.PgConn().Conn().(*tls.Conn)
			if !ok {
				t.Fatalf("client connection: got %T, want *tls.Conn", conn.PgConn().Conn())
			}
			state := tc.ConnectionState()
			if len(state.PeerCertificates) == 0 || !state.PeerCertificates[0].Equal(cert.Leaf) {
				t.Fatalf("client saw a certificate other than the relay's")
			}
			var n int
			if err := conn.QueryRow(context.Background(), "select 41 + 1").Scan(&n); err != nil {
				t.Fatalf("query over TLS: %v", err)
			}
			if n != 42 {
				t.Fatalf("select 41 + 1: got %d, want 42", n)
			}
		})
	}

	t.Run("GSSENCRequest then SSLRequest", func(t *testing.T) {
		// libpq's order when gssencmode=prefer and sslmode=prefer.
		c := dialRaw(t, r.Addr().String())
		if got := c.requestAnswers(t, gssEncRequestCode, sslRequestCode); got != "NS" {
			t.Fatalf("answers to GSSENCRequest and SSLRequest: got %q, want %q", got, "NS")
		}
		pool := x509.NewCertPool()
		pool.AddCert(cert.Leaf)
		tc := tls.Client(c.conn, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
		if err := tc.Handshake(); err != nil {
			t.Fatalf("TLS handshake: %v", err)
		}
		c = &rawClient{conn: tc, fe: pgproto3.NewFrontend(tc, tc)}
		c.login(t, pgcluster.RoleSuperuser)
		c.query(t, "select 1")
	})
}

func TestGSSENCRequestIsAnsweredN(t *testing.T) {
	r := primaryRelay(t)
	c := dialRaw(t, r.Addr().String())
	if got := c.requestAnswers(t, gssEncRequestCode); got != "N" {
		t.Fatalf("GSSENCRequest answer: got %q, want %q", got, "N")
	}
	c.login(t, pgcluster.RoleSuperuser)
	if got := c.query(t, "select current_user"); got != pgcluster.RoleSuperuser.Name {
		t.Fatalf("current_user: got %q, want %q", got, pgcluster.RoleSuperuser.Name)
	}
}

func TestProtocolVersionNegotiationPassesThrough(t *testing.T) {
	r := primaryRelay(t)

	t.Run("raw 3.99", func(t *testing.T) {
		c := dialRaw(t, r.Addr().String())
		c.send(t, &pgproto3.StartupMessage{
			ProtocolVersion: 3<<16 | 99,
			Parameters: map[string]string{
				"user":             pgcluster.RoleSuperuser.Name,
				"database":         pgcluster.Database,
				"_pq_.pgfly_probe": "on",
			},
		})
		msg := c.receive(t)
		v, ok := msg.(*pgproto3.NegotiateProtocolVersion)
		if !ok {
			t.Fatalf("first answer: got %T, want *pgproto3.NegotiateProtocolVersion", msg)
		}
		// The server sends its whole newest version (3.0 is 196608); the minor is the low half.
		if minor := v.NewestMinorProtocol & 0xffff; minor != 0 {
			t.Errorf("newest minor protocol: got %d (from %#x), want 0", minor, v.NewestMinorProtocol)
		}
		if len(v.UnrecognizedOptions) != 1 || v.UnrecognizedOptions[0] != "_pq_.pgfly_probe" {
			t.Errorf("unrecognized options: got %q, want [_pq_.pgfly_probe]", v.UnrecognizedOptions)
		}
		// Authentication then proceeds at 3.0.
		if msg := c.receive(t); !isAuthOK(msg) {
			t.Fatalf("after NegotiateProtocolVersion: got %T, want AuthenticationOk", msg)
		}
		c.readUntilReady(t)
		c.query(t, "select 1")
	})

	t.Run("pgx max_protocol_version=3.2", func(t *testing.T) {
		conn := connectURL(t, r.url(pgcluster.RoleSuperuser, "sslmode=disable", "max_protocol_version=3.2"))
		var one int
		if err := conn.QueryRow(context.Background(), "select 1").Scan(&one); err != nil {
			t.Fatalf("select 1: %v", err)
		}
	})

	t.Run("pgx min_protocol_version=3.2", func(t *testing.T) {
		// PostgreSQL 15 offers only 3.0, and the relay must say so rather than pretend.
		err := connectErr(t, r.url(pgcluster.RoleSuperuser, "sslmode=disable", "min_protocol_version=3.2"),
			"connect with min_protocol_version=3.2", "a protocol version error")
		if !strings.Contains(err.Error(), "protocol version too low") {
			t.Fatalf("connect with min_protocol_version=3.2: got %v, want an error about the protocol version", err)
		}
	})
}

func TestUnsupportedProtocolIsRefused(t *testing.T) {
	r := primaryRelay(t)
	tests := []struct {
		name    string
		version uint32
	}{
		{"2.0", 2 << 16},
		{"4.0", 4 << 16},
		{"1.0", 1 << 16},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, r.Addr().String())
			c.send(t, &pgproto3.StartupMessage{
				ProtocolVersion: tt.version,
				Parameters:      map[string]string{"user": pgcluster.RoleSuperuser.Name, "database": pgcluster.Database},
			})
			e := wantFatal(t, c.readAll(t), "0A000")
			if !strings.Contains(e.Message, "protocol") {
				t.Errorf("message: got %q, want it to mention the protocol", e.Message)
			}
		})
	}
}

// Helpers shared by the startup, auth, cancel and fault tests.

// rawTimeout bounds every read and write of a rawClient.
const rawTimeout = 15 * time.Second

// rawClient speaks the protocol by hand, for what pgx will not do.
type rawClient struct {
	conn net.Conn
	fe   *pgproto3.Frontend
}

// dialRaw connects to addr and closes the connection when the test ends.
func dialRaw(tb testing.TB, addr string) *rawClient {
	tb.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		tb.Fatalf("dial %s: %v", addr, err)
	}
	tb.Cleanup(func() { c.Close() })
	return &rawClient{conn: c, fe: pgproto3.NewFrontend(c, c)}
}

// write sends raw bytes.
func (c *rawClient) write(tb testing.TB, b []byte) {
	tb.Helper()
	c.conn.SetWriteDeadline(time.Now().Add(rawTimeout))
	if _, err := c.conn.Write(b); err != nil {
		tb.Fatalf("write: %v", err)
	}
}

// send encodes and sends messages in one write.
func (c *rawClient) send(tb testing.TB, msgs ...pgproto3.FrontendMessage) {
	tb.Helper()
	for _, m := range msgs {
		c.fe.Send(m)
	}
	c.conn.SetWriteDeadline(time.Now().Add(rawTimeout))
	if err := c.fe.Flush(); err != nil {
		tb.Fatalf("send: %v", err)
	}
}

// receive reads one message.
func (c *rawClient) receive(tb testing.TB) pgproto3.BackendMessage {
	tb.Helper()
	c.conn.SetReadDeadline(time.Now().Add(rawTimeout))
	msg, err := c.fe.Receive()
	if err != nil {
		tb.Fatalf("receive: %v", err)
	}
	return msg
}

// startup sends a protocol 3.0 StartupMessage for role on the test database.
func (c *rawClient) startup(tb testing.TB, role pgcluster.Role) {
	tb.Helper()
	c.send(tb, &pgproto3.StartupMessage{
		ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters:      map[string]string{"user": role.Name, "database": pgcluster.Database},
	})
}

// login starts up as a trusted role and reads until the first ReadyForQuery. It returns the
// session's cancel key.
func (c *rawClient) login(tb testing.TB, role pgcluster.Role) *pgproto3.BackendKeyData {
	tb.Helper()
	c.startup(tb, role)
	if msg := c.receive(tb); !isAuthOK(msg) {
		tb.Fatalf("login as %s: got %#v, want AuthenticationOk", role.Name, msg)
	}
	return c.readUntilReady(tb)
}

// readUntilReady reads until ReadyForQuery, failing on an ErrorResponse, and returns the
// BackendKeyData seen on the way, if any.
func (c *rawClient) readUntilReady(tb testing.TB) *pgproto3.BackendKeyData {
	tb.Helper()
	var key *pgproto3.BackendKeyData
	for range 1000 {
		switch m := c.receive(tb).(type) {
		case *pgproto3.BackendKeyData:
			key = &pgproto3.BackendKeyData{ProcessID: m.ProcessID, SecretKey: append([]byte(nil), m.SecretKey...)}
		case *pgproto3.ErrorResponse:
			tb.Fatalf("got ErrorResponse %s: %s, want ReadyForQuery", m.Code, m.Message)
		case *pgproto3.ReadyForQuery:
			return key
		}
	}
	tb.Fatalf("no ReadyForQuery in 1000 messages")
	return nil
}

// query runs sql with the simple protocol and returns the first column of the last row.
func (c *rawClient) query(tb testing.TB, sql string) string {
	tb.Helper()
	c.send(tb, &pgproto3.Query{String: sql})
	var got string
	for range 1000 {
		switch m := c.receive(tb).(type) {
		case *pgproto3.DataRow:
			if len(m.Values) > 0 {
				got = string(m.Values[0])
			}
		case *pgproto3.ErrorResponse:
			tb.Fatalf("%s: got ErrorResponse %s: %s", sql, m.Code, m.Message)
		case *pgproto3.ReadyForQuery:
			return got
		}
	}
	tb.Fatalf("%s: no ReadyForQuery in 1000 messages", sql)
	return ""
}

// requestAnswers sends an SSLRequest or GSSENCRequest for each code, one write each, and
// returns the single-byte answers ('S' or 'N') read back.
func (c *rawClient) requestAnswers(tb testing.TB, codes ...uint32) string {
	tb.Helper()
	for _, code := range codes {
		c.write(tb, requestPacket(code))
	}
	b := make([]byte, len(codes))
	c.conn.SetReadDeadline(time.Now().Add(rawTimeout))
	if n, err := io.ReadFull(c.conn, b); err != nil {
		tb.Fatalf("read the answers to %d requests: %v (after %q)", len(codes), err, b[:n])
	}
	return string(b)
}

// readAll reads until the peer closes the connection and returns what it sent.
func (c *rawClient) readAll(tb testing.TB) []byte {
	tb.Helper()
	c.conn.SetReadDeadline(time.Now().Add(rawTimeout))
	b, err := io.ReadAll(c.conn)
	if err != nil && !errors.Is(err, net.ErrClosed) && !isReset(err) {
		tb.Fatalf("read until the relay closes: %v (after %q)", err, b)
	}
	return b
}

// isReset reports a connection reset, which is how a close with unread input can arrive.
func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset by peer")
}

func isAuthOK(msg pgproto3.BackendMessage) bool {
	_, ok := msg.(*pgproto3.AuthenticationOk)
	return ok
}

// requestPacket is an 8-byte SSLRequest or GSSENCRequest.
func requestPacket(code uint32) []byte {
	var b [8]byte
	binary.BigEndian.PutUint32(b[0:4], 8)
	binary.BigEndian.PutUint32(b[4:8], code)
	return b[:]
}

// wantFatal checks that b is exactly one FATAL ErrorResponse with the given SQLSTATE.
func wantFatal(tb testing.TB, b []byte, code string) *pgproto3.ErrorResponse {
	tb.Helper()
	if len(b) < 5 || b[0] != 'E' {
		tb.Fatalf("got %q, want a FATAL ErrorResponse %s", b, code)
	}
	n := int(binary.BigEndian.Uint32(b[1:5]))
	if n < 4 || 1+n != len(b) {
		tb.Fatalf("got %d bytes with an ErrorResponse of length %d, want exactly that message: %q", len(b), n, b)
	}
	var e pgproto3.ErrorResponse
	if err := e.Decode(b[5:]); err != nil {
		tb.Fatalf("decode ErrorResponse: %v", err)
	}
	if e.Severity != "FATAL" || e.Code != code {
		tb.Fatalf("got %s %s %q, want FATAL %s", e.Severity, e.Code, e.Message, code)
	}
	return &e
}

// pgCode is the SQLSTATE of a server error in err's chain, or "".
func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// selfSignedCert returns a certificate for 127.0.0.1, ::1 and localhost that is its own CA,
// and the PEM file holding it, for sslrootcert=.
func selfSignedCert(tb testing.TB) (tls.Certificate, string) {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatalf("generate key: %v", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		tb.Fatalf("serial: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "pgfly wire test " + rand.Text()},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatalf("create certificate: %v", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatalf("parse certificate: %v", err)
	}
	file := filepath.Join(tb.TempDir(), "cert.pem")
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		tb.Fatalf("write certificate: %v", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, file
}

// primaryAdmin is a direct superuser connection to the primary, bypassing any relay.
func primaryAdmin(tb testing.TB) *pgx.Conn {
	tb.Helper()
	return connectURL(tb, cluster.Primary.URL(pgcluster.RoleSuperuser.Name, "", pgcluster.Database))
}

// activeWith returns the pids of the primary's backends running a statement containing tag.
func activeWith(tb testing.TB, admin *pgx.Conn, tag string) []uint32 {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, err := admin.Query(ctx, `select pid from pg_stat_activity
		where state = 'active' and pid <> pg_backend_pid() and position($1 in query) > 0`, tag)
	if err != nil {
		tb.Fatalf("query pg_stat_activity: %v", err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[uint32])
	if err != nil {
		tb.Fatalf("query pg_stat_activity: %v", err)
	}
	return pids
}

// waitRunning waits until the primary runs a statement containing tag.
func waitRunning(tb testing.TB, admin *pgx.Conn, tag string) {
	tb.Helper()
	waitFor(tb, 10*time.Second, "a backend running "+tag, func() bool { return len(activeWith(tb, admin, tag)) > 0 })
}

// waitNotRunning waits until no backend of the primary runs a statement containing tag.
func waitNotRunning(tb testing.TB, admin *pgx.Conn, tag string) {
	tb.Helper()
	waitFor(tb, 5*time.Second, "no backend running "+tag, func() bool { return len(activeWith(tb, admin, tag)) == 0 })
}

// closedFor waits for the SessionEnd of the session whose client address is addr.
func closedFor(tb testing.TB, r *relay, addr string) wire.SessionEnd {
	tb.Helper()
	var end wire.SessionEnd
	waitFor(tb, 10*time.Second, "the session of "+addr+" to close", func() bool {
		for _, e := range r.events.Closed() {
			if e.ClientAddr == addr {
				end = e
				return true
			}
		}
		return false
	})
	return end
}
