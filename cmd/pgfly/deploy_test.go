package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// These tests keep deploy/ and the Dockerfile honest: every example parses, names only
// flags and environment variables pgfly has, and describes a configuration pgfly accepts.
// There is no TOML or YAML library in go.mod, so each format gets a small parser for the
// subset the examples use; anything outside that subset fails the test.

// repoRoot is the module's root, seen from this package's directory.
const repoRoot = "../.."

// commandFlags returns each subcommand's flag set, as registered.
func commandFlags() map[string]*flagSet {
	sets := make(map[string]*flagSet)
	for _, c := range []command{&serveCommand{}, &runCommand{}, &edgeCommand{}, &demoCommand{}, &checkCommand{}} {
		fs := newFlagSet("pgfly "+c.name(), io.Discard)
		c.register(fs)
		sets[c.name()] = fs
	}
	return sets
}

// knownSettings returns every flag name and every environment variable pgfly reads.
func knownSettings() (flags, env map[string]bool) {
	flags, env = make(map[string]bool), make(map[string]bool)
	for _, fs := range commandFlags() {
		fs.VisitAll(func(f *flag.Flag) { flags[f.Name] = true })
		for _, e := range fs.env {
			env[e] = true
		}
	}
	return flags, env
}

// exampleFiles lists deploy/'s files and the Dockerfile.
func exampleFiles(tb testing.TB) []string {
	tb.Helper()
	files := []string{filepath.Join(repoRoot, "Dockerfile")}
	err := filepath.WalkDir(filepath.Join(repoRoot, "deploy"), func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			files = append(files, path)
		}
		return err
	})
	if err != nil {
		tb.Fatalf("list deploy/: %v", err)
	}
	return files
}

func readFile(tb testing.TB, path string) string {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	return string(b)
}

var (
	// flagRE finds --flag tokens.
	flagRE = regexp.MustCompile(`(?:^|[\s"'\[,])--([a-z][a-z0-9-]*)`)
	// appCommandRE finds a standalone "--", after which a command line is the app's.
	appCommandRE = regexp.MustCompile(`(?:^|[\s"'\[,])--(?:[\s"',\]]|$)`)
	// envRE finds the names of environment variables pgfly reads, or might.
	envRE = regexp.MustCompile(`\b(?:PGFLY_[A-Z0-9_]+|FLY_[A-Z0-9_]+|PRIMARY_REGION)\b`)
	// dockerInstrRE matches a line (or a commented one) whose flags are Docker's own: a
	// Dockerfile instruction such as COPY --from, or a docker command.
	dockerInstrRE = regexp.MustCompile(`^[#\s]*(?:COPY|ADD|RUN|FROM|docker)\s`)
)

func TestExamplesNameOnlyRealSettings(t *testing.T) {
	flags, env := knownSettings()
	for _, path := range exampleFiles(t) {
		t.Run(strings.TrimPrefix(path, repoRoot+"/"), func(t *testing.T) {
			seenFlags := 0
			for n, line := range strings.Split(readFile(t, path), "\n") {
				for _, name := range envRE.FindAllString(line, -1) {
					if !env[name] {
						t.Errorf("line %d: got $%s, which no pgfly command reads", n+1, name)
					}
				}
				if dockerInstrRE.MatchString(line) {
					continue
				}
				if loc := appCommandRE.FindStringIndex(line); loc != nil {
					line = line[:loc[0]]
				}
				for _, m := range flagRE.FindAllStringSubmatch(line, -1) {
					seenFlags++
					if !flags[m[1]] {
						t.Errorf("line %d: got --%s, which no pgfly command has", n+1, m[1])
					}
				}
			}
			t.Logf("%d flags checked", seenFlags)
		})
	}
}

func TestExamplesParse(t *testing.T) {
	for _, path := range exampleFiles(t) {
		t.Run(strings.TrimPrefix(path, repoRoot+"/"), func(t *testing.T) {
			src := readFile(t, path)
			var err error
			switch {
			case strings.HasSuffix(path, ".toml"):
				_, err = parseTOML(src)
			case strings.HasSuffix(path, ".yaml"), strings.HasSuffix(path, ".yml"):
				_, err = parseYAML(src)
			case filepath.Base(path) == "Dockerfile":
				_, err = parseDockerfile(src)
			case strings.HasSuffix(path, ".json"): // the Grafana dashboard; internal/regions checks its metrics
				var v map[string]any
				err = json.Unmarshal([]byte(src), &v)
			default:
				t.Fatalf("got a file of a kind this test does not check; add a check for it")
			}
			if err != nil {
				t.Error(err)
			}
		})
	}
}

