"""`ledger status`: where the pipeline stands, per shard and overall.

Per shard: the consumer lag (Kafka's log end − the offset stored with the journal, summed over
the input topics, read_committed), the projection lag (journal entries not applied yet), the
last PeriodTick journaled, and the worker holding the shard's lease (from `shard_leases`).
Overall: the outbox backlog (unpublished, not parked), the age of its oldest row, the parked
rows, and the open rejects by reason. Read-only; Kafka is asked only for the log ends (when it
does not answer, the lags are unknown and the rest is still reported).
"""

from __future__ import annotations

from datetime import datetime

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from ledger import db, topics
from ledger.db import QUERIES
from ledger.settings import Settings

KAFKA_TIMEOUT_MS = 10_000


def log_ends(settings: Settings, bootstrap: str) -> dict[tuple[str, int], int]:
    """{(topic, partition): log end} of every input topic partition (read_committed: the last
    stable offset, so an open transaction is not counted as lag)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        client_id="ledger-status",
        enable_auto_commit=False,
        isolation_level="read_committed",
        enable_incremental_fetch_sessions=False,
        request_timeout_ms=KAFKA_TIMEOUT_MS,
        bootstrap_timeout_ms=KAFKA_TIMEOUT_MS,
    )
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in topics.input_topics(settings)
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        ends = consumer.end_offsets(partitions, timeout_ms=KAFKA_TIMEOUT_MS) if partitions else {}
    finally:
        consumer.close(autocommit=False)
    return {(tp.topic, tp.partition): end for tp, end in ends.items()}


def overview(
    settings: Settings, bootstrap: str | None, dsn: str, *, kafka_unknown: str | None = None
) -> dict:
    """Everything `ledger status` prints, as data (JSON-ready). Without `bootstrap` (no Kafka
    known: `kafka_unknown` says why) the lags are unknown."""
    kafka_error = kafka_unknown
    ends = None
    if bootstrap is not None:
        try:
            ends = log_ends(settings, bootstrap)
        except KafkaError as exc:
            name, text = type(exc).__name__, " ".join(str(exc).split())
            kafka_error = text if text.startswith(name) else f"{name}: {text}"
    with db.connect(dsn, autocommit=True) as conn:
        stored = {
            (t, p): o
            for t, p, o in conn.execute(
                QUERIES["stored_offsets"],
                {"group_id": settings.consumer_group, "topics": topics.input_topics(settings)},
            )
        }
        progress = {
            shard: (lag, tick)
            for shard, lag, tick in conn.execute(QUERIES["shard_progress"], ("account_status",))
        }
        leases = {
            shard: (holder, expires, live)
            for shard, holder, expires, live in conn.execute(
                QUERIES["shard_lease_holders"], (settings.consumer_group,)
            )
        }
        backlog, oldest_s, parked = conn.execute(QUERIES["outbox_backlog"]).fetchone()
        rejects = dict(conn.execute(QUERIES["open_rejects_by_reason"]).fetchall())
    known = {p for _, p in ends or ()} | {p for _, p in stored} | set(progress) | set(leases)
    shards = []
    for shard in sorted(known):
        lag = None
        if ends is not None:
            lag = sum(
                max(0, end - stored.get((topic, partition), 0))
                for (topic, partition), end in ends.items()
                if partition == shard
            )
        projection_lag, tick = progress.get(shard, (0, None))  # nothing journaled there yet
        holder, expires, live = leases.get(shard, (None, None, False))
        shards.append(
            {
                "shard": shard,
                "lag": lag,
                "projection_lag": projection_lag,
                "last_tick_at": _iso(tick),
                "holder": holder,
                "lease_expires_at": _iso(expires),
                "lease_live": bool(live),
            }
        )
    return {
        "consumer_group": settings.consumer_group,
        "shards": shards,
        "outbox": {"backlog": backlog, "oldest_age_s": round(oldest_s, 3), "parked": parked},
        "rejects_open": rejects,
        "kafka_error": kafka_error,
    }


def overview_lines(report: dict) -> list[str]:
    """The report as a table and a few lines."""
    lines = [
        f"consumer group {report['consumer_group']}",
        f"{'shard':>5}  {'lag':>10}  {'projection':>10}  {'last tick':<25}  holder (lease)",
    ]
    for row in report["shards"]:
        if row["holder"] is None:
            holder = "nobody"
        else:
            state = "live" if row["lease_live"] else "EXPIRED"
            holder = f"{row['holder']} ({state} until {row['lease_expires_at']})"
        lines.append(
            f"{row['shard']:>5}  {_count(row['lag']):>10}  {_count(row['projection_lag']):>10}  "
            f"{row['last_tick_at'] or '-':<25}  {holder}"
        )
    if not report["shards"] and report["kafka_error"]:
        lines.append("  (no shard known to the database, and Kafka did not answer)")
    elif not report["shards"]:
        lines.append("  (no shards yet: `ledger topics create`, then start a worker)")
    outbox = report["outbox"]
    lines.append(
        f"outbox: {outbox['backlog']} unpublished (oldest {outbox['oldest_age_s']:.1f} s), "
        f"{outbox['parked']} parked"
    )
    rejects = report["rejects_open"]
    detail = ", ".join(f"{reason} {count}" for reason, count in sorted(rejects.items()))
    lines.append(f"rejects open: {sum(rejects.values())}" + (f" ({detail})" if detail else ""))
    if report["kafka_error"]:
        lines.append(f"lag unknown: Kafka did not answer ({report['kafka_error']})")
    return lines


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")
