"""Stored Kafka offsets against what Kafka still holds: finding and accepting lost ranges,
and auditing that every record below them left its trace in the journal.

The ledger never moves past offsets that Kafka deleted before they were journaled (retention
ran out while the ledger was down, a topic was recreated): that shard stops and logs
`shard_stopped_data_lost`. `ledger offsets accept-loss --shard N` is the operator's decision
to go on: it records each lost range in `accepted_offset_losses` (with a note) and moves the
stored offset to Kafka's log start, in one transaction. The events in that range are gone
from Kafka; if they exist elsewhere, produce them again and they are journaled as usual.

`ledger offsets audit` reads every input partition from Kafka's log start up to the ledger's
stored offset (`read_committed`, as the ledger reads) and accounts for each record: journaled
from it, a redelivery of an event journaled from another record (same event_id, same content
hash), or quarantined at its offset (a reject row, or the trace `ledger prune` keeps of one).
Anything else was skipped: a stored offset moved forward by hand, or a bug. It names those
records' offset ranges and exits 1; the journal itself is not touched.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from kafka import KafkaConsumer, TopicPartition

from ledger import db, topics
from ledger.book import canonical_json, content_hash
from ledger.codec import Codec
from ledger.consumer import kafka_consumer_options
from ledger.db import QUERIES
from ledger.errors import DecodeError, LedgerError
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
        partitions = _input_partitions(consumer, names, shards)
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


def _input_partitions(
    consumer: KafkaConsumer, names: list[str], shards: list[int] | None
) -> list[TopicPartition]:
    """The partitions of the input topics `names` (of `shards`, or all), in order."""
    return [
        TopicPartition(name, p)
        for name in names
        for p in sorted(consumer.partitions_for_topic(name) or ())
        if shards is None or p in shards
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


@dataclasses.dataclass
class Unaccounted:
    """Records next to each other in a partition (offsets `first`..`last`, `records` of them)
    that left no trace in the journal; `why` is said of the first."""

    first: int
    last: int
    records: int
    why: str


@dataclasses.dataclass
class PartitionAudit:
    """One input partition's records from Kafka's log start (`first`) up to the ledger's
    stored next offset (`stored`, exclusive), by what became of each."""

    topic: str
    partition: int
    first: int
    stored: int
    end: int  # Kafka's end offset: `stored`..`end` - 1 are not read by the ledger yet
    journaled: int = 0  # journaled from this record
    redelivered: int = 0  # the same event journaled from another record
    quarantined: int = 0  # a reject row at this offset (open or resolved)
    pruned: int = 0  # quarantined, resolved, and its row deleted by retention
    unaccounted: list[Unaccounted] = dataclasses.field(default_factory=list)
    # Whether the last record counted was unaccounted: a run of them goes on across chunks.
    last_missed: bool = dataclasses.field(default=False, repr=False, compare=False)

    @property
    def records(self) -> int:
        return self.journaled + self.redelivered + self.quarantined + self.pruned + self.missing

    @property
    def missing(self) -> int:
        return sum(u.records for u in self.unaccounted)

    def _count(self, offset: int, why: str | None) -> None:
        """Record at `offset` counted elsewhere (None) or unaccounted (why)."""
        if why is not None:
            if self.last_missed:
                run = self.unaccounted[-1]
                run.last, run.records = offset, run.records + 1
            else:
                self.unaccounted.append(Unaccounted(offset, offset, 1, why))
        self.last_missed = why is not None


# A record as the audit reads it: (offset, value); value None for a tombstone.
AuditRecord = tuple[int, bytes | None]
Journaled = Callable[[list[str]], dict[str, tuple[bytes, str, int, int]]]


def account_for(
    audit: PartitionAudit,
    records: Sequence[AuditRecord],
    quarantined: dict[int, bool],
    journaled: Journaled,
    codec: Codec,
) -> None:
    """Count what became of each of `records` (in offset order) into `audit`. `quarantined`
    maps the offsets with a reject to whether retention pruned it; `journaled(event_ids)` says,
    for those journaled, (content hash, topic, partition, offset) of the record they came
    from. The pure part of the audit: no I/O of its own."""
    decoded: dict[int, tuple[str, bytes] | str] = {}  # offset -> (event_id, digest) or why not
    for offset, value in records:
        if offset in quarantined:
            continue
        if value is None:
            decoded[offset] = "a tombstone"
            continue
        try:
            d = codec.decode(value)
        except DecodeError as exc:
            decoded[offset] = f"does not decode ({exc.reason})"
            continue
        event_id = d.event["event_id"]
        decoded[offset] = (event_id, content_hash(d.event_type, canonical_json(d.event)))
    found = journaled(sorted({v[0] for v in decoded.values() if isinstance(v, tuple)}))
    for offset, _ in records:
        if offset in quarantined:
            if quarantined[offset]:
                audit.pruned += 1
            else:
                audit.quarantined += 1
            audit._count(offset, None)
            continue
        what = decoded[offset]
        why = what if isinstance(what, str) else None
        if why is None:
            event_id, digest = what
            row = found.get(event_id)
            if row is None:
                why = f"event {event_id} is neither journaled nor quarantined"
            elif bytes(row[0]) != digest:
                why = (
                    f"event {event_id} was journaled from another record with a different "
                    "body, and this one was not quarantined"
                )
            elif (row[1], row[2], row[3]) == (audit.topic, audit.partition, offset):
                audit.journaled += 1
            else:
                audit.redelivered += 1
        audit._count(offset, why)


AUDIT_CHUNK = 5_000
AUDIT_STALL_S = 60.0


def audit(
    settings: Settings,
    bootstrap: str,
    dsn: str,
    shards: list[int] | None = None,
    *,
    codec: Codec | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[PartitionAudit]:
    """Account for every record of the input partitions (of `shards`, or all) below the
    stored offsets; see the module doc."""
    codec = codec or Codec.default()
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        client_id="ledger-offsets-audit",
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=1024 * 1024,
        **kafka_consumer_options(settings),
        **client_options(settings),
    )
    try:
        names = topics.input_topics(settings)
        partitions = _input_partitions(consumer, names, shards)
        if not partitions:
            return []
        begin = consumer.beginning_offsets(partitions, timeout_ms=10_000)
        end = consumer.end_offsets(partitions, timeout_ms=10_000)
        with db.connect(dsn) as conn:
            conn.autocommit = True
            stored = {
                (t, p): o
                for t, p, o in conn.execute(
                    QUERIES["stored_offsets"],
                    {"group_id": settings.consumer_group, "topics": names},
                )
            }
            audits = [
                PartitionAudit(
                    tp.topic,
                    tp.partition,
                    begin[tp],
                    stored.get((tp.topic, tp.partition), 0),
                    end[tp],
                )
                for tp in partitions
            ]
            total = sum(max(0, a.stored - a.first) for a in audits)
            done = 0

            def journaled(event_ids: list[str]) -> dict[str, tuple[bytes, str, int, int]]:
                if not event_ids:
                    return {}
                rows = conn.execute(QUERIES["audit_journaled"], (event_ids,))
                return {e: (h, t, p, o) for e, h, t, p, o in rows}

            for tp, one in zip(partitions, audits, strict=True):
                if one.stored <= one.first:
                    continue  # nothing Kafka holds was read (a lost range: `offsets show`)
                consumer.assign([tp])
                consumer.seek(tp, one.first)
                position, moved_at = one.first, time.monotonic()
                while position < one.stored:
                    fetched = consumer.poll(timeout_ms=1000, max_records=AUDIT_CHUNK).get(tp, [])
                    chunk = [(r.offset, r.value) for r in fetched if r.offset < one.stored]
                    if chunk:
                        quarantined = dict(
                            conn.execute(
                                QUERIES["audit_quarantined"],
                                {
                                    "topic": tp.topic,
                                    "partition": tp.partition,
                                    "first": chunk[0][0],
                                    "last": chunk[-1][0],
                                },
                            ).fetchall()
                        )
                        account_for(one, chunk, quarantined, journaled, codec)
                    now_at = consumer.position(tp)
                    if now_at > position:
                        done += min(now_at, one.stored) - position
                        position, moved_at = now_at, time.monotonic()
                        if progress is not None:
                            progress(done, total)
                    elif time.monotonic() - moved_at > AUDIT_STALL_S:
                        raise LedgerError(
                            f"{tp.topic}[{tp.partition}]: Kafka returned nothing past offset "
                            f"{position} for {AUDIT_STALL_S:.0f} s (the ledger's stored "
                            f"offset is {one.stored})"
                        )
    finally:
        consumer.close()
    return audits
