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
