// A node-postgres job through a forwarding relay, for wire's TestForwardNodePostgres: a named
// prepared statement used on the replica, then a transaction that reads, writes and commits,
// then the same statement again. It prints what it got as one JSON line.
const { Client } = require('pg');

(async () => {
  const c = new Client({ connectionString: process.env.DATABASE_URL });
  await c.connect();
  const count = { name: 'count_jobs', text: 'select count(*)::int as n from fwd_node where job = $1', values: [process.env.JOB] };
  const out = {};
  out.before = (await c.query(count)).rows[0].n;
  await c.query('begin');
  out.seen = (await c.query('select count(*)::int as n from fwd_node')).rows[0].n;
  await c.query('insert into fwd_node (job) values ($1)', [process.env.JOB]);
  await c.query('commit');
  out.after = (await c.query(count)).rows[0].n;
  await c.end();
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
