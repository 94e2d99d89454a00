-- Every SQL statement of the ledger package, one per `-- name:` header (loaded by ledger/db.py).

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: current_role
SELECT current_user;

-- name: set_role
SET LOCAL ROLE {};

-- name: set_migration_roles
-- Read by the migrations that grant to the roles (0007).
SELECT set_config('ledger.owner_role', %s, true), set_config('ledger.writer_role', %s, true),
       set_config('ledger.reader_role', %s, true);

-- name: lock_migrations
SELECT pg_advisory_xact_lock(4242001);

-- name: applied_migrations
SELECT version FROM schema_migrations ORDER BY version;

-- name: latest_migration
SELECT max(version) FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES (%s, %s);

-- name: describe_columns
SELECT table_name, column_name, data_type, is_nullable, column_default, numeric_precision,
       numeric_scale
  FROM information_schema.columns
 WHERE table_schema = 'public' AND table_name <> 'schema_migrations'
 ORDER BY table_name, column_name;

-- name: describe_constraints
SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
  FROM pg_constraint
 WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> 'schema_migrations'
 ORDER BY 1, 2;

-- name: describe_indexes
SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
 AND tablename <> 'schema_migrations'
 ORDER BY 1, 2;

-- name: describe_triggers
SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
  FROM pg_trigger WHERE NOT tgisinternal
 ORDER BY 1, 2;

-- name: describe_functions
SELECT proname, pg_get_function_arguments(oid), prosrc
  FROM pg_proc WHERE pronamespace = 'public'::regnamespace
 ORDER BY 1, 2;

-- ---------------------------------------------------------------------------------------------
-- Ledger writer: one transaction per batch.

-- name: ensure_offsets
INSERT INTO consumer_offsets (group_id, topic, kafka_partition, next_offset)
SELECT %(group_id)s, t, p, o
  FROM unnest(%(topics)s::text[], %(partitions)s::integer[], %(offsets)s::bigint[]) AS x (t, p, o)
 ORDER BY t, p
ON CONFLICT (group_id, topic, kafka_partition) DO NOTHING;

-- name: lock_offsets
SELECT o.topic, o.kafka_partition, o.next_offset
  FROM consumer_offsets o
  JOIN unnest(%(topics)s::text[], %(partitions)s::integer[]) AS x (topic, kafka_partition)
 USING (topic, kafka_partition)
 WHERE o.group_id = %(group_id)s
 ORDER BY o.topic, o.kafka_partition
   FOR UPDATE OF o;

-- name: accept_offset_loss
INSERT INTO accepted_offset_losses (group_id, topic, kafka_partition, from_offset, to_offset, note)
VALUES (%s, %s, %s, %s, %s, %s);

-- name: shard_clocks
SELECT shard, last_tick_at FROM shard_heads WHERE shard = ANY(%s);

-- name: save_shard_clock
UPDATE shard_heads SET last_tick_at = %s WHERE shard = %s;

-- name: claim_shards
-- Renew this holder's leases and take those that expired, or whose holder's session is gone
-- (renewed since the server started, its backend no longer running: migration 0013).
INSERT INTO shard_leases (group_id, shard, holder, expires_at, holder_pid, renewed_at)
SELECT %(group)s, s, %(holder)s, clock_timestamp() + make_interval(secs => %(ttl)s),
       pg_backend_pid(), clock_timestamp()
  FROM unnest(%(shards)s::integer[]) AS s
 ORDER BY s
ON CONFLICT (group_id, shard) DO UPDATE
   SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at,
       holder_pid = EXCLUDED.holder_pid, renewed_at = EXCLUDED.renewed_at
 WHERE shard_leases.holder = EXCLUDED.holder
    OR shard_leases.expires_at < clock_timestamp()
    OR (shard_leases.renewed_at > pg_postmaster_start_time()
        AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = shard_leases.holder_pid))
RETURNING shard;

-- name: fence_shards
SELECT shard FROM shard_leases
 WHERE group_id = %s AND shard = ANY(%s) AND holder = %s AND expires_at > clock_timestamp();

-- name: release_shards
DELETE FROM shard_leases WHERE group_id = %s AND holder = %s;

-- name: stored_offsets
SELECT topic, kafka_partition, next_offset FROM consumer_offsets
 WHERE group_id = %(group_id)s AND topic = ANY(%(topics)s);

-- name: save_offset
INSERT INTO consumer_offsets (group_id, topic, kafka_partition, next_offset)
VALUES (%s, %s, %s, %s)
ON CONFLICT (group_id, topic, kafka_partition) DO UPDATE SET next_offset = EXCLUDED.next_offset
 WHERE consumer_offsets.next_offset < EXCLUDED.next_offset;

-- name: audit_journaled
-- `ledger offsets audit`: where each of these events was journaled from, and its content.
SELECT event_id, content_hash, topic, kafka_partition, kafka_offset FROM raw_events
 WHERE event_id = ANY(%s);

-- name: audit_quarantined
-- `ledger offsets audit`: the offsets of one partition's range that were quarantined (TRUE if
-- retention has since pruned the reject, with only where it came from kept).
SELECT kafka_offset, FALSE FROM rejected_events
 WHERE topic = %(topic)s AND kafka_partition = %(partition)s
   AND kafka_offset BETWEEN %(first)s AND %(last)s
UNION ALL
SELECT kafka_offset, TRUE FROM pruned_rejects
 WHERE topic = %(topic)s AND kafka_partition = %(partition)s
   AND kafka_offset BETWEEN %(first)s AND %(last)s;

-- name: known_events
SELECT event_id, content_hash FROM raw_events WHERE event_id = ANY(%s);

-- name: lock_books
SELECT account_id, book, shard FROM account_books
 WHERE account_id = ANY(%s) ORDER BY account_id FOR UPDATE;

-- name: accounts_journaled
-- Which of these accounts (ones without a book) have journal entries all the same: their book
-- was deleted by hand (index journal_entries_account).
SELECT a.account_id FROM unnest(%s::text[]) AS a (account_id)
 CROSS JOIN LATERAL (SELECT 1 FROM journal_entries e WHERE e.account_id = a.account_id
                      LIMIT 1) AS journaled;

-- name: lock_expiring_books
SELECT account_id, book, shard FROM account_books
 WHERE shard = %s AND next_expiry <= %s ORDER BY account_id FOR UPDATE;

