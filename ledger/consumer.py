"""The ledger consumer: Kafka input topics → journal, one PostgreSQL transaction per batch.

A shard is a partition number: all input topics are co-partitioned by account, so partition p
of every input topic holds the same accounts, and one writer must own all of them at once.
Ownership is a PostgreSQL session advisory lock per (consumer group, shard), held on a
dedicated connection: a worker consumes (by manual assignment) exactly the shards it holds,
others wait as standbys and take a shard over within seconds when its owner's session ends
(a crash closes the connection and frees the lock). `LEDGER_SHARDS` restricts a worker to some
shards, so a deployment scales out by giving each worker its range.

Why not Kafka's group protocol: with kafka-python 3.0.12 a rebalance that outlives one
`poll()` call can leave the consumer joined but never fetching (the join task completes after
the poll gave up, and nothing applies its assignment), which stalls a shard silently; leases
in the same database as the offsets have no such failure mode. Correctness never depends on
the leases anyway: every batch locks its partitions' stored offsets, drops what another writer
already journaled and refuses gaps, so even two writers on one shard duplicate nothing.

Offsets live in PostgreSQL beside the journal; Kafka's committed offsets are not used.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import structlog
from kafka import KafkaConsumer, TopicPartition

from ledger import db, topics
from ledger.book import LedgerFold
from ledger.db import QUERIES
from ledger.errors import StackError
from ledger.journal import LedgerWriter
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.settings import Settings

log = structlog.get_logger(__name__)

LEASE_REFRESH_S = 2.0


def kafka_consumer_options(settings: Settings) -> dict[str, object]:
    """Consumer options for both Apache Kafka and the Tansu fallback: no incremental fetch
    sessions (KIP-227), with which kafka-python 3.0 was also seen to stop fetching an
    assigned partition. To ride out a broker restart: reconnect attempts back off from
    100 ms to 1 s at most (kafka-python's default grows to 30 s, which kept the consumer
    away for ~50 s after the broker was back), requests time out after 10 s, and metadata
    is refreshed at least every minute."""
    return {
        "enable_incremental_fetch_sessions": False,
        "reconnect_backoff_ms": 100,
        "reconnect_backoff_max_ms": 1000,
        "request_timeout_ms": 10_000,
        "bootstrap_timeout_ms": 10_000,
        "metadata_max_age_ms": 60_000,
    }


class ShardLeases:
    """The shards this process may write: session advisory locks on their own connection."""

    def __init__(self, dsn: str, group: str, wanted: list[int]):
        self.dsn = dsn
        self.group = group
        self.wanted = wanted
        self.owned: set[int] = set()
        self.conn: psycopg.Connection | None = None

    def refresh(self) -> set[int]:
        """Try to take every wanted shard not held yet; returns the shards held now."""
        if self.conn is None or self.conn.closed or self.conn.broken:
            if self.owned:
                log.warning("shard_leases_lost", shards=sorted(self.owned))
            self.owned = set()
            self.conn = db.connect(self.dsn, autocommit=True)
        for shard in self.wanted:
            if shard not in self.owned:
                (got,) = self.conn.execute(
                    QUERIES["try_shard_lease"], (self.group, shard)
                ).fetchone()
                if got:
                    self.owned.add(shard)
        return set(self.owned)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()  # ends the session: every lease is released at once


def run_ledger_consumer(
    settings: Settings,
    bootstrap: str,
    dsn: str,
    stop: threading.Event,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Consume the owned shards until `stop` is set; then finish the batch in hand and
    commit it."""
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
        group_id=None,
        client_id=f"ledger-{settings.consumer_group}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.batch_max_events,
        fetch_max_wait_ms=min(settings.batch_max_ms, 500),
        max_partition_fetch_bytes=4 * 1024 * 1024,
        **kafka_consumer_options(settings),
    )
    input_topics = topics.input_topics(settings)
    shard_count = _shard_count(consumer, input_topics, stop)
    wanted = settings.shards if settings.shards is not None else list(range(shard_count))
    if any(shard >= shard_count for shard in wanted):
        raise StackError(f"LEDGER_SHARDS={wanted}: the input topics have {shard_count} partitions")
    leases = ShardLeases(dsn, settings.consumer_group, wanted)
    owned: set[int] = set()
    next_refresh = 0.0
    log.info("ledger_consumer_started", group=settings.consumer_group, shards=wanted)
    try:
        while not stop.is_set():
            if time.monotonic() >= next_refresh:
                held = leases.refresh()
                if held != owned:
                    owned = held
                    _assign(consumer, writer, input_topics, owned)
                next_refresh = time.monotonic() + LEASE_REFRESH_S
            if not owned:
                stop.wait(LEASE_REFRESH_S)
                continue
            batch = _poll_batch(consumer, settings, stop)
            if not batch:
                continue
            try:
                writer.write_batch(batch)
            except Exception as exc:  # retried from the stored offsets; nothing is lost
                log.error("batch_failed", error=str(exc), records=len(batch), exc_info=True)
                if conn.closed or conn.broken:
                    conn = writer.conn = db.connect(dsn)
                _seek_to_stored(consumer, writer, consumer.assignment())
                stop.wait(1.0)
                continue
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        consumer.close(autocommit=False)
        leases.close()
        conn.close()
        log.info("ledger_consumer_stopped")


def _assign(
    consumer: KafkaConsumer, writer: LedgerWriter, input_topics: list[str], shards: set[int]
) -> None:
    """Consume exactly `shards` of every input topic, from the offsets stored with the
    journal (the beginning of a partition never journaled)."""
    partitions = [TopicPartition(t, s) for t in input_topics for s in sorted(shards)]
    consumer.assign(partitions)
    _seek_to_stored(consumer, writer, partitions)
    log.info("partitions_assigned", shards=sorted(shards), partitions=len(partitions))


def _seek_to_stored(consumer: KafkaConsumer, writer: LedgerWriter, partitions) -> None:
    stored = writer.stored_offsets(sorted({tp.topic for tp in partitions}))
    for tp in partitions:
        consumer.seek(tp, stored.get((tp.topic, tp.partition), 0))


def _shard_count(
    consumer: KafkaConsumer, names: list[str], stop: threading.Event, timeout_s: float = 60
) -> int:
    """The partition count shared by every input topic (they must be co-partitioned)."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        counts = {t: consumer.partitions_for_topic(t) for t in names}
        missing = [t for t, parts in counts.items() if not parts]
        if not missing:
            sizes = {len(parts) for parts in counts.values()}
            if len(sizes) != 1:
                raise StackError(f"input topics are not co-partitioned: {counts}")
            return sizes.pop()
        if time.monotonic() > deadline:
            raise StackError(
                f"input topics not found on the broker: {', '.join(missing)} "
                "(run `ledger topics create`)"
            )
        stop.wait(0.2)
    return 0


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
