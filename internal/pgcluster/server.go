package pgcluster

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// serverConfFile is included from postgresql.conf and holds the settings that
// differ between the primary and the replica. It is rewritten before every
// fresh start.
const serverConfFile = "pgcluster_server.conf"

// portAttempts is how many free ports a fresh start tries before giving up.
const portAttempts = 3

// pgctlTimeout bounds one pg_ctl start or stop.
const pgctlTimeout = 60 * time.Second

// maxSocketPath is the longest Unix socket path this package lets the server
// create; the kernel limit is 107 bytes.
const maxSocketPath = 100

// logTailLines is how many lines of a server log an error carries.
const logTailLines = 30

// Server is one PostgreSQL server of a Cluster. Port stays the same across
// Stop and Start.
type Server struct {
	// Name is "primary" or "replica".
	Name string
	// Host is the address the server listens on, "127.0.0.1".
	Host string
	// Port is the TCP port the server listens on.
	Port int
	// DataDir is the server's data directory.
	DataDir string
	// LogFile is where the server writes its log.
	LogFile string

	// clusterName is the server's cluster_name setting, unique per cluster;
	// it is also the replica's application_name on the primary.
	clusterName string
	r           *runner
	logf        func(format string, args ...any)
}

// Addr returns the server's host:port, e.g. "127.0.0.1:54321".
func (s *Server) Addr() string {
	return net.JoinHostPort(s.Host, strconv.Itoa(s.Port))
}

// URL returns a postgres:// URL for user and password (no password when
// empty) on database, with sslmode=disable unless params say otherwise. Each
// param is "key=value" and sets that query parameter, replacing any earlier
// value; a param without "=" sets an empty value.
func (s *Server) URL(user, password, database string, params ...string) string {
	u := url.URL{Scheme: "postgres", Host: s.Addr(), Path: "/" + database}
	if password != "" {
		u.User = url.UserPassword(user, password)
	} else {
		u.User = url.User(user)
	}
	q := url.Values{"sslmode": {"disable"}}
	for _, p := range params {
		k, v, _ := strings.Cut(p, "=")
		q.Set(k, v)
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// Stop shuts the server down with pg_ctl -m fast and waits until it is gone,
// so clients see it as unreachable until Start.
func (s *Server) Stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), pgctlTimeout+5*time.Second)
	defer cancel()
	if err := s.r.run(ctx, "pg_ctl", "-D", s.DataDir, "-m", "fast", "-w", "-t", seconds(pgctlTimeout), "stop"); err != nil {
		return fmt.Errorf("stop %s: %w", s.Name, err)
	}
	s.logf("pgcluster: %s stopped", s.Name)
	return nil
}

// Start starts a stopped server again on the same port and waits until it
// accepts connections. A restarted replica may need a moment before it
// streams again; see Cluster.WaitStreaming.
func (s *Server) Start() error {
	ctx, cancel := context.WithTimeout(context.Background(), pgctlTimeout+5*time.Second)
	defer cancel()
	if err := s.pgctlStart(ctx); err != nil {
		return fmt.Errorf("start %s: %w%s", s.Name, err, s.logTail())
	}
	s.logf("pgcluster: %s started on %s", s.Name, s.Addr())
	return nil
}

// startFresh picks a free port, writes the per-server configuration and
// starts the server, trying another port when the chosen one was taken in
// the meantime.
func (s *Server) startFresh(ctx context.Context) error {
	for attempt := 1; ; attempt++ {
		port, err := freePort()
		if err != nil {
			return err
		}
		s.Port = port
		if err := s.writeServerConf(); err != nil {
			return err
		}
		logOffset := fileSize(s.LogFile)
		err = s.pgctlStart(ctx)
		if err == nil {
			return nil
		}
		if attempt < portAttempts && portTaken(s.LogFile, logOffset) {
			s.logf("pgcluster: %s port %d was taken, trying another", s.Name, port)
			continue
		}
		return fmt.Errorf("start %s: %w%s", s.Name, err, s.logTail())
	}
}

// pgctlStart runs pg_ctl start and waits for the server to accept
// connections.
func (s *Server) pgctlStart(ctx context.Context) error {
	return s.r.run(ctx, "pg_ctl", "-D", s.DataDir, "-l", s.LogFile, "-w", "-t", seconds(pgctlTimeout), "start")
}

// writeServerConf writes the settings that differ per server.
func (s *Server) writeServerConf() error {
	// Put the Unix socket in the cluster directory (not the data directory,
	// where pg_basebackup warns about it) when the path is short enough;
	// otherwise listen on TCP only, which pg_ctl -w does not need.
	socketDir := filepath.Dir(s.DataDir)
	if len(filepath.Join(socketDir, ".s.PGSQL.65535.lock")) > maxSocketPath {
		socketDir = ""
	}
	conf := fmt.Sprintf("# Written by pgfly's pgcluster for the %s server.\nport = %d\ncluster_name = %s\nunix_socket_directories = %s\n",
		s.Name, s.Port, confQuote(s.clusterName), confQuote(socketDir))
	return s.r.writeFile(filepath.Join(s.DataDir, serverConfFile), []byte(conf), 0o600)
}

// kill stops the server with pg_ctl -m immediate and, if that fails, signals
// the postmaster directly. A server that is not running is not an error.
func (s *Server) kill() error {
	if _, err := os.Stat(filepath.Join(s.DataDir, "postmaster.pid")); err != nil {
		return nil
	}
	// A frozen server would not hear the stop request.
	if err := s.Thaw(); err != nil {
		s.logf("pgcluster: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), pgctlTimeout+5*time.Second)
	defer cancel()
	err := s.r.run(ctx, "pg_ctl", "-D", s.DataDir, "-m", "immediate", "-w", "-t", seconds(pgctlTimeout), "stop")
	if err == nil {
		return nil
	}
	s.logf("pgcluster: pg_ctl could not stop %s, killing it: %v", s.Name, err)
	if kerr := killPostmaster(s.DataDir); kerr != nil {
		return fmt.Errorf("stop %s: %w (then: %v)", s.Name, kerr, err)
	}
	return nil
}

// logTail returns the last lines of the server log, formatted to be appended
// to an error message, or "" when there is no log.
func (s *Server) logTail() string {
	if s == nil {
		return ""
	}
	data, err := os.ReadFile(s.LogFile)
	if err != nil || len(bytes.TrimSpace(data)) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > logTailLines {
		lines = lines[len(lines)-logTailLines:]
	}
	return fmt.Sprintf("\n--- last lines of %s ---\n%s", s.LogFile, strings.Join(lines, "\n"))
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	return port, nil
}

// portTaken reports whether the log written after offset says the server
// could not bind its port.
func portTaken(logFile string, offset int64) bool {
	data, err := os.ReadFile(logFile)
	if err != nil || int64(len(data)) < offset {
		return false
	}
	return bytes.Contains(data[offset:], []byte("Address already in use"))
}

// fileSize returns the size of path, or 0 when it does not exist.
func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// confQuote quotes s as a postgresql.conf string value.
func confQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}

// seconds formats d as whole seconds for pg_ctl -t.
func seconds(d time.Duration) string {
	return strconv.Itoa(int(d / time.Second))
}
