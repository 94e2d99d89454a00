"""Writing a batch of Kafka records into the journal: ONE PostgreSQL transaction per batch.

The commit protocol, in order:
  1. lock the stored offsets of the batch's partitions (FOR UPDATE): a second writer of the same
     partitions (a zombie after a rebalance) waits here, then sees the moved offsets;
  2. drop records below the stored offset (already journaled), refuse a gap above it;
  3. decode, deduplicate by event_id, post each event onto its account book (the pure fold);
  4. take gapless per-shard sequence numbers (row lock on shard_heads until commit);
  5. COPY raw events, entries and postings; insert rejects and their dead-letter outbox rows;
  6. save the account books and the next offsets; NOTIFY the projection workers; commit.
A crash anywhere before the commit loses nothing (Kafka redelivers from the stored offsets) and
duplicates nothing (the journal and the offsets commit together).
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import psycopg
import structlog
from psycopg.types.json import Jsonb

from ledger.book import (
    AccountBook,
    Entry,
    LedgerFold,
    Rejected,
    canonical_json,
    chain_hash,
    content_hash,
    expiry_events,
)
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.errors import DecodeError, LedgerError

log = structlog.get_logger(__name__)

GENESIS = b"\x00" * 32


class Record(Protocol):
    """What the writer needs of a Kafka record (kafka-python's ConsumerRecord has it)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]]


class OffsetGapError(LedgerError):
    """A batch starts past the stored offset: records would be skipped. The consumer re-seeks."""


@dataclasses.dataclass
class BatchResult:
    journaled: int = 0
    duplicates: int = 0
    rejected: int = 0
    stale: int = 0
    next_offsets: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Accepted:
    record: Record
    event_type: str
    fingerprint: int
    event: dict[str, Any]
    digest: bytes
    entry: Entry | None = None
    hash: bytes = b""
    prev_hash: bytes = b""
    cause_event_id: str | None = None  # set on entries derived from another event
    event_json: str = ""  # canonical JSON of `event`, made once: stored, hashed, compared
    detail_json: str = ""

    def link(self, prev_hash: bytes) -> bytes:
        """Set this entry's place in its account's hash chain; returns its hash."""
        assert self.entry is not None
        self.event_json = self.event_json or canonical_json(self.event)
        self.detail_json = canonical_json(self.entry.detail)
        self.prev_hash = prev_hash
        self.hash = chain_hash(
            prev_hash, self.event_json, self.entry, self.record.value, self.detail_json
        )
        return self.hash

    @property
    def derived(self) -> bool:
        return self.cause_event_id is not None


class LedgerWriter:
    """Journals batches of records for consumer group `group_id` over connection `conn`."""

    def __init__(
        self,
        conn: psycopg.Connection,
        fold: LedgerFold,
        *,
        group_id: str,
        deadletter_topic: str,
        codec: Codec | None = None,
    ):
        self.conn = conn
        self.fold = fold
        self.group_id = group_id
        self.deadletter_topic = deadletter_topic
        self.codec = codec or Codec.default()

    def stored_offsets(self, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        rows = self.conn.execute(
            QUERIES["stored_offsets"], {"group_id": self.group_id, "topics": list(topics)}
        ).fetchall()
        self.conn.commit()
        return {(t, p): o for t, p, o in rows}

    def write_batch(self, records: Sequence[Record], *, replay: bool = False) -> BatchResult:
        """Journal `records` in one transaction. With `replay`, the records come from another
        journal in its order (`ledger replay`) or from quarantine (`ledger rejects replay`):
        that order is kept exactly, Kafka offsets are neither checked nor stored, and a record
        rejected again gets no second dead-letter copy."""
        started = time.perf_counter()
        try:
            with self.conn.transaction():
                result = self._write(records, replay)
        except BaseException:
            if not self.conn.closed:
                self.conn.rollback()
            raise
        self.conn.commit()
        log.info(
            "batch_committed",
            records=len(records),
            journaled=result.journaled,
            duplicates=result.duplicates,
            rejected=result.rejected,
            stale=result.stale,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return result

    # --- the transaction ------------------------------------------------------------------

    def _write(self, records: Sequence[Record], replay: bool) -> BatchResult:
        cur = self.conn.cursor()
        result = BatchResult()
        if not replay:
            records = self._fresh_records(cur, records, result)
        accepted: list[_Accepted] = []
        rejects: list[tuple[Record, str | None, str | None, str, str]] = []
        seen: dict[str, bytes] = {}

        decoded = []
        for record in records:
            try:
                d = self.codec.decode(record.value)
            except DecodeError as exc:
                rejects.append((record, None, None, exc.reason, str(exc)))
                continue
            decoded.append((record, d))
        ids = [d.event.get("event_id") for _, d in decoded]
        known = dict(cur.execute(QUERIES["known_events"], (ids,)).fetchall())
        for record, d in decoded:
            event_id = d.event["event_id"]
            event_json = canonical_json(d.event)
            digest = content_hash(d.event_type, event_json)
            previous = known.get(event_id, seen.get(event_id))
            if previous is not None:
                if bytes(previous) == digest:
                    result.duplicates += 1
                else:
                    rejects.append(
                        (
                            record,
                            event_id,
                            d.event_type,
                            "duplicate_conflict",
                            f"event_id {event_id} was already journaled with a different body",
                        )
                    )
                continue
            seen[event_id] = digest
            accepted.append(
                _Accepted(
                    record, d.event_type, d.fingerprint, d.event, digest, event_json=event_json
                )
            )

        # Topics are not ordered with each other: within a batch, events are applied in
        # occurred_at order (stable, so Kafka's order breaks ties).
        if not replay:
            accepted.sort(key=lambda a: a.event["occurred_at"])
        books = self._load_books(
            cur, {a.event["account_id"] for a in accepted if a.event_type != "PeriodTick"}
        )
        journaled: list[_Accepted] = []
        for item in accepted:
            if item.event_type == "PeriodTick":
                journaled += self._period_tick(cur, item, books)
                continue
            account_id = item.event["account_id"]
            book, last_hash, _ = books.get(account_id) or (
                AccountBook(account_id),
                GENESIS,
                item.record.partition,
            )
            try:
                item.entry = self.fold.post(book, item.event_type, item.event)
            except Rejected as exc:
                rejects.append(
                    (item.record, item.event["event_id"], item.event_type, exc.reason, exc.detail)
                )
                continue
            except Exception:  # a bug must not block the partition; the event is kept
                detail = traceback.format_exc(limit=3)
                log.error("fold_failed", event_id=item.event["event_id"], detail=detail)
                rejects.append(
                    (
                        item.record,
                        item.event["event_id"],
                        item.event_type,
                        "processing_error",
                        detail,
                    )
                )
                continue
            books[account_id] = (book, item.link(last_hash), item.record.partition)
            journaled.append(item)

        self._copy_journal(cur, journaled)
        self._insert_rejects(cur, rejects, replay)
        cur.executemany(
            QUERIES["save_book"],
            [
                (acct, Jsonb(book.to_json()), last_hash, shard, book.next_expiry())
                for acct in sorted({j.event["account_id"] for j in journaled} - {""})
                for book, last_hash, shard in [books[acct]]
            ],
        )
        cur.executemany(
            QUERIES["save_offset"],
            [(self.group_id, t, p, o) for (t, p), o in sorted(result.next_offsets.items())],
        )
        if journaled:
            cur.execute(QUERIES["notify_journal"])
        if rejects and not replay:
            cur.execute(QUERIES["notify_outbox"])
        result.journaled = len(journaled)
        result.rejected = len(rejects)
        return result

    def _fresh_records(
        self, cur: psycopg.Cursor, records: Sequence[Record], result: BatchResult
    ) -> list[Record]:
        """Lock the partitions' stored offsets; keep only records at or after them."""
        topics = sorted({r.topic for r in records})
        stored = {
            (t, p): o
            for t, p, o in cur.execute(
                QUERIES["lock_offsets"], {"group_id": self.group_id, "topics": topics}
            )
        }
        fresh: list[Record] = []
        expected = dict(stored)
        for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
            tp = (record.topic, record.partition)
            want = expected.get(tp)
            if want is not None and record.offset < want:
                result.stale += 1
                continue
            if want is not None and record.offset > want:
                raise OffsetGapError(
                    f"{record.topic}[{record.partition}] batch starts at offset "
                    f"{record.offset}, stored next offset is {want}"
                )
            expected[tp] = record.offset + 1
            fresh.append(record)
        result.next_offsets = {tp: o for tp, o in expected.items() if stored.get(tp) != o}
        return fresh

    def _load_books(
        self, cur: psycopg.Cursor, account_ids: set[str]
    ) -> dict[str, tuple[AccountBook, bytes, int]]:
        rows = cur.execute(QUERIES["lock_books"], (sorted(account_ids),)).fetchall()
        return {a: (AccountBook.from_json(a, b), bytes(h), shard) for a, b, h, shard in rows}

    def _period_tick(
        self,
        cur: psycopg.Cursor,
        tick: _Accepted,
        books: dict[str, tuple[AccountBook, bytes, int]],
    ) -> list[_Accepted]:
        """Journal a PeriodTick (so projections see the shard's clock move, in order) and
        expire what is left of every grant in its shard whose expires_at has come."""
        shard, at = tick.record.partition, tick.event["tick_at"]
        tick.entry = Entry("noop", detail={"tick_at": at.isoformat()})
        tick.link(GENESIS)  # ticks belong to no account's chain
        out = [tick]
        for account_id, book, last_hash, shard_ in cur.execute(
            QUERIES["lock_expiring_books"], (shard, at)
        ):
            books.setdefault(
                account_id, (AccountBook.from_json(account_id, book), bytes(last_hash), shard_)
            )
        due = sorted(
            a
            for a, (book, _, s) in books.items()
            if s == shard and (when := book.next_expiry()) is not None and when <= at
        )
        for account_id in due:
            book, last_hash, _ = books[account_id]
            for event, entry in expiry_events(self.fold, tick.event, account_id, book):
                item = _Accepted(
                    tick.record,
                    "GrantExpired",
                    tick.fingerprint,
                    event,
                    b"",
                    entry=entry,
                    cause_event_id=tick.event["event_id"],
                )
                last_hash = item.link(last_hash)
                out.append(item)
            books[account_id] = (book, last_hash, shard)
        return out

    def _copy_journal(self, cur: psycopg.Cursor, journaled: list[_Accepted]) -> None:
        if not journaled:
            return
        per_shard: dict[int, list[_Accepted]] = defaultdict(list)
        for item in journaled:
            per_shard[item.record.partition].append(item)
        numbered: list[tuple[int, int, _Accepted]] = []
        for shard in sorted(per_shard):
            items = per_shard[shard]
            (last,) = cur.execute(QUERIES["advance_shard"], (shard, len(items))).fetchone()
            first = last - len(items) + 1
            numbered += [(shard, first + i, item) for i, item in enumerate(items)]

        with cur.copy(QUERIES["copy_raw_events"]) as copy:
            for _, _, a in numbered:
                if a.derived:
                    continue
                r = a.record
                copy.write_row(
                    (
                        a.event["event_id"],
                        a.event_type,
                        a.event["account_id"],
                        r.topic,
                        r.partition,
                        r.offset,
                        _signed64(a.fingerprint),
                        a.digest,
                        r.value,
                        a.event["occurred_at"],
                    )
                )
        with cur.copy(QUERIES["copy_journal_entries"]) as copy:
            for shard, seq, a in numbered:
                assert a.entry is not None
                copy.write_row(
                    (
                        shard,
                        seq,
                        a.event["event_id"],
                        a.event["account_id"],
                        a.event_type,
                        a.entry.status,
                        a.event["occurred_at"],
                        a.entry.price_version,
                        a.event_json,
                        a.detail_json,
                        a.prev_hash,
                        a.hash,
                        a.cause_event_id,
                    )
                )
        with cur.copy(QUERIES["copy_postings"]) as copy:
            for shard, seq, a in numbered:
                assert a.entry is not None
                for line, posting in enumerate(a.entry.postings):
                    copy.write_row(
                        (
                            shard,
                            seq,
                            line,
                            posting.ledger_account,
                            a.event["account_id"],
                            posting.amount,
                        )
                    )

    def _insert_rejects(
        self,
        cur: psycopg.Cursor,
        rejects: list[tuple[Record, str | None, str | None, str, str]],
        replay: bool,
    ) -> None:
        if not rejects:
            return
        rejects = sorted(rejects, key=lambda r: (r[0].topic, r[0].partition, r[0].offset))
        for record, event_id, event_type, reason, detail in rejects:
            log.warning(
                "event_rejected",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                event_id=event_id,
                event_type=event_type,
                reason=reason,
                detail=detail[:500],
            )
        cur.executemany(
            QUERIES["insert_rejected"],
            [
                (r.topic, r.partition, r.offset, eid, et, reason, detail, r.value, r.key)
                for r, eid, et, reason, detail in rejects
            ],
        )
        if replay:
            return  # replayed records came from a journal or from quarantine: copied already
        cur.executemany(
            QUERIES["insert_outbox"],
            [
                (
                    self.deadletter_topic,
                    r.key,  # same partitioning as the original: per-account order kept
                    r.value,
                    Jsonb(_dead_letter_headers(r, reason, detail)),
                )
                for r, _, _, reason, detail in rejects
            ],
        )


def _dead_letter_headers(record: Record, reason: str, detail: str) -> list[list[str]]:
    """Original headers plus where the record came from and why it was rejected (hex values)."""
    headers = [[k, (v or b"").hex()] for k, v in (record.headers or [])]
    headers += [
        ["dlq_reason", reason.encode().hex()],
        ["dlq_detail", detail[:1000].encode().hex()],
        ["dlq_topic", record.topic.encode().hex()],
        ["dlq_partition", str(record.partition).encode().hex()],
        ["dlq_offset", str(record.offset).encode().hex()],
    ]
    return headers


def _signed64(value: int) -> int:
    """CRC-64 fingerprints are unsigned; PostgreSQL bigint is signed."""
    return value - (1 << 64) if value >= 1 << 63 else value


__all__ = ["GENESIS", "BatchResult", "LedgerWriter", "OffsetGapError", "Record"]
