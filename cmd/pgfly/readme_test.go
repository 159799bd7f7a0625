package main

import (
	"flag"
	"os"
	"strings"
	"testing"
)

// TestReadmeListsEveryFlag keeps the README's configuration reference complete: every flag of
// every command, with its environment variable, in that command's table.
func TestReadmeListsEveryFlag(t *testing.T) {
	b, err := os.ReadFile(repoRoot + "/README.md")
	if err != nil {
		t.Fatal(err)
	}
	sections := readmeSections(string(b))
	for cmd, fs := range commandFlags() {
		section, ok := sections[cmd]
		if !ok {
			t.Errorf("README has no \"### `pgfly %s`\" section", cmd)
			continue
		}
		if cmd == "run" || cmd == "check" { // their tables list what they add to serve's
			section += sections["serve"]
		}
		fs.VisitAll(func(f *flag.Flag) {
			row := rowFor(section, f.Name)
			if row == "" {
				t.Errorf("README's pgfly %s table lacks --%s", cmd, f.Name)
				return
			}
			if env := fs.env[f.Name]; !strings.Contains(row, "`"+env+"`") {
				t.Errorf("README's row for pgfly %s --%s lacks its variable %s: %s", cmd, f.Name, env, row)
			}
		})
	}
}

// readmeSections maps a command to the text under its "### `pgfly CMD`" heading.
func readmeSections(readme string) map[string]string {
	sections := make(map[string]string)
	parts := strings.Split(readme, "\n### `pgfly ")
	for _, p := range parts[1:] {
		cmd, rest, _ := strings.Cut(p, "`")
		if end := strings.Index(rest, "\n## "); end >= 0 {
			rest = rest[:end]
		}
		sections[cmd] = rest
	}
	return sections
}

func rowFor(section, name string) string {
	for _, line := range strings.Split(section, "\n") {
		if strings.HasPrefix(line, "| `--"+name+"` |") {
			return line
		}
	}
	return ""
}
