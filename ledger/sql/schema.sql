-- The declared schema: what applying every migration in order must produce (a test proves
-- it). Change it together with each new numbered migration.

-- 0001 ----------------------------------------------------------------------------------------
-- The append-only journal, the ledger writer's working state and its Kafka positions.
--
-- Journal tables (raw_events, journal_entries, postings) refuse UPDATE, DELETE and TRUNCATE:
-- corrections are new entries. Everything else here is derived state that may be rewritten.

-- Every accepted input event, byte for byte, where it came from, and a hash of its content
-- (canonical JSON of the decoded event) that tells a redelivery from a conflicting duplicate.
CREATE TABLE raw_events (
    event_id      text        PRIMARY KEY,
    event_type    text        NOT NULL,
    account_id    text        NOT NULL,
    topic         text        NOT NULL,
    kafka_partition integer   NOT NULL,
    kafka_offset  bigint      NOT NULL,
    fingerprint   bigint      NOT NULL,
    content_hash  bytea       NOT NULL,
    raw           bytea       NOT NULL,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One entry per accepted event. (shard, shard_seq) is the projections' reading order: shard is
-- the Kafka partition number (all input topics are co-partitioned by account), and shard_seq is
-- gapless per shard, handed out under a row lock on shard_heads, so a higher seq never becomes
-- visible before a lower one.
CREATE TABLE journal_entries (
    shard         integer     NOT NULL,
    shard_seq     bigint      NOT NULL,
    event_id      text        NOT NULL UNIQUE REFERENCES raw_events (event_id),
    account_id    text        NOT NULL,
    event_type    text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('posted', 'unpriced', 'noop')),
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    price_version text,
    payload       jsonb       NOT NULL,
    detail        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    prev_hash     bytea       NOT NULL,
    entry_hash    bytea       NOT NULL,
    PRIMARY KEY (shard, shard_seq)
);
CREATE INDEX journal_entries_account ON journal_entries (account_id, occurred_at);

-- Double entry: amounts are signed (debit positive, credit negative) and every entry's
-- postings sum to zero, enforced at commit by a deferred constraint trigger.
CREATE TABLE postings (
    shard          integer        NOT NULL,
    shard_seq      bigint         NOT NULL,
    line           smallint       NOT NULL,
    ledger_account text           NOT NULL,
    account_id     text           NOT NULL,
    amount         numeric(38, 9) NOT NULL CHECK (amount <> 0),
    currency       text           NOT NULL DEFAULT 'USD',
    PRIMARY KEY (shard, shard_seq, line),
    FOREIGN KEY (shard, shard_seq) REFERENCES journal_entries (shard, shard_seq)
);
CREATE INDEX postings_ledger_account ON postings (ledger_account);
CREATE INDEX postings_account ON postings (account_id);

CREATE FUNCTION journal_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'journal table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER raw_events_append_only BEFORE UPDATE OR DELETE ON raw_events
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER raw_events_no_truncate BEFORE TRUNCATE ON raw_events
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER journal_entries_append_only BEFORE UPDATE OR DELETE ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER journal_entries_no_truncate BEFORE TRUNCATE ON journal_entries
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change();

-- Balanced entries: checked once per entry at commit (after all its postings are in).
CREATE FUNCTION journal_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced record;
BEGIN
    SELECT currency, sum(amount) AS total INTO unbalanced
      FROM postings WHERE shard = NEW.shard AND shard_seq = NEW.shard_seq
     GROUP BY currency HAVING sum(amount) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal entry (%, %) is unbalanced: % % ',
            NEW.shard, NEW.shard_seq, unbalanced.total, unbalanced.currency
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE CONSTRAINT TRIGGER journal_entries_balanced AFTER INSERT ON journal_entries
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION journal_check_balanced();

-- Events the ledger could not accept, with the reason; never blocks a partition. A copy goes
-- to the dead-letter topic through the outbox.
CREATE TABLE rejected_events (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    event_id        text,
    event_type      text,
    reason          text        NOT NULL,
    detail          text        NOT NULL,
    raw             bytea       NOT NULL,
    rejected_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (topic, kafka_partition, kafka_offset)
);

-- The ledger consumer's next offset per (group, topic, partition), written in the same
-- transaction as the batch it covers. Kafka's committed offsets are advisory only.
CREATE TABLE consumer_offsets (
    group_id        text    NOT NULL,
    topic           text    NOT NULL,
    kafka_partition integer NOT NULL,
    next_offset     bigint  NOT NULL,
    PRIMARY KEY (group_id, topic, kafka_partition)
);

