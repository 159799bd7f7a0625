package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"
)

// Freeze stops the server's postmaster and every process it started with
// SIGSTOP, as a server that hangs: connections are accepted by the kernel,
// but nothing answers on them until Thaw. The postmaster is stopped first so
// that it forks nothing new. Close thaws a frozen server before it stops it.
func (s *Server) Freeze() error {
	pid, ok := postmasterPID(s.DataDir)
	if !ok || !isPostmasterOf(pid, s.DataDir) {
		return fmt.Errorf("freeze %s: it is not running", s.Name)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("freeze %s: signal postmaster %d: %w", s.Name, pid, err)
	}
	for _, child := range childrenOf(pid) {
		if err := syscall.Kill(child, syscall.SIGSTOP); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("freeze %s: signal process %d: %w", s.Name, child, err)
		}
	}
	s.logf("pgcluster: %s frozen", s.Name)
	return nil
}

// Thaw resumes a server that Freeze stopped, children first. Thawing a
// server that is not frozen, or not running, does nothing.
func (s *Server) Thaw() error {
	pid, ok := postmasterPID(s.DataDir)
	if !ok || !isPostmasterOf(pid, s.DataDir) {
		return nil
	}
	for _, child := range childrenOf(pid) {
		if err := syscall.Kill(child, syscall.SIGCONT); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("thaw %s: signal process %d: %w", s.Name, child, err)
		}
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("thaw %s: signal postmaster %d: %w", s.Name, pid, err)
	}
	s.logf("pgcluster: %s thawed", s.Name)
	return nil
}

// Promote ends recovery on a standby (pg_ctl promote) and waits until it
// accepts writes, on a new timeline. Nothing stops the old primary: a
// promoted replica beside a running primary is two primaries, and the
// replica no longer streams, so a Cluster whose replica was promoted should
// not be shared with tests that expect replication.
func (s *Server) Promote(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, pgctlTimeout+5*time.Second)
	defer cancel()
	if err := s.r.run(ctx, "pg_ctl", "-D", s.DataDir, "-w", "-t", seconds(pgctlTimeout), "promote"); err != nil {
		return fmt.Errorf("promote %s: %w%s", s.Name, err, s.logTail())
	}
	s.logf("pgcluster: %s promoted", s.Name)
	return nil
}