-- name: save_books
-- The batch's books in one statement, from a JSON array of
-- [account_id, book, shard, next_expiry, first_pending_month] (a statement per book cost the
-- writer ~12 µs of Python per book, this ~5; account ids unique, sorted).
INSERT INTO account_books (account_id, book, shard, next_expiry, first_pending_month)
SELECT b->>0, b->1, (b->>2)::integer, (b->>3)::timestamptz, b->>4
  FROM jsonb_array_elements(%s) AS b
ON CONFLICT (account_id) DO UPDATE
   SET book = EXCLUDED.book, shard = EXCLUDED.shard, next_expiry = EXCLUDED.next_expiry,
       first_pending_month = EXCLUDED.first_pending_month;

-- name: lock_billable_books
-- The books of a shard with charges waiting for a month that is closed now (at or before the
-- given YYYY-MM): the accounts a closing PeriodTick may invoice (index account_books_billing).
SELECT account_id, book, shard FROM account_books
 WHERE shard = %s AND first_pending_month <= %s ORDER BY account_id FOR UPDATE;

-- name: advance_shards
-- Per shard (first array) its new last sequence number, the count (second array) added to the
-- last, and its chain head before this batch. One statement for all the batch's shards; the
-- rows are locked in shard order, as one statement per shard did.
-- Also the shard's last journaled sequence number (an index probe), by which the writer knows
-- a head left behind its journal by hand (`repair_shard_heads`).
INSERT INTO shard_heads (shard, last_seq)
SELECT shard, added FROM unnest(%s::integer[], %s::bigint[]) AS x (shard, added) ORDER BY shard
ON CONFLICT (shard) DO UPDATE SET last_seq = shard_heads.last_seq + EXCLUDED.last_seq
RETURNING shard, last_seq, head_hash,
          (SELECT max(j.shard_seq) FROM journal_entries j WHERE j.shard = shard_heads.shard);

-- name: repair_shard_heads
-- Shard heads behind their journal (a row deleted, or its last_seq lowered, by hand): moved to
-- the journal's last entry and past it by the count (second array) this batch adds. Returns
-- what advance_shards returns, the journal's last sequence number as repaired.
UPDATE shard_heads h SET last_seq = e.shard_seq + x.added, head_hash = e.entry_hash
  FROM unnest(%s::integer[], %s::bigint[]) AS x (shard, added)
 CROSS JOIN LATERAL (SELECT j.shard_seq, j.entry_hash FROM journal_entries j
                      WHERE j.shard = x.shard ORDER BY j.shard_seq DESC LIMIT 1) e
 WHERE h.shard = x.shard
RETURNING h.shard, h.last_seq, h.head_hash, e.shard_seq;

-- name: save_shard_head
UPDATE shard_heads SET head_hash = %s WHERE shard = %s;

-- name: copy_raw_events
COPY raw_events (event_id, event_type, account_id, topic, kafka_partition, kafka_offset,
                 fingerprint, content_hash, raw, occurred_at) FROM STDIN;

-- name: copy_journal_entries
COPY journal_entries (shard, shard_seq, event_id, account_id, event_type, status, occurred_at,
                      price_version, payload, detail, prev_hash, entry_hash, cause_event_id,
                      chain_key_id)
FROM STDIN;

-- name: copy_postings
COPY postings (shard, shard_seq, line, ledger_account, account_id, amount) FROM STDIN;

-- name: insert_rejected
INSERT INTO rejected_events (topic, kafka_partition, kafka_offset, event_id, event_type, reason,
                             detail, raw, message_key)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING;

-- name: insert_outbox
INSERT INTO outbox (topic, message_key, value, headers) VALUES (%s, %s, %s, %s);

-- name: insert_deadletter_copy
-- The value is the reject's raw bytes, stored once (in rejected_events); the relay reads them.
INSERT INTO outbox (topic, message_key, value, headers, value_of_reject)
VALUES (%s, %s, ''::bytea, %s, %s);

-- name: notify_journal
SELECT pg_notify('ledger_journal', '');

-- name: notify_outbox
SELECT pg_notify('ledger_outbox', '');

-- ---------------------------------------------------------------------------------------------
-- Projection workers.

-- name: shards_behind
-- The shards with entries this projection has not folded, and whether it has a position there
-- yet (and where it is, as of this snapshot); one cheap statement per wake-up.
SELECT h.shard, h.last_seq, p.position IS NOT NULL, coalesce(p.position, 0)
  FROM shard_heads h
  LEFT JOIN projection_positions p ON p.projection = %s AND p.shard = h.shard
 WHERE p.position IS NULL OR p.position < h.last_seq
 ORDER BY h.shard;

-- name: ensure_position
INSERT INTO projection_positions (projection, shard, position) VALUES (%s, %s, 0)
ON CONFLICT (projection, shard) DO NOTHING;

-- name: lock_positions
-- The positions of the shards given that no other worker is folding (SKIP LOCKED).
SELECT shard, position, last_tick_at FROM projection_positions
 WHERE projection = %s AND shard = ANY(%s)
 ORDER BY shard
   FOR UPDATE SKIP LOCKED;

-- name: save_positions
UPDATE projection_positions p SET position = r.upto, last_tick_at = r.tick_at
  FROM unnest(%s::int[], %s::bigint[], %s::timestamptz[]) AS r(shard, upto, tick_at)
 WHERE p.projection = %s AND p.shard = r.shard AND p.position < r.upto;

-- name: read_entries
-- A range of one shard's entries, in order; their postings come from read_entry_postings. The
-- payload of the event types in the first parameter (those the projection folds from the
-- postings alone, e.g. usage) is read as NULL: neither sent nor parsed.
SELECT shard, shard_seq, account_id, event_type, status, occurred_at,
       CASE WHEN event_type = ANY(%s) THEN NULL ELSE payload END
  FROM journal_entries
 WHERE shard = %s AND shard_seq > %s AND shard_seq <= %s
 ORDER BY shard_seq;

-- name: read_entry_postings
-- The postings of the same range, in entry and line order: one range scan of the primary key.
-- (A join, or a LATERAL aggregate per entry, cost PostgreSQL more than both ranges read
-- apart: a join is not given the range on the postings side, and read every posting of the
-- shard for every range.)
SELECT shard_seq, ledger_account, amount
  FROM postings
 WHERE shard = %s AND shard_seq > %s AND shard_seq <= %s
 ORDER BY shard_seq, line;