CREATE TABLE shard_heads (
    shard    integer PRIMARY KEY,
    last_seq bigint  NOT NULL
);

-- The ledger writer's working state per customer account: grants with their remaining
-- balances, receivable, the hash chain head. A cache of what the postings say, kept in step
-- in the same transaction; it decides how each charge is split across grants.
CREATE TABLE account_books (
    account_id text  PRIMARY KEY,
    book       jsonb NOT NULL,
    last_hash  bytea NOT NULL
);

-- Messages to publish to Kafka (account-status events, dead-letter copies), written in the
-- transaction that decided them; the relay publishes them in id order.
CREATE TABLE outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text        NOT NULL,
    message_key  bytea,
    value        bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '[]'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Per-account state kept by the projection workers, and their positions per shard.
CREATE TABLE account_status (
    account_id     text           PRIMARY KEY,
    opened         boolean        NOT NULL,
    suspended      boolean        NOT NULL,
    reasons        text[]         NOT NULL,
    status_version bigint         NOT NULL,
    credit_balance numeric(38, 9) NOT NULL,
    receivable     numeric(38, 9) NOT NULL,
    state          jsonb          NOT NULL
);
CREATE INDEX account_status_suspended ON account_status (suspended) WHERE suspended;

CREATE TABLE projection_positions (
    projection text    NOT NULL,
    shard      integer NOT NULL,
    position   bigint  NOT NULL,
    PRIMARY KEY (projection, shard)
);

-- 0002 ----------------------------------------------------------------------------------------
-- Billing periods: grant expiry and month close driven by PeriodTick events, spend limits,
-- and issued invoices.

-- Entries derived from another event (a grant expiring at a PeriodTick) name that event as
-- their cause; their own event_id is derived from it, so it has no raw_events row.
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_event_id_fkey;
ALTER TABLE journal_entries ADD COLUMN cause_event_id text REFERENCES raw_events (event_id);

-- The ledger writer finds the books with grants due to expire in a shard at each tick.
ALTER TABLE account_books ADD COLUMN shard integer;
ALTER TABLE account_books ADD COLUMN next_expiry timestamptz;
CREATE INDEX account_books_expiry ON account_books (shard, next_expiry)
    WHERE next_expiry IS NOT NULL;

-- Spend-limit figures for queries, and the accounts a PeriodTick must revisit (limit
-- suspensions to lift at the month turn, amounts waiting for the month close).
ALTER TABLE account_status ADD COLUMN shard integer;
ALTER TABLE account_status ADD COLUMN tier text NOT NULL DEFAULT '1';
ALTER TABLE account_status ADD COLUMN effective_limit numeric(38, 9);
ALTER TABLE account_status ADD COLUMN month text;
ALTER TABLE account_status ADD COLUMN month_to_date_spend numeric(38, 9) NOT NULL DEFAULT 0;
ALTER TABLE account_status ADD COLUMN tick_sensitive boolean NOT NULL DEFAULT false;
CREATE INDEX account_status_tick ON account_status (shard) WHERE tick_sensitive;

-- The time of the last PeriodTick a projection applied in each shard: its billing clock.
ALTER TABLE projection_positions ADD COLUMN last_tick_at timestamptz;

-- Issued invoices never change: corrections go on the next invoice as adjustment lines.
CREATE TABLE invoices (
    invoice_id     text           PRIMARY KEY,
    account_id     text           NOT NULL,
    month          text           NOT NULL,
    issued_at      timestamptz    NOT NULL,
    currency       text           NOT NULL DEFAULT 'USD',
    exact_total    numeric(38, 9) NOT NULL,
    amount_due     numeric(38, 2) NOT NULL CHECK (amount_due > 0),
    lines          jsonb          NOT NULL,
    UNIQUE (account_id, month)
);
CREATE INDEX invoices_month ON invoices (month);
CREATE TRIGGER invoices_append_only BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change();

-- 0003 ----------------------------------------------------------------------------------------
-- Rejected events can be fed again once fixed (`ledger rejects replay`): keep the record key
-- (for the dead-letter copy and the partitioning), and record how each was resolved.
ALTER TABLE rejected_events ADD COLUMN message_key bytea;
ALTER TABLE rejected_events ADD COLUMN resolved_at timestamptz;
ALTER TABLE rejected_events ADD COLUMN resolution text;
CREATE INDEX rejected_events_open ON rejected_events (id) WHERE resolved_at IS NULL;