// setEnv makes the process environment hold exactly env among the variables fs reads, for
// the rest of the test.
func setEnv(t *testing.T, fs *flagSet, env map[string]string) {
	t.Helper()
	for _, name := range fs.env {
		t.Setenv(name, "") // restored in Cleanup
		os.Unsetenv(name)
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
}

// port returns the port of a listen address such as ":8080" or "0.0.0.0:9187".
func port(tb testing.TB, addr string) int {
	tb.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		tb.Fatalf("listen address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		tb.Fatalf("listen address %q: %v", addr, err)
	}
	return n
}

// reachableFromOutside reports whether a listen address takes connections from other
// machines (not a loopback address).
func reachableFromOutside(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return host == "" || ip != nil && !ip.IsLoopback()
}

func number(tb testing.TB, v any, what string) int {
	tb.Helper()
	n, ok := v.(int64)
	if !ok {
		tb.Fatalf("%s: got %v (%T), want an integer", what, v, v)
	}
	return int(n)
}

func TestFlyTomlForRun(t *testing.T) {
	toml, err := parseTOML(readFile(t, filepath.Join(repoRoot, "deploy/fly.toml")))
	if err != nil {
		t.Fatal(err)
	}
	primaryRegion, _ := toml["primary_region"].(string)
	if primaryRegion == "" {
		t.Fatalf("primary_region: got %v, want a region", toml["primary_region"])
	}
	command, _ := toml["processes.app"].(string)
	words := strings.Fields(command)
	if len(words) < 4 || words[0] != "pgfly" || words[1] != "run" || !slices.Contains(words, "--") {
		t.Fatalf("processes.app: got %q, want pgfly run [flags] -- the app's command", command)
	}
	flags, argv := splitCommand(words[2:])
	if len(argv) == 0 {
		t.Fatalf("processes.app: got %q, want the app's command after --", command)
	}
	env := map[string]string{}
	for k, v := range toml {
		if name, ok := strings.CutPrefix(k, "env."); ok {
			env[name], _ = v.(string)
		}
	}

	// As on a machine in the primary region and in another one.
	for _, region := range []string{primaryRegion, "elsewhere"} {
		t.Run("FLY_REGION="+region, func(t *testing.T) {
			var cfg runConfig
			fs := newFlagSet("pgfly run", io.Discard)
			cfg.register(fs)
			machineEnv := map[string]string{"PRIMARY_REGION": primaryRegion, "FLY_REGION": region, "FLY_MACHINE_ID": "148ed123"}
			for k, v := range env {
				machineEnv[k] = v
			}
			setEnv(t, fs, machineEnv)
			if err := fs.parse(flags); err != nil {
				t.Fatalf("pgfly run %s: %v", strings.Join(flags, " "), err)
			}
			sc, _, how, err := cfg.resolve("postgres://app:secret@my-db.internal:5432/app?sslmode=disable")
			if err != nil {
				t.Fatalf("pgfly run with this configuration: %v", err)
			}
			t.Logf("upstream %s (%s)", redact(sc.Relay.Upstream), how)

			if got, want := number(t, toml["http_service.internal_port"], "http_service.internal_port"), port(t, sc.Shim.Listen); got != want {
				t.Errorf("http_service.internal_port: got %d, want the shim's port %d", got, want)
			}
			if !reachableFromOutside(sc.AdminListen) {
				t.Errorf("admin address: got %q, want one Fly's checks can reach (not loopback)", sc.AdminListen)
			}
			admin := port(t, sc.AdminListen)
			if got := number(t, toml["checks.pgfly.port"], "checks.pgfly.port"); got != admin || toml["checks.pgfly.path"] != "/health" || toml["checks.pgfly.type"] != "http" {
				t.Errorf("checks.pgfly: got port %d path %v type %v, want an http check of /health on %d", got, toml["checks.pgfly.path"], toml["checks.pgfly.type"], admin)
			}
			if got := number(t, toml["metrics.port"], "metrics.port"); got != admin || toml["metrics.path"] != "/metrics" {
				t.Errorf("metrics: got port %d path %v, want /metrics on %d", got, toml["metrics.path"], admin)
			}
		})
	}
}

func TestComposeExample(t *testing.T) {
	dir := filepath.Join(repoRoot, "deploy/compose")
	toml, err := parseTOML(readFile(t, filepath.Join(dir, "fly.toml")))
	if err != nil {
		t.Fatal(err)
	}
	file, _ := toml["build.compose.file"].(string)
	docs, err := parseYAML(readFile(t, filepath.Join(dir, file)))
	if err != nil {
		t.Fatalf("build.compose.file %q: %v", file, err)
	}
	services := dig(t, docs[0], "services").(map[string]any)
	if _, ok := services["app"]; !ok {
		t.Errorf("services: got %v, want an app", services)
	}
	command := stringList(t, dig(t, services, "pgfly", "command"))
	if len(command) == 0 || command[0] != "serve" {
		t.Fatalf("services.pgfly.command: got %q, want serve", command)
	}
	env := map[string]string{"PRIMARY_REGION": toml["primary_region"].(string), "FLY_REGION": "elsewhere",
		// Secrets, set with fly secrets set (see compose.yaml).
		"PGFLY_UPSTREAM": "postgres://app:secret@top1.nearest.of.my-db.internal:5433/app",
		"PGFLY_PRIMARY":  "postgres://app:secret@my-db.internal:5432/app"}
	for k, v := range dig(t, services, "pgfly", "environment").(map[string]any) {
		env[k] = v.(string)
	}
	var cfg serveConfig
	fs := newFlagSet("pgfly serve", io.Discard)
	cfg.register(fs)
	setEnv(t, fs, env)
	if err := fs.parse(command[1:]); err != nil {
		t.Fatalf("pgfly %s: %v", strings.Join(command, " "), err)
	}
	sc, err := cfg.sidecarConfig()
	if err != nil {
		t.Fatalf("pgfly serve with this configuration: %v", err)
	}
	if got, want := number(t, toml["http_service.internal_port"], "http_service.internal_port"), port(t, sc.Shim.Listen); got != want {
		t.Errorf("http_service.internal_port: got %d, want the shim's port %d", got, want)
	}
	if !reachableFromOutside(sc.AdminListen) {
		t.Errorf("admin address: got %q, want one Fly's checks can reach (not loopback)", sc.AdminListen)
	}
	if got, want := number(t, toml["checks.pgfly.port"], "checks.pgfly.port"), port(t, sc.AdminListen); got != want || toml["checks.pgfly.path"] != "/health" {
		t.Errorf("checks.pgfly: got port %d path %v, want /health on %d", got, toml["checks.pgfly.path"], want)
	}
	if got, want := dig(t, services, "app", "environment", "PORT"), strconv.Itoa(port(t, sc.Shim.App.Host)); got != want {
		t.Errorf("services.app.environment.PORT: got %v, want the --app port %s", got, want)
	}
}

func TestKubernetesExample(t *testing.T) {
	docs, err := parseYAML(readFile(t, filepath.Join(repoRoot, "deploy/kubernetes/pgfly-sidecar.yaml")))
	if err != nil {
		t.Fatal(err)
	}
	byKind := map[string]any{}
	for _, d := range docs {
		byKind[dig(t, d, "kind").(string)] = d
	}
	pod := dig(t, byKind["Deployment"], "spec", "template", "spec")
	var pgfly, app map[string]any
	for _, list := range []string{"initContainers", "containers"} {
		cs, _ := pod.(map[string]any)[list].([]any)
		for _, c := range cs {
			switch c.(map[string]any)["name"] {
			case "pgfly":
				pgfly = c.(map[string]any)
			case "app":
				app = c.(map[string]any)
			}
		}
	}
	if pgfly == nil || app == nil {
		t.Fatalf("pod spec: got %v, want containers pgfly and app", pod)
	}
	if rp, native := pgfly["restartPolicy"]; native && rp != "Always" {
		t.Errorf("pgfly restartPolicy: got %v, want Always (a native sidecar)", rp)
	}
	args := stringList(t, pgfly["args"])
	if len(args) == 0 || args[0] != "serve" || !slices.Contains(args, "--replay-mode=proxy") {
		t.Fatalf("pgfly args: got %q, want serve in --replay-mode=proxy", args)
	}
	env := map[string]string{}
	for _, e := range pgfly["env"].([]any) {
		e := e.(map[string]any)
		name := e["name"].(string)
		switch v := e["value"].(type) {
		case string:
			env[name] = v
		default: // from a secret or the downward API: a stand-in value
			env[name] = map[string]string{"PGFLY_UPSTREAM": "postgres://app:secret@db-replica:5432/app",
				"PGFLY_PRIMARY": "postgres://app:secret@db-primary:5432/app"}[name]
			if env[name] == "" {
				env[name] = "stand-in"
			}
		}
	}
	var cfg serveConfig
	fs := newFlagSet("pgfly serve", io.Discard)
	cfg.register(fs)
	setEnv(t, fs, env)
	if err := fs.parse(args[1:]); err != nil {
		t.Fatalf("pgfly %s: %v", strings.Join(args, " "), err)
	}
	sc, err := cfg.sidecarConfig()
	if err != nil {
		t.Fatalf("pgfly serve with this configuration: %v", err)
	}
	if sc.Relay.Upstream == "" || sc.Lag.Primary == "" || sc.Shim == nil || sc.Shim.PrimaryHTTP == nil {
		t.Errorf("got upstream %q, primary %q, primary-http %v; want all three", sc.Relay.Upstream, sc.Lag.Primary, sc.Shim.PrimaryHTTP)
	}
	shim, admin := port(t, sc.Shim.Listen), port(t, sc.AdminListen)
	var ports []int
	for _, p := range pgfly["ports"].([]any) {
		n, _ := strconv.Atoi(p.(map[string]any)["containerPort"].(string))
		ports = append(ports, n)
	}
	if !slices.Contains(ports, shim) || !slices.Contains(ports, admin) {
		t.Errorf("pgfly ports: got %v, want %d (shim) and %d (admin)", ports, shim, admin)
	}
	if !reachableFromOutside(sc.AdminListen) {
		t.Errorf("admin address: got %q, want one the kubelet can reach (not loopback)", sc.AdminListen)
	}
	probe := dig(t, pgfly, "readinessProbe", "httpGet").(map[string]any)
	if probe["path"] != "/health" || probe["port"] != strconv.Itoa(admin) {
		t.Errorf("readinessProbe: got %v, want /health on %d", probe, admin)
	}
	if got := dig(t, byKind["Service"], "spec", "ports").([]any)[0].(map[string]any)["targetPort"]; got != strconv.Itoa(shim) {
		t.Errorf("Service targetPort: got %v, want the shim's port %d", got, shim)
	}
	appEnv := map[string]any{}
	for _, e := range app["env"].([]any) {
		appEnv[e.(map[string]any)["name"].(string)] = e.(map[string]any)["value"]
	}
	if got, want := appEnv["PORT"], strconv.Itoa(port(t, sc.Shim.App.Host)); got != want {
		t.Errorf("app PORT: got %v, want the --app port %s", got, want)
	}
	if _, ok := appEnv["DATABASE_URL"]; !ok {
		t.Errorf("app env: got %v, want a DATABASE_URL", appEnv)
	}
}

func TestDockerfile(t *testing.T) {
	instrs, err := parseDockerfile(readFile(t, filepath.Join(repoRoot, "Dockerfile")))
	if err != nil {
		t.Fatal(err)
	}
	var stages [][]dockerInstr
	for _, in := range instrs {
		if in.cmd == "FROM" {
			stages = append(stages, nil)
		}
		if len(stages) == 0 {
			t.Fatalf("line %d: %s before FROM", in.line, in.cmd)
		}
		stages[len(stages)-1] = append(stages[len(stages)-1], in)
	}
	if len(stages) != 2 {
		t.Fatalf("got %d stages, want 2: a build and a minimal final image", len(stages))
	}
	build, final := stages[0], stages[1]

	gomod := readFile(t, filepath.Join(repoRoot, "go.mod"))
	goVersion := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(gomod)
	m := regexp.MustCompile(`^golang:(\d+\.\d+)\S* AS (\S+)$`).FindStringSubmatch(build[0].args)
	if goVersion == nil || m == nil || m[1] != goVersion[1] {
		t.Fatalf("build stage: got FROM %s, want golang:%s (go.mod's version) AS a name", build[0].args, goVersion)
	}
	buildStage := m[2]

	var goBuild []string
	for _, in := range build {
		if in.cmd == "RUN" && strings.Contains(in.args, "go build") {
			if goBuild, err = shellWords(in.args); err != nil {
				t.Fatalf("line %d: %v", in.line, err)
			}
		}
		if in.cmd == "COPY" {
			for _, src := range strings.Fields(in.args)[:len(strings.Fields(in.args))-1] {
				if _, err := os.Stat(filepath.Join(repoRoot, src)); err != nil {
					t.Errorf("line %d: COPY %s: %v", in.line, src, err)
				}
			}
		}
	}
	var env []string
	for len(goBuild) > 0 && strings.Contains(goBuild[0], "=") {
		env, goBuild = append(env, goBuild[0]), goBuild[1:]
	}
	out := flagValue(goBuild, "-o")
	if !slices.Contains(env, "CGO_ENABLED=0") || len(goBuild) < 2 || goBuild[0] != "go" || goBuild[1] != "build" ||
		goBuild[len(goBuild)-1] != "./cmd/pgfly" || out == "" {
		t.Fatalf("build command: got %q %q, want CGO_ENABLED=0 go build -o PATH ./cmd/pgfly", env, goBuild)
	}

	base := final[0].args
	if !regexp.MustCompile(`^(gcr\.io/distroless/static\S*:nonroot|scratch)$`).MatchString(base) {
		t.Errorf("final stage: got FROM %s, want distroless/static:nonroot or scratch", base)
	}
	var user, entrypoint string
	var copied []string
	for _, in := range final {
		switch in.cmd {
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entrypoint = in.args
		case "COPY":
			copied = strings.Fields(in.args)
		}
	}
	if user == "" || user == "root" || strings.HasPrefix(user, "0") || strings.HasPrefix(user, "root:") {
		t.Errorf("final stage USER: got %q, want a non-root user", user)
	}
	if len(copied) != 3 || copied[0] != "--from="+buildStage || copied[1] != out {
		t.Fatalf("final stage COPY: got %q, want --from=%s %s DEST", copied, buildStage, out)
	}
	if want := `["` + copied[2] + `"]`; entrypoint != want {
		t.Errorf("ENTRYPOINT: got %s, want %s (exec form, the copied binary)", entrypoint, want)
	}

	// The build command, exactly, as a dry run: the whole compile of a static binary takes
	// minutes on a cold cache, and the rest of the tests compile the same code.
	t.Run("the build command plans", func(t *testing.T) {
		args := slices.Clone(goBuild[1:])
		args[slices.Index(args, "-o")+1] = filepath.Join(t.TempDir(), "pgfly")
		cmd := exec.Command("go", append([]string{args[0], "-n"}, args[1:]...)...)
		cmd.Dir, cmd.Env = repoRoot, append(os.Environ(), env...)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s go %s: %v\n%s", env, strings.Join(cmd.Args[1:], " "), err, b)
		}
		list := exec.Command("go", "list", "-e", "-deps", "-f", "{{with .Error}}{{.}}{{end}}", "./cmd/pgfly")
		list.Dir, list.Env = repoRoot, append(os.Environ(), env...)
		b, err := list.CombinedOutput()
		if err != nil || strings.TrimSpace(string(b)) != "" {
			t.Errorf("%s go list -deps ./cmd/pgfly: got %v %s, want every package to build that way", env, err, b)
		}
	})
	t.Run("CMD is a pgfly command", func(t *testing.T) {
		for _, in := range final {
			if in.cmd != "CMD" {
				continue
			}
			words, err := shellWords(strings.NewReplacer(`[`, ``, `]`, ``, `,`, ` `).Replace(in.args))
			if err != nil || len(words) == 0 {
				t.Fatalf("CMD %s: want exec form", in.args)
			}
			if err := run(context.Background(), []string{words[0], "-h"}, io.Discard, io.Discard); !errors.Is(err, flag.ErrHelp) {
				t.Errorf("CMD %s: pgfly %s -h: got %v, want its usage", in.args, words[0], err)
			}
		}
	})
}

