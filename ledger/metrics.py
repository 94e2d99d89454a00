"""Every Prometheus metric the ledger exports, in one place.

Two kinds:

- **Process metrics**, counted where the work happens, at the I/O edge (the consumer after the
  journal writer's result, the projection worker's step, the relay's publish, the scheduler's
  tick); never inside the pure folds. They live in `REGISTRY`, one per process, so a process
  running several roles exports each role's metrics once.
- **Database gauges** (`DatabaseCollector`): the outbox backlog, parked rows, suspended
  accounts, projection lag, open rejects, read with a few cheap queries at scrape time. They
  describe the whole deployment, so every worker process exports the same values (aggregate
  them with `max`).

The ledger consumer also records, per process, which shards it holds and their lag
(`ConsumerShards`): the `ledger_consumer_lag_records` gauge and `/readyz` read it.

`ledger.health` serves `REGISTRY` and a `DatabaseCollector` on `LEDGER_METRICS_PORT`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping

import psycopg
import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ledger import db
from ledger.db import QUERIES
from ledger.errors import LedgerError

log = structlog.get_logger(__name__)

REGISTRY = CollectorRegistry()
for _standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_standard)  # process_*, python_info, python_gc_*

# --- the ledger consumer (ledger/consumer.py) ------------------------------------------------

EVENTS_JOURNALED = Counter(
    "ledger_events_journaled",
    "Journal entries written, by event type (entries the ledger derives itself included: "
    "GrantExpired, ConfigPublished, UsageRerated)",
    ["event_type"],
    registry=REGISTRY,
)
EVENTS_DUPLICATE = Counter(
    "ledger_events_duplicate",
    "Records whose event_id was already journaled with the same content (dropped)",
    registry=REGISTRY,
)
EVENTS_REJECTED = Counter(
    "ledger_events_rejected",
    "Records quarantined in rejected_events, by reason",
    ["reason"],
    registry=REGISTRY,
)
RECORDS_STALE = Counter(
    "ledger_records_stale",
    "Records below the stored offset (already journaled, e.g. by a previous shard holder)",
    registry=REGISTRY,
)
BATCH_RECORDS = Histogram(
    "ledger_journal_batch_records",
    "Records per journal batch transaction",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
    registry=REGISTRY,
)
COMMIT_SECONDS = Histogram(
    "ledger_journal_commit_seconds",
    "Time to write and commit one journal batch transaction",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "ledger_consumer_lag_records",
    "Per shard this process holds: records in Kafka after the offset stored with the journal "
    "(log end - stored offset), summed over the input topics",
    ["shard"],
    registry=REGISTRY,
)
SHARDS_HELD = Gauge(
    "ledger_consumer_shards_held",
    "Shards whose lease this process's ledger consumer holds",
    registry=REGISTRY,
)

KAFKA_SILENT = Gauge(
    "ledger_kafka_silent_seconds",
    "Seconds since a Kafka broker last answered this role's client (its metadata refresh, "
    "every 5 s); past 10 s the ledger lets its shard leases run out and the relay gives its "
    "lock up (ledger.backoff.KafkaContact)",
    ["role"],
    registry=REGISTRY,
)

# --- the projection worker (projections/worker.py) -------------------------------------------

PROJECTION_ENTRIES = Counter(
    "ledger_projection_entries_applied",
    "Journal entries the projection worker applied",
    registry=REGISTRY,
)

# --- the relay (ledger/relay.py) -------------------------------------------------------------

RELAY_PUBLISH_SECONDS = Histogram(
    "ledger_relay_publish_seconds",
    "From sending a batch of outbox rows to Kafka's answer for the last of them",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
OUTBOX_PUBLISHED = Counter(
    "ledger_outbox_published",
    "Outbox rows Kafka acknowledged and the relay marked published, by topic",
    ["topic"],
    registry=REGISTRY,
)
OUTBOX_PARKED = Counter(
    "ledger_outbox_parked",
    "Outbox rows the relay parked because Kafka refused them for good, by reason",
    ["reason"],
    registry=REGISTRY,
)

# --- the scheduler (ledger/scheduler.py) -----------------------------------------------------

LAST_TICK = Gauge(
    "ledger_scheduler_last_tick_timestamp_seconds",
    "tick_at of the last PeriodTick Kafka acknowledged on every partition (Unix time)",
    registry=REGISTRY,
)


def batch_written(result, records: int, seconds: float) -> None:
    """The consumer committed a batch of `records` records in `seconds`: count what the
    journal writer says it did (`ledger.journal.BatchResult`)."""
    BATCH_RECORDS.observe(records)
    COMMIT_SECONDS.observe(seconds)
    for event_type, count in result.journaled_by_type.items():
        EVENTS_JOURNALED.labels(event_type).inc(count)
    for reason, count in result.rejected_by_reason.items():
        EVENTS_REJECTED.labels(reason).inc(count)
    if result.duplicates:
        EVENTS_DUPLICATE.inc(result.duplicates)
    if result.stale:
        RECORDS_STALE.inc(result.stale)


# --- which shards this process's ledger consumer holds ---------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardsView:
    """One ledger consumer's shards, as it last saw them."""

    wanted: tuple[int, ...]
    held: frozenset[int]
    stopped: frozenset[int]  # held, but Kafka deleted offsets not yet journaled
    lag: Mapping[int, int]  # per held shard with a known log end
    at: float  # time.monotonic() of the report


