package pgcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrBinariesNotFound is returned by Start when no directory holds the
// PostgreSQL server binaries.
var ErrBinariesNotFound = errors.New("PostgreSQL server binaries not found")

// serverUser is the account the server binaries run as when we are root;
// initdb and postgres refuse to run as root.
const serverUser = "postgres"

// serverBinaries are the programs Start needs from the bin directory.
var serverBinaries = []string{"initdb", "pg_ctl", "postgres", "pg_basebackup"}

// killWait bounds how long killPostmaster waits after each signal.
const killWait = 5 * time.Second

// staleAge is how old a cluster directory without an owner file must be
// before reapStale treats it as abandoned rather than being created.
const staleAge = time.Minute

// BinDir is the directory Start takes the server binaries from when Options.BinDir is
// empty, or an error wrapping ErrBinariesNotFound that says where it looked.
func BinDir() (string, error) { return findBinDir("") }

// findBinDir returns the directory holding the server binaries: explicit if
// set, else $PGFLY_PG_BIN, else the newest /usr/lib/postgresql/*/bin, else
// the directory of initdb on PATH.
func findBinDir(explicit string) (string, error) {
	var looked []string
	try := func(dir string) bool {
		looked = append(looked, dir)
		return hasBinaries(dir)
	}
	notFound := func() error {
		return fmt.Errorf("%w (looked in %s): install them with `apt-get install -y postgresql` or set %s",
			ErrBinariesNotFound, strings.Join(looked, ", "), EnvBinDir)
	}
	if explicit != "" {
		if try(explicit) {
			return explicit, nil
		}
		return "", notFound()
	}
	if env := os.Getenv(EnvBinDir); env != "" {
		// A wrong explicit setting is an error, not a reason to pick
		// some other PostgreSQL.
		if try(env) {
			return env, nil
		}
		return "", notFound()
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return pgVersion(dirs[i]) > pgVersion(dirs[j]) })
	for _, dir := range dirs {
		if try(dir) {
			return dir, nil
		}
	}
	if len(dirs) == 0 {
		looked = append(looked, "/usr/lib/postgresql/*/bin")
	}
	if path, err := exec.LookPath("initdb"); err == nil {
		if dir := filepath.Dir(path); try(dir) {
			return dir, nil
		}
	} else {
		looked = append(looked, "PATH")
	}
	return "", notFound()
}

