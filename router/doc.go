// Package router is pgfly's HTTP shim: a reverse proxy in front of the app that replays, in
// the primary region, the requests whose writes the nearby replica refused, and sends the
// routes that keep writing there before the app runs them.
//
// The files follow the life of a request:
//   - shim.go: configuration, the server, and ServeHTTP, which decides up front (a learned or
//     configured write route, or a bookmark the replica has not replayed) or lets the app run.
//   - registry.go: the requests in flight, the standby refusals the relay reports and the
//     requests each taints (the one whose trace id the failing statement carried; else every
//     candidate that began before the statement was sent and whose response has not started),
//     and the evidence each request leaves for route learning when it ends.
//   - routes.go: route keys (ids collapsed), the bounded table of learned routes with its
//     learning and probing rule, and --replay-routes/--local-routes patterns.
//   - decision.go: the one replay function, for up-front and tainted requests alike, and the
//     typed reasons, matches and outcomes the metrics count.
//   - bookmarks.go: the read-your-writes cookie and the wait for the replica.
//   - timeouts.go: the bounds on a slow or idle client and a slow app: an idle keep-alive
//     timeout, a deadline for a whole request body (408), and one for the app's response
//     headers (504). No timeout bounds a response once it has started, nor an upgraded
//     connection.
//   - headers.go: what is kept, added and removed on the way.
//
// The shim never replays in the primary region, never replays a request twice, and never
// replays a response that has started or a WebSocket: those cases are logged instead.
package router
