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