// hasBinaries reports whether dir holds every server binary.
func hasBinaries(dir string) bool {
	for _, name := range serverBinaries {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// pgVersion returns the major version in /usr/lib/postgresql/<version>/bin,
// or 0.
func pgVersion(binDir string) float64 {
	v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	return v
}

// runner runs server binaries, through runuser as the postgres account when
// we are root, and owns the files it writes for them.
type runner struct {
	binDir string
	// dir is the working directory of every command; it must be
	// accessible to the server account (initdb checks).
	dir string
	// runuser is the path of runuser, empty when not root.
	runuser  string
	uid, gid int
}

// newRunner prepares to run the binaries in binDir as ourselves, or as the
// postgres account when we are root.
func newRunner(binDir string) (*runner, error) {
	r := &runner{binDir: binDir, uid: -1, gid: -1}
	if os.Geteuid() != 0 {
		return r, nil
	}
	u, err := user.Lookup(serverUser)
	if err != nil {
		return nil, fmt.Errorf("running as root needs the %s account to run the server (install postgresql or create the user): %w", serverUser, err)
	}
	if r.uid, err = strconv.Atoi(u.Uid); err != nil {
		return nil, fmt.Errorf("uid of %s: %w", serverUser, err)
	}
	if r.gid, err = strconv.Atoi(u.Gid); err != nil {
		return nil, fmt.Errorf("gid of %s: %w", serverUser, err)
	}
	if r.runuser, err = exec.LookPath("runuser"); err != nil {
		return nil, fmt.Errorf("running as root needs runuser (util-linux) to drop to %s: %w", serverUser, err)
	}
	return r, nil
}

// run runs a server binary and returns its output in the error on failure.
func (r *runner) run(ctx context.Context, name string, args ...string) error {
	path := filepath.Join(r.binDir, name)
	var cmd *exec.Cmd
	if r.runuser != "" {
		cmd = exec.CommandContext(ctx, r.runuser, append([]string{"-u", serverUser, "--", path}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, path, args...)
	}
	cmd.Dir = r.dir
	// A small fixed environment, so PGDATA, PGPORT, PGSSLMODE and the like
	// from the caller cannot change what the binaries do.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C", "LANG=C"}
	// runuser does not pass a kill on to its child, so cancellation kills
	// the whole process group. The postmaster escapes it (pg_ctl starts it
	// in a session of its own); Close stops it through postmaster.pid.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// pg_ctl start leaves the server running; it must not hold our pipes,
	// but never wait forever if it does.
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// chown gives path to the server account when we are root.
func (r *runner) chown(path string) error {
	if r.uid < 0 {
		return nil
	}
	if err := os.Lchown(path, r.uid, r.gid); err != nil {
		return fmt.Errorf("chown %s to %s: %w", path, serverUser, err)
	}
	return nil
}

// writeFile writes a file the server reads, owned by the server account.
func (r *runner) writeFile(path string, data []byte, perm os.FileMode) error {
	if err := os.WriteFile(path, data, perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return r.chown(path)
}

// killPostmaster stops the postmaster named in dataDir/postmaster.pid with
// SIGQUIT (an immediate shutdown that also ends its children), then SIGKILLs
// it and its children if it is still alive after killWait. A missing or
// stale pid file is not an error.
func killPostmaster(dataDir string) error {
	pid, ok := postmasterPID(dataDir)
	if !ok || !isPostmasterOf(pid, dataDir) {
		return nil
	}
	children := childrenOf(pid)
	if err := syscall.Kill(pid, syscall.SIGQUIT); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signal postmaster %d: %w", pid, err)
	}
	if waitGone(pid, killWait) {
		return nil
	}
	for _, p := range append(children, pid) {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	if !waitGone(pid, killWait) {
		return fmt.Errorf("postmaster %d of %s survived SIGKILL", pid, dataDir)
	}
	return nil
}

// postmasterPID reads the pid from the first line of dataDir/postmaster.pid.
func postmasterPID(dataDir string) (int, bool) {
	data, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return 0, false
	}
	first, _, _ := strings.Cut(string(data), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	return pid, err == nil && pid > 0
}

// isPostmasterOf reports whether pid is a live process whose command line
// names dataDir, guarding against a recycled pid.
func isPostmasterOf(pid int, dataDir string) bool {
	if !alive(pid) {
		return false
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		// No /proc: trust the pid file.
		return errors.Is(err, os.ErrNotExist) && !procMounted()
	}
	return bytes.Contains(cmdline, []byte(dataDir))
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return !procMounted()
	}
	// The state follows the parenthesised command name, which may itself
	// contain parentheses.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 || i+2 >= len(stat) {
		return true
	}
	state := stat[i+2]
	return state != 'Z' && state != 'X'
}

// waitGone polls until pid is no longer alive or d has passed.
func waitGone(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if !alive(pid) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(pollInterval)
	}
}

// childrenOf lists the live children of pid using /proc.
func childrenOf(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var kids []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		// After ")": state, ppid, ...
		fields := strings.Fields(string(stat[i+1:]))
		if len(fields) >= 2 && fields[1] == strconv.Itoa(pid) {
			kids = append(kids, p)
		}
	}
	return kids
}

// procMounted reports whether /proc describes processes.
func procMounted() bool {
	_, err := os.Stat("/proc/self/stat")
	return err == nil
}

// reapStale stops the servers of, and removes, cluster directories whose
// owning process is gone, e.g. because a test binary was killed before its
// Cleanup ran. Directories of live owners, including other test binaries
// running in parallel, are left alone.
func reapStale(logf func(format string, args ...any)) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, dir := range dirs {
		if !abandoned(dir) {
			continue
		}
		for _, name := range []string{"replica", "primary"} {
			if err := killPostmaster(filepath.Join(dir, name)); err != nil {
				logf("pgcluster: stale cluster %s: %v", dir, err)
			}
		}
		if err := os.RemoveAll(dir); err != nil {
			logf("pgcluster: remove stale cluster %s: %v", dir, err)
			continue
		}
		logf("pgcluster: removed stale cluster %s", dir)
	}
}

// abandoned reports whether the process that created a cluster directory is
// gone.
func abandoned(dir string) bool {
	data, err := os.ReadFile(filepath.Join(dir, ownerFile))
	if err != nil {
		// Being created right now, or left by a crash before the owner
		// file was written.
		fi, serr := os.Stat(dir)
		return errors.Is(err, os.ErrNotExist) && serr == nil && time.Since(fi.ModTime()) > staleAge
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		return false
	}
	return pid != os.Getpid() && !alive(pid)
}
