package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"go.uber.org/zap"
)

// A command is one subcommand, in the shape each of them has (after litefs's Main): its flags
// are registered and parsed; open checks them and builds and binds what the command runs;
// run runs it until it is done or a signal stops it; close releases what open built. execute
// drives the shape, so that a subcommand holds only what is its own.
type command interface {
	// name is the command's name after "pgfly".
	name() string
	// register adds the command's flags; the text usage returns is shown above them ("" for
	// the flags alone).
	register(fs *flagSet)
	usage() string
	// logLevel is the parsed --log-level.
	logLevel() string
	// open checks the parsed flags (naming the flag of a value it refuses) and builds what
	// the command runs. What it built is closed even when it fails.
	open(fs *flagSet, log *zap.Logger) error
	// run runs until the command is done. The signals it listens for arrive on sigs; ctx
	// ends when the caller gives up (tests).
	run(ctx context.Context, sigs <-chan os.Signal) error
	close() error
}

// stopSignals are the signals a command listens for unless it says otherwise (see
// signalled): SIGTERM, as Fly and Docker send it, and SIGINT, from a terminal.
var stopSignals = []os.Signal{syscall.SIGTERM, syscall.SIGINT}

// signalled is a command that listens for other signals than stopSignals.
type signalled interface{ signals() []os.Signal }

// hinted is a command that adds a hint to an error in its command line.
type hinted interface{ usageHint(err error) error }

// usageError is a command line that cannot be run as it is (a flag, a value or the
// environment it reads): exit status 2, where a failure of what it runs is 1.
type usageError struct{ err error }

// usage marks err, when there is one, as the command line's.
func usage(err error) error {
	if err == nil {
		return nil
	}
	return usageError{err}
}

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// execute runs cmd with args: parse, logger, open, run, close.
func execute(ctx context.Context, cmd command, args []string, stderr io.Writer) error {
	fs := newFlagSet("pgfly "+cmd.name(), stderr)
	if text := cmd.usage(); text != "" {
		fs.Usage = func() {
			fmt.Fprint(fs.Output(), text)
			fs.PrintDefaults()
		}
	}
	cmd.register(fs)
	if err := fs.parse(args); err != nil {
		if h, ok := cmd.(hinted); ok {
			err = h.usageHint(err)
		}
		return usageError{err}
	}
	log, err := newLogger(cmd.logLevel(), stderr)
	if err != nil {
		return err
	}
	defer log.Sync()

	signals := stopSignals
	if s, ok := cmd.(signalled); ok {
		signals = s.signals()
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, signals...)
	defer signal.Stop(sigs)

	defer cmd.close()
	if err := cmd.open(fs, log); err != nil {
		return err
	}
	return cmd.run(ctx, sigs)
}
