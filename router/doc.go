// Package router is pgfly's HTTP shim: a reverse proxy in front of the app that replays, in
// the primary region, the requests whose writes the nearby replica refused.
//
// It keeps a registry of the requests in flight. When the Postgres relay reports a read-only
// violation, the shim taints the requests that may have caused it (the one whose trace id the
// failing statement carried, or else every request whose response has not started), and
// answers each tainted request with a fly-replay header (or, in proxy mode, with the primary
// region's answer to the same request) instead of the app's error.
//
// The shim never replays in the primary region, never replays a request twice, and never
// replays a response that has started or a WebSocket: those cases are logged instead.
package router
