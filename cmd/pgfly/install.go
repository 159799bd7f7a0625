package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/pgfly/pgfly/internal/pgcluster"
)

// demoPackages are the Debian packages `pgfly demo --install` installs when the PostgreSQL
// server binaries are missing: the server alone (initdb, pg_ctl, postgres, pg_basebackup).
var demoPackages = []string{"postgresql"}

// installDemo makes sure the PostgreSQL server binaries the demo runs are here. When they
// are, it does nothing; on Debian or Ubuntu, as root, it installs demoPackages with apt-get,
// asking nothing; anywhere else it says what to do instead.
func installDemo(ctx context.Context, out io.Writer) error {
	if dir, err := pgcluster.BinDir(); err == nil {
		fmt.Fprintf(out, "pgfly demo --install: the PostgreSQL server binaries are in %s; nothing to install\n", dir)
		return nil
	} else if os.Getenv(pgcluster.EnvBinDir) != "" {
		return fmt.Errorf("--install: %w; $%s names the directory to use, so installing a package would not change it", err, pgcluster.EnvBinDir)
	}
	apt, err := exec.LookPath("apt-get")
	if _, derr := os.Stat("/etc/debian_version"); err != nil || derr != nil {
		return errors.New("--install works on Debian and Ubuntu (apt-get) only: install the PostgreSQL server with your system's packages, or set $PGFLY_PG_BIN to the directory holding initdb, pg_ctl, postgres and pg_basebackup")
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("--install runs apt-get, which needs root: run the demo as root, or install the package yourself: sudo apt-get install -y %s", demoPackages[0])
	}
	fmt.Fprintf(out, "pgfly demo --install: the PostgreSQL server binaries are missing; installing the Debian package %s with apt-get ...\n", demoPackages[0])
	for _, args := range [][]string{{"update", "-qq"}, append([]string{"install", "-y", "-qq", "--no-install-recommends"}, demoPackages...)} {
		cmd := exec.CommandContext(ctx, apt, args...)
		// A signal asks apt-get to stop as Ctrl-C would, never SIGKILL, which could leave dpkg
		// half-way ("dpkg was interrupted").
		cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
		cmd.WaitDelay = 5 * time.Minute
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("--install: apt-get %s: %w", args[0], err)
		}
	}
	dir, err := pgcluster.BinDir()
	if err != nil {
		return fmt.Errorf("--install: installed %s, yet: %w", demoPackages[0], err)
	}
	fmt.Fprintf(out, "pgfly demo --install: installed; the server binaries are in %s (Debian's package also creates and starts a cluster of its own, \"main\" on port 5432, which the demo does not use; pg_dropcluster --stop %s main removes it)\n",
		dir, filepath.Base(filepath.Dir(dir))) // /usr/lib/postgresql/<version>/bin
	return nil
}
