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
