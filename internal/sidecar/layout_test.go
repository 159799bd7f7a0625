package sidecar_test

import (
	"go/build"
	"strings"
	"testing"
)

// TestLayout keeps the packages in the rooms the README's "Where things live" gives them.
func TestLayout(t *testing.T) {
	for _, tc := range []struct {
		dir     string
		allowed []string // the pgfly packages it may import
	}{
		{"../../wire", nil},
		{"../../lag", nil},
		{"../../router", []string{"lag", "internal/flyreplay"}},
	} {
		pkg, err := build.ImportDir(tc.dir, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range pkg.Imports {
			rest, ok := strings.CutPrefix(imp, "github.com/pgfly/pgfly/")
			if !ok {
				continue
			}
			allowed := false
			for _, a := range tc.allowed {
				allowed = allowed || rest == a
			}
			if !allowed {
				t.Errorf("%s imports %s; it may import only %v of pgfly's packages", pkg.ImportPath, imp, tc.allowed)
			}
		}
	}
}
