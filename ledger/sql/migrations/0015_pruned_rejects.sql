-- `ledger offsets audit` accounts for every Kafka record below the stored offsets: journaled,
-- a redelivery of a journaled event, or quarantined. A resolved reject deleted by retention
-- (`ledger prune`) would leave its record unaccounted for, so prune keeps where each came from
-- and how it was resolved (not its bytes, which are what retention frees). Written only by
-- ledger_prune (the owner's, SECURITY DEFINER); read by everyone.
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
