// Package pgcluster starts a real PostgreSQL primary and a streaming
// hot-standby replica on free loopback ports in a temporary directory, for
// tests, the demo and benchmarks.
//
// The cluster is disposable: fsync is off, every role it creates has a
// password printed in this file, and it listens only on 127.0.0.1. It must
// never be pointed at data that matters, and it must never leave a server
// running after Close. This package does not import "testing"; the
// testing.TB convenience lives in package pgtest.
package pgcluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvBinDir names the environment variable that points at the directory
// holding initdb, pg_ctl, postgres and pg_basebackup.
const EnvBinDir = "PGFLY_PG_BIN"

// DefaultWaitTimeout bounds WaitStreaming and WaitReplayed when the caller's
// context has no earlier deadline.
const DefaultWaitTimeout = 30 * time.Second

// dirPrefix starts the name of every cluster directory under os.TempDir; the
// stale-cluster reaper only looks at directories with this prefix.
const dirPrefix = "pgfly-pgcluster-"

// ownerFile is the file in a cluster directory that holds the pid of the
// process that created it.
const ownerFile = "owner.pid"

// pollInterval is how often the helper re-checks replication state.
const pollInterval = 10 * time.Millisecond

// Options configures Start. The zero value is a plain-text cluster using the
// newest installed PostgreSQL.
type Options struct {
	// BinDir is the directory holding the server binaries. When empty,
	// Start looks at $PGFLY_PG_BIN, then the newest /usr/lib/postgresql/*/bin,
	// then PATH.
	BinDir string
	// TLS turns on ssl on both servers with a certificate for localhost,
	// 127.0.0.1 and ::1 signed by a fresh CA written to Cluster.CAFile.
	TLS bool
	// Logf, when set, receives one line per start-up step.
	Logf func(format string, args ...any)
	// MaxConnections, when positive, replaces the max_connections of 300 on
	// both servers (the benchmarks hold thousands of sessions open).
	MaxConnections int
}

// Cluster is a running primary and its streaming replica. Its methods are not
// safe for concurrent use, except that Close may be called at any time.
type Cluster struct {
	// Primary is the read-write server.
	Primary *Server
	// Replica is a hot standby streaming from Primary.
	Replica *Server
	// Dir is the temporary directory holding both data directories, their
	// logs and the CA certificate; Close removes it.
	Dir string
	// CAFile is the PEM file of the CA that signed the servers'
	// certificate, for sslrootcert=. It is empty unless Options.TLS is set.
	CAFile string

	r    *runner
	logf func(format string, args ...any)

	mu     sync.Mutex
	closed bool
}

// Start creates a primary, a replica taken from it with pg_basebackup, the
// test roles and the pgfly database, and returns once the replica is
// streaming. On error nothing is left behind: servers that were started are
// stopped and the directory is removed.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	binDir, err := findBinDir(opts.BinDir)
	if err != nil {
		return nil, err
	}
	r, err := newRunner(binDir)
	if err != nil {
		return nil, err
	}
	reapStale(logf)

	dir, err := os.MkdirTemp(os.TempDir(), dirPrefix)
	if err != nil {
		return nil, fmt.Errorf("create cluster directory: %w", err)
	}
	r.dir = dir
	c := &Cluster{Dir: dir, r: r, logf: logf}
	if err := c.start(ctx, opts); err != nil {
		if cerr := c.Close(); cerr != nil {
			logf("pgcluster: clean up after failed start: %v", cerr)
		}
		return nil, err
	}
	return c, nil
}

