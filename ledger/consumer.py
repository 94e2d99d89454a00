"""The ledger consumer: Kafka input topics → journal, one PostgreSQL transaction per batch.

A shard is a partition number: all input topics are co-partitioned by account, so partition p
of every input topic holds the same accounts, and one writer must own all of them at once.
Ownership is an expiring lease per (consumer group, shard) in PostgreSQL (`ledger.leases`): a
worker consumes (by manual assignment) exactly the shards it holds, others wait as standbys
and take a shard over when its lease expires (its holder crashed, froze or lost the database)
or is released (a clean stop). `LEDGER_SHARDS` restricts a worker to some shards, so a
deployment scales out by giving each worker its range.

Why not Kafka's group protocol: with kafka-python 3.0.12 a rebalance that outlives one
`poll()` call can leave the consumer joined but never fetching (the join task completes after
the poll gave up, and nothing applies its assignment), which stalls a shard silently; leases
in the same database as the offsets have no such failure mode. Correctness never depends on
the leases anyway: every batch locks its partitions' stored offsets, drops what another writer
already journaled and refuses a fetch that starts past the stored offset, so even two writers
on one shard duplicate nothing.

Offsets live in PostgreSQL beside the journal; Kafka's committed offsets are not used.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import psycopg
import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaConnectionError, KafkaTimeoutError
from kafka.errors import OffsetOutOfRangeError as KafkaOffsetOutOfRange

from ledger import chain_keys, db, metrics, topics
from ledger.backoff import KafkaContact, Outage, kafka_reconnect_options
from ledger.book import LedgerFold
from ledger.errors import StackError
from ledger.journal import BatchResult, Fetched, LedgerWriter, OffsetGapError, one_line
from ledger.kafka_auth import client_options
from ledger.leases import LEASE_REFRESH_S, LeaseLostError, ShardLeases
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")


def kafka_consumer_options(settings: Settings) -> dict[str, object]:
    """Consumer options for both Apache Kafka and the Tansu fallback: no incremental fetch
    sessions (KIP-227), with which kafka-python 3.0 was also seen to stop fetching an
    assigned partition; and reconnection within ~1 s of a restarted broker's return
    (`ledger.backoff.kafka_reconnect_options`)."""
    return {"enable_incremental_fetch_sessions": False, **kafka_reconnect_options()}


@dataclasses.dataclass
class BatchSizer:
    """How many records the next batch may take, so that writing it stays well inside the lease.

    `LEDGER_BATCH_MAX_EVENTS` is the ceiling. A batch that took longer than `target_s` to write
    (a loaded machine, a cold database after a restart) shrinks the next one in proportion;
    batches written in under half the target grow it back by a quarter at a time. Without this
    a 2,000-record batch on a loaded machine was seen to take 11.6 s, outlive the 10 s lease and
    hand its shards to a standby mid-write."""

    ceiling: int
    target_s: float
    limit: int = 0

    def __post_init__(self) -> None:
        self.limit = self.ceiling

    @classmethod
    def for_settings(cls, settings: Settings) -> BatchSizer:
        return cls(settings.batch_max_events, settings.lease_timeout_s / 4)

    def written(self, records: int, seconds: float) -> None:
        if records <= 0:
            return
        if seconds > self.target_s:
            self.limit = max(1, min(self.limit, int(records * self.target_s / seconds)))
        elif seconds < self.target_s / 2 and records >= self.limit:
            self.limit = min(self.ceiling, self.limit + max(1, self.limit // 4))


RETRY_FIRST_S = 0.5
RETRY_MAX_S = 2.0  # a database back from a restart is written to within ~2 s
LOSS_REPORT_S = 30.0
# While records wait for the batch being written: how often the poll looks whether it is done.
WRITER_CHECK_MS = 5
# Records one poll may hand over (into ShardConsumer.buffered): all that has arrived.
POLL_MAX_RECORDS = 100_000
# The consumer stops fetching the partitions it has records of once it holds this many
# batches' worth (`ShardConsumer._throttle`): one being taken, one filling.
BUFFERED_BATCHES = 2
# The first contact with Kafka gives up after this long and is tried again (so a stop during an
# outage at start-up is seen within ~2 s).
BOOTSTRAP_TIMEOUT_MS = 2000


class ShardConsumer:
    """The owned shards' partitions of every input topic, consumed by manual assignment from
    the offsets stored with the journal. Keeps, per partition, where the current fetch
    started, so that each batch tells the writer exactly which offsets it covers (offsets are
    not contiguous: transaction markers, aborted records and compaction leave holes).

    Fair shares: kafka-python hands a poll the buffered records of one partition before the
    next, so a batch filled straight from `poll` serves a backlog (after a takeover or an
    outage) a partition or two at a time while every other shard waits. Instead, what Kafka
    returns is kept per partition (`buffered`) and each batch takes an equal share from every
    partition that has records, so each shard is served in every batch. A partition that has a
    batch's worth buffered is paused (no more fetches for it) until the batches drained it."""

    def __init__(self, consumer: KafkaConsumer, writer: LedgerWriter, input_topics: list[str]):
        self.consumer = consumer
        self.writer = writer
        self.input_topics = input_topics
        self.starts: dict[TopicPartition, int] = {}
        self.buffered: dict[TopicPartition, deque] = {}
        self.lost: dict[TopicPartition, tuple[int, int]] = {}  # stored offset, log start
        self._reported = 0.0

    def assign(self, shards: set[int]) -> None:
        """Consume exactly `shards`, less those whose next record Kafka already deleted."""
        partitions = [TopicPartition(t, s) for t in self.input_topics for s in sorted(shards)]
        stored = self.writer.stored_offsets(self.input_topics)
        begin = self.consumer.beginning_offsets(partitions, timeout_ms=10_000) if partitions else {}
        lost = {
            tp: (stored.get((tp.topic, tp.partition), 0), begin[tp])
            for tp in partitions
            if stored.get((tp.topic, tp.partition), 0) < begin[tp]
        }
        if lost != self.lost:
            self.lost, self._reported = lost, 0.0
        self._report_lost()
        blocked = {tp.partition for tp in lost}
        partitions = [tp for tp in partitions if tp.partition not in blocked]
        if set(partitions) == set(self.consumer.assignment()):
            return
        if self.consumer.paused():
            self.consumer.resume(*self.consumer.paused())
        self.consumer.assign(partitions)
        self.starts, self.buffered = {}, {}
        for tp in partitions:
            offset = stored.get((tp.topic, tp.partition), 0)
            self.consumer.seek(tp, offset)
            self.starts[tp] = offset
        log.info(
            "partitions_assigned",
            shards=sorted(shards - blocked),
            stopped=sorted(blocked),
            partitions=len(partitions),
        )

    def _report_lost(self) -> None:
        """Name every lost range loudly, again every LOSS_REPORT_S while it stays lost."""
        if not self.lost or time.monotonic() - self._reported < LOSS_REPORT_S:
            return
        self._reported = time.monotonic()
        for tp, (stored, log_start) in sorted(self.lost.items()):
            log.error(
                "shard_stopped_data_lost",
                shard=tp.partition,
                topic=tp.topic,
                lost_from=stored,
                lost_to=log_start,
                fix=f"ledger offsets accept-loss --shard {tp.partition}",
                detail="Kafka deleted these offsets before the ledger journaled them",
            )

    def poll(
        self,
        settings: Settings,
        stop: threading.Event,
        limit: int | None = None,
        writing: Callable[[], bool] = lambda: True,
    ) -> tuple[list, Fetched]:
        """A batch of at most `limit` records (default LEDGER_BATCH_MAX_EVENTS; an equal share
        of each partition's buffered records) and the offsets fetched per partition to get it.

        Group commit: records wait for more to join their batch (up to LEDGER_BATCH_MAX_MS)
        only while `writing()`, i.e. while the previous batch is still being written; once
        the writer is free, whatever has arrived goes at once. A busy ledger still writes
        full batches (they fill during each write); a quiet one adds no batching delay to a
        suspension."""
        self._report_lost()
        limit = settings.batch_max_events if limit is None else limit
        deadline = time.monotonic() + settings.batch_max_ms / 1000
        # Always one poll, even with a batch's worth buffered: the client does its network
        # work (fetches, metadata after a leader moved, reconnects) only inside poll. Then
        # wait for more, up to the deadline, while less than a batch is buffered and either
        # nothing is or the writer is busy (checked every WRITER_CHECK_MS).
        timeout_ms = 0
        while not stop.is_set():
            # Straight into the buffer, and the batch taken in a frame of its own (`_take`):
            # kafka-python leaves some polls' frames, this one among them, in reference
            # cycles, which would keep whatever records this frame's locals held in memory
            # until the cyclic collector runs.
            self._buffer(self.consumer.poll(timeout_ms=timeout_ms, max_records=POLL_MAX_RECORDS))
            timeout_ms = int((deadline - time.monotonic()) * 1000)
            buffered = self._buffered_count()
            if timeout_ms <= 0 or buffered >= limit:
                break
            if buffered:
                if not writing():
                    break
                timeout_ms = min(timeout_ms, WRITER_CHECK_MS)
        return self._take(limit)

    def _buffer(self, polled: dict[TopicPartition, list]) -> None:
        for tp, records in polled.items():
            self.buffered.setdefault(tp, deque()).extend(records)

    def _take(self, limit: int) -> tuple[list, Fetched]:
        """The batch (`fair_shares` of the buffer) and the offsets fetched to get it."""
        batch, taken = fair_shares(self.buffered, limit)
        fetched: dict[tuple[str, int], tuple[int, int]] = {}
        for tp, start in self.starts.items():
            if self.buffered.get(tp):
                # Records of this partition are still buffered: the fetch (for this batch)
                # ends just after the last one taken.
                end = taken[tp] + 1 if tp in taken else start
            else:
                end = self.consumer.position(tp)
            if end is not None and end != start:
                fetched[(tp.topic, tp.partition)] = (start, end)
        self._throttle(limit)
        return batch, fetched

    def _buffered_count(self) -> int:
        return sum(len(records) for records in self.buffered.values())

    def _throttle(self, limit: int) -> None:
        """Once the buffer holds BUFFERED_BATCHES batches' worth, pause the partitions that
        have records in it; resume them once it holds less. A partition with nothing buffered
        keeps fetching (it would otherwise wait for the others to drain). What the consumer
        buffers is so bounded by the batch size (and one poll), not by the number of
        partitions: the rule before, a batch's worth per partition, let a worker on 3 topics
        of 64 partitions buffer 192 batches."""
        full: set[TopicPartition] = set()
        if self._buffered_count() >= BUFFERED_BATCHES * limit:
            full = {tp for tp, records in self.buffered.items() if records}
        paused = self.consumer.paused()
        if full - paused:
            self.consumer.pause(*(full - paused))
        if paused - full:
            self.consumer.resume(*(paused - full))

    def lag(self) -> dict[int, int]:
        """Per shard consumed: records in Kafka after the stored offset (the log end as of the
        last fetch response), summed over the input topics; shards whose log end is not known
        yet are left out."""
        lag: dict[int, int] = {}
        unknown: set[int] = set()
        for tp, stored in self.starts.items():
            end = self.consumer.highwater(tp)
            if end is None:
                unknown.add(tp.partition)
            else:
                lag[tp.partition] = lag.get(tp.partition, 0) + max(0, end - stored)
        return {shard: n for shard, n in lag.items() if shard not in unknown}

    def committed(self, fetched: Fetched) -> None:
        """The writer stored `fetched`: the next batch starts where it ended."""
        for (topic, partition), (_, end) in fetched.items():
            self.starts[TopicPartition(topic, partition)] = end

    def rewind(self) -> None:
        """Back to the stored offsets (after a failed batch or a refused fetch)."""
        stored = self.writer.stored_offsets(self.input_topics)
        self.buffered = {}
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)
        for tp in list(self.starts):
            offset = stored.get((tp.topic, tp.partition), 0)
            self.consumer.seek(tp, offset)
            self.starts[tp] = offset


