"""Stored Kafka offsets against what Kafka still holds: finding and accepting lost ranges.

The ledger never moves past offsets that Kafka deleted before they were journaled (retention
ran out while the ledger was down, a topic was recreated): that shard stops and logs
`shard_stopped_data_lost`. `ledger offsets accept-loss --shard N` is the operator's decision
to go on: it records each lost range in `accepted_offset_losses` (with a note) and moves the
stored offset to Kafka's log start, in one transaction. The events in that range are gone
from Kafka; if they exist elsewhere, produce them again and they are journaled as usual.
"""

from __future__ import annotations

import dataclasses

from kafka import KafkaConsumer, TopicPartition

from ledger import db, topics
from ledger.consumer import kafka_consumer_options
from ledger.db import QUERIES
from ledger.errors import LedgerError
from ledger.kafka_auth import client_options
from ledger.settings import Settings


@dataclasses.dataclass(frozen=True)
class LostRange:
    topic: str
    partition: int
    stored: int  # the next offset the journal expects
    log_start: int  # the first offset Kafka still has


def lost_ranges(
    settings: Settings, bootstrap: str, dsn: str, shards: list[int] | None = None
) -> list[LostRange]:
    """Every input partition (of `shards`, or all) whose stored offset Kafka deleted."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        client_id="ledger-offsets",
        **kafka_consumer_options(settings),
        **client_options(settings),
    )
    try:
        names = topics.input_topics(settings)
        partitions = [
            TopicPartition(name, p)
            for name in names
            for p in sorted(consumer.partitions_for_topic(name) or ())
            if shards is None or p in shards
        ]
        begin = consumer.beginning_offsets(partitions, timeout_ms=10_000) if partitions else {}
    finally:
        consumer.close()
    with db.connect(dsn) as conn:
        stored = {
            (t, p): o
            for t, p, o in conn.execute(
                QUERIES["stored_offsets"], {"group_id": settings.consumer_group, "topics": names}
            )
        }
    return [
        LostRange(tp.topic, tp.partition, stored.get((tp.topic, tp.partition), 0), begin[tp])
        for tp in partitions
        if stored.get((tp.topic, tp.partition), 0) < begin[tp]
    ]


def accept_loss(
    settings: Settings, bootstrap: str, dsn: str, shard: int, note: str
) -> list[LostRange]:
    """Record the lost ranges of `shard` and move its stored offsets past them."""
    if not note.strip():
        raise LedgerError("accept-loss needs --note: why the loss is accepted, for the record")
    lost = lost_ranges(settings, bootstrap, dsn, [shard])
    with db.connect(dsn) as conn, conn.transaction():
        for r in lost:
            conn.execute(
                QUERIES["accept_offset_loss"],
                (settings.consumer_group, r.topic, r.partition, r.stored, r.log_start, note),
            )
            conn.execute(
                QUERIES["save_offset"],
                (settings.consumer_group, r.topic, r.partition, r.log_start),
            )
    return lost
