package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/edge"
)

// DefaultEdgeListen is where `pgfly edge` and `pgfly demo` take requests, as Fly's edge
// would: the address to open in a browser.
const DefaultEdgeListen = "127.0.0.1:8080"

// edgeConfig is `pgfly edge`'s configuration, from flags and the environment.
type edgeConfig struct {
	listen        string
	regions       regionURLs
	def           string
	maxHops       int
	maxReplayBody byteSize
	logLevel      string
}

func (c *edgeConfig) register(fs *flagSet) {
	fs.StringVar(&c.listen, "listen", DefaultEdgeListen, "where clients send HTTP, as they would to Fly's edge")
	fs.bindEnv("listen", "PGFLY_EDGE_LISTEN")
	fs.Var(&c.regions, "region", "a region and its pgfly HTTP URL, NAME=URL, e.g. fra=http://127.0.0.1:8081; repeat it for each region (the variable takes a comma-separated list)")
	fs.bindEnv("region", "PGFLY_EDGE_REGIONS")
	fs.StringVar(&c.def, "default", "", "the region requests go to unless a fly-prefer-region or fly-force-region header says otherwise (required)")
	fs.bindEnv("default", "PGFLY_EDGE_DEFAULT")
	fs.IntVar(&c.maxHops, "max-hops", edge.DefaultMaxHops, "replays followed for one request before answering 508 Loop Detected")
	fs.bindEnv("max-hops", "PGFLY_EDGE_MAX_HOPS")
	c.maxReplayBody = byteSize(edge.DefaultMaxReplayBody)
	fs.Var(&c.maxReplayBody, "max-replay-body", "largest request body that can be replayed, e.g. 1MiB (Fly's limit)")
	fs.bindEnv("max-replay-body", "PGFLY_EDGE_MAX_REPLAY_BODY")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.bindEnv("log-level", "PGFLY_LOG_LEVEL")
}

// edgeConfig checks the flags together and turns them into the edge's configuration.
func (c *edgeConfig) edgeConfig() (edge.Config, error) {
	if len(c.regions.m) == 0 {
		return edge.Config{}, errors.New("flag --region NAME=URL (or $PGFLY_EDGE_REGIONS) is required: name at least one region and its pgfly HTTP URL")
	}
	if c.def == "" {
		return edge.Config{}, errors.New("flag --default (or $PGFLY_EDGE_DEFAULT) is required: name the region requests go to first")
	}
	if c.maxHops < 1 {
		return edge.Config{}, fmt.Errorf("invalid value %d for flag --max-hops: want 1 or more", c.maxHops)
	}
	return edge.Config{
		Listen:        c.listen,
		Regions:       c.regions.m,
		Default:       c.def,
		MaxHops:       c.maxHops,
		MaxReplayBody: int64(c.maxReplayBody),
	}, nil
}

// regionURLs is a repeatable NAME=URL flag; one value may also hold a comma-separated list.
type regionURLs struct {
	m     map[string]string
	order []string
}

func (r *regionURLs) String() string {
	if r == nil {
		return ""
	}
	parts := make([]string, 0, len(r.order))
	for _, name := range r.order {
		parts = append(parts, name+"="+r.m[name])
	}
	return strings.Join(parts, ",")
}

func (r *regionURLs) Set(s string) error {
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		name, u, ok := strings.Cut(item, "=")
		name, u = strings.TrimSpace(name), strings.TrimSpace(u)
		if !ok || name == "" || u == "" {
			return fmt.Errorf("want NAME=URL, e.g. fra=http://127.0.0.1:8081, got %q", item)
		}
		if r.m == nil {
			r.m = make(map[string]string)
		}
		if _, dup := r.m[name]; dup {
			return fmt.Errorf("region %s given twice", name)
		}
		r.m[name] = u
		r.order = append(r.order, name)
	}
	return nil
}

// edgeCommand is `pgfly edge`: the stand-in edge until a signal stops it.
type edgeCommand struct {
	cfg  edgeConfig
	log  *zap.Logger
	edge *edge.Edge
}

func (c *edgeCommand) name() string         { return "edge" }
func (c *edgeCommand) register(fs *flagSet) { c.cfg.register(fs) }
func (c *edgeCommand) logLevel() string     { return c.cfg.logLevel }

func (c *edgeCommand) usage() string {
	return `Usage: pgfly edge --region NAME=URL [--region NAME=URL ...] --default NAME [flags]

A development stand-in for Fly's edge proxy, not a product and not a model of it: it sends
each request to one region's pgfly and, when the answer carries a fly-replay header, sends
the same request to the region it names, with a fly-replay-src header, as Fly's proxy does.
It adds an X-Edge-Trail response header listing the regions a request ran in, e.g. fra>iad.
It trusts every header it is sent: never let it face the internet.

Flags:
`
}

func (c *edgeCommand) open(_ *flagSet, log *zap.Logger) error {
	c.log = log
	ec, err := c.cfg.edgeConfig()
	if err != nil {
		return usage(err)
	}
	e, err := edge.New(ec, log)
	if err != nil {
		return usage(err)
	}
	if err := e.Listen(); err != nil {
		return fmt.Errorf("%w: stop what uses that address or pick another with --listen", err)
	}
	c.edge = e
	return nil
}

func (c *edgeCommand) run(ctx context.Context, sigs <-chan os.Signal) error {
	served := make(chan error, 1)
	go func() { served <- c.edge.Serve() }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	case sig := <-sigs:
		c.log.Info("shutting down", zap.Stringer("signal", sig))
	}
	err := c.edge.Close()
	<-served
	return err
}

func (c *edgeCommand) close() error {
	if c.edge == nil {
		return nil
	}
	err := c.edge.Close() // a second Close does nothing
	c.log.Info("stopped")
	return err
}