class ConsumerShards:
    """The ledger consumers of this process (normally one) and their shards, by lease holder.
    Sets the lag and shards-held gauges; `/readyz` reads `views()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: dict[str, ShardsView] = {}

    def report(
        self,
        holder: str,
        wanted: list[int],
        held: set[int],
        stopped: set[int],
        lag: Mapping[int, int],
    ) -> None:
        view = ShardsView(
            tuple(wanted), frozenset(held), frozenset(stopped), dict(lag), time.monotonic()
        )
        with self._lock:
            before = self._views.get(holder)
            self._views[holder] = view
            self._publish(before, view)

    def gone(self, holder: str) -> None:
        """The consumer stopped: its shards are no longer this process's."""
        with self._lock:
            before = self._views.pop(holder, None)
            self._publish(before, None)

    def views(self) -> list[ShardsView]:
        with self._lock:
            return list(self._views.values())

    def _publish(self, before: ShardsView | None, after: ShardsView | None) -> None:
        shown = set(after.lag) if after else set()
        for shard in set(before.lag if before else ()) - shown:
            with contextlib.suppress(KeyError):  # another consumer of this process removed it
                CONSUMER_LAG.remove(str(shard))
        for shard, lag in (after.lag if after else {}).items():
            CONSUMER_LAG.labels(str(shard)).set(lag)
        SHARDS_HELD.set(sum(len(v.held) for v in self._views.values()))


CONSUMERS = ConsumerShards()


# --- gauges read from the database at scrape time --------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatabaseReadings:
    outbox_backlog: int
    outbox_oldest_age_s: float
    outbox_parked: int
    suspended_by_reason: dict[str, int]
    projection_lag: dict[int, int]
    last_tick_at: dict[int, float]  # Unix time, shards that journaled a tick
    open_rejects: dict[str, int]


def read_database(conn: psycopg.Connection, projection: str = "account_status") -> DatabaseReadings:
    """The deployment-wide figures, in one short read-only snapshot."""
    with conn.transaction():
        conn.execute(QUERIES["set_repeatable_read"])
        backlog, oldest, parked = conn.execute(QUERIES["outbox_backlog"]).fetchone()
        suspended = dict(conn.execute(QUERIES["suspended_by_reason"]).fetchall())
        shards = conn.execute(QUERIES["shard_progress"], (projection,)).fetchall()
        rejects = dict(conn.execute(QUERIES["open_rejects_by_reason"]).fetchall())
    return DatabaseReadings(
        outbox_backlog=backlog,
        outbox_oldest_age_s=float(oldest),
        outbox_parked=parked,
        suspended_by_reason=suspended,
        projection_lag={shard: lag for shard, lag, _ in shards},
        last_tick_at={shard: tick.timestamp() for shard, _, tick in shards if tick is not None},
        open_rejects=rejects,
    )


class DatabaseCollector(Collector):
    """Reads `read_database` at each scrape over one connection of its own (made again when it
    breaks; connecting and every query give up after `timeout_s`). While PostgreSQL does not
    answer, only `ledger_database_up 0` is exported."""

    def __init__(self, dsn: str, timeout_s: int = 2):
        self.dsn = dsn
        self.timeout_s = timeout_s
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ledger_database_up", "1 if PostgreSQL answered this scrape's queries, else 0"
        )
        try:
            with self._lock:
                readings = self._read()
        except (psycopg.Error, LedgerError) as exc:
            log.debug("metrics_database_unavailable", error=" ".join(str(exc).split())[:200])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _database_metrics(readings)

    def _read(self) -> DatabaseReadings:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = db.connect(self.dsn, autocommit=True, timeout_s=self.timeout_s)
        try:
            return read_database(self._conn)
        except psycopg.Error:
            self._conn.close()
            self._conn = None
            raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _database_metrics(r: DatabaseReadings) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "ledger_outbox_backlog_rows",
        "Outbox rows not yet published and not parked (rows waiting behind a parked row of "
        "their key included)",
        value=r.outbox_backlog,
    )
    yield GaugeMetricFamily(
        "ledger_outbox_oldest_unpublished_age_seconds",
        "Age of the oldest outbox row not yet published and not parked (0 when none)",
        value=r.outbox_oldest_age_s,
    )
    yield GaugeMetricFamily(
        "ledger_outbox_parked_rows",
        "Outbox rows parked (Kafka refused them for good)",
        value=r.outbox_parked,
    )
    yield _labelled(
        "ledger_accounts_suspended",
        "Suspended accounts by reason (an account with two reasons counts under both)",
        "reason",
        r.suspended_by_reason,
    )
    yield _labelled(
        "ledger_projection_lag_entries",
        "Per shard: journal entries the account-status projection has not applied yet",
        "shard",
        r.projection_lag,
    )
    yield _labelled(
        "ledger_shard_last_tick_timestamp_seconds",
        "Per shard: tick_at of the last PeriodTick journaled there (Unix time)",
        "shard",
        r.last_tick_at,
    )
    yield _labelled(
        "ledger_rejects_open",
        "Rejected events not yet resolved, by reason",
        "reason",
        r.open_rejects,
    )


def _labelled(name: str, documentation: str, label: str, values: Mapping) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], value)
    return family