-- name: read_entries_of_shards
-- read_entries for several ranges (shard, after, upto) at once, each range in order (rows of
-- one range come out together; the caller groups them by shard). OFFSET 0 keeps each range
-- its own index range scan: pulled up, the subquery became a hash join over a sequential scan
-- of the whole journal.
SELECT e.shard, e.shard_seq, e.account_id, e.event_type, e.status, e.occurred_at,
       CASE WHEN e.event_type = ANY(%s) THEN NULL ELSE e.payload END
  FROM unnest(%s::int[], %s::bigint[], %s::bigint[]) AS r(shard, after, upto)
 CROSS JOIN LATERAL (
        SELECT shard, shard_seq, account_id, event_type, status, occurred_at, payload
          FROM journal_entries j
         WHERE j.shard = r.shard AND j.shard_seq > r.after AND j.shard_seq <= r.upto
         ORDER BY j.shard_seq OFFSET 0) e;

-- name: read_entry_postings_of_shards
SELECT p.shard, p.shard_seq, p.ledger_account, p.amount
  FROM unnest(%s::int[], %s::bigint[], %s::bigint[]) AS r(shard, after, upto)
 CROSS JOIN LATERAL (
        SELECT shard, shard_seq, ledger_account, amount
          FROM postings q
         WHERE q.shard = r.shard AND q.shard_seq > r.after AND q.shard_seq <= r.upto
         ORDER BY q.shard_seq, q.line OFFSET 0) p;

-- name: load_account_status
SELECT account_id, state, folded_through FROM account_status WHERE account_id = ANY(%s);

-- name: accounts_folded_before
-- Which of these accounts (ones without a state row) have entries the shard's projection
-- already folded: their row was deleted by hand (index journal_entries_account).
-- A probe per account (LATERAL ... LIMIT 1), never one pass over the shard's entries.
SELECT a.account_id FROM unnest(%s::text[]) AS a (account_id)
 CROSS JOIN LATERAL (SELECT 1 FROM journal_entries e
                      WHERE e.account_id = a.account_id AND e.shard = %s AND e.shard_seq <= %s
                      LIMIT 1) AS folded;

-- name: load_tick_sensitive
SELECT account_id, state, folded_through FROM account_status WHERE shard = %s AND tick_sensitive;

-- name: save_account_status
INSERT INTO account_status (account_id, opened, suspended, reasons, status_version,
                            credit_balance, receivable, state, shard, tier, effective_limit,
                            month, month_to_date_spend, tick_sensitive, folded_through)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (account_id) DO UPDATE
   SET opened = EXCLUDED.opened, suspended = EXCLUDED.suspended, reasons = EXCLUDED.reasons,
       status_version = EXCLUDED.status_version, credit_balance = EXCLUDED.credit_balance,
       receivable = EXCLUDED.receivable, state = EXCLUDED.state, shard = EXCLUDED.shard,
       tier = EXCLUDED.tier, effective_limit = EXCLUDED.effective_limit,
       month = EXCLUDED.month, month_to_date_spend = EXCLUDED.month_to_date_spend,
       tick_sensitive = EXCLUDED.tick_sensitive, folded_through = EXCLUDED.folded_through;

-- name: insert_invoice
INSERT INTO invoices (invoice_id, account_id, month, issued_at, currency, exact_total,
                      amount_due, lines)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (invoice_id) DO NOTHING;

-- ---------------------------------------------------------------------------------------------
-- Outbox relay.

-- name: relay_lock
SELECT pg_try_advisory_lock(4242002);

-- name: relay_listen
LISTEN ledger_outbox;

-- name: unpublished
-- Neither published nor parked, in id order; a row whose topic and key match an earlier
-- parked row waits behind it (per-key order). Rows without a key are never held.
SELECT o.id, o.topic, o.message_key, coalesce(r.raw, o.value), o.headers FROM outbox o
  LEFT JOIN rejected_events r ON r.id = o.value_of_reject
 WHERE o.published_at IS NULL AND o.parked_at IS NULL
   AND NOT EXISTS (SELECT 1 FROM outbox p
                    WHERE p.parked_at IS NOT NULL AND p.published_at IS NULL
                      AND p.topic = o.topic AND p.message_key = o.message_key AND p.id < o.id)
 ORDER BY o.id LIMIT %s;

-- name: mark_published
UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY(%s);

-- name: park_outbox
UPDATE outbox SET parked_at = clock_timestamp(), park_reason = %s, park_detail = %s,
                  attempts = attempts + 1
 WHERE id = %s AND published_at IS NULL;

-- name: parked_outbox
-- size: key + value + header names and values (headers are stored hex-encoded).
SELECT o.id, o.topic, o.message_key,
       octet_length(coalesce(r.raw, o.value)) + coalesce(octet_length(o.message_key), 0)
         + (SELECT coalesce(sum(octet_length(h ->> 0) + length(h ->> 1) / 2), 0)
              FROM jsonb_array_elements(o.headers) h)::bigint,
       o.park_reason, o.park_detail, o.parked_at, o.attempts,
       (SELECT count(*) FROM outbox w
         WHERE w.published_at IS NULL AND w.parked_at IS NULL AND w.topic = o.topic
           AND w.message_key = o.message_key AND w.id > o.id)
  FROM outbox o
  LEFT JOIN rejected_events r ON r.id = o.value_of_reject
 WHERE o.parked_at IS NOT NULL AND o.published_at IS NULL
 ORDER BY o.id;

-- name: unpark_outbox
UPDATE outbox SET parked_at = NULL
 WHERE parked_at IS NOT NULL AND published_at IS NULL
   AND (%(id)s::bigint IS NULL OR id = %(id)s)
RETURNING id;

-- ---------------------------------------------------------------------------------------------
-- Reports.

-- name: trial_balance
SELECT currency, coalesce(sum(amount), 0), count(*) FROM postings GROUP BY currency
 ORDER BY currency;

-- name: orphan_postings
-- Postings whose journal entry does not exist (only a superuser bypassing the triggers can
-- write them: migration 0012). An anti-join over both primary keys: a merge, or a hash join
-- that spills to disk past work_mem, so the server's memory stays bounded at any size.
SELECT p.shard, p.shard_seq, count(*), sum(p.amount)
  FROM postings p
 WHERE NOT EXISTS (SELECT 1 FROM journal_entries e
                    WHERE e.shard = p.shard AND e.shard_seq = p.shard_seq)
 GROUP BY p.shard, p.shard_seq
 ORDER BY p.shard, p.shard_seq
 LIMIT 100;