// start does the work of Start on a cluster whose directory exists.
func (c *Cluster) start(ctx context.Context, opts Options) error {
	began := time.Now()
	if err := os.WriteFile(filepath.Join(c.Dir, ownerFile), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return fmt.Errorf("write owner file: %w", err)
	}
	if err := c.r.chown(c.Dir); err != nil {
		return err
	}
	token := filepath.Base(c.Dir)
	c.Primary = c.newServer("primary", token)

	var tlsFiles *tlsFiles
	if opts.TLS {
		f, err := newTLSFiles()
		if err != nil {
			return err
		}
		tlsFiles = f
		c.CAFile = filepath.Join(c.Dir, "ca.crt")
		if err := os.WriteFile(c.CAFile, f.caPEM, 0o644); err != nil {
			return fmt.Errorf("write CA certificate: %w", err)
		}
	}

	c.logf("pgcluster: initdb %s (binaries in %s)", c.Primary.DataDir, c.r.binDir)
	if err := c.r.run(ctx, "initdb",
		"-D", c.Primary.DataDir, "-U", superuser,
		"--auth-local=trust", "--auth-host=scram-sha-256",
		"--no-sync", "-E", "UTF8", "--locale=C", "--no-instructions"); err != nil {
		return err
	}
	if err := c.configurePrimary(tlsFiles, opts.MaxConnections); err != nil {
		return err
	}
	if err := c.Primary.startFresh(ctx); err != nil {
		return err
	}
	c.logf("pgcluster: primary listening on %s", c.Primary.Addr())
	if err := c.createRoles(ctx); err != nil {
		return err
	}

	c.Replica = c.newServer("replica", token)
	c.logf("pgcluster: pg_basebackup into %s", c.Replica.DataDir)
	if err := c.r.run(ctx, "pg_basebackup",
		"-h", c.Primary.Host, "-p", strconv.Itoa(c.Primary.Port), "-U", superuser,
		"-D", c.Replica.DataDir, "-R", "-X", "stream", "-c", "fast", "--no-sync"); err != nil {
		return err
	}
	if err := c.Replica.startFresh(ctx); err != nil {
		return err
	}
	c.logf("pgcluster: replica listening on %s", c.Replica.Addr())
	if err := c.WaitStreaming(ctx); err != nil {
		return err
	}
	c.logf("pgcluster: cluster ready in %v", time.Since(began).Round(time.Millisecond))
	return nil
}

// newServer describes a server whose data directory is named after it.
func (c *Cluster) newServer(name, token string) *Server {
	return &Server{
		Name:        name,
		Host:        "127.0.0.1",
		DataDir:     filepath.Join(c.Dir, name),
		LogFile:     filepath.Join(c.Dir, name+".log"),
		clusterName: token + "-" + name,
		r:           c.r,
		logf:        c.logf,
	}
}

// configurePrimary writes postgresql.conf additions, pg_hba.conf and the TLS
// key pair into the freshly initialised primary. pg_basebackup copies all of
// it to the replica.
func (c *Cluster) configurePrimary(tf *tlsFiles, maxConnections int) error {
	conf := commonConf
	if maxConnections > 0 { // a later setting wins
		conf += "max_connections = " + strconv.Itoa(maxConnections) + "\n"
	}
	if tf != nil {
		conf += "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
		if err := c.r.writeFile(filepath.Join(c.Primary.DataDir, "server.crt"), tf.certPEM, 0o600); err != nil {
			return err
		}
		if err := c.r.writeFile(filepath.Join(c.Primary.DataDir, "server.key"), tf.keyPEM, 0o600); err != nil {
			return err
		}
	}
	conf += "include '" + serverConfFile + "'\n"
	f, err := os.OpenFile(filepath.Join(c.Primary.DataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open postgresql.conf: %w", err)
	}
	if _, err := f.WriteString(conf); err != nil {
		f.Close()
		return fmt.Errorf("append to postgresql.conf: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close postgresql.conf: %w", err)
	}
	return c.r.writeFile(filepath.Join(c.Primary.DataDir, "pg_hba.conf"), []byte(hbaConf()), 0o600)
}

// commonConf is appended to the primary's postgresql.conf and so shared by
// both servers. Settings that differ per server live in serverConfFile.
const commonConf = `
# Added by pgfly's pgcluster: a disposable test cluster, never real data.
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
hot_standby = on
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 300
wal_keep_size = 256MB
wal_writer_delay = 10ms
wal_retrieve_retry_interval = 100ms
log_min_messages = warning
logging_collector = off
`

// WaitStreaming waits until the primary's pg_stat_replication shows the
// replica in state streaming. Start calls it; call it again after restarting
// either server. It gives up after DefaultWaitTimeout.
func (c *Cluster) WaitStreaming(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, DefaultWaitTimeout)
	defer cancel()
	var lastErr error
	for {
		state, err := c.replicationState(ctx)
		if err == nil && state == "streaming" {
			return nil
		}
		if err != nil {
			lastErr = err
		} else {
			lastErr = fmt.Errorf("replica state is %q", state)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for replica to stream: %w (last: %v)%s%s",
				ctx.Err(), lastErr, c.Primary.logTail(), c.Replica.logTail())
		case <-time.After(pollInterval):
		}
	}
}

