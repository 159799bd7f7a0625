package wire_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

func TestAuthMethodsThroughRelay(t *testing.T) {
	r := primaryRelay(t)
	tests := []struct {
		name string
		role pgcluster.Role
		// firstAuth is the Authentication message the upstream's method starts with.
		firstAuth pgproto3.BackendMessage
		// wrongFails: a wrong password is refused (a trust role never asks for one).
		wrongFails bool
	}{
		{"trust", pgcluster.RoleTrust, &pgproto3.AuthenticationOk{}, false},
		{"cleartext password", pgcluster.RolePassword, &pgproto3.AuthenticationCleartextPassword{}, true},
		{"md5", pgcluster.RoleMD5, &pgproto3.AuthenticationMD5Password{}, true},
		{"scram-sha-256", pgcluster.RoleSCRAM, &pgproto3.AuthenticationSASL{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The relay passes the upstream's own challenge through.
			c := dialRaw(t, r.Addr().String())
			c.startup(t, tt.role)
			if got, want := c.receive(t), tt.firstAuth; reflect.TypeOf(got) != reflect.TypeOf(want) {
				t.Fatalf("first Authentication message: got %T, want %T", got, want)
			}

			login(t, r.url(tt.role), tt.role.Name)

			wrong := tt.role
			wrong.Password = "not-" + tt.role.Password + "-at-all"
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, err := pgx.Connect(ctx, r.url(wrong))
			switch {
			case tt.wrongFails && err == nil:
				conn.Close(ctx)
				t.Fatalf("login with a wrong password: got no error, want 28P01")
			case tt.wrongFails && pgCode(err) != "28P01":
				t.Fatalf("login with a wrong password: got %v, want SQLSTATE 28P01", err)
			case !tt.wrongFails && err != nil:
				t.Fatalf("login to a trust role with any password: got %v, want success", err)
			case !tt.wrongFails:
				conn.Close(ctx)
			}

			// The relay keeps serving after a failed login.
			login(t, r.url(tt.role), tt.role.Name)
		})
	}
}

func TestUpstreamTLSFollowsSSLMode(t *testing.T) {
	tests := []struct {
		sslmode string
		wantTLS bool
	}{
		{"disable", false},
		{"allow", false}, // plain first, and the server accepts it
		{"prefer", true},
		{"require", true},
		{"verify-ca", true},
		{"verify-full", true},
	}
	for _, tt := range tests {
		t.Run(tt.sslmode, func(t *testing.T) {
			// The cluster's certificate names 127.0.0.1, the host in the URL, so verify-full
			// can check it.
			r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode="+tt.sslmode, "sslrootcert="+cluster.CAFile), wire.Config{})
			conn := login(t, r.url(pgcluster.RoleSCRAM), pgcluster.RoleSCRAM.Name)
			var ssl bool
			if err := conn.QueryRow(context.Background(),
				"select ssl from pg_stat_ssl where pid = pg_backend_pid()").Scan(&ssl); err != nil {
				t.Fatalf("read pg_stat_ssl: %v", err)
			}
			if ssl != tt.wantTLS {
				t.Fatalf("upstream hop is TLS: got %v, want %v", ssl, tt.wantTLS)
			}
		})
	}
}

func TestUpstreamCertificateFromWrongCAIsRefused(t *testing.T) {
	_, wrongCA := selfSignedCert(t)
	for _, sslmode := range []string{"verify-ca", "verify-full"} {
		t.Run(sslmode, func(t *testing.T) {
			r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode="+sslmode, "sslrootcert="+wrongCA), wire.Config{})
			err := connectErr(t, r.url(pgcluster.RoleSCRAM), "login through an upstream with an untrusted certificate", "08006")
			if got := pgCode(err); got != "08006" {
				t.Fatalf("login through an upstream with an untrusted certificate: got %v, want SQLSTATE 08006", err)
			}
			if msg := err.Error(); !strings.Contains(msg, "FATAL") || !strings.Contains(msg, cluster.Primary.Addr()) ||
				!strings.Contains(msg, "certificate") {
				t.Fatalf("error: got %q, want a FATAL naming upstream %s and its certificate", msg, cluster.Primary.Addr())
			}
		})
	}
}