func flagValue(args []string, name string) string {
	if i := slices.Index(args, name); i >= 0 && i+1 < len(args) {
		return args[i+1]
	}
	return ""
}

// dig walks nested YAML maps.
func dig(tb testing.TB, v any, keys ...string) any {
	tb.Helper()
	for i, k := range keys {
		m, ok := v.(map[string]any)
		if !ok {
			tb.Fatalf("%s: got %T, want a mapping", strings.Join(keys[:i], "."), v)
		}
		if v, ok = m[k]; !ok {
			tb.Fatalf("%s: missing", strings.Join(keys[:i+1], "."))
		}
	}
	return v
}

// stringList converts a YAML sequence of strings.
func stringList(tb testing.TB, v any) []string {
	tb.Helper()
	list, ok := v.([]any)
	if !ok {
		tb.Fatalf("got %v (%T), want a sequence", v, v)
	}
	out := make([]string, len(list))
	for i, x := range list {
		if out[i], ok = x.(string); !ok {
			tb.Fatalf("item %d: got %v (%T), want a string", i, x, x)
		}
	}
	return out
}

// --- a TOML subset: tables, arrays of tables, key = value on one line with strings,
// integers, booleans, one-line arrays and inline tables. Keys come back dotted:
// "http_service.internal_port", "http_service.checks[0].path".