-- name: account_status_row
SELECT s.opened, s.suspended, s.reasons, s.status_version, s.credit_balance, s.receivable,
       s.state, s.tier, s.effective_limit, s.month, s.month_to_date_spend, p.last_tick_at
  FROM account_status s
  LEFT JOIN projection_positions p ON p.projection = 'account_status' AND p.shard = s.shard
 WHERE s.account_id = %s;

-- name: account_invoices
SELECT invoice_id, month, issued_at, amount_due, exact_total, lines FROM invoices
 WHERE account_id = %s ORDER BY month;

-- name: invoices_of_month
SELECT invoice_id, account_id, issued_at, amount_due, exact_total, jsonb_array_length(lines)
  FROM invoices WHERE month = %s ORDER BY account_id;

-- name: account_book_pending
-- What waits for an invoice in the account's book (the ledger writer's state).
SELECT coalesce(book->'pending', '{}'::jsonb) FROM account_books WHERE account_id = %s;

-- name: account_ledger_balances
SELECT ledger_account, sum(amount) FROM postings WHERE account_id = %s
 GROUP BY ledger_account ORDER BY ledger_account;

-- name: account_last_entries
SELECT e.shard_seq, e.occurred_at, e.event_type, e.status, e.price_version,
       coalesce(sum(p.amount) FILTER (WHERE p.ledger_account LIKE 'revenue:%%'), 0) * -1
  FROM journal_entries e
  LEFT JOIN postings p ON p.shard = e.shard AND p.shard_seq = e.shard_seq
 WHERE e.account_id = %s
 GROUP BY e.shard, e.shard_seq
 ORDER BY e.occurred_at DESC, e.shard_seq DESC
 LIMIT %s;

-- ---------------------------------------------------------------------------------------------
-- Databases of their own for the demo and the benchmark (ledger/runner.py). `{}` is a
-- database name, filled in with psycopg.sql.Identifier.

-- name: create_database
CREATE DATABASE {};

-- name: drop_database
DROP DATABASE IF EXISTS {} WITH (FORCE);

-- name: demo_databases
SELECT datname FROM pg_database WHERE datname LIKE 'demo\_%' ORDER BY datname;

-- ---------------------------------------------------------------------------------------------
-- Benchmark (ledger/bench/).

-- name: bench_server_version
SHOW server_version;

-- name: bench_ledger_progress
-- Entries of the events sent (the ConfigPublished entries the worker journals at start left
-- out), and rejects.
SELECT ((SELECT coalesce(sum(last_seq), 0) FROM shard_heads)
        - (SELECT count(*) FROM journal_entries WHERE event_type = 'ConfigPublished'))::bigint,
       (SELECT count(*) FROM rejected_events);

-- name: bench_ledger_consumed
-- Input records the ledger is done with (journaled, rejected or dropped as duplicates).
SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets;

-- name: bench_journal_counts
SELECT (SELECT count(*) FROM journal_entries WHERE event_type <> 'ConfigPublished'),
       (SELECT count(*) FROM rejected_events), (SELECT count(*) FROM postings);

-- name: bench_table_sizes
-- Every table of the ledger's schema with its indexes and TOAST, largest first.
SELECT c.relname, pg_total_relation_size(c.oid)
  FROM pg_class c
 WHERE c.relkind IN ('r', 'p') AND c.relnamespace = current_schema()::regnamespace
 ORDER BY 2 DESC, 1;

-- name: bench_rejects_by_reason
SELECT reason, count(*) FROM rejected_events GROUP BY reason ORDER BY 2 DESC, 1;

-- name: bench_projection_progress
SELECT coalesce(sum(least(coalesce(p.position, 0), h.last_seq)), 0)::bigint,
       coalesce(sum(h.last_seq), 0)::bigint
  FROM shard_heads h
  LEFT JOIN projection_positions p ON p.shard = h.shard AND p.projection = %s;

-- name: bench_latency_ready
SELECT (SELECT count(*) FROM account_status WHERE account_id LIKE 'lat-%%' AND opened),
       (SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL)
       + (SELECT count(*) FROM shard_heads h
            LEFT JOIN projection_positions p
              ON p.shard = h.shard AND p.projection = 'account_status'
           WHERE coalesce(p.position, 0) < h.last_seq);