-- 0004 ----------------------------------------------------------------------------------------
-- Nothing stops a shard: the ledger bounds time by each shard's clock, an operator can
-- accept a range of Kafka offsets that was deleted before the ledger read it, and shard
-- leases expire when their holder stops renewing them.

-- The last PeriodTick journaled in each shard: ticks only move it forward, by a bounded step.
ALTER TABLE shard_heads ADD COLUMN last_tick_at timestamptz;

-- Offsets the ledger never read because Kafka deleted them first (retention, a recreated
-- topic), accepted by an operator (`ledger offsets accept-loss`); the consumer refuses to
-- move past such a range on its own.
CREATE TABLE accepted_offset_losses (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    group_id        text        NOT NULL,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    from_offset     bigint      NOT NULL,
    to_offset       bigint      NOT NULL,
    note            text        NOT NULL,
    accepted_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Shard leases with liveness: a holder renews its rows; a standby takes a shard whose lease
-- expired (its holder crashed or froze) or was released.
CREATE TABLE shard_leases (
    group_id   text        NOT NULL,
    shard      integer     NOT NULL,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (group_id, shard)
);

-- 0005 ----------------------------------------------------------------------------------------
-- The relay parks an outbox row Kafka refuses for good (too large for the producer or the
-- broker, an invalid topic, a record it cannot serialize) with the reason, and moves on;
-- `ledger outbox retry` un-parks it. `attempts` counts the refusals.
ALTER TABLE outbox ADD COLUMN parked_at timestamptz;
ALTER TABLE outbox ADD COLUMN park_reason text;
ALTER TABLE outbox ADD COLUMN park_detail text;
ALTER TABLE outbox ADD COLUMN attempts integer NOT NULL DEFAULT 0;
-- Rows still parked, by (topic, key): later rows with the same topic and key wait behind them.
CREATE INDEX outbox_parked ON outbox (topic, message_key, id)
    WHERE parked_at IS NOT NULL AND published_at IS NULL;

-- 0006 ----------------------------------------------------------------------------------------
-- Price-book and policy versions published to the ledger (`ledger config publish`; the worker
-- publishes its configured files at start). A name is published once, with one content. The
-- ledger writer journals each one on every shard as a ConfigPublished entry; replays follow
-- the journal, never these rows or the files.
CREATE TABLE config_publications (
    id             bigserial   PRIMARY KEY,
    kind           text        NOT NULL CHECK (kind IN ('price_book', 'policy')),
    version        text        NOT NULL,
    effective_from timestamptz NOT NULL,
    document       text        NOT NULL,
    sha256         text        NOT NULL,
    published_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (kind, version)
);
-- The position of the latest ConfigPublished entry of each shard (0: none), so a writer knows
-- when its cached versions are stale.
ALTER TABLE shard_heads ADD COLUMN config_seq bigint NOT NULL DEFAULT 0;
-- The configuration entries of a shard, and its held (unpriced) usage, without a scan.
CREATE INDEX journal_entries_config ON journal_entries (shard, shard_seq)
    WHERE event_type = 'ConfigPublished';
CREATE INDEX journal_entries_unpriced ON journal_entries (shard, shard_seq)
    WHERE status = 'unpriced';

-- 0007 ----------------------------------------------------------------------------------------
-- Least privilege, and retention without loss.
--
-- Three roles. The owner (`ledger db migrate`, which connects as it or SETs ROLE to it) owns
-- every table, function and trigger. The writer (every worker role, and the commands that
-- write) reads everything, appends to the journal and changes only its own working state: it
-- cannot change or remove a journal row, own, alter or drop a table or trigger, or set
-- session_replication_role. The reader only reads. The names come from
-- LEDGER_DB_{OWNER,WRITER,READER}_ROLE through the session settings ledger.owner_role,
-- ledger.writer_role and ledger.reader_role (`ledger db migrate` sets them; unset: the
-- defaults). A writer or reader role that does not exist yet is created NOLOGIN (which needs
-- CREATEROLE; login roles can then be granted membership in it).

-- Reject bytes are stored once: a dead-letter copy in the outbox names its reject, and the
-- relay publishes that reject's raw bytes (the row's own value stays empty).
ALTER TABLE outbox ADD COLUMN value_of_reject bigint REFERENCES rejected_events (id);
CREATE INDEX outbox_value_of_reject ON outbox (value_of_reject)
    WHERE value_of_reject IS NOT NULL;