var tomlKeyRE = regexp.MustCompile(`^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$`)

func parseTOML(src string) (map[string]any, error) {
	out := map[string]any{}
	tables := map[string]bool{}
	arrays := map[string]int{}
	prefix := ""
	for n, raw := range strings.Split(src, "\n") {
		line := strings.TrimSpace(cutComment(raw))
		switch {
		case line == "":
		case strings.HasPrefix(line, "[["):
			name, ok := strings.CutSuffix(strings.TrimPrefix(line, "[["), "]]")
			name = strings.TrimSpace(name)
			if !ok || !tomlKeyRE.MatchString(name) {
				return nil, fmt.Errorf("line %d: bad array of tables %q", n+1, line)
			}
			prefix = fmt.Sprintf("%s[%d]", name, arrays[name])
			arrays[name]++
		case strings.HasPrefix(line, "["):
			name, ok := strings.CutSuffix(strings.TrimPrefix(line, "["), "]")
			name = strings.TrimSpace(name)
			if !ok || !tomlKeyRE.MatchString(name) || tables[name] {
				return nil, fmt.Errorf("line %d: bad or repeated table %q", n+1, line)
			}
			tables[name], prefix = true, name
		default:
			key, val, ok := strings.Cut(line, "=")
			key = strings.TrimSpace(key)
			if !ok || !tomlKeyRE.MatchString(key) || strings.Contains(key, ".") {
				return nil, fmt.Errorf("line %d: want key = value, got %q", n+1, line)
			}
			v, err := tomlValue(strings.TrimSpace(val))
			if err != nil {
				return nil, fmt.Errorf("line %d: %s: %w", n+1, key, err)
			}
			if prefix != "" {
				key = prefix + "." + key
			}
			if _, dup := out[key]; dup {
				return nil, fmt.Errorf("line %d: %s set twice", n+1, key)
			}
			out[key] = v
		}
	}
	return out, nil
}

