"""The ledger consumer: Kafka input topics → journal, one PostgreSQL transaction per batch.

Consumer group `settings.consumer_group` (default `ledger`) with the range assignor, so the same
partition number of every input topic (co-partitioned by account) goes to the same consumer and
each shard has one writer. Offsets live in PostgreSQL beside the journal; on assignment the
consumer seeks to them, and Kafka's own committed offsets are not used.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor

from ledger import db, topics
from ledger.book import LedgerFold
from ledger.errors import StackError
from ledger.journal import LedgerWriter
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.settings import Settings

log = structlog.get_logger(__name__)


def kafka_group_options(settings: Settings) -> dict[str, object]:
    """Consumer options for both Apache Kafka and the Tansu fallback (DESIGN §8): group timing
    that joins in seconds, and no incremental fetch sessions (KIP-227), with which
    kafka-python 3.0 was seen to stop sending fetches for an assigned partition."""
    return {
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "enable_incremental_fetch_sessions": False,
    }


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, consumer: KafkaConsumer, writer: LedgerWriter):
        self.consumer = consumer
        self.writer = writer

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Every batch is committed to PostgreSQL before the next poll, so nothing is pending.
        log.info(
            "partitions_revoked", partitions=sorted(f"{t.topic}[{t.partition}]" for t in revoked)
        )

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        seek_to_stored(self.consumer, self.writer, assigned)
        log.info(
            "partitions_assigned", partitions=sorted(f"{t.topic}[{t.partition}]" for t in assigned)
        )


def seek_to_stored(consumer: KafkaConsumer, writer: LedgerWriter, assigned) -> None:
    stored = writer.stored_offsets(sorted({tp.topic for tp in assigned}))
    for tp in assigned:
        offset = stored.get((tp.topic, tp.partition))
        if offset is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, offset)


def run_ledger_consumer(
    settings: Settings,
    bootstrap: str,
    dsn: str,
    stop: threading.Event,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Consume until `stop` is set; then finish the batch in hand, commit, leave the group."""
    fold = LedgerFold(PriceBook.load(settings.price_book), Policy.load(settings.policy))
    conn = db.connect(dsn)
    writer = LedgerWriter(
        conn,
        fold,
        group_id=settings.consumer_group,
        deadletter_topic=settings.topic(topics.DEADLETTER),
    )
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=settings.consumer_group,
        client_id=f"ledger-{settings.consumer_group}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        partition_assignment_strategy=[RangePartitionAssignor],
        max_poll_records=settings.batch_max_events,
        fetch_max_wait_ms=min(settings.batch_max_ms, 500),
        max_partition_fetch_bytes=4 * 1024 * 1024,
        **kafka_group_options(settings),
    )
    input_topics = topics.input_topics(settings)
    _wait_for_topic_metadata(consumer, input_topics, stop)
    consumer.subscribe(topics=input_topics, listener=_SeekToStoredOffsets(consumer, writer))
    log.info("ledger_consumer_started", group=settings.consumer_group)
    try:
        while not stop.is_set():
            batch = _poll_batch(consumer, settings, stop)
            if not batch:
                continue
            try:
                writer.write_batch(batch)
            except Exception as exc:  # retried from the stored offsets; nothing is lost
                log.error("batch_failed", error=str(exc), records=len(batch), exc_info=True)
                if conn.closed:
                    conn = db.connect(dsn)
                    writer.conn = conn
                seek_to_stored(consumer, writer, consumer.assignment())
                stop.wait(1.0)
                continue
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        consumer.close(autocommit=False)  # leaves the group promptly
        conn.close()
        log.info("ledger_consumer_stopped")


def _wait_for_topic_metadata(
    consumer: KafkaConsumer, names: list[str], stop: threading.Event, timeout_s: float = 60
) -> None:
    """Know every input topic's partitions before joining the group. A group leader without
    that metadata assigns nothing, and kafka-python's rejoin after the metadata arrives can
    stall (seen on a fresh broker); asking first avoids the empty first assignment."""
    deadline = time.monotonic() + timeout_s
    missing = list(names)
    while missing and not stop.is_set():
        missing = [t for t in missing if not consumer.partitions_for_topic(t)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"input topics not found on the broker: {', '.join(missing)} "
                "(run `ledger topics create`)"
            )
        stop.wait(0.2)


def _poll_batch(consumer: KafkaConsumer, settings: Settings, stop: threading.Event) -> list:
    """Records until the batch holds `batch_max_events` or `batch_max_ms` has passed."""
    batch: list = []
    deadline = time.monotonic() + settings.batch_max_ms / 1000
    while len(batch) < settings.batch_max_events and not stop.is_set():
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        polled = consumer.poll(
            timeout_ms=left_ms, max_records=settings.batch_max_events - len(batch)
        )
        for records in polled.values():
            batch.extend(records)
    return batch