-- `ledger projections rebuild` builds into a temporary table now (the writer creates no
-- tables); drop the permanent one an interrupted rebuild of an older version may have left.
DROP TABLE IF EXISTS account_status_rebuild;

-- Retention (`ledger prune`, run by the writer): published outbox rows older than
-- `outbox_age`, and rejects resolved longer than `rejects_age` ago whose dead-letter copies
-- are all published (those copies go with them). Nothing else: the journal keeps everything.
-- SECURITY DEFINER, so the writer needs no DELETE on either table.
CREATE FUNCTION ledger_prune(outbox_age interval, rejects_age interval,
                             OUT outbox_rows bigint, OUT rejects bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    done bigint[];
    copies bigint;
BEGIN
    IF outbox_age < interval '1 day' OR rejects_age < interval '1 day' THEN
        RAISE EXCEPTION 'retention must be at least 1 day (outbox %, rejects %)',
            outbox_age, rejects_age USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM outbox WHERE published_at < clock_timestamp() - outbox_age;
    GET DIAGNOSTICS outbox_rows = ROW_COUNT;
    SELECT coalesce(array_agg(r.id), '{}') INTO done
      FROM (SELECT r.id FROM rejected_events r
             WHERE r.resolved_at < clock_timestamp() - rejects_age
               AND NOT EXISTS (SELECT 1 FROM outbox o
                                WHERE o.value_of_reject = r.id AND o.published_at IS NULL)
             FOR UPDATE OF r) r;
    DELETE FROM outbox WHERE value_of_reject = ANY (done);
    GET DIAGNOSTICS copies = ROW_COUNT;
    outbox_rows := outbox_rows + copies;
    DELETE FROM rejected_events WHERE id = ANY (done);
    GET DIAGNOSTICS rejects = ROW_COUNT;
END;
$$;

DO $$
DECLARE
    owner_role text := coalesce(nullif(current_setting('ledger.owner_role', true), ''),
                                'ledger_owner');
    writer text := coalesce(nullif(current_setting('ledger.writer_role', true), ''),
                            'ledger_writer');
    reader text := coalesce(nullif(current_setting('ledger.reader_role', true), ''),
                            'ledger_reader');
    name text;
BEGIN
    IF current_user <> owner_role THEN
        RAISE EXCEPTION 'the ledger''s migrations run as its owner role %, not as %',
            owner_role, current_user USING ERRCODE = 'insufficient_privilege';
    END IF;
    FOREACH name IN ARRAY ARRAY[writer, reader] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', name);
        END IF;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name
                      AND (rolsuper OR rolbypassrls OR rolcreaterole)) THEN
            RAISE EXCEPTION 'role % must not be a superuser or create roles', name
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF pg_has_role(name, owner_role, 'MEMBER') THEN
            RAISE EXCEPTION 'role % must not be a member of the owner role %', name, owner_role
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END LOOP;

    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA public TO %I, %I', writer, reader);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO %I',
                   reader);
    -- The journal and the records of what happened: append only.
    EXECUTE format('GRANT INSERT ON raw_events, journal_entries, postings, invoices, '
                   'rejected_events, accepted_offset_losses, config_publications TO %I',
                   writer);
    EXECUTE format('GRANT USAGE ON SEQUENCE config_publications_id_seq TO %I', writer);
    -- A reject is resolved (replayed, or dismissed by an operator), never rewritten.
    EXECUTE format('GRANT UPDATE (resolved_at, resolution) ON rejected_events TO %I', writer);
    -- The writer's own working state.
    EXECUTE format('GRANT INSERT, UPDATE ON consumer_offsets, shard_heads, account_books, '
                   'shard_leases, projection_positions, account_status, outbox TO %I', writer);
    EXECUTE format('GRANT DELETE ON shard_leases, account_status TO %I', writer);
    REVOKE ALL ON FUNCTION ledger_prune(interval, interval) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION ledger_prune(interval, interval) TO %I', writer);
END;
$$;

-- 0008 ----------------------------------------------------------------------------------------
-- Tamper evidence that survives a database compromise. Each entry is linked into its SHARD's
-- hash chain (shard_seq order, ticks and grant expiries included) by an HMAC-SHA256 under a key
-- held outside the database; the entry records the id of the key (rotation). Entries journaled
-- before this migration keep their unkeyed per-account links (chain_key_id NULL): verify checks
-- them as before, and each shard's keyed chain starts from its last such entry.
ALTER TABLE journal_entries ADD COLUMN chain_key_id text;

