package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/pgfly/pgfly/internal/pgcluster"
	"github.com/pgfly/pgfly/internal/regions"
	"github.com/pgfly/pgfly/wire"
)

// jobReads is how many reads a section 7 job makes before its write.
const jobReads = 5

// jobWay is one way section 7 runs a job in the replica region.
type jobWay struct {
	name string
	url  string // where the job connects
	// fresh: a connection per job (cron, rails runner); else one connection for every job
	// (a worker's pooled connection).
	fresh bool
	tx    bool // the reads and the write in one transaction, which a move re-runs
	times []time.Duration
	err   error // the first job's error, for a way that fails
}

// jobsForwarding is section 7: a job in the replica region that reads jobReads times, then
// writes once, through a forwarding relay, against the same job pointed at the primary
// across the link, and at the replica without pgfly.
func (b *bench) jobsForwarding(ctx context.Context) error {
	r := &b.rep
	c := b.cluster
	su := pgcluster.RoleSuperuser.Name
	b.logf("section 7: jobs, %v one way, %d jobs per way", b.cfg.delay, b.prof.jobs)
	admin, err := pgx.Connect(ctx, c.Primary.URL(su, "", pgcluster.Database))
	if err != nil {
		return err
	}
	defer admin.Close(context.WithoutCancel(ctx))
	if _, err := admin.Exec(ctx, "DROP TABLE IF EXISTS bench_jobs; CREATE TABLE bench_jobs (id serial PRIMARY KEY, way text, n int)"); err != nil {
		return err
	}
	if err := c.WaitReplayed(ctx); err != nil {
		return err
	}
	link, err := regions.NewLink(b.cfg.delay)
	if err != nil {
		return err
	}
	defer link.Close()
	toPrimary, err := link.Forward(c.Primary.Addr())
	if err != nil {
		return err
	}
	role := pgcluster.RoleSCRAM
	relay, err := wire.NewServer(wire.Config{Listen: "127.0.0.1:0", Upstream: c.Replica.URL("", "", ""),
		Primary: fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", role.Name, role.Password, toPrimary, pgcluster.Database)},
		nil, zap.NewNop())
	if err != nil {
		return err
	}
	if err := relay.Listen(); err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- relay.Serve() }()
	defer func() {
		relay.Close()
		<-served
	}()
	url := func(addr string) string {
		return fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", role.Name, role.Password, addr, pgcluster.Database)
	}
	viaPgfly, direct, replica := url(relay.Addr().String()), url(toPrimary), url(c.Replica.Addr())
	var ways []*jobWay
	for _, fresh := range []bool{true, false} {
		for _, tx := range []bool{false, true} {
			ways = append(ways,
				&jobWay{name: "pgfly, forwarding", url: viaPgfly, fresh: fresh, tx: tx},
				&jobWay{name: "the primary, directly", url: direct, fresh: fresh, tx: tx})
		}
	}
	noPgfly := &jobWay{name: "the replica, without pgfly", url: replica, fresh: true}
	ways = append(ways, noPgfly)

	// Interleaved: one job of each way in turn, so that load and drift fall on all alike.
	conns := make([]*pgx.Conn, len(ways))
	defer func() {
		for _, cn := range conns {
			if cn != nil {
				cn.Close(context.WithoutCancel(ctx))
			}
		}
	}()
	for i := range b.prof.jobs + 1 { // the first round warms up
		for w, way := range ways {
			if way.err != nil {
				continue
			}
			start := time.Now()
			if way.fresh || conns[w] == nil {
				if conns[w] != nil {
					conns[w].Close(ctx)
				}
				if conns[w], err = pgx.Connect(ctx, way.url); err != nil {
					return fmt.Errorf("%s: %w", way.name, err)
				}
			}
			if err := runJob(ctx, conns[w], way, i); err != nil {
				way.err = err
				continue
			}
			if i > 0 {
				way.times = append(way.times, time.Since(start))
			}
		}
	}
	if noPgfly.err == nil {
		return errors.New("the job's write succeeded on the replica without pgfly: the bench is not measuring what it says")
	}
	for _, way := range ways {
		if way != noPgfly && way.err != nil {
			return fmt.Errorf("%s: %w", way.name, way.err)
		}
	}

	r.printf("## 7. Jobs: writes forwarded from the replica region\n\n")
	r.printf("A job in the replica region that reads %d times (one row by primary key, a count), then writes once "+
		"(an INSERT), run %d times each way, interleaved, after a warm-up round; a one-way delay of %v on every "+
		"connection to the primary (the setup's link), none to the replica. pgfly is a forwarding relay (`--http-listen=` "+
		"with `--primary`) in front of the replica: the job's reads run on the replica, the write is refused there, "+
		"and the session moves to the primary, logging in there as the job's user (SCRAM), where the write runs. "+
		"Once the write's ReadyForQuery has reached the job, pgfly asks the primary for the session's state and WAL "+
		"position (one round trip the job does not wait for, unless it sends its next statement meanwhile), waits "+
		"for the replica to replay that far, and moves the session back to its replica backend, keeping the primary's "+
		"backend for the next write. Replication here does not cross the delayed link, so the replica catches up at "+
		"once; across regions the move back waits about one more one-way delay, after the job has its answer. The "+
		"job either opens a connection of its own (cron, `rails runner`) or uses one connection for every job (a "+
		"worker's pool: between two of its jobs run those of the other ways, so its move back is over by the next "+
		"one; a worker that runs jobs back to back waits one round trip for it at its next job's first statement); "+
		"either with the reads and the write in one transaction, which the move re-runs on the primary and compares, "+
		"or without. The job's time includes its connection, when it opens one.\n\n", jobReads, b.prof.jobs, b.cfg.delay)
	var rows [][]string
	p50 := map[string]float64{}
	for _, way := range ways {
		if way == noPgfly {
			continue
		}
		ts := durations(way.times)
		key := jobKey(way)
		rows = append(rows, []string{key, way.name, ms(percentile(ts, 50)), ms(percentile(ts, 99))})
		p50[key+way.name] = percentile(ts, 50)
	}
	var pe *pgconn.PgError
	why := noPgfly.err.Error()
	if errors.As(noPgfly.err, &pe) {
		why = pe.Code + " " + pe.Message
	}
	rows = append(rows, []string{jobKey(noPgfly), noPgfly.name, "fails: " + why, ""})
	r.table([]string{"job", "connects to", "p50 ms", "p99 ms"}, rows)
	for _, fresh := range []bool{true, false} {
		for _, tx := range []bool{false, true} {
			key := jobKey(&jobWay{fresh: fresh, tx: tx})
			f, d := p50[key+"pgfly, forwarding"], p50[key+"the primary, directly"]
			r.check("7", "a forwarded job at most 0.5 of the same job pointed at the primary (p50, "+key+")", f <= 0.5*d,
				fmt.Sprintf("%s ms vs %s ms, %s", ms(f), ms(d), ratio(f, d)))
		}
	}
	r.printf("\nThe cost of a forwarded transaction's re-run: the forwarded job in a transaction less the same job "+
		"without one, at p50: %s ms with a connection per job, %s ms with one connection for every job. The re-run "+
		"of BEGIN and the reads on the primary is one round trip (pgfly sends them in one write and compares the "+
		"answers' SHA-256), and the transaction's COMMIT is another the autocommit job does not make. A fresh "+
		"connection's autocommit move pays one back: it prepares the job's statements on the new primary backend "+
		"in a round trip of its own, where the re-run prepares them with the reads.\n\n",
		ms(p50[jobKey(&jobWay{fresh: true, tx: true})+"pgfly, forwarding"]-p50[jobKey(&jobWay{fresh: true})+"pgfly, forwarding"]),
		ms(p50[jobKey(&jobWay{tx: true})+"pgfly, forwarding"]-p50[jobKey(&jobWay{})+"pgfly, forwarding"]))
	return nil
}

func jobKey(w *jobWay) string {
	key := "a connection per job"
	if !w.fresh {
		key = "one connection for every job"
	}
	if w.tx {
		key += ", in a transaction"
	}
	return key
}

// runJob runs one job of way: jobReads reads, then a write.
func runJob(ctx context.Context, c *pgx.Conn, way *jobWay, n int) error {
	job := func(q interface {
		Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
		QueryRow(context.Context, string, ...any) pgx.Row
	}) error {
		var v int
		for i := range jobReads { // rows that never exist: the same answer on both servers
			if err := q.QueryRow(ctx, "SELECT count(*) FROM bench_jobs WHERE id = $1", -1-i).Scan(&v); err != nil {
				return err
			}
		}
		_, err := q.Exec(ctx, "INSERT INTO bench_jobs (way, n) VALUES ($1, $2)", way.name, n)
		return err
	}
	if !way.tx {
		return job(c)
	}
	return pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error { return job(tx) })
}