def fair_shares(
    buffered: dict[TopicPartition, deque], limit: int
) -> tuple[list, dict[TopicPartition, int]]:
    """Up to `limit` records taken from the front of each partition's queue in equal shares
    (a partition with fewer leaves its share to the others); the records, and the offset of
    the last record taken per partition."""
    batch: list = []
    taken: dict[TopicPartition, int] = {}
    while len(batch) < limit:
        ready = [tp for tp, records in buffered.items() if records]
        if not ready:
            break
        share = max(1, (limit - len(batch)) // len(ready))
        for tp in ready:
            records = buffered[tp]
            n = min(share, len(records), limit - len(batch))
            batch.extend(records.popleft() for _ in range(n))
            taken[tp] = batch[-1].offset
            if len(batch) >= limit:
                break
    return batch, taken


def run_ledger_consumer(
    settings: Settings,
    bootstrap: str,
    dsn: str,
    stop: threading.Event,
    *,
    on_batch: Callable[[int], None] | None = None,
    consumer_options: dict[str, Any] | None = None,
) -> None:
    """Consume the owned shards until `stop` is set; then finish the batch in hand and
    commit it. Errors of the infrastructure (PostgreSQL or Kafka down or restarting) are
    retried with capped exponential backoff, one log line per attempt; a batch is never
    skipped: after any failure, consumption resumes from the offsets stored with the journal.
    `consumer_options` (kafka-python keywords) override the consumer's."""
    consumer = _kafka_consumer(
        stop,
        bootstrap_servers=bootstrap,
        group_id=None,
        client_id=f"ledger-{settings.consumer_group}",
        enable_auto_commit=False,
        # Offsets come from the journal. Offsets Kafka deleted before the ledger read them are
        # never skipped silently: the shard stops (ShardConsumer.lost) until an operator
        # accepts the loss.
        auto_offset_reset="none",
        # Producers may use transactions: aborted records are never journaled.
        isolation_level="read_committed",
        max_poll_records=settings.batch_max_events,
        fetch_max_wait_ms=min(settings.batch_max_ms, 500),
        # Small fetches per partition: what one partition's backlog puts in memory at a time
        # (ShardConsumer takes each batch in fair shares from every partition anyway).
        max_partition_fetch_bytes=256 * 1024,
        **kafka_consumer_options(settings)
        | {"bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS}
        | client_options(settings)
        | (consumer_options or {}),
    )
    if consumer is None:
        return  # stopped before any broker answered
    conn: psycopg.Connection | None = None
    try:  # a failure here (no chain key, topics missing) leaves no client running
        fold = LedgerFold(PriceBook.load(settings.price_book), Policy.load(settings.policy))
        keys = chain_keys.load(settings)
        input_topics = topics.input_topics(settings)
        shard_count = _shard_count(consumer, input_topics, stop)
        wanted = settings.shards if settings.shards is not None else list(range(shard_count))
        if any(shard >= shard_count for shard in wanted):
            raise StackError(
                f"LEDGER_SHARDS={wanted}: the input topics have {shard_count} partitions"
            )
        conn = _writer_connection(dsn, settings)
    except BaseException:
        consumer.close(autocommit=False)
        if conn is not None:
            conn.close()
        raise
    writer = LedgerWriter(
        conn,
        fold,
        keys=keys,
        group_id=settings.consumer_group,
        deadletter_topic=settings.topic(topics.DEADLETTER),
        deadletter_max_bytes=settings.deadletter_max_bytes,
    )
    leases = ShardLeases(dsn, settings.consumer_group, wanted, settings.lease_timeout_s)
    writer.fence = leases.fence
    shards = ShardConsumer(consumer, writer, input_topics)
    sizer = BatchSizer.for_settings(settings)
    # A worker that hears from no broker lets its leases run out, so that a standby that can
    # reach Kafka takes the shards (poll() returns nothing, not an error, when cut off).
    contact = KafkaContact("ledger")
    owned: set[int] = set()
    next_refresh = 0.0  # when the leases are next refreshed and the assignment checked
    renewed = 0.0  # when the leases were last renewed
    failures = 0

    def report_shards() -> None:  # for the lag gauge and /readyz
        stopped = {tp.partition for tp in shards.lost}
        lag = {shard: n for shard, n in shards.lag().items() if shard in owned}
        metrics.CONSUMERS.report(leases.holder, wanted, owned, stopped, lag)

    # Overlap: one batch is written (in a thread of its own) while the next is polled and
    # prepared here; psycopg releases the GIL while PostgreSQL works. Everything else that
    # uses the writer's connection (assign, rewind) waits for the write first.
    pending: tuple[Future[tuple[BatchResult, float]], int] | None = None

    def finish_pending() -> None:
        """Wait for the batch being written; raises what its write raised."""
        nonlocal pending
        if pending is None:
            return
        future, records = pending
        pending = None
        result, took = future.result()
        metrics.batch_written(result, records, took)
        sizer.written(records, took)
        if on_batch is not None and records:
            on_batch(records)

    def timed_write(batch: list, **options: Any) -> tuple[BatchResult, float]:
        """The batch written, and the seconds its write took (for the metrics and the sizer)."""
        started = time.perf_counter()
        result = writer.write_batch(batch, **options)
        return result, time.perf_counter() - started

    log.info("ledger_consumer_started", group=settings.consumer_group, shards=wanted)
    try:
        while not stop.is_set():
            try:
                if failures or time.monotonic() >= next_refresh or not owned:
                    finish_pending()
                if failures:
                    if writer.conn.closed or writer.conn.broken:
                        writer.conn = _writer_connection(dsn, settings)
                    shards.rewind()
                if time.monotonic() >= next_refresh:
                    held = leases.refresh(renew=contact.hears(consumer))
                    renewed = time.monotonic()
                    if held != owned or shards.lost:
                        shards.assign(held)  # may fail (database down): then retried
                        owned = held
                    next_refresh = time.monotonic() + LEASE_REFRESH_S
                if not owned:
                    failures = 0
                    report_shards()
                    stop.wait(LEASE_REFRESH_S)
                    continue
                batch, fetched = shards.poll(
                    settings, stop, sizer.limit, writing=lambda busy=pending: not _done(busy)
                )
                if time.monotonic() - renewed >= LEASE_REFRESH_S:
                    # A slow poll (a backlog to fetch, a busy machine): renew before the write
                    # too, so that the lease does not run out while the batch is written.
                    renewed = time.monotonic()
                    if leases.refresh(renew=contact.hears(consumer)) != owned:
                        next_refresh = 0.0  # reassigned at the top of the loop
                # Decoded while the previous batch is written; then that write must have
                # succeeded before this batch goes (if it failed, this one is dropped and
                # the loop rewinds to the stored offsets).
                prepared = writer.prepare(batch) if pending is not None else None
                finish_pending()
                if batch or fetched:
                    future = in_thread(timed_write, batch, fetched=fetched, prepared=prepared)
                    pending = (future, len(batch))
                    # The next poll's ranges start where this batch ends. Should its write
                    # fail, the loop rewinds to the stored offsets first (and the writer
                    # refuses any fetch that would skip or repeat records anyway).
                    shards.committed(fetched)
                report_shards()
                if failures:
                    log.info("ledger_consumer_recovered", after_attempts=failures)
                failures = 0
            except LeaseLostError as exc:  # another worker holds a shard now: give it up
                log.warning("shard_lease_fenced", reason=one_line(exc))
                owned, next_refresh, failures = set(), 0.0, max(failures, 1)
            except OffsetGapError as exc:  # a fetch that does not start at the stored offset
                log.warning("offsets_resynced", reason=one_line(exc))
                failures = max(failures, 1)
            except KafkaOffsetOutOfRange as exc:  # Kafka deleted what we were about to read
                log.error("offsets_out_of_range", error=one_line(exc))
                owned, next_refresh, failures = set(), 0.0, 0
            except Exception as exc:
                failures += 1
                delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (failures - 1))
                log.warning(
                    "ledger_batch_retry",
                    error=f"{type(exc).__name__}: {one_line(exc)}"[:500],
                    attempt=failures,
                    retry_in_s=delay,
                )
                stop.wait(delay)
    finally:
        try:  # the batch in hand is committed before the consumer stops
            finish_pending()
        except Exception as exc:
            log.warning("ledger_batch_not_written", error=f"{type(exc).__name__}: {one_line(exc)}")
        metrics.CONSUMERS.gone(leases.holder)
        consumer.close(autocommit=False)
        leases.close()
        writer.conn.close()
        log.info("ledger_consumer_stopped")


def _kafka_consumer(stop: threading.Event, **options: Any) -> KafkaConsumer | None:
    """The consumer, once a broker answers its bootstrap; None if `stop` came first. Until
    then one `dependency_down` line every few seconds, as for PostgreSQL, instead of the role
    crashing at each attempt (and the supervisor logging `role_crashed`) while Kafka is away
    at start-up."""
    outage = Outage("ledger", "kafka")
    while not stop.is_set():
        try:
            consumer = KafkaConsumer(**options)
        except (KafkaTimeoutError, KafkaConnectionError) as exc:
            stop.wait(outage.failed(exc))
            continue
        outage.ok()
        return consumer
    return None


def _done(pending: tuple[Future, int] | None) -> bool:
    return pending is None or pending[0].done()


def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """`fn(*args, **kwargs)` in a new daemon thread (a write stuck on a dead connection does
    not hold the process up at exit, as an executor's thread would); its future."""
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="ledger-writer", daemon=True).start()
    return future


def _writer_connection(dsn: str, settings: Settings) -> psycopg.Connection:
    """The batch writer's connection. A batch transaction left idle longer than the lease
    timeout (its process frozen) is aborted by the server, so its row locks cannot hold a
    standby up after the standby took the shard over."""
    return db.connect(dsn, idle_in_transaction_timeout_s=settings.lease_timeout_s)


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
