// Package lag watches the nearby Postgres server pgfly relays to (the
// "upstream": a read replica, or the primary in the primary region) and, when
// one is configured, the primary. It answers what the router needs to decide
// where a request may run: the upstream's role, how far it has replayed the
// primary's WAL, its lag in bytes and seconds, whether its replay is paused,
// and WaitFor(ctx, lsn), which returns once the upstream has replayed a
// read-your-writes bookmark, or at once when it can tell that it will not in
// time (ErrUnreachable).
//
// A Monitor runs one polling loop per server over its own connections and
// serves any number of WaitFor callers from that loop, so waiting costs no
// extra queries. It runs read-only monitoring functions only: it must never
// write, never take locks an application could wait on, and never touch the
// sessions that package wire relays for the application.
package lag
