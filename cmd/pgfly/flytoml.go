package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
)

// flyToml is what `pgfly check --fly-toml` reads of a fly.toml: the HTTP service's internal
// port and the HTTP health checks, from [http_service] and its [[http_service.checks]], the
// older [[services]] with [[services.http_checks]], and the top-level [checks.NAME].
type flyToml struct {
	servicePorts []int // internal ports of the HTTP services
	checks       []flyCheck
}

// flyCheck is one HTTP health check: the port it connects to and its path.
type flyCheck struct {
	where string // the table it came from, for messages
	port  int
	path  string
}

// readFlyToml reads the few keys the checks need with a line reader for TOML's common form
// (tables, arrays of tables, key = value); a fly.toml written with inline tables for these
// keys is not understood, and the checks then say they found nothing.
func readFlyToml(path string) (flyToml, error) {
	f, err := os.Open(path)
	if err != nil {
		return flyToml{}, err
	}
	defer f.Close()
	var (
		ft      flyToml
		table   string
		check   *flyCheck
		service = -1 // the index in servicePorts of the current service
		typ     string
	)
	flush := func() {
		if check != nil && (typ == "" || typ == "http") {
			if check.port == 0 && service >= 0 && service < len(ft.servicePorts) {
				check.port = ft.servicePorts[service] // a service's check defaults to its port
			}
			ft.checks = append(ft.checks, *check)
		}
		check, typ = nil, ""
	}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(stripComment(sc.Text()))
		switch {
		case line == "":
		case strings.HasPrefix(line, "["):
			flush()
			table = strings.TrimSpace(strings.Trim(line, "[]"))
			switch {
			case table == "http_service" || table == "services":
				ft.servicePorts = append(ft.servicePorts, 0)
				service = len(ft.servicePorts) - 1
			case table == "http_service.checks" || table == "services.http_checks":
				check = &flyCheck{where: "[[" + table + "]]"}
			case strings.HasPrefix(table, "checks."):
				check = &flyCheck{where: "[" + table + "]"}
			}
		default:
			key, value, ok := strings.Cut(line, "=")
			if !ok {
				return flyToml{}, fmt.Errorf("%s:%d: want key = value, got %q", path, n, line)
			}
			key, value = strings.TrimSpace(key), strings.Trim(strings.TrimSpace(value), `"'`)
			switch {
			case key == "internal_port" && (table == "http_service" || table == "services"):
				ft.servicePorts[service], _ = strconv.Atoi(value)
			case check != nil && key == "port":
				check.port, _ = strconv.Atoi(value)
			case check != nil && key == "path":
				check.path = value
			case check != nil && key == "type":
				typ = value
			}
		}
	}
	flush()
	return ft, sc.Err()
}

// stripComment drops a # comment that is not inside a quoted string.
func stripComment(line string) string {
	var quote rune
	for i, r := range line {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote == 0 && (r == '"' || r == '\''):
			quote = r
		case quote == 0 && r == '#':
			return line[:i]
		}
	}
	return line
}

// flyTomlChecks: the HTTP service's internal port is the shim's, and a health check asks
// pgfly's /health (the admin port), not the app alone.
func flyTomlChecks(t checkTarget, add adder) {
	ft, err := readFlyToml(t.FlyToml)
	if err != nil {
		add("fly.toml", verdictFail, "pass --fly-toml the app's fly.toml", "cannot read it: %v", err)
		return
	}
	shimPort, adminPort, appPort := portOf(t.HTTPListen), portOf(t.AdminListen), 0
	if t.App != nil {
		appPort, _ = strconv.Atoi(t.App.Port())
	}
	switch {
	case t.App == nil:
		add("fly.toml port", verdictOK, "", "no HTTP shim: the HTTP service is not pgfly's")
	case len(ft.servicePorts) == 0:
		add("fly.toml port", verdictWarn, fmt.Sprintf("add [http_service] with internal_port = %d", shimPort), "%s has no HTTP service", t.FlyToml)
	default:
		for _, p := range ft.servicePorts {
			switch p {
			case shimPort:
				add("fly.toml port", verdictOK, "", "the HTTP service's internal_port %d is pgfly's shim (--http-listen)", p)
			case appPort:
				add("fly.toml port", verdictFail, fmt.Sprintf("set internal_port = %d (--http-listen)", shimPort),
					"the HTTP service's internal_port %d is the app's: the edge bypasses pgfly and no write is replayed", p)
			default:
				add("fly.toml port", verdictFail, fmt.Sprintf("set internal_port = %d (--http-listen)", shimPort),
					"the HTTP service's internal_port %d is not pgfly's shim (%d)", p, shimPort)
			}
		}
	}
	if adminPort == 0 {
		add("fly.toml health", verdictWarn, "set --admin-listen", "pgfly serves no /health (--admin-listen is empty)")
		return
	}
	for _, c := range ft.checks {
		if c.port == adminPort && c.path == "/health" {
			add("fly.toml health", verdictOK, "", "%s checks pgfly's /health on port %d", c.where, c.port)
			return
		}
	}
	fix := fmt.Sprintf(`add [checks.pgfly] with type = "http", port = %d, path = "/health" (and --admin-listen on every interface, e.g. :%d)`, adminPort, adminPort)
	for _, c := range ft.checks {
		if c.port == appPort && appPort != 0 {
			add("fly.toml health", verdictWarn, fix, "%s checks the app on port %d directly, and nothing checks pgfly's /health", c.where, c.port)
			return
		}
	}
	add("fly.toml health", verdictWarn, fix, "no health check asks pgfly's /health on port %d", adminPort)
}

// portOf is the port of a listen address, 0 when it has none.
func portOf(addr string) int {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return n
}