func tomlValue(s string) (any, error) {
	switch {
	case strings.HasPrefix(s, `"`):
		return strconv.Unquote(s)
	case strings.HasPrefix(s, `'`) && len(s) >= 2 && strings.HasSuffix(s, `'`) && !strings.Contains(s[1:len(s)-1], `'`):
		return s[1 : len(s)-1], nil
	case s == "true" || s == "false":
		return s == "true", nil
	case strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]"):
		var list []any
		for _, item := range splitList(s[1 : len(s)-1]) {
			v, err := tomlValue(item)
			if err != nil {
				return nil, err
			}
			list = append(list, v)
		}
		return list, nil
	case strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}"):
		m := map[string]any{}
		for _, item := range splitList(s[1 : len(s)-1]) {
			k, v, ok := strings.Cut(item, "=")
			if !ok {
				return nil, fmt.Errorf("inline table item %q: want key = value", item)
			}
			val, err := tomlValue(strings.TrimSpace(v))
			if err != nil {
				return nil, err
			}
			m[strings.TrimSpace(k)] = val
		}
		return m, nil
	}
	n, err := strconv.ParseInt(strings.ReplaceAll(s, "_", ""), 10, 64)
	if err != nil {
		return nil, fmt.Errorf("unsupported value %q", s)
	}
	return n, nil
}

