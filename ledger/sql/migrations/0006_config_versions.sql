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
