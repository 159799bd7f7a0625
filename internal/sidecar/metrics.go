package sidecar

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/pgfly/pgfly/lag"
	"github.com/pgfly/pgfly/router"
	"github.com/pgfly/pgfly/wire"
)

// metrics are pgfly's Prometheus metrics, in a registry of their own.
type metrics struct {
	reg          *prometheus.Registry
	violations   prometheus.Counter
	writes       prometheus.Counter
	replays      *prometheus.CounterVec
	bookmarkWait *prometheus.HistogramVec
	tainted      prometheus.Histogram
	// upstreamFailures counts sessions that could not reach the upstream or lost it, by cause.
	upstreamFailures *prometheus.CounterVec
	timeouts         *prometheus.CounterVec
	forwards         *prometheus.CounterVec
}

// newMetrics registers pgfly's metrics. relays are the Postgres relays by listener ("app",
// "jobs"): each relay's session and byte counts carry its name as the label listener, so that
// job sessions are told from the app's, and a sum over it is every session.
func newMetrics(relays map[string]*wire.Server, shim *router.Shim, monitor *lag.Monitor) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		violations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pgfly_readonly_violations_total",
			Help: "Statements the upstream refused because it is a standby (SQLSTATE 25006; 0A000 and 55000 while it is in recovery).",
		}),
		writes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pgfly_writes_committed_total",
			Help: "Transactions that wrote and committed through the relay.",
		}),
		replays: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pgfly_replay_decisions_total",
			Help: "Decisions about sending requests to the primary region, by reason (read_only, lag, route, replica_down), match (precise, overlap), route (learned, configured) and outcome (replayed, loop_blocked, too_large, started, no_request, primary, not_replayed).",
		}, []string{"reason", "match", "route", "outcome"}),
		bookmarkWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "pgfly_bookmark_wait_seconds",
			Help:    "Time requests with a bookmark waited for the replica, by outcome (caught_up, timeout, unreachable, other_history, cancelled).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"outcome"}),
		tainted: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "pgfly_refusal_tainted_requests",
			Help:    "HTTP requests in flight that each standby refusal could belong to and so tainted (1 for a precise match).",
			Buckets: []float64{0, 1, 2, 4, 8, 16, 32, 64},
		}),
		timeouts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pgfly_http_timeouts_total",
			Help: "HTTP requests the shim answered for a timeout, by timeout (body: 408, the request body did not arrive within --http-body-timeout; app: 504, the app did not start its answer within --app-timeout).",
		}, []string{"timeout"}),
		forwards: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pgfly_forwards_total",
			Help: "Standby refusals of sessions with no HTTP request (the jobs listener, or the relay without the shim) and what pgfly did, by outcome (moved: to the primary, the client saw nothing; retry: moved, the client was answered 40001; refused: not moved, the client got the refusal; limit: --max-forwarded-sessions on the primary, answered 53300; direct: the upstream unreachable, relayed to the primary from the start; back: a moved session went back to its replica backend).",
		}, []string{"outcome"}),
	}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.upstreamFailures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgfly_upstream_failures_total",
		Help: "Client sessions for which the relay could not reach the upstream or lost it, by cause (connect, login timeout, shutdown: a FATAL 57P, lost).",
	}, []string{"cause"})
	m.reg.MustRegister(m.violations, m.writes, m.replays, m.bookmarkWait, m.tainted, m.upstreamFailures, m.timeouts, m.forwards)
	// Every known label value from the start, at 0, so that a rate over them is 0 rather than
	// absent until the first failure (dashboards and alerts see a series to watch).
	for _, cause := range []string{wire.FailConnect, wire.FailLoginTimeout, wire.FailShutdown, wire.FailLost, wire.FailFenced} {
		m.upstreamFailures.WithLabelValues(cause)
	}
	for _, d := range []router.Decision{ // the replays, by each way a reason comes about
		{Reason: router.ReasonReadOnly, Match: router.MatchOverlap}, {Reason: router.ReasonReadOnly, Match: router.MatchPrecise},
		{Reason: router.ReasonLag}, {Reason: router.ReasonRoute, Route: "learned"}, {Reason: router.ReasonRoute, Route: "configured"},
		{Reason: router.ReasonReplicaDown}, {Reason: router.ReasonReplicaDown, Match: router.MatchOverlap},
	} {
		m.replays.WithLabelValues(string(d.Reason), string(d.Match), d.Route, string(router.OutcomeReplayed))
	}
	for _, o := range []router.WaitOutcome{router.WaitCaughtUp, router.WaitTimeout, router.WaitUnreachable, router.WaitOtherHistory, router.WaitCancelled} {
		m.bookmarkWait.WithLabelValues(string(o))
	}
	for _, t := range []router.Timeout{router.TimeoutBody, router.TimeoutApp} {
		m.timeouts.WithLabelValues(string(t))
	}
	for _, o := range []string{wire.ForwardMoved, wire.ForwardRetry, wire.ForwardRefused, wire.ForwardLimit, wire.ForwardDirect, wire.ForwardBack} {
		m.forwards.WithLabelValues(o)
	}
	for listener, relay := range relays {
		stat := func(f func(wire.Stats) uint64) func() float64 {
			return func() float64 { return float64(f(relay.Stats())) }
		}
		labels := prometheus.Labels{"listener": listener}
		m.reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pgfly_sessions_open", Help: "Postgres sessions being relayed, by listener (app, jobs).",
				ConstLabels: labels}, func() float64 { return float64(relay.OpenSessions()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "pgfly_sessions_total", Help: "Postgres sessions relayed since start, by listener (app, jobs).",
				ConstLabels: labels}, stat(func(s wire.Stats) uint64 { return s.Sessions })),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "pgfly_relay_bytes_total", Help: "Bytes relayed, by direction and listener (app, jobs).",
				ConstLabels: prometheus.Labels{"listener": listener, "direction": "to_upstream"}}, stat(func(s wire.Stats) uint64 { return s.BytesIn })),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "pgfly_relay_bytes_total", Help: "Bytes relayed, by direction and listener (app, jobs).",
				ConstLabels: prometheus.Labels{"listener": listener, "direction": "to_client"}}, stat(func(s wire.Stats) uint64 { return s.BytesOut })),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "pgfly_upstream_connect_errors_total", Help: "Failed connections to the upstream for client sessions, by listener (app, jobs).",
				ConstLabels: labels}, stat(func(s wire.Stats) uint64 { return s.ConnectErrors })),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "pgfly_clients_refused_total", Help: "Client connections answered 53300 because --max-client-conn were open, by listener (app, jobs).",
				ConstLabels: labels}, stat(func(s wire.Stats) uint64 { return s.Refused })),
		)
	}
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pgfly_forwarded_sessions",
		Help: "Sessions that hold a backend on the primary now (on it after a standby refusal or from their start, or back on the replica with their primary backend kept idle for the next write), both listeners together."},
		func() float64 {
			n := 0
			for _, relay := range relays {
				n += relay.ForwardedSessions()
			}
			return float64(n)
		}))
	if shim != nil {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pgfly_http_requests_in_flight", Help: "HTTP requests in flight through the shim."},
			func() float64 { return float64(shim.InFlight()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "pgfly_http_served_here_total",
				Help: "HTTP requests the app in this region answered without a replay (beside pgfly_replay_decisions_total{outcome=\"replayed\"}: the share kept local)."},
				func() float64 { return float64(shim.ServedHere()) }))
	}
	status := func(f func(lag.Status) float64) func() float64 {
		return func() float64 { return f(monitor.Status()) }
	}
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pgfly_upstream_up", Help: "1 when pgfly's monitor reaches the upstream."},
			status(func(s lag.Status) float64 { return bool01(s.UpstreamUp) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pgfly_upstream_is_primary", Help: "1 when the upstream is not in recovery."},
			status(func(s lag.Status) float64 { return bool01(s.Role == lag.RolePrimary) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pgfly_two_primaries", Help: "1 when the upstream and the configured primary are two different servers that both accept writes (a split brain)."},
			status(func(s lag.Status) float64 { return bool01(s.TwoPrimaries) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pgfly_replica_lag_bytes", Help: "WAL bytes the upstream is behind the primary (-1 unknown)."},
			status(func(s lag.Status) float64 { return float64(s.LagBytes) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pgfly_replica_lag_seconds", Help: "Seconds the upstream is behind the primary (-1 unknown)."},
			status(func(s lag.Status) float64 { return s.LagSeconds })),
	)
	return m
}

func bool01(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (m *metrics) decision(d router.Decision) {
	m.replays.WithLabelValues(string(d.Reason), string(d.Match), d.Route, string(d.Outcome)).Inc()
}

func (m *metrics) wait(d time.Duration, outcome router.WaitOutcome) {
	m.bookmarkWait.WithLabelValues(string(outcome)).Observe(d.Seconds())
}