// cutComment removes a # comment that is outside quotes.
func cutComment(line string) string {
	var quote byte
	for i := 0; i < len(line); i++ {
		switch c := line[i]; {
		case quote != 0 && c == '\\' && quote == '"':
			i++
		case quote != 0 && c == quote:
			quote = 0
		case quote == 0 && (c == '"' || c == '\''):
			quote = c
		case quote == 0 && c == '#' && (i == 0 || line[i-1] == ' ' || line[i-1] == '\t'):
			return line[:i]
		}
	}
	return line
}

// splitList splits a one-line list on the commas outside quotes and brackets.
func splitList(s string) []string {
	var (
		out   []string
		quote byte
		depth int
		start int
	)
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case quote != 0 && c == '\\' && quote == '"':
			i++
		case quote != 0 && c == quote:
			quote = 0
		case quote != 0:
		case c == '"' || c == '\'':
			quote = c
		case c == '[' || c == '{':
			depth++
		case c == ']' || c == '}':
			depth--
		case c == ',' && depth == 0:
			out = append(out, strings.TrimSpace(s[start:i]))
			start = i + 1
		}
	}
	if last := strings.TrimSpace(s[start:]); last != "" {
		out = append(out, last)
	}
	return out
}

// --- a YAML subset: documents separated by ---, block mappings and sequences indented
// with spaces, and scalars: plain, "double-quoted", 'single-quoted' and one-line [lists].

