package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// flagSet is a flag.FlagSet whose flags each also read an environment variable. A flag on
// the command line wins over its variable.
type flagSet struct {
	*flag.FlagSet
	env map[string]string // flag name to environment variable
}

func newFlagSet(name string, out io.Writer) *flagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(out)
	return &flagSet{FlagSet: fs, env: make(map[string]string)}
}

// bindEnv makes the named flag fall back to an environment variable.
func (fs *flagSet) bindEnv(name, env string) {
	f := fs.Lookup(name)
	if f == nil {
		panic("no flag " + name)
	}
	fs.env[name] = env
	f.Usage += " [$" + env + "]"
}

// parse reads the command line, then the environment for every flag the command line left
// unset. An invalid value in either stops with an error that names the flag.
func (fs *flagSet) parse(args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for name, env := range fs.env {
		v, ok := os.LookupEnv(env)
		if set[name] || !ok {
			continue
		}
		if err := fs.Set(name, v); err != nil {
			return fmt.Errorf("invalid value %q for $%s (flag --%s): %v", v, env, name, err)
		}
	}
	return nil
}

// byteSize is a flag value such as 1048576, 64KiB, 16MiB or 1GiB.
type byteSize int

func (b *byteSize) String() string { return fmt.Sprint(int(*b)) }

func (b *byteSize) Set(s string) error {
	units := []struct {
		suffix string
		mult   int
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}
	mult := 1
	num := strings.TrimSpace(s)
	for _, u := range units {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(num, u.suffix)), u.mult
			break
		}
	}
	var n int
	if _, err := fmt.Sscanf(num, "%d", &n); err != nil || fmt.Sprint(n) != num || n <= 0 {
		return fmt.Errorf("want a positive size such as 1048576, 64KiB or 16MiB")
	}
	*b = byteSize(n * mult)
	return nil
}