-- name: bench_latency_stages
-- Per timed usage event: when the ledger inserted it (inside its batch's transaction), when the
-- projection wrote the account's AccountSuspended to the outbox, and when the relay marked it
-- published (after Kafka's acks), all on the database's clock.
SELECT r.event_id, r.recorded_at, o.created_at, o.published_at
  FROM raw_events r
  LEFT JOIN LATERAL (
        SELECT created_at, published_at FROM outbox
         WHERE message_key = convert_to(r.account_id, 'UTF8')
           AND headers @> '[["event_type", "4163636f756e7453757370656e646564"]]'::jsonb
         ORDER BY id LIMIT 1) o ON true
 WHERE r.event_id = ANY(%s);

-- ---------------------------------------------------------------------------------------------
-- The demo (ledger/demo/).

-- name: demo_progress
SELECT (SELECT coalesce(sum(last_seq), 0) FROM shard_heads)::bigint,
       (SELECT count(*) FROM rejected_events),
       (SELECT coalesce(sum(least(coalesce(p.position, 0), h.last_seq)), 0)
          FROM shard_heads h
          LEFT JOIN projection_positions p
            ON p.shard = h.shard AND p.projection = 'account_status')::bigint,
       (SELECT coalesce(sum(last_seq), 0) FROM shard_heads)::bigint,
       (SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL),
       (SELECT count(*) FROM outbox WHERE topic = %s AND published_at IS NOT NULL);

-- name: demo_last_recorded
SELECT greatest((SELECT max(recorded_at) FROM journal_entries),
                (SELECT max(rejected_at) FROM rejected_events));

-- name: demo_counts
SELECT (SELECT count(*) FROM journal_entries), (SELECT count(*) FROM rejected_events);

-- name: demo_entries_by_status
SELECT status, count(*) FROM journal_entries GROUP BY status ORDER BY status;

-- name: demo_rejected_by_reason
SELECT reason, count(*) FROM rejected_events GROUP BY reason ORDER BY 2 DESC, 1;

-- name: demo_accounts_by_status
SELECT suspended, reasons, count(*) FROM account_status
 GROUP BY suspended, reasons ORDER BY suspended, count(*) DESC, reasons;

-- name: demo_balances
SELECT coalesce(-sum(amount) FILTER (WHERE ledger_account = 'revenue:usage'), 0),
       coalesce(-sum(amount) FILTER (WHERE ledger_account LIKE 'customer:%:credit:%'), 0),
       coalesce(sum(amount) FILTER (WHERE ledger_account LIKE 'customer:%:receivable'
                                       OR ledger_account LIKE 'customer:%:invoiced'), 0),
       coalesce(sum(amount) FILTER (WHERE ledger_account = 'expense:promotional'), 0),
       coalesce(sum(amount) FILTER (WHERE ledger_account = 'cash'), 0)
  FROM postings;

-- name: demo_sample_account
SELECT account_id FROM account_status
 WHERE suspended = %s AND status_version >= CASE WHEN %s THEN 1 ELSE 2 END
 ORDER BY account_id LIMIT 1;

-- ---------------------------------------------------------------------------------------------
-- Replay: another journal's events, in that journal's order.

-- name: replay_source
-- The raw events of the given shards, in their journal order.
SELECT r.topic, r.kafka_partition, r.kafka_offset, r.account_id, r.raw, r.recorded_at
  FROM journal_entries e JOIN raw_events r ON r.event_id = e.event_id
 WHERE e.cause_event_id IS NULL AND e.shard = ANY(%s)
 ORDER BY e.shard, e.shard_seq;

-- name: replay_shards
-- Each shard of the journal with the raw events it holds (what a replay feeds again).
SELECT shard, count(*) FILTER (WHERE cause_event_id IS NULL)
  FROM journal_entries GROUP BY shard ORDER BY shard;

-- name: journal_is_empty
SELECT NOT EXISTS (SELECT 1 FROM journal_entries);

-- name: mark_all_published
UPDATE outbox SET published_at = clock_timestamp() WHERE published_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- The demo's billing periods (ledger/demo.py): ticks, grant expiry, invoices.

-- name: demo_journal_sources
SELECT count(*) FILTER (WHERE cause_event_id IS NULL AND event_type <> 'ConfigPublished'),
       count(*) FILTER (WHERE cause_event_id IS NOT NULL OR event_type = 'ConfigPublished')
  FROM journal_entries;

-- name: demo_journal_kinds
SELECT count(*) FILTER (WHERE event_type = 'GrantExpired'),
       count(*) FILTER (WHERE event_type = 'PeriodTick'),
       count(*) FILTER (WHERE event_type = 'ConfigPublished'),
       count(*) FILTER (WHERE event_type = 'InvoiceIssued')
  FROM journal_entries;

-- name: demo_breakage
SELECT (SELECT coalesce(-sum(amount), 0) FROM postings
         WHERE ledger_account = 'revenue:breakage'),
       (SELECT coalesce(-sum(p.amount), 0)
          FROM journal_entries g
          JOIN postings p
            ON p.account_id = g.account_id
           AND p.ledger_account = 'customer:' || g.account_id || ':credit:'
                                  || (g.payload->>'grant_id')
         WHERE g.event_type = 'CreditGranted'
           AND (g.payload->>'expires_at')::timestamptz <= %s);

-- name: demo_invoices_of_month
SELECT count(*), coalesce(sum(amount_due), 0) FROM invoices WHERE month = %s;

-- name: demo_invoice_check
-- Per account: what it owed exactly before the close (what still waits + what the invoice took
-- from the receivable) against its invoice; the invoiced receivable is the amount due and
-- nothing invoiced still waits.
WITH owed AS (
    SELECT account_id,
           coalesce(sum(amount) FILTER (WHERE ledger_account = 'customer:' || account_id
                                                             || ':receivable'), 0) AS waiting,
           coalesce(sum(amount) FILTER (WHERE ledger_account = 'customer:' || account_id
                                                             || ':invoiced'), 0) AS invoiced
      FROM postings
     WHERE ledger_account IN ('customer:' || account_id || ':receivable',
                              'customer:' || account_id || ':invoiced')
     GROUP BY account_id
), issued AS (
    SELECT account_id, exact_total, amount_due FROM invoices WHERE month = %s
), exact AS (
    SELECT coalesce(o.account_id, i.account_id) AS account_id,
           coalesce(o.waiting, 0) + coalesce(i.exact_total, 0) AS owed,
           coalesce(o.waiting, 0) AS waiting, coalesce(o.invoiced, 0) AS invoiced,
           i.account_id IS NOT NULL AS has_invoice, i.amount_due
      FROM owed o FULL JOIN issued i USING (account_id)
)
SELECT count(*) FILTER (WHERE owed >= 0.005),
       count(*) FILTER (WHERE NOT has_invoice AND owed >= 0.005
                           OR has_invoice
                              AND (waiting <> 0 OR invoiced <> amount_due
                                   OR amount_due <> round(owed, 2)))
  FROM exact;

-- name: demo_limit_suspended_now
SELECT count(*) FROM account_status WHERE 'SPEND_LIMIT_REACHED' = ANY (reasons);

-- name: demo_sample_invoiced
SELECT account_id FROM invoices WHERE month = %s
 ORDER BY jsonb_array_length(lines) DESC, amount_due DESC, account_id LIMIT 1;

-- ---------------------------------------------------------------------------------------------
-- Rebuild and verify: projections recomputed from the journal.

-- name: projection_positions
SELECT p.shard, p.position, p.last_tick_at
  FROM projection_positions p WHERE p.projection = %s ORDER BY p.shard;

-- name: lock_projection_positions
SELECT shard, position, last_tick_at FROM projection_positions
 WHERE projection = %s ORDER BY shard FOR UPDATE;

-- name: set_repeatable_read
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ;

-- name: export_snapshot
-- The snapshot of this (repeatable read) transaction, for verify's other processes to share.
SELECT pg_export_snapshot();

-- name: create_status_rebuild
-- Temporary (this session's own): the writer role that rebuilds creates no tables.
CREATE TEMPORARY TABLE account_status_rebuild (LIKE account_status INCLUDING DEFAULTS);

-- name: drop_status_rebuild
DROP TABLE IF EXISTS pg_temp.account_status_rebuild;

-- name: copy_status_rebuild
COPY account_status_rebuild (account_id, opened, suspended, reasons, status_version,
                             credit_balance, receivable, state, shard, tier, effective_limit,
                             month, month_to_date_spend, tick_sensitive, folded_through)
FROM STDIN;

-- name: delete_status_rebuild_rows
DELETE FROM account_status_rebuild WHERE account_id = ANY(%s);

-- name: swap_status_rebuild
DELETE FROM account_status;
INSERT INTO account_status SELECT * FROM account_status_rebuild;
DROP TABLE pg_temp.account_status_rebuild;

-- name: all_account_status
SELECT account_id, opened, suspended, reasons, status_version, credit_balance, receivable,
       state, shard, tier, effective_limit, month, month_to_date_spend, tick_sensitive
  FROM account_status ORDER BY account_id;

-- name: status_folded_ahead
-- Account states that say they folded entries past their shard's projection position.
SELECT s.account_id, s.shard, s.folded_through, coalesce(p.position, 0) FROM account_status s
  LEFT JOIN projection_positions p ON p.projection = %s AND p.shard = s.shard
 WHERE s.folded_through > coalesce(p.position, 0)
 ORDER BY s.account_id;

-- name: all_invoices
SELECT invoice_id, account_id, month, issued_at, currency, exact_total, amount_due, lines
  FROM invoices ORDER BY invoice_id;

-- name: journal_shards
-- Every shard that has entries or a head: the entries' shards one index probe each (a loose
-- scan of the primary key), not a scan of the journal.
WITH RECURSIVE s (shard) AS (
    SELECT min(shard) FROM journal_entries
     UNION ALL
    SELECT (SELECT min(e.shard) FROM journal_entries e WHERE e.shard > s.shard)
      FROM s WHERE s.shard IS NOT NULL
)
SELECT shard FROM s WHERE shard IS NOT NULL
 UNION
SELECT shard FROM shard_heads
 ORDER BY shard;

-- name: chain_entries
-- A shard's entries in chain order (shard_seq), with what its link covers: the raw bytes
-- (a derived entry's are its cause's), postings in line order, and whether every posting
-- belongs to the entry's account in USD (the link does not cover those two columns). Read
-- through a server-side cursor: a plan that streams in key order (no sort, no grouping of the
-- whole shard).
SELECT e.account_id, e.shard, e.shard_seq, e.event_id, e.event_type, e.status, e.payload,
       e.detail, e.prev_hash, e.entry_hash, coalesce(r.raw, c.raw),
       coalesce(p.accounts, '{}'), coalesce(p.amounts, '{}'),
       e.chain_key_id, e.occurred_at, e.price_version, e.cause_event_id,
       p.owned IS NOT FALSE
  FROM journal_entries e
  LEFT JOIN raw_events r ON r.event_id = e.event_id
  LEFT JOIN raw_events c ON c.event_id = e.cause_event_id
  CROSS JOIN LATERAL (
        SELECT array_agg(pp.ledger_account ORDER BY pp.line) AS accounts,
               array_agg(pp.amount ORDER BY pp.line) AS amounts,
               bool_and(pp.account_id = e.account_id AND pp.currency = 'USD') AS owned
          FROM postings pp
         WHERE pp.shard = e.shard AND pp.shard_seq = e.shard_seq) p
 WHERE e.shard = %s
 ORDER BY e.shard_seq;

-- name: shard_chain_heads
SELECT shard, last_seq, head_hash FROM shard_heads ORDER BY shard;

-- name: all_account_books
SELECT account_id, book, shard, next_expiry, first_pending_month FROM account_books
 ORDER BY account_id;

-- name: receivable_balances
-- Per customer: its receivable (not yet invoiced) and invoiced ledger accounts' balances.
SELECT account_id,
       coalesce(sum(amount) FILTER (WHERE ledger_account = 'customer:' || account_id
                                                         || ':receivable'), 0),
       coalesce(sum(amount) FILTER (WHERE ledger_account = 'customer:' || account_id
                                                         || ':invoiced'), 0)
  FROM postings WHERE ledger_account LIKE 'customer:%%'
 GROUP BY account_id ORDER BY account_id;

-- name: ledger_account_total
SELECT coalesce(sum(amount), 0) FROM postings WHERE ledger_account = %s;

-- name: applied_to_invoices
-- Per customer: what payments (and credit that paid what was owed) applied to issued invoices.
SELECT account_id, sum((detail->>'applied_to_invoiced')::numeric) FROM journal_entries
 WHERE detail->>'applied_to_invoiced' IS NOT NULL GROUP BY account_id ORDER BY account_id;

-- name: checkpoint_heads
-- Each shard's last entry: what a checkpoint publishes.
SELECT h.shard, h.last_seq, e.entry_hash, e.chain_key_id, e.event_id
  FROM shard_heads h
  JOIN journal_entries e ON e.shard = h.shard AND e.shard_seq = h.last_seq
 ORDER BY h.shard;

-- ---------------------------------------------------------------------------------------------
-- Audit: one account's journal (and its shard's ticks), as it stood at a time.

-- name: account_shard
SELECT shard FROM journal_entries WHERE account_id = %s LIMIT 1;

-- name: lock_book
-- One account's book, locked as the writer locks it for a batch (so the journal of the account
-- does not move until the lock is let go).
SELECT book, shard FROM account_books WHERE account_id = %s FOR UPDATE;