type yamlLine struct {
	num, indent int
	text        string
}

func parseYAML(src string) ([]any, error) {
	var (
		docs  []any
		lines []yamlLine
	)
	flush := func() error {
		if len(lines) == 0 {
			return nil
		}
		v, next, err := yamlNode(lines, 0, lines[0].indent)
		if err != nil {
			return err
		}
		if next != len(lines) {
			return fmt.Errorf("line %d: unexpected indentation", lines[next].num)
		}
		docs, lines = append(docs, v), nil
		return nil
	}
	for n, raw := range strings.Split(src, "\n") {
		if strings.Contains(raw, "\t") {
			return nil, fmt.Errorf("line %d: a tab", n+1)
		}
		text := strings.TrimRight(cutComment(raw), " ")
		if strings.TrimSpace(text) == "" {
			continue
		}
		if text == "---" {
			if err := flush(); err != nil {
				return nil, err
			}
			continue
		}
		trimmed := strings.TrimLeft(text, " ")
		lines = append(lines, yamlLine{n + 1, len(text) - len(trimmed), trimmed})
	}
	if err := flush(); err != nil {
		return nil, err
	}
	if len(docs) == 0 {
		return nil, errors.New("no document")
	}
	return docs, nil
}

func isSeqItem(text string) bool { return text == "-" || strings.HasPrefix(text, "- ") }

func yamlNode(ls []yamlLine, i, indent int) (any, int, error) {
	if isSeqItem(ls[i].text) {
		return yamlSeq(ls, i, indent)
	}
	return yamlMap(ls, i, indent)
}

// yamlKey splits "key: value" or "key:"; ok is false for anything else.
func yamlKey(text string) (key, rest string, ok bool) {
	if strings.HasPrefix(text, `"`) || strings.HasPrefix(text, `'`) || strings.HasPrefix(text, "[") {
		return "", "", false
	}
	if k, ok := strings.CutSuffix(text, ":"); ok && !strings.Contains(k, ": ") {
		return k, "", true
	}
	k, r, ok := strings.Cut(text, ": ")
	return k, strings.TrimSpace(r), ok && !strings.Contains(k, " ")
}

func yamlMap(ls []yamlLine, i, indent int) (map[string]any, int, error) {
	m := map[string]any{}
	for i < len(ls) && ls[i].indent == indent && !isSeqItem(ls[i].text) {
		key, rest, ok := yamlKey(ls[i].text)
		if !ok {
			return nil, 0, fmt.Errorf("line %d: want key: value, got %q", ls[i].num, ls[i].text)
		}
		if _, dup := m[key]; dup {
			return nil, 0, fmt.Errorf("line %d: %s set twice", ls[i].num, key)
		}
		num := ls[i].num
		i++
		if rest != "" {
			v, err := yamlScalar(rest)
			if err != nil {
				return nil, 0, fmt.Errorf("line %d: %w", num, err)
			}
			m[key] = v
			continue
		}
		m[key] = nil
		if i < len(ls) && (ls[i].indent > indent || ls[i].indent == indent && isSeqItem(ls[i].text)) {
			v, next, err := yamlNode(ls, i, ls[i].indent)
			if err != nil {
				return nil, 0, err
			}
			m[key], i = v, next
		}
	}
	if i < len(ls) && ls[i].indent > indent {
		return nil, 0, fmt.Errorf("line %d: unexpected indentation", ls[i].num)
	}
	return m, i, nil
}

func yamlSeq(ls []yamlLine, i, indent int) ([]any, int, error) {
	var s []any
	for i < len(ls) && ls[i].indent == indent && isSeqItem(ls[i].text) {
		rest := strings.TrimLeft(strings.TrimPrefix(ls[i].text, "-"), " ")
		switch _, _, isKey := yamlKey(rest); {
		case rest == "":
			i++
			var v any
			if i < len(ls) && ls[i].indent > indent {
				var err error
				if v, i, err = yamlNode(ls, i, ls[i].indent); err != nil {
					return nil, 0, err
				}
			}
			s = append(s, v)
		case isKey:
			// A mapping whose first key shares the dash's line.
			childIndent := indent + len(ls[i].text) - len(rest)
			ls[i] = yamlLine{ls[i].num, childIndent, rest}
			v, next, err := yamlMap(ls, i, childIndent)
			if err != nil {
				return nil, 0, err
			}
			s, i = append(s, v), next
		default:
			v, err := yamlScalar(rest)
			if err != nil {
				return nil, 0, fmt.Errorf("line %d: %w", ls[i].num, err)
			}
			s, i = append(s, v), i+1
		}
	}
	if i < len(ls) && ls[i].indent > indent {
		return nil, 0, fmt.Errorf("line %d: unexpected indentation", ls[i].num)
	}
	return s, i, nil
}

