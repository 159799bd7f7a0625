package sidecar

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pgfly/pgfly/lag"
)

// DefaultMaxLag is the replica lag beyond which /health answers 503.
const DefaultMaxLag = 10 * time.Second

// health is the body of /health.
type health struct {
	Status        string  `json:"status"` // ok, lagging, two_primaries, upstream_down
	Region        string  `json:"region,omitempty"`
	PrimaryRegion string  `json:"primary_region,omitempty"`
	Role          string  `json:"role"`
	UpstreamUp    bool    `json:"upstream_up"`
	UpstreamError string  `json:"upstream_error,omitempty"`
	PrimaryUp     bool    `json:"primary_up"`
	ReplayLSN     string  `json:"replay_lsn"`
	PrimaryLSN    string  `json:"primary_lsn,omitempty"`
	LagBytes      int64   `json:"lag_bytes"`
	LagSeconds    float64 `json:"lag_seconds"`
	MaxLagSeconds float64 `json:"max_lag_seconds"`
	// System identifiers are strings: JSON numbers lose their last digits.
	SystemID           string `json:"system_id,omitempty"`
	Timeline           uint32 `json:"timeline,omitempty"`
	PrimarySystemID    string `json:"primary_system_id,omitempty"`
	PrimaryTimeline    uint32 `json:"primary_timeline,omitempty"`
	TwoPrimaries       bool   `json:"two_primaries"`
	TwoPrimariesReason string `json:"two_primaries_reason,omitempty"`
	CheckedAt          string `json:"checked_at,omitempty"`
	SessionsOpen       int    `json:"sessions_open"`
}

// adminHandler serves /health, /metrics and /routes.
func (s *Sidecar) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", s.serveHealth)
	mux.HandleFunc("GET /routes", s.serveRoutes)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{}))
	return mux
}

// serveHealth answers 200 when the upstream is reachable, is not one of two primaries and its
// lag is within MaxLag, else 503, so that it can serve as a Fly HTTP check.
func (s *Sidecar) serveHealth(w http.ResponseWriter, r *http.Request) {
	st := s.monitor.Status()
	var region, primaryRegion string
	if s.cfg.Shim != nil {
		region, primaryRegion = s.cfg.Shim.Region, s.cfg.Shim.PrimaryRegion
	}
	h := health{
		Status:        "ok",
		Region:        region,
		PrimaryRegion: primaryRegion,
		Role:          string(st.Role),
		UpstreamUp:    st.UpstreamUp,
		UpstreamError: st.UpstreamError,
		PrimaryUp:     st.PrimaryUp,
		ReplayLSN:     st.ReplayLSN.String(),
		LagBytes:      st.LagBytes,
		LagSeconds:    st.LagSeconds,
		MaxLagSeconds: s.cfg.MaxLag.Seconds(),
		SystemID:      systemID(st.SystemID),
		Timeline:      st.Timeline,

		PrimarySystemID:    systemID(st.PrimarySystemID),
		PrimaryTimeline:    st.PrimaryTimeline,
		TwoPrimaries:       st.TwoPrimaries,
		TwoPrimariesReason: st.TwoPrimariesReason,
		SessionsOpen:       s.openSessions(),
	}
	if st.PrimaryLSN != 0 {
		h.PrimaryLSN = st.PrimaryLSN.String()
	}
	if !st.CheckedAt.IsZero() {
		h.CheckedAt = st.CheckedAt.UTC().Format(time.RFC3339Nano)
	}
	code := http.StatusOK
	switch {
	case !st.UpstreamUp:
		h.Status, code = "upstream_down", http.StatusServiceUnavailable
	case st.TwoPrimaries:
		h.Status, code = "two_primaries", http.StatusServiceUnavailable
	case st.Role == lag.RoleReplica && st.LagSeconds > s.cfg.MaxLag.Seconds():
		h.Status, code = "lagging", http.StatusServiceUnavailable
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(h)
}

// openSessions counts the sessions of both relays.
func (s *Sidecar) openSessions() int {
	n := 0
	for _, relay := range s.relays() {
		n += relay.OpenSessions()
	}
	return n
}

// systemID formats a system identifier for /health, "" when unknown (0).
func systemID(id uint64) string {
	if id == 0 {
		return ""
	}
	return strconv.FormatUint(id, 10)
}

// serveRoutes lists the learned and configured write routes with their counts; 404 when the
// shim is off, since then no request is ever replayed.
func (s *Sidecar) serveRoutes(w http.ResponseWriter, r *http.Request) {
	if s.shim == nil {
		http.Error(w, "pgfly: the HTTP shim is off (--http-listen is empty): no routes", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(s.shim.Routes())
}