func TestSCRAMChannelBindingIsStripped(t *testing.T) {
	r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=require"), wire.Config{})

	t.Run("upstream offers PLUS over TLS", func(t *testing.T) {
		// Without the relay, a TLS client is offered SCRAM-SHA-256-PLUS: that is what the
		// relay must hide.
		mechs := saslMechanisms(t, dialUpstreamTLS(t))
		if !slices.Contains(mechs, "SCRAM-SHA-256-PLUS") {
			t.Fatalf("mechanisms offered directly over TLS: got %q, want SCRAM-SHA-256-PLUS among them", mechs)
		}
	})

	t.Run("relay offers no PLUS", func(t *testing.T) {
		mechs := saslMechanisms(t, dialRaw(t, r.Addr().String()))
		if !slices.Contains(mechs, "SCRAM-SHA-256") || slices.Contains(mechs, "SCRAM-SHA-256-PLUS") {
			t.Fatalf("mechanisms offered through the relay: got %q, want SCRAM-SHA-256 and no SCRAM-SHA-256-PLUS", mechs)
		}
	})

	t.Run("pgx defaults", func(t *testing.T) {
		// No sslmode: pgx prefers TLS, gets 'N' from the relay and goes plain.
		conn := login(t, r.url(pgcluster.RoleSCRAM, "application_name=pgfly-scram-default"), pgcluster.RoleSCRAM.Name)
		if _, ok := conn.PgConn().Conn().(*tls.Conn); ok {
			t.Fatalf("client connection is TLS, want plain (the relay has no client TLS)")
		}
	})

	// A TLS client that is offered only SCRAM-SHA-256 says so in its first message ("y,,"),
	// and a server whose own hop is TLS refuses that as a downgrade. So with TLS on both
	// hops, channel_binding=disable is needed; with plain upstream, nothing is.
	cert, _ := selfSignedCert(t)
	clientTLS := &tls.Config{Certificates: []tls.Certificate{cert}}
	t.Run("client TLS, upstream plain", func(t *testing.T) {
		r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{TLS: clientTLS})
		login(t, r.url(pgcluster.RoleSCRAM, "sslmode=require"), pgcluster.RoleSCRAM.Name)
	})
	t.Run("client TLS, upstream TLS, channel_binding=disable", func(t *testing.T) {
		r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=require"), wire.Config{TLS: clientTLS})
		login(t, r.url(pgcluster.RoleSCRAM, "sslmode=require", "channel_binding=disable"), pgcluster.RoleSCRAM.Name)
	})
}

func TestPasswordsNeverLogged(t *testing.T) {
	var buf lockedBuffer
	core := zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewDevelopmentEncoderConfig()), &buf, zap.DebugLevel)
	r := startRelayWithLog(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{}, zap.New(core))

	const wrongPassword = "pgfly-wrong-secret-5d1e0c"
	roles := []pgcluster.Role{pgcluster.RolePassword, pgcluster.RoleMD5, pgcluster.RoleSCRAM}
	for _, role := range roles {
		login(t, r.url(role), role.Name).Close(context.Background())
		wrong := role
		wrong.Password = wrongPassword
		connectErr(t, r.url(wrong), "login as "+role.Name+" with a wrong password", "28P01")
	}
	waitFor(t, 10*time.Second, "every session to end", func() bool { return r.OpenSessions() == 0 })
	waitFor(t, 10*time.Second, "every session end to be reported", func() bool { return len(r.events.Closed()) == 2*len(roles) })

	logs := buf.String()
	// The buffer must hold the relay's logs for the check below to mean anything.
	if got, want := strings.Count(logs, "session closed"), 2*len(roles); got != want {
		t.Fatalf("session closed entries in the relay's logs: got %d, want %d:\n%s", got, want, logs)
	}
	for _, secret := range []string{wrongPassword, pgcluster.RolePassword.Password, pgcluster.RoleMD5.Password, pgcluster.RoleSCRAM.Password} {
		if strings.Contains(logs, secret) {
			t.Errorf("relay logs contain the password %q", secret)
		}
	}
}

// login connects to url, checks that the session belongs to user, and closes it at the end.
func login(tb testing.TB, url, user string) *pgx.Conn {
	tb.Helper()
	conn := connectURL(tb, url)
	var got string
	if err := conn.QueryRow(context.Background(), "select current_user").Scan(&got); err != nil {
		tb.Fatalf("select current_user: %v", err)
	}
	if got != user {
		tb.Fatalf("current_user: got %q, want %q", got, user)
	}
	return conn
}

// saslMechanisms starts up as the SCRAM role on c and returns the mechanisms offered.
func saslMechanisms(tb testing.TB, c *rawClient) []string {
	tb.Helper()
	c.startup(tb, pgcluster.RoleSCRAM)
	msg := c.receive(tb)
	sasl, ok := msg.(*pgproto3.AuthenticationSASL)
	if !ok {
		tb.Fatalf("first Authentication message: got %T, want *pgproto3.AuthenticationSASL", msg)
	}
	return slices.Clone(sasl.AuthMechanisms)
}

// dialUpstreamTLS connects straight to the primary and upgrades to TLS, verifying its
// certificate against the cluster's CA.
func dialUpstreamTLS(tb testing.TB) *rawClient {
	tb.Helper()
	c := dialRaw(tb, cluster.Primary.Addr())
	if got := c.requestAnswers(tb, sslRequestCode); got != "S" {
		tb.Fatalf("SSLRequest to the primary: got %q, want %q", got, "S")
	}
	pem, err := os.ReadFile(cluster.CAFile)
	if err != nil {
		tb.Fatalf("read CA: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		tb.Fatalf("no certificate in %s", cluster.CAFile)
	}
	host, _, _ := net.SplitHostPort(cluster.Primary.Addr())
	tc := tls.Client(c.conn, &tls.Config{RootCAs: pool, ServerName: host})
	if err := tc.Handshake(); err != nil {
		tb.Fatalf("TLS handshake with the primary: %v", err)
	}
	return &rawClient{conn: tc, fe: pgproto3.NewFrontend(tc, tc)}
}

// lockedBuffer is a bytes.Buffer safe for the relay's goroutines to log into.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) Sync() error { return nil }

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
