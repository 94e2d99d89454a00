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