-- name: audit_entries
SELECT e.shard, e.shard_seq, e.account_id, e.event_type, e.status, e.occurred_at, e.payload,
       coalesce(p.accounts, '{}'), coalesce(p.amounts, '{}'),
       e.event_id, e.price_version, e.detail
  FROM journal_entries e
 CROSS JOIN LATERAL (  -- per entry, as in read_entries: not every posting of the shard
        SELECT array_agg(pp.ledger_account ORDER BY pp.line) AS accounts,
               array_agg(pp.amount ORDER BY pp.line) AS amounts
          FROM postings pp
         WHERE pp.shard = e.shard AND pp.shard_seq = e.shard_seq) p
 WHERE e.shard = %(shard)s AND e.account_id IN (%(account_id)s, '')
   AND (%(as_of)s::timestamptz IS NULL OR e.recorded_at <= %(as_of)s::timestamptz)
 ORDER BY e.shard_seq;

-- ---------------------------------------------------------------------------------------------
-- Rejected events: inspect, and feed again once fixed.

-- name: rejects_by_reason
SELECT reason, count(*) FILTER (WHERE resolved_at IS NULL), count(*) FILTER (WHERE resolved_at
       IS NOT NULL)
  FROM rejected_events GROUP BY reason ORDER BY reason;

-- name: open_rejects
SELECT id, topic, kafka_partition, kafka_offset, message_key, raw, reason
  FROM rejected_events
 WHERE resolved_at IS NULL AND (%(reason)s::text IS NULL OR reason = %(reason)s)
 ORDER BY id
 LIMIT %(limit)s;

