// Package lag watches the nearby Postgres server pgfly relays to (the
// "upstream": a read replica, or the primary in the primary region) and, when
// one is configured, the primary. It answers what the router needs to decide
// where a request may run: the upstream's role, how far it has replayed the
// primary's WAL, its lag in bytes and seconds, whether its replay is paused,
// and WaitFor(ctx, lsn), which returns once the upstream has replayed a
// read-your-writes bookmark, or at once when it can tell that it will not in
// time (ErrUnreachable). It also tells when the upstream and the configured
// primary are two primaries (a promoted replica beside a primary that still
// runs), and each server's system identifier and timeline.
//
// A Monitor runs one polling loop per server (poller.go: the same query, loop
// and logging for both) over its own connections and serves any number of
// WaitFor callers from the upstream's loop, so waiting costs no extra
// queries. A server that is down is probed every DownInterval; a relay
// session that fails calls SuspectDown to have the upstream polled at once.
// Files: monitor.go (the Monitor, Status, WaitFor, PrimaryLSN), poller.go
// (polling), primaries.go (two primaries), reach.go (the rate rule of
// WaitFor), conns.go (its connections), params.go (URL parameters), lsn.go. It runs read-only monitoring functions only: it must never
// write, never take locks an application could wait on, and never touch the
// sessions that package wire relays for the application.
package lag
