-- Each account state records the shard sequence number of the last entry folded into it
-- (0: not known, as for every state written before this migration). The projection skips an
-- entry at or below it, so a shard position moved back (by hand, or a projection table
-- restored from a backup older than the states) folds nothing twice: no spend counted twice,
-- no status change sent twice. Bookkeeping, not billing: verify compares it only with the
-- shard's position (a state cannot have folded past it).
ALTER TABLE account_status ADD COLUMN folded_through bigint NOT NULL DEFAULT 0;
