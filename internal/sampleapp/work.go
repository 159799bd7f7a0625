package sampleapp

import (
	"context"
	"database/sql"
	"net/http"
)

// Option changes how New builds the app.
type Option func(*app)

// WithPrimary turns on DB-level routing, for the benchmarks only: it is the alternative to
// pgfly that they measure, not something an app under pgfly does. With it, POST /work sends
// its writes, and every read after its first write, to primary (a handle on the remote
// primary), and only the reads before the first write to New's db (the nearby replica), the
// way pgpool-II or a Rails-style database selector routes statements. Without it (as under
// pgfly) every statement goes to db. It changes no other endpoint.
func WithPrimary(primary *sql.DB) Option {
	return func(a *app) { a.primary = primary }
}

// Work is what /work answers: the item the request looked at or wrote, and how many
// statements of each kind it ran.
type Work struct {
	ID     int64 `json:"id"`
	Reads  int   `json:"reads"`
	Writes int   `json:"writes"`
}

// The statements of /work. Each is one round trip once pgx has prepared it on a connection.
const (
	workLatest = "SELECT id, name FROM items ORDER BY id DESC LIMIT 10"
	workGet    = "SELECT name, region, body_size FROM items WHERE id = $1"
	workUpdate = "UPDATE items SET body_size = body_size + 1 WHERE id = $1"
)

// latest reads the ten newest items and returns the newest id, 0 when there are none.
func latest(ctx context.Context, db *sql.DB) (int64, error) {
	rows, err := db.QueryContext(ctx, withTrace(ctx, workLatest))
	if err != nil {
		return 0, err
	}
	defer rows.Close()
	var newest int64
	for rows.Next() {
		var id int64
		var name string
		if err := rows.Scan(&id, &name); err != nil {
			return 0, err
		}
		newest = max(newest, id)
	}
	return newest, rows.Err()
}

// getItem reads one item; a missing one is not an error.
func getItem(ctx context.Context, db *sql.DB, id int64) error {
	var name, region string
	var size int
	err := db.QueryRowContext(ctx, withTrace(ctx, workGet), id).Scan(&name, &region, &size)
	if err == sql.ErrNoRows {
		return nil
	}
	return err
}

// workRead serves GET /work, a typical read request: read, read, read (the newest items,
// the newest one, the newest items again).
func (a *app) workRead(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	id, err := latest(ctx, a.db)
	if err == nil {
		err = getItem(ctx, a.db, id)
	}
	if err == nil {
		_, err = latest(ctx, a.db)
	}
	if err != nil {
		a.dbError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, Work{ID: id, Reads: 3})
}

// workWrite serves POST /work, a typical write request: read, write, read, read, write (the
// newest items, insert one, read it back, the newest items again, update it). Each statement
// commits on its own. Under DB-level routing (WithPrimary) everything from the first write
// on runs on the primary handle, so that the reads see the write.
func (a *app) workWrite(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	after := a.db // the handle for the write and every statement after it
	if a.primary != nil {
		after = a.primary
	}
	if _, err := latest(ctx, a.db); err != nil {
		a.dbError(w, r, err)
		return
	}
	it, err := a.insert(ctx, after, nameParam(r, "work"), 0)
	if err == nil {
		err = getItem(ctx, after, it.ID)
	}
	if err == nil {
		_, err = latest(ctx, after)
	}
	if err == nil {
		_, err = after.ExecContext(ctx, withTrace(ctx, workUpdate), it.ID)
	}
	if err != nil {
		a.dbError(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, Work{ID: it.ID, Reads: 3, Writes: 2})
}