-- name: resolve_reject
UPDATE rejected_events SET resolved_at = clock_timestamp(), resolution = %s WHERE id = %s;

-- name: dismiss_reject
UPDATE rejected_events SET resolved_at = clock_timestamp(), resolution = %s
 WHERE id = %s AND resolved_at IS NULL
RETURNING id;

-- name: reject_ids_at
-- The ids of the rejects at these (topic, partition, offset) positions: one statement for a
-- batch's rejects (those it stored, and those stored before it at the same positions).
SELECT r.topic, r.kafka_partition, r.kafka_offset, r.id
  FROM unnest(%s::text[], %s::integer[], %s::bigint[]) AS p (topic, kafka_partition, kafka_offset)
  JOIN rejected_events r USING (topic, kafka_partition, kafka_offset);

-- name: reject_row
SELECT id, reason, detail, topic, kafka_partition, kafka_offset, message_key, event_id,
       event_type, rejected_at, resolved_at, resolution, raw
  FROM rejected_events WHERE id = %s;

-- ---------------------------------------------------------------------------------------------
-- The fault-injection run (ledger/chaos/): what its checker reads of the ledger.

-- name: chaos_journaled
SELECT event_id, event_type FROM raw_events WHERE event_type <> 'ConfigPublished';

-- name: chaos_journaled_twice
SELECT event_id, count(*) FROM journal_entries WHERE cause_event_id IS NULL
 GROUP BY event_id HAVING count(*) > 1;

-- name: chaos_rejects
SELECT topic, kafka_partition, kafka_offset, event_id, reason, sha256(raw) FROM rejected_events;

-- name: chaos_totals
SELECT account_id, ledger_account, sum(amount) FROM postings
 WHERE ledger_account IN ('revenue:usage', 'cash', 'expense:promotional')
 GROUP BY 1, 2;

-- name: chaos_status_versions
SELECT account_id, status_version FROM account_status;

-- name: chaos_status_recorded
SELECT value FROM outbox WHERE topic = %s ORDER BY id;

