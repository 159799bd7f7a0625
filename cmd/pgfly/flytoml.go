package main

import (
	"fmt"
	"maps"
	"net"
	"slices"
	"strconv"

	"github.com/BurntSushi/toml"
)

// flyToml is what `pgfly check --fly-toml` reads of a fly.toml: the internal ports of the
// HTTP services ([http_service], and each [[services]] with an "http" handler) and the HTTP
// health checks ([[http_service.checks]], [[services.http_checks]], [checks.NAME] of type
// "http").
type flyToml struct {
	servicePorts []int
	checks       []flyCheck
}

// flyCheck is one HTTP health check: the port it connects to and its path.
type flyCheck struct {
	where string // the table it came from, for messages
	port  int
	path  string
}

// flyTomlFile is the part of a fly.toml the checks read, as Fly's configuration reference
// names it.
type flyTomlFile struct {
	HTTPService *struct {
		InternalPort int `toml:"internal_port"`
		Checks       []struct {
			Path string `toml:"path"`
		} `toml:"checks"`
	} `toml:"http_service"`
	Services []struct {
		InternalPort int       `toml:"internal_port"`
		Ports        []flyPort `toml:"ports"`
		HTTPChecks   []struct {
			Path string `toml:"path"`
		} `toml:"http_checks"`
	} `toml:"services"`
	Checks map[string]struct {
		Type string `toml:"type"`
		Port int    `toml:"port"`
		Path string `toml:"path"`
	} `toml:"checks"`
}

// flyDefaultInternalPort is [http_service]'s internal_port when fly.toml leaves it out.
const flyDefaultInternalPort = 8080

// flyPort is one of a service's public ports.
type flyPort struct {
	Handlers []string `toml:"handlers"`
}

// readFlyToml parses a fly.toml (any valid TOML) and picks out the HTTP services and checks.
// A service's own checks connect to its internal port; a top-level check names its port.
func readFlyToml(path string) (flyToml, error) {
	var f flyTomlFile
	if _, err := toml.DecodeFile(path, &f); err != nil {
		return flyToml{}, err
	}
	var ft flyToml
	if hs := f.HTTPService; hs != nil {
		if hs.InternalPort == 0 {
			hs.InternalPort = flyDefaultInternalPort
		}
		ft.servicePorts = append(ft.servicePorts, hs.InternalPort)
		for _, c := range hs.Checks {
			ft.checks = append(ft.checks, flyCheck{where: "[[http_service.checks]]", port: hs.InternalPort, path: c.Path})
		}
	}
	for _, svc := range f.Services {
		if !slices.ContainsFunc(svc.Ports, func(p flyPort) bool { return slices.Contains(p.Handlers, "http") }) {
			continue // a TCP or TLS-only service is not the shim's business
		}
		ft.servicePorts = append(ft.servicePorts, svc.InternalPort)
		for _, c := range svc.HTTPChecks {
			ft.checks = append(ft.checks, flyCheck{where: "[[services.http_checks]]", port: svc.InternalPort, path: c.Path})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(f.Checks)) { // in a stable order
		if c := f.Checks[name]; c.Type == "http" {
			ft.checks = append(ft.checks, flyCheck{where: "[checks." + name + "]", port: c.Port, path: c.Path})
		}
	}
	return ft, nil
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
	for _, l := range []struct{ flag, addr string }{{"--http-listen", t.HTTPListen}, {"--admin-listen", t.AdminListen}} {
		if isLoopback(l.addr) {
			add("fly.toml listen", verdictWarn, fmt.Sprintf("listen on every interface, e.g. %s :%d", l.flag, portOf(l.addr)),
				"%s %s is loopback only: Fly's proxy and health checks connect from outside the machine and cannot reach it", l.flag, l.addr)
		}
	}
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

// isLoopback reports a listen address on a loopback host (127.0.0.1, ::1, localhost).
func isLoopback(addr string) bool {
	h, _, err := net.SplitHostPort(addr)
	return err == nil && isLoopbackHost(h)
}

// isLoopbackHost reports a loopback host name or address.
func isLoopbackHost(h string) bool {
	ip := net.ParseIP(h)
	return h == "localhost" || ip != nil && ip.IsLoopback()
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
