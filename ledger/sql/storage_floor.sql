-- Not part of the schema: a measurement (README, Benchmark). Run it on a scratch database:
--   psql -d scratch -f ledger/sql/storage_floor.sql
-- The smallest journal this design could keep per event (an estimate, not the project's schema):
-- the Avro bytes once (no JSON payload, no rating detail: a price reference instead), one chain
-- hash, uuid event ids, two postings rows, and the indexes the audits and the chain walk use.
DROP TABLE IF EXISTS f_events, f_postings;
CREATE TABLE f_events (
    shard int4 NOT NULL, shard_seq int8 NOT NULL, event_id uuid NOT NULL UNIQUE,
    account_id text NOT NULL, event_type int2 NOT NULL, status int2 NOT NULL,
    occurred_at timestamptz NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now(),
    price_ref int4, chain_key int2 NOT NULL, entry_hash bytea NOT NULL, raw bytea NOT NULL,
    PRIMARY KEY (shard, shard_seq));
CREATE INDEX ON f_events (account_id, occurred_at);
CREATE TABLE f_postings (
    shard int4 NOT NULL, shard_seq int8 NOT NULL, line int2 NOT NULL,
    ledger_account text NOT NULL, account_id text NOT NULL, amount numeric(38, 9) NOT NULL,
    PRIMARY KEY (shard, shard_seq, line));
CREATE INDEX ON f_postings (account_id);
CREATE INDEX ON f_postings (ledger_account);
-- 200,000 events over 8 shards and 2,000 accounts, inserted in batches of 2,000 in shard order
-- as the writer does (shards interleaved across batches).
DO $$
DECLARE b int;
BEGIN
  FOR b IN 0..99 LOOP
    INSERT INTO f_events (shard, shard_seq, event_id, account_id, event_type, status, occurred_at,
                          price_ref, chain_key, entry_hash, raw)
    SELECT i % 8, b * 250 + i / 8 + 1, gen_random_uuid(),
           'bench-acct-' || lpad(((i * 7919 + b) % 2000)::text, 6, '0'), 1, 1, now(), 1, 1,
           sha256(i::text::bytea), decode(repeat(md5(i::text), 9), 'hex') || '\x0102030405060708090a'::bytea
      FROM generate_series(0, 1999) i ORDER BY i % 8, i / 8;
    INSERT INTO f_postings (shard, shard_seq, line, ledger_account, account_id, amount)
    SELECT i % 8, b * 250 + i / 8 + 1, l,
           CASE l WHEN 0 THEN 'customer:bench-acct-' || lpad(((i * 7919 + b) % 2000)::text, 6, '0') || ':credit:signup'
                  ELSE 'revenue:usage' END,
           'bench-acct-' || lpad(((i * 7919 + b) % 2000)::text, 6, '0'),
           CASE l WHEN 0 THEN 0.012345678 ELSE -0.012345678 END
      FROM generate_series(0, 1999) i, generate_series(0, 1) l ORDER BY i % 8, i / 8, l;
  END LOOP;
END $$;
VACUUM ANALYZE f_events; VACUUM ANALYZE f_postings;
SELECT c.relname, pg_total_relation_size(c.oid) / 200000.0 AS bytes_per_event
  FROM pg_class c WHERE c.relname IN ('f_events', 'f_postings')
UNION ALL
SELECT 'total', (pg_total_relation_size('f_events') + pg_total_relation_size('f_postings')) / 200000.0
UNION ALL
SELECT i.relname, pg_relation_size(i.oid) / 200000.0 FROM pg_class i
 WHERE i.relkind = 'i' AND (i.relname LIKE 'f\_events%' OR i.relname LIKE 'f\_postings%');
SELECT avg(octet_length(raw)) FROM f_events;