-- name: chaos_status_rows
-- (folded_through aside: bookkeeping; verify checks it against the shard's position)
SELECT account_id, to_jsonb(s) - 'folded_through' FROM account_status s ORDER BY account_id;

-- name: chaos_commit_times
SELECT kafka_partition, extract(epoch FROM recorded_at)::float8 FROM raw_events
 WHERE event_type NOT IN ('PeriodTick', 'ConfigPublished')
UNION ALL
SELECT kafka_partition, extract(epoch FROM rejected_at)::float8 FROM rejected_events;

-- name: chaos_lease_holders
SELECT holder, count(*) FROM shard_leases
 WHERE group_id = %s AND expires_at > now() GROUP BY holder ORDER BY 2 DESC;

-- name: chaos_offsets_done
SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = %s;

-- name: chaos_drain_snapshot
SELECT (SELECT count(*) FROM raw_events WHERE event_type <> 'PeriodTick'),
       (SELECT count(*) FROM rejected_events),
       (SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL),
       (SELECT coalesce(sum(h.last_seq - coalesce(p.position, 0)), 0)
          FROM shard_heads h LEFT JOIN projection_positions p ON p.shard = h.shard);

-- ---------------------------------------------------------------------------------------------
-- Published configuration (price-book and policy versions).

-- name: publish_config
INSERT INTO config_publications (kind, version, effective_from, document, sha256)
VALUES (%(kind)s, %(version)s, %(effective_from)s, %(document)s, %(sha256)s)
ON CONFLICT (kind, version) DO NOTHING
RETURNING id;

-- name: published_config
SELECT id, kind, version, effective_from, sha256, published_at
  FROM config_publications WHERE kind = %(kind)s AND version = %(version)s;

-- name: list_config
SELECT p.id, p.kind, p.version, p.effective_from, p.sha256, p.published_at,
       (SELECT count(*) FROM journal_entries e
         WHERE e.event_type = 'ConfigPublished'
           AND e.event_id LIKE 'config:' || p.kind || ':' || p.version || ':%%')
  FROM config_publications p ORDER BY p.id;

-- name: pending_config
-- Run for every batch. The shard and event type narrow the lookup to the shards' configuration
-- entries (index journal_entries_config): with the event id alone the planner hashed every
-- event id of the journal for each batch (23 ms at 57,000 entries, growing with the journal).
SELECT s.shard, p.id, p.kind, p.version, p.effective_from, p.document, p.sha256, p.published_at
  FROM config_publications p
 CROSS JOIN unnest(%(shards)s::integer[]) AS s(shard)
 WHERE (p.kind = 'price_book' OR p.effective_from <= %(now)s)
   AND NOT EXISTS (SELECT 1 FROM journal_entries e
                    WHERE e.shard = s.shard AND e.event_type = 'ConfigPublished'
                      AND e.event_id = 'config:' || p.kind || ':' || p.version || ':' || s.shard)
 ORDER BY s.shard, p.id;

-- name: shard_config_seqs
SELECT shard, config_seq FROM shard_heads WHERE shard = ANY(%s);

-- name: shard_config_entries
-- With the publication each entry was made from (its event id names kind, version, shard): what
-- the writer falls back on for an entry whose payload no longer reads.
SELECT e.event_id, e.payload, p.kind, p.version, p.effective_from, p.document, p.sha256
  FROM journal_entries e
  LEFT JOIN config_publications p
    ON e.event_id = 'config:' || p.kind || ':' || p.version || ':' || e.shard
 WHERE e.shard = %s AND e.event_type = 'ConfigPublished' ORDER BY e.shard_seq;

-- name: save_config_seq
UPDATE shard_heads SET config_seq = %s WHERE shard = %s;

-- name: held_usage
SELECT e.event_id, e.account_id, e.payload FROM journal_entries e
 WHERE e.shard = %s AND e.status = 'unpriced' AND e.event_type = 'UsageRecorded'
   AND NOT EXISTS (SELECT 1 FROM journal_entries r WHERE r.event_id = e.event_id || ':rerated')
 ORDER BY e.shard_seq;

-- name: shard_policy_at
SELECT payload FROM journal_entries
 WHERE shard = %s AND shard_seq <= %s AND event_type = 'ConfigPublished'
   AND payload->>'kind' = 'policy'
 ORDER BY shard_seq DESC LIMIT 1;

-- ---------------------------------------------------------------------------------------------
-- Retention (`ledger prune`): published outbox rows and resolved rejects, never the journal.

-- name: prune
SELECT outbox_rows, rejects FROM ledger_prune(make_interval(days => %s), make_interval(days => %s));

-- --- metrics, readiness and `ledger status` (ledger/metrics.py, ledger/health.py, ----------
-- --- ledger/overview.py) -------------------------------------------------------------------

-- name: ping
SELECT 1;

-- name: outbox_backlog
-- Unpublished rows not parked (rows waiting behind a parked row of their key included), the
-- age of the oldest of them in seconds, and the parked rows.
SELECT count(*) FILTER (WHERE parked_at IS NULL),
       coalesce(extract(epoch FROM clock_timestamp()
                - min(created_at) FILTER (WHERE parked_at IS NULL)), 0)::float8,
       count(*) FILTER (WHERE parked_at IS NOT NULL)
  FROM outbox WHERE published_at IS NULL;

-- name: suspended_by_reason
SELECT reason, count(*) FROM account_status, unnest(reasons) AS reason
 WHERE suspended GROUP BY reason ORDER BY reason;

-- name: shard_progress
-- Per shard: journal entries the projection has not applied yet, and the last PeriodTick
-- journaled there.
SELECT h.shard, h.last_seq - coalesce(p.position, 0), h.last_tick_at
  FROM shard_heads h
  LEFT JOIN projection_positions p ON p.projection = %s AND p.shard = h.shard
 ORDER BY h.shard;

-- name: open_rejects_by_reason
SELECT reason, count(*) FROM rejected_events WHERE resolved_at IS NULL
 GROUP BY reason ORDER BY reason;

-- name: shard_lease_holders
SELECT shard, holder, expires_at, expires_at > clock_timestamp() FROM shard_leases
 WHERE group_id = %s ORDER BY shard;

-- ---------------------------------------------------------------------------------------------
-- The web console (ledger/console/): read-only, as the reader role.

-- name: console_accounts
-- One page of the accounts list, keyset-paged: no OFFSET, each page starts from the index
-- position after the last row shown, so page 20,000 costs what page 1 does. Filled in with
-- psycopg.sql: the sort key is one of the console_sort_* expressions (each read in its own
-- index order, migration 0009), with its type, the comparison (> or <) and the direction.
-- The console_sort_* bodies are bare expressions (no comments: they are spliced in); a missing
-- effective limit sorts as the most headroom there is (Infinity).
SELECT account_id, suspended, reasons, tier, effective_limit, month, month_to_date_spend,
       receivable, credit_balance, ({key})::text AS sort_key
  FROM account_status
 WHERE (%(suspended)s::boolean IS NULL OR suspended = %(suspended)s::boolean)
   AND (%(reason)s::text IS NULL OR %(reason)s::text = ANY (reasons))
   AND (%(prefix)s::text IS NULL OR account_id LIKE %(prefix)s::text)
   AND (%(after_id)s::text IS NULL
        OR (({key}), account_id) {cmp} (%(after_key)s::{keytype}, %(after_id)s::text))
 ORDER BY ({key}) {dir}, account_id {dir}
 LIMIT %(limit)s;

-- name: console_sort_account
account_id;

-- name: console_sort_spend
month_to_date_spend;

-- name: console_sort_headroom
coalesce(effective_limit, 'Infinity'::numeric) - month_to_date_spend;

-- name: console_sort_receivable
receivable;

-- name: console_account_state
SELECT state FROM account_status WHERE account_id = %s;

-- name: console_account_entries
-- An account's latest entries with their postings, and whether each keyed entry links to the
-- entry before it in its shard (NULL for an entry journaled before the chain was keyed; the
-- full check, keyed links recomputed, is `ledger verify`).
SELECT e.shard, e.shard_seq, e.occurred_at, e.recorded_at, e.event_type, e.status,
       e.price_version, e.event_id, e.chain_key_id, encode(e.entry_hash, 'hex'),
       CASE WHEN e.chain_key_id IS NULL THEN NULL
            WHEN prev.shard_seq IS NULL THEN e.prev_hash = decode(repeat('00', 32), 'hex')
            ELSE e.prev_hash = prev.entry_hash END,
       coalesce(array_agg(p.ledger_account ORDER BY p.line) FILTER (WHERE p.line IS NOT NULL),
                ARRAY[]::text[]),
       coalesce(array_agg(p.amount ORDER BY p.line) FILTER (WHERE p.line IS NOT NULL),
                ARRAY[]::numeric[])
  FROM journal_entries e
  LEFT JOIN journal_entries prev ON prev.shard = e.shard AND prev.shard_seq = e.shard_seq - 1
  LEFT JOIN postings p ON p.shard = e.shard AND p.shard_seq = e.shard_seq
 WHERE e.account_id = %s
 GROUP BY e.shard, e.shard_seq, prev.shard_seq, prev.entry_hash
 ORDER BY e.occurred_at DESC, e.shard_seq DESC
 LIMIT %s;

-- name: console_daily_spend
-- An account's usage charges per UTC day of one month (the revenue:usage postings).
SELECT (e.occurred_at AT TIME ZONE 'UTC')::date, -sum(p.amount)
  FROM journal_entries e
  JOIN postings p ON p.shard = e.shard AND p.shard_seq = e.shard_seq
 WHERE e.account_id = %(account_id)s
   AND e.occurred_at >= %(start)s AND e.occurred_at < %(end)s
   AND p.ledger_account = 'revenue:usage'
 GROUP BY 1 ORDER BY 1;

-- name: console_suspensions
-- The latest AccountSuspended status events still in the outbox (published rows are pruned
-- after LEDGER_OUTBOX_RETENTION_DAYS); the header is event_type = AccountSuspended, hex.
SELECT value FROM outbox
 WHERE headers @> '[["event_type", "4163636f756e7453757370656e646564"]]'::jsonb
 ORDER BY created_at DESC
 LIMIT %s;

-- name: console_rejects
-- One page of rejects (all, or one reason's), in id order after `after`.
SELECT id, reason, topic, kafka_partition, kafka_offset, event_type, rejected_at, resolved_at,
       octet_length(raw), left(detail, 300)
  FROM rejected_events
 WHERE (%(reason)s::text IS NULL OR reason = %(reason)s::text)
   AND (%(after)s::bigint IS NULL OR id > %(after)s::bigint)
 ORDER BY id
 LIMIT %(limit)s;

