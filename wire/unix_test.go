package wire_test

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/wire"
)

// unixURL is a client URL for the superuser through a relay listening in dir, in the form
// libpq, pgx and node-postgres take: the directory as the host.
func unixURL(dir string, port string) string {
	return "postgres://" + pgcluster.RoleSuperuser.Name + "@/" + pgcluster.Database + "?host=" + dir + "&port=" + port + "&sslmode=disable"
}

// TestUnixSocket: with Listen a directory, the relay listens on <dir>/.s.PGSQL.<UnixPort>,
// where pgx and psql find it given the directory as the host; it removes the file when it
// closes.
func TestUnixSocket(t *testing.T) {
	dir := t.TempDir()
	r := startRelay(t, cluster.Primary.URL("", "", "", "sslmode=disable"), wire.Config{Listen: dir, UnixPort: 6543})
	sock := filepath.Join(dir, ".s.PGSQL.6543")
	if fi, err := os.Stat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o777 {
		t.Fatalf("stat %s: %v (mode %v), want a socket, 0777 as Postgres makes its own", sock, err, fi)
	}
	if got := r.Addr().String(); got != sock {
		t.Errorf("Addr: got %q, want %q", got, sock)
	}

	conn := connectURL(t, unixURL(dir, "6543"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var n int
	if err := conn.QueryRow(ctx, "select 41 + 1").Scan(&n); err != nil || n != 42 {
		t.Fatalf("select through the socket with pgx: %d, %v", n, err)
	}
	waitFor(t, 10*time.Second, "the session to be recorded", func() bool { return len(r.events.Opened()) == 1 })
	if got := r.events.Opened()[0].ClientAddr; got != "[local]" {
		t.Errorf("ClientAddr: got %q, want [local], as Postgres names a Unix-socket client", got)
	}

	psql, err := exec.LookPath("psql")
	if err != nil {
		t.Fatalf("psql is needed for this test: %v", err)
	}
	out, err := exec.CommandContext(ctx, psql, "-X", "-At", "-h", dir, "-p", "6543", "-U", pgcluster.RoleSuperuser.Name,
		"-d", pgcluster.Database, "-c", "select 'through the socket'").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "through the socket" {
		t.Fatalf("psql -h %s -p 6543: %v: %s", dir, err, out)
	}

	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat %s after Close: %v, want it removed", sock, err)
	}
	if _, err := os.Lstat(sock + ".lock"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat %s.lock: %v, want none: that name is Postgres's own lock file", sock, err)
	}
}

// TestUnixSocketInTheWay: a socket left by a process that died is replaced; one that answers,
// or a file that is not a socket, stops Listen with an error saying so; a directory that does
// not exist is a configuration error.
func TestUnixSocketInTheWay(t *testing.T) {
	upstream := cluster.Replica.URL("", "", "", "sslmode=disable")
	listen := func(dir string) error {
		srv, err := wire.NewServer(wire.Config{Listen: dir, Upstream: upstream}, nil, nil)
		if err != nil {
			return err
		}
		defer srv.Close()
		return srv.Listen()
	}

	stale := t.TempDir()
	ln, err := net.Listen("unix", wire.UnixSocket(stale, wire.DefaultUnixPort))
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close() // the file stays, with nobody behind it
	if err := listen(stale); err != nil {
		t.Errorf("Listen over a stale socket: %v, want it replaced", err)
	}

	live := t.TempDir()
	ln, err = net.Listen("unix", wire.UnixSocket(live, wire.DefaultUnixPort))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := listen(live); err == nil || !strings.Contains(err.Error(), "a server listens there") {
		t.Errorf("Listen over a live socket: %v, want an error saying it is in use", err)
	}

	// Two relays on one directory: the second is refused by the first's lock, and leaves the
	// first's socket alone.
	shared := t.TempDir()
	first, err := wire.NewServer(wire.Config{Listen: shared, Upstream: upstream}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Listen(); err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if err := listen(shared); err == nil || !strings.Contains(err.Error(), "another pgfly listens there") {
		t.Errorf("a second Listen on one directory: %v, want it refused by the lock", err)
	}
	if _, err := os.Stat(wire.UnixSocket(shared, wire.DefaultUnixPort)); err != nil {
		t.Errorf("the first relay's socket after the second was refused: %v", err)
	}

	file := t.TempDir()
	if err := os.WriteFile(wire.UnixSocket(file, wire.DefaultUnixPort), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := listen(file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen over a plain file: %v, want an error saying so", err)
	}

	long := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
	if err := os.Mkdir(long, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, dir := range map[string]string{"a missing directory": filepath.Join(t.TempDir(), "missing"),
		"a relative directory": "./sock", "a path too long for a socket": long} {
		var ce *wire.ConfigError
		if err := listen(dir); !errors.As(err, &ce) || ce.Field != "Listen" {
			t.Errorf("Listen in %s: %v, want a ConfigError for Listen", name, err)
		}
	}
}
