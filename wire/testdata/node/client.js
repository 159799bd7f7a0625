// A node-postgres client's habits through the relay, for wire's TestNodePostgresClient: simple
// and parameterized queries, a named prepared statement used twice, a transaction, an error
// and the session going on after it. It prints what it got as one JSON line.
const { Client } = require('pg');

(async () => {
  const c = new Client({ connectionString: process.env.DATABASE_URL });
  await c.connect();
  const one = async (q, values) => (await c.query(q, values)).rows[0].n;
  const out = {};
  out.simple = await one('select 41 + 1 as n');
  out.params = await one('select $1::int + $2::int as n', [40, 2]);
  out.named = await one({ name: 'twice', text: 'select $1::int * 2 as n', values: [21] });
  out.namedAgain = await one({ name: 'twice', text: 'select $1::int * 2 as n', values: [4] });
  await c.query('begin');
  await c.query('create temp table node_t (x int)');
  await c.query('insert into node_t values (1), (2)');
  out.inTransaction = await one('select count(*)::int as n from node_t');
  await c.query('rollback');
  try {
    await c.query('select 1 / 0');
  } catch (e) {
    out.error = e.code;
  }
  out.afterError = await one('select 7 as n');
  await c.end();
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