-- The shard's chain head (the last entry's link), read and moved under the shard's row lock.
ALTER TABLE shard_heads ADD COLUMN head_hash bytea NOT NULL
    DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
UPDATE shard_heads h SET head_hash = e.entry_hash
  FROM journal_entries e
 WHERE e.shard = h.shard AND e.shard_seq = h.last_seq;

-- The per-account chain heads are gone with the per-account chains.
ALTER TABLE account_books DROP COLUMN last_hash;

-- 0009 ----------------------------------------------------------------------------------------
-- The web console's reading paths (`ledger console`): the accounts list is sorted by
-- month-to-date spend, headroom (effective limit − spend; no limit sorts as the most headroom)
-- or receivable and paged by keyset (sort key, account_id), searched by an account id prefix;
-- the rejects are listed per reason in id order. Indexes only: nothing is written differently.
CREATE INDEX account_status_spend ON account_status (month_to_date_spend, account_id);
CREATE INDEX account_status_headroom
    ON account_status ((coalesce(effective_limit, 'Infinity'::numeric) - month_to_date_spend),
                       account_id);
CREATE INDEX account_status_receivable ON account_status (receivable, account_id);
CREATE INDEX account_status_id_prefix ON account_status (account_id text_pattern_ops);
CREATE INDEX rejected_events_reason ON rejected_events (reason, id);
-- The suspensions chart reads the AccountSuspended status events still in the outbox.
CREATE INDEX outbox_suspensions ON outbox (created_at)
    WHERE headers @> '[["event_type", "4163636f756e7453757370656e646564"]]'::jsonb;
