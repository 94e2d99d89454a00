"""Read what the ledger ended with, for the checker: PostgreSQL (raw events, rejects, postings,
live status versions, commit times), Kafka (the status and dead-letter topics, read from the
start), `ledger verify` and `ledger offsets audit`."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from decimal import Decimal

import structlog
from kafka import KafkaConsumer, TopicPartition

from ledger import chain_keys, db, topics
from ledger.chaos.checker import Observed, Reject, StatusEvent
from ledger.chaos.model import Totals
from ledger.checkpoints import read_topic as read_checkpoints
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.errors import DecodeError
from ledger.kafka_auth import client_options
from ledger.offsets import audit as offsets_audit
from ledger.settings import Settings
from ledger.verify import verify
from projections.rebuild import rebuild

log = structlog.get_logger(__name__)

STATUS_TYPES = ("AccountSuspended", "AccountReinstated")


def observe(settings: Settings, bootstrap: str, dsn: str) -> Observed:
    with db.connect(dsn) as conn:
        journaled = dict(conn.execute(QUERIES["chaos_journaled"]).fetchall())
        twice = dict(conn.execute(QUERIES["chaos_journaled_twice"]).fetchall())
        rejects = [
            Reject(topic, partition, offset, event_id, reason, bytes(sha))
            for topic, partition, offset, event_id, reason, sha in conn.execute(
                QUERIES["chaos_rejects"]
            )
        ]
        totals: dict[str, Totals] = defaultdict(Totals)
        for account, ledger_account, amount in conn.execute(QUERIES["chaos_totals"]):
            t = totals[account]
            if ledger_account == "revenue:usage":
                t.usage -= Decimal(amount)
            elif ledger_account == "cash":
                t.purchases += Decimal(amount)
            else:
                t.grants += Decimal(amount)
        versions = dict(conn.execute(QUERIES["chaos_status_versions"]).fetchall())
        recorded = status_by_account(
            bytes(value)
            for (value,) in conn.execute(
                QUERIES["chaos_status_recorded"],
                (settings.topic(topics.STATUS),),
            )
        )
    # The chains checked against every checkpoint the relays published through the faults.
    keys = chain_keys.load(settings)
    checkpoints, forged = read_checkpoints(settings, bootstrap, keys)
    differences = [("checkpoint", "unreadable", problem) for problem in forged]
    differences += [
        (d.check, d.subject, d.detail)
        for d in verify(settings, dsn, keys=keys, checkpoints=checkpoints)
    ]
    differences += rebuild_differences(settings, dsn)
    # Every record below the stored offsets accounted for by the audit an operator runs.
    differences += [
        ("offsets audit", f"{a.topic}[{a.partition}] offsets {u.first}..{u.last}", u.why)
        for a in offsets_audit(settings, bootstrap, dsn)
        for u in a.unaccounted
    ]
    return Observed(
        journaled=journaled,
        journaled_twice=twice,
        rejects=rejects,
        totals={a: t for a, t in totals.items()},
        deadletter=deadletter_refs(settings, bootstrap),
        status=status_events(settings, bootstrap),
        status_versions=versions,
        status_recorded=recorded,
        verify=differences,
    )


def rebuild_differences(settings: Settings, dsn: str) -> list[tuple[str, str, str]]:
    """`ledger projections rebuild` (the real one: fold from scratch, swap in) must leave every
    account's status row exactly as the live projection had it."""
    query = QUERIES["chaos_status_rows"]
    with db.connect(dsn) as conn:
        before = dict(conn.execute(query).fetchall())
    rebuild(settings, dsn)
    with db.connect(dsn) as conn:
        after = dict(conn.execute(query).fetchall())
    out = []
    for account in sorted(set(before) | set(after)):
        if before.get(account) != after.get(account):
            out.append(
                (
                    "rebuild",
                    account,
                    f"live {before.get(account)} != rebuilt {after.get(account)}",
                )
            )
    return out


def commit_times(dsn: str) -> dict[int, list[float]]:
    """Per shard, the wall-clock times its records were journaled or quarantined, sorted."""
    out: dict[int, list[float]] = defaultdict(list)
    with db.connect(dsn) as conn:
        for shard, at in conn.execute(QUERIES["chaos_commit_times"]):
            out[shard].append(at)
    for times in out.values():
        times.sort()
    return out


def max_stalls(
    times: dict[int, list[float]], shards: set[int], start: float, end: float
) -> dict[int, float]:
    """Per shard that had traffic, the longest time without a commit within [start, end], the
    traffic (the workers had every shard before it started, and it flows to every shard until
    it ends, so a healthy shard's first and last gaps are short too)."""
    out = {}
    for shard in sorted(shards | set(times)):
        inside = [t for t in times.get(shard, []) if start <= t <= end]
        points = [start, *inside, end]
        out[shard] = max(b - a for a, b in itertools.pairwise(points))
    return out


def shards_with_traffic(settings: Settings, bootstrap: str) -> set[int]:
    """The partitions of the input topics that hold any record."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, **client_options(settings))
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in topics.input_topics(settings)
            for p in consumer.partitions_for_topic(topic) or ()
        ]
        return {tp.partition for tp, end in consumer.end_offsets(partitions).items() if end > 0}
    finally:
        consumer.close()


def recovery(times: dict[int, list[float]], at: float) -> tuple[float | None, list[int]]:
    """After a fault injected at `at`: seconds until every shard that committed again did so
    (None if none did), and the shards that never committed again (stuck, or simply drained
    before the fault)."""
    worst: float | None = None
    never = []
    for shard, ts in sorted(times.items()):
        later = next((t for t in ts if t > at), None)
        if later is None:
            never.append(shard)
        else:
            worst = max(worst or 0.0, later - at)
    return worst, never


def read_topic(settings: Settings, bootstrap: str, topic: str, timeout_s: float = 120.0):
    """Every record of `topic`, partition by partition in offset order."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        enable_incremental_fetch_sessions=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        **client_options(settings),
    )
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end in {timeout_s:.0f}s")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def deadletter_refs(settings: Settings, bootstrap: str) -> set[tuple[str, int, int]]:
    out = set()
    for record in read_topic(settings, bootstrap, settings.topic(topics.DEADLETTER)):
        headers = {k: v for k, v in record.headers or ()}
        try:
            out.add(
                (
                    headers["dlq_topic"].decode(),
                    int(headers["dlq_partition"].decode()),
                    int(headers["dlq_offset"].decode()),
                )
            )
        except (KeyError, ValueError, AttributeError):
            log.warning("chaos.deadletter_without_origin", offset=record.offset)
    return out


def status_events(settings: Settings, bootstrap: str) -> dict[str, list[StatusEvent]]:
    """What a gateway sees: the status topic read from the start."""
    records = read_topic(settings, bootstrap, settings.topic(topics.STATUS))
    return status_by_account(record.value for record in records)


def status_by_account(values) -> dict[str, list[StatusEvent]]:
    """Suspensions and reinstatements per account, in the given order."""
    codec = Codec.default()
    out: dict[str, list[StatusEvent]] = defaultdict(list)
    for value in values:
        try:
            decoded = codec.decode(value)
        except DecodeError:
            continue
        if decoded.event_type not in STATUS_TYPES:
            continue
        event = decoded.event
        out[event["account_id"]].append(
            StatusEvent(
                event["status_version"], decoded.event_type, tuple(event.get("reasons") or ())
            )
        )
    return dict(out)
