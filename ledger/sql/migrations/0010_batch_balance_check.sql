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