func yamlScalar(s string) (any, error) {
	switch {
	case strings.HasPrefix(s, `"`):
		return strconv.Unquote(s)
	case strings.HasPrefix(s, `'`):
		if len(s) < 2 || !strings.HasSuffix(s, `'`) {
			return nil, fmt.Errorf("unterminated string %s", s)
		}
		return strings.ReplaceAll(s[1:len(s)-1], "''", "'"), nil
	case strings.HasPrefix(s, "["):
		if !strings.HasSuffix(s, "]") {
			return nil, fmt.Errorf("a list that does not end on its line: %s", s)
		}
		var list []any
		for _, item := range splitList(s[1 : len(s)-1]) {
			v, err := yamlScalar(item)
			if err != nil {
				return nil, err
			}
			list = append(list, v)
		}
		return list, nil
	case strings.HasPrefix(s, "{"), strings.HasPrefix(s, "|"), strings.HasPrefix(s, ">"),
		strings.HasPrefix(s, "&"), strings.HasPrefix(s, "*"), strings.HasPrefix(s, "!"):
		return nil, fmt.Errorf("outside the YAML this test reads: %s", s)
	case strings.Contains(s, ": "):
		return nil, fmt.Errorf("a plain value with \": \" in it: %s", s)
	}
	return s, nil
}

// --- Dockerfiles: instructions, with continuation lines joined.

type dockerInstr struct {
	line int
	cmd  string
	args string
}

var dockerInstructions = []string{"FROM", "WORKDIR", "COPY", "ADD", "RUN", "USER", "EXPOSE", "ENTRYPOINT", "CMD",
	"ENV", "ARG", "LABEL", "HEALTHCHECK", "STOPSIGNAL", "VOLUME", "SHELL", "ONBUILD"}

func parseDockerfile(src string) ([]dockerInstr, error) {
	var (
		out  []dockerInstr
		cur  string
		from int
	)
	for n, raw := range strings.Split(src, "\n") {
		line := strings.TrimSpace(raw)
		if cur == "" && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if cur == "" {
			from = n + 1
		}
		if cont, ok := strings.CutSuffix(line, `\`); ok {
			cur += cont + " "
			continue
		}
		cur += line
		cmd, args, _ := strings.Cut(cur, " ")
		if !slices.Contains(dockerInstructions, cmd) {
			return nil, fmt.Errorf("line %d: unknown instruction %q", from, cmd)
		}
		if args = strings.TrimSpace(args); args == "" {
			return nil, fmt.Errorf("line %d: %s without arguments", from, cmd)
		}
		if (cmd == "ENTRYPOINT" || cmd == "CMD") && strings.HasPrefix(args, "[") {
			if _, err := yamlScalar(args); err != nil || !strings.HasSuffix(args, "]") {
				return nil, fmt.Errorf("line %d: %s: bad exec form %s", from, cmd, args)
			}
		}
		out, cur = append(out, dockerInstr{from, cmd, args}), ""
	}
	if cur != "" {
		return nil, errors.New("a continuation line at the end")
	}
	return out, nil
}

// shellWords splits a command line the way sh would for plain words and quotes, without
// expansions.
func shellWords(s string) ([]string, error) {
	var (
		words []string
		cur   strings.Builder
		in    bool
		quote byte
	)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote != 0 && c == quote:
			quote = 0
		case quote != 0:
			cur.WriteByte(c)
		case c == '"' || c == '\'':
			quote, in = c, true
		case c == ' ' || c == '\t':
			if in {
				words, in = append(words, cur.String()), false
				cur.Reset()
			}
		case strings.IndexByte("$`&|;<>()\\", c) >= 0:
			return nil, fmt.Errorf("shell syntax %q in %q: this test reads plain commands only", c, s)
		default:
			cur.WriteByte(c)
			in = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unterminated quote in %q", s)
	}
	if in {
		words = append(words, cur.String())
	}
	return words, nil
}
