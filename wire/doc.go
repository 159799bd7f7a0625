// Package wire accepts PostgreSQL connections and relays each session, one to one, to an
// upstream server.
//
// The relay is a copier with eyes: it frames messages by their 5-byte header and forwards
// raw bytes in batches, decoding only the few message types it acts on (Authentication,
// BackendKeyData, ErrorResponse, CommandComplete, ReadyForQuery). It reports what it sees
// (sessions opening and closing, read-only violations, committed writes) to an Observer that
// the caller implements.
//
// wire never stores a password or a query parameter, never holds a large message whole
// (rows, queries and COPY data stream through; only the rare server messages it decodes are
// read whole, up to Config.MaxMessageSize), and never imports the packages that consume its
// events (router, lag).
package wire