// replicationState returns the replica's state in the primary's
// pg_stat_replication, or "" when it is not connected.
func (c *Cluster) replicationState(ctx context.Context) (string, error) {
	conn, err := c.Primary.connect(ctx, nil)
	if err != nil {
		return "", err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var state string
	err = conn.QueryRow(ctx,
		"SELECT coalesce(max(state), '') FROM pg_stat_replication WHERE application_name = $1",
		c.Replica.clusterName).Scan(&state)
	if err != nil {
		return "", fmt.Errorf("query pg_stat_replication: %w", err)
	}
	return state, nil
}

// WaitReplayed waits until the replica has replayed everything the primary
// had written when WaitReplayed was called, so a row committed on the primary
// before the call is visible on the replica after it. Because the cluster
// runs with synchronous_commit=off, whose commits may sit unflushed in WAL
// buffers, it first commits one tiny synchronous transaction on the primary
// (a transactional logical message) to flush them. It polls every 10ms and
// gives up after DefaultWaitTimeout.
func (c *Cluster) WaitReplayed(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, DefaultWaitTimeout)
	defer cancel()

	primary, err := c.Primary.connect(ctx, map[string]string{"synchronous_commit": "on"})
	if err != nil {
		return err
	}
	defer primary.Close(context.WithoutCancel(ctx))
	// A commit flushes WAL only if its transaction wrote WAL itself
	// (assigning an xid with txid_current() is not enough), so write a
	// transactional logical message; it is a no-op on replay.
	if _, err := primary.Exec(ctx, "SELECT pg_logical_emit_message(true, 'pgcluster', 'WaitReplayed')"); err != nil {
		return fmt.Errorf("flush primary WAL: %w", err)
	}
	var target string
	if err := primary.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&target); err != nil {
		return fmt.Errorf("read primary WAL position: %w", err)
	}

	replica, err := c.Replica.connect(ctx, nil)
	if err != nil {
		return err
	}
	defer replica.Close(context.WithoutCancel(ctx))
	for {
		var done bool
		err := replica.QueryRow(ctx,
			"SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)", target).Scan(&done)
		if err != nil {
			return fmt.Errorf("wait for replica to replay %s: %w", target, err)
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for replica to replay %s: %w%s", target, ctx.Err(), c.Replica.logTail())
		case <-time.After(pollInterval):
		}
	}
}

// Close stops both servers at once (pg_ctl -m immediate, replica first),
// kills them if pg_ctl cannot, and removes Dir. It is idempotent and returns
// the first error.
func (c *Cluster) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true

	var errs []error
	for _, s := range []*Server{c.Replica, c.Primary} {
		if s != nil {
			errs = append(errs, s.kill())
		}
	}
	if c.Dir != "" {
		if err := os.RemoveAll(c.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove cluster directory: %w", err))
		}
	}
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// connect opens a superuser connection to the server's postgres database,
// with extra run-time parameters.
func (s *Server) connect(ctx context.Context, params map[string]string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(s.URL(superuser, "", "postgres"))
	if err != nil {
		return nil, fmt.Errorf("parse %s URL: %w", s.Name, err)
	}
	for k, v := range params {
		cfg.RuntimeParams[k] = v
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", s.Name, err)
	}
	return conn, nil
}