-- 0010 ----------------------------------------------------------------------------------------
-- Balanced entries, checked once per statement instead of once per entry at commit: every
-- statement that inserts postings (the writer's one COPY per batch) must leave the postings it
-- inserted summing to zero per entry and currency, or it fails. The journal is append-only,
-- so an entry whose postings balance in every statement that added to it balances in total:
-- the rule is at least as strict as the per-entry deferred trigger it replaces (which ran a
-- PL/pgSQL function and an index lookup per entry at commit), at one aggregate per batch.
DROP TRIGGER journal_entries_balanced ON journal_entries;
DROP FUNCTION journal_check_balanced();

CREATE FUNCTION postings_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced record;
BEGIN
    SELECT shard, shard_seq, currency, sum(amount) AS total INTO unbalanced
      FROM inserted_postings
     GROUP BY shard, shard_seq, currency HAVING sum(amount) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal entry (%, %) is unbalanced: % %',
            unbalanced.shard, unbalanced.shard_seq, unbalanced.total, unbalanced.currency
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER postings_balanced AFTER INSERT ON postings
    REFERENCING NEW TABLE AS inserted_postings
    FOR EACH STATEMENT EXECUTE FUNCTION postings_check_balanced();
-- 0011 ----------------------------------------------------------------------------------------
-- The month close is journaled by the ledger writer (InvoiceIssued entries). The accounts a
-- closing PeriodTick must visit are those with charges waiting for an invoice: the earliest
-- month they are for, kept with the book and indexed, so the close never scans every account.
ALTER TABLE account_books ADD COLUMN first_pending_month text;
CREATE INDEX account_books_billing ON account_books (shard, first_pending_month)
    WHERE first_pending_month IS NOT NULL;
-- 0012 ----------------------------------------------------------------------------------------
-- Every posting belongs to a journal entry, checked once per statement instead of once per
-- row: the foreign key from postings to journal_entries ran a referential-integrity trigger
-- per posting (measured: 12 µs of PostgreSQL CPU each, two per event, about a sixth of what
-- PostgreSQL spends per event); the statement trigger that already checks the balance now
-- also looks each inserted posting's entry up in journal_entries' primary key (~2 µs).
-- What the foreign key also guarded, an entry deleted or re-keyed under its postings, the
-- append-only triggers refuse (journal_refuse_change), as they refuse TRUNCATE.
ALTER TABLE postings DROP CONSTRAINT postings_shard_shard_seq_fkey;

-- Nested loops over the primary key, never a hash of the whole journal: the transition table
-- has no statistics, and the journal grows without bound.
CREATE OR REPLACE FUNCTION postings_check_balanced() RETURNS trigger LANGUAGE plpgsql
    SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    unbalanced record;
    orphan record;
BEGIN
    SELECT p.shard, p.shard_seq INTO orphan
      FROM inserted_postings p
     WHERE NOT EXISTS (SELECT 1 FROM journal_entries e
                        WHERE e.shard = p.shard AND e.shard_seq = p.shard_seq)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'postings of journal entry (%, %), which does not exist',
            orphan.shard, orphan.shard_seq
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT shard, shard_seq, currency, sum(amount) AS total INTO unbalanced
      FROM inserted_postings
     GROUP BY shard, shard_seq, currency HAVING sum(amount) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal entry (%, %) is unbalanced: % %',
            unbalanced.shard, unbalanced.shard_seq, unbalanced.total, unbalanced.currency
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;

-- 0013 ----------------------------------------------------------------------------------------
-- A lease whose holder's session is gone (a crash) may be taken before it expires.
ALTER TABLE shard_leases ADD COLUMN holder_pid integer;
ALTER TABLE shard_leases ADD COLUMN renewed_at timestamptz;

-- 0014 ----------------------------------------------------------------------------------------
-- A journal entry's payload and rating detail are stored as json, the canonical text the
-- writer made (and hashed), not as jsonb. Nothing indexes or searches inside them; they are
-- read whole (verify, audit, projections, the console) or by a key (`->>`, which json has
-- too). jsonb parsed every entry's ~830 bytes of JSON into its binary form on the way in and
-- printed it back on the way out. Measured on 70,614 usage entries of a demo journal: COPY
-- of both columns 10.5 µs per row as jsonb against 5.1 as json (medians of five, alternating),
-- reading them back 23-25 µs against 20, and 1,107 bytes of table per row against 916. The
-- hash chain is unchanged: it covers the canonical JSON of the value, which verify computes
-- again from the value it reads back, whichever text an entry holds (entries written before
-- this migration hold jsonb's output of it).
-- The rewrite takes the journal's ACCESS EXCLUSIVE lock for as long as it copies the table:
-- run it with the workers stopped (README, Operations).
ALTER TABLE journal_entries
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN detail DROP DEFAULT,
    ALTER COLUMN detail TYPE json USING detail::json,
    ALTER COLUMN detail SET DEFAULT '{}'::json;

-- 0015 ----------------------------------------------------------------------------------------
-- Where each reject deleted by retention came from, for `ledger offsets audit`.
CREATE TABLE pruned_rejects (
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    event_id        text,
    reason          text        NOT NULL,
    resolution      text,
    resolved_at     timestamptz NOT NULL,
    pruned_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic, kafka_partition, kafka_offset)
);

CREATE OR REPLACE FUNCTION ledger_prune(outbox_age interval, rejects_age interval,
                                        OUT outbox_rows bigint, OUT rejects bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    done bigint[];
    copies bigint;
BEGIN
    IF outbox_age < interval '1 day' OR rejects_age < interval '1 day' THEN
        RAISE EXCEPTION 'retention must be at least 1 day (outbox %, rejects %)',
            outbox_age, rejects_age USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM outbox WHERE published_at < clock_timestamp() - outbox_age;
    GET DIAGNOSTICS outbox_rows = ROW_COUNT;
    SELECT coalesce(array_agg(r.id), '{}') INTO done
      FROM (SELECT r.id FROM rejected_events r
             WHERE r.resolved_at < clock_timestamp() - rejects_age
               AND NOT EXISTS (SELECT 1 FROM outbox o
                                WHERE o.value_of_reject = r.id AND o.published_at IS NULL)
             FOR UPDATE OF r) r;
    DELETE FROM outbox WHERE value_of_reject = ANY (done);
    GET DIAGNOSTICS copies = ROW_COUNT;
    outbox_rows := outbox_rows + copies;
    INSERT INTO pruned_rejects (topic, kafka_partition, kafka_offset, event_id, reason,
                                resolution, resolved_at)
    SELECT topic, kafka_partition, kafka_offset, event_id, reason, resolution, resolved_at
      FROM rejected_events WHERE id = ANY (done)
        ON CONFLICT DO NOTHING;
    DELETE FROM rejected_events WHERE id = ANY (done);
    GET DIAGNOSTICS rejects = ROW_COUNT;
END;
$$;

DO $$
BEGIN
    EXECUTE format('GRANT SELECT ON pruned_rejects TO %I',
                   coalesce(nullif(current_setting('ledger.writer_role', true), ''),
                            'ledger_writer'));
END;
$$;

-- 0016 ----------------------------------------------------------------------------------------
-- The last entry folded into each account state: the projection folds nothing twice.
ALTER TABLE account_status ADD COLUMN folded_through bigint NOT NULL DEFAULT 0;
