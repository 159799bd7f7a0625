// Command pgfly is a sidecar that lets an unmodified app run beside a Postgres read replica
// in every region and still write: it relays the app's Postgres sessions and replays, in the
// primary region, the HTTP requests whose writes the replica refused.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
)

func main() {
	err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
		os.Exit(2)
	case errors.Is(err, errInterrupted):
		os.Exit(130)
	default:
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		fmt.Fprintln(os.Stderr, "pgfly:", err)
		if errors.As(err, new(usageError)) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// errInterrupted is returned when a second signal asked to exit at once.
var errInterrupted = errors.New("interrupted")

// exitError carries an exit status that is not pgfly's own failure (a child's, in `run`).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

const usageText = `pgfly: run one Postgres-backed app in many regions

Usage:
  pgfly serve [flags]             relay Postgres sessions to the nearby replica (the sidecar)
  pgfly run [flags] -- CMD ...    the sidecar with the app as its child, DATABASE_URL and PORT set
  pgfly demo [--scenario]         a whole two-region setup on this machine, to try pgfly
  pgfly check [flags]             check a multi-region setup against the real servers (serve's flags)
  pgfly edge [flags]              a development stand-in for Fly's edge proxy (not a product)
  pgfly help                      this text

Run 'pgfly COMMAND -h' for a command's flags. Every flag can also be set by the
environment variable listed beside it.
`

// run executes one subcommand; only main turns its result into an exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return flag.ErrHelp
	}
	switch args[0] {
	case "serve":
		return execute(ctx, &serveCommand{}, args[1:], stderr)
	case "run":
		flags, argv := splitCommand(args[1:])
		return execute(ctx, &runCommand{argv: argv, dashes: slices.Contains(args, "--"), stdout: stdout, stderr: stderr}, flags, stderr)
	case "demo":
		return execute(ctx, &demoCommand{stdout: stdout}, args[1:], stderr)
	case "edge":
		return execute(ctx, &edgeCommand{}, args[1:], stderr)
	case "check":
		return execute(ctx, &checkCommand{stdout: stdout}, args[1:], stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return nil
	default:
		fmt.Fprint(stderr, usageText)
		return usageError{fmt.Errorf("unknown command %q", args[0])}
	}
}
