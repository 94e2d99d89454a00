"""Writing a batch of Kafka records into the journal: ONE PostgreSQL transaction per batch.

The commit protocol, in order:
  1. lock the stored offsets of the batch's partitions (FOR UPDATE): a second writer of the same
     partitions (a zombie after a rebalance) waits here, then sees the moved offsets;
  2. drop records below the stored offset (already journaled); refuse a batch whose fetch
     started after it (records would be skipped). Offsets need not be contiguous (transaction
     markers, compaction): the consumer says from where to where it fetched each partition,
     and the stored offset moves to the end of that range;
  3. decode and check bounds (`ledger.bounds`), deduplicate by event_id, check time and the
     account's home shard, post each event onto its account book (the pure fold);
  4. take gapless per-shard sequence numbers (row lock on shard_heads until commit) and link
     each entry into its shard's hash chain: an HMAC under the current chain key, over the
     shard's previous link (`shard_heads.head_hash`) and the entry (`ledger.book.chain_link`);
  5. COPY raw events, entries and postings; insert rejects and their dead-letter outbox rows;
  6. save the account books and the next offsets; NOTIFY the projection workers; commit.
A crash anywhere before the commit loses nothing (Kafka redelivers from the stored offsets) and
duplicates nothing (the journal and the offsets commit together).

A batch that fails with an error nobody foresaw (a data error from PostgreSQL, a bug) is split
in halves until the failing record is alone; that record is quarantined as `processing_error`
with the error's message and the rest is journaled, in order, exactly once. Errors of the
infrastructure (connection lost, server restarting, serialization failure) are not split:
they propagate, and the consumer retries the batch with backoff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import psycopg
import structlog
from psycopg.types.json import Jsonb

from ledger.book import (
    AccountBook,
    Entry,
    LedgerFold,
    Rejected,
    canonical_json,
    chain_link,
    content_hash,
    expiry_events,
    jsonb_dumps,
    link_header,
    rerate_event,
)
from ledger.chain_keys import ChainKeys
from ledger.codec import Codec
from ledger.config_versions import (
    CONFIG_PUBLISHED,
    CONFIG_TOPIC,
    PRICE_BOOK,
    ConfigVersion,
    ShardConfig,
)
from ledger.db import QUERIES
from ledger.errors import DecodeError, LedgerError, TombstoneError
from ledger.invoicing import INVOICE_ISSUED, invoice_events, months_to_close
from ledger.log import describe_error
from ledger.settings import DEADLETTER_MAX_BYTES

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

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


# (topic, partition) -> (start, end): the consumer fetched every committed record of the
# partition from offset `start` up to, not including, `end` (its position after the batch).
Fetched = Mapping[tuple[str, int], tuple[int, int]]
# (topic, partition, offset) -> (the value it was made from, its decoding or the DecodeError
# it raised, canonical JSON of the event, content hash): `LedgerWriter.prepare`.
Prepared = dict[tuple[str, int, int], tuple[bytes, Any, str, bytes]]


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """A record as the writer keeps it: a tombstone's missing value becomes empty bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]] = ()
    tombstone: bool = False
    recorded_at: datetime | None = None  # replays: when the source journal recorded it

    @classmethod
    def of(cls, record: Record) -> InputRecord:
        if isinstance(record, InputRecord):
            return record
        value = record.value
        return cls(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            b"" if value is None else bytes(value),
            tuple(record.headers or ()),
            value is None,
            getattr(record, "recorded_at", None),
        )


@dataclasses.dataclass
class BatchResult:
    journaled: int = 0
    duplicates: int = 0
    rejected: int = 0
    stale: int = 0
    next_offsets: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)
    split: bool = False  # the batch failed whole and was split to isolate a record
    # What was journaled, by event type, and rejected, by reason (for the metrics).
    journaled_by_type: Counter[str] = dataclasses.field(default_factory=Counter)
    rejected_by_reason: Counter[str] = dataclasses.field(default_factory=Counter)

    def add(self, other: BatchResult) -> None:
        self.journaled += other.journaled
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.stale += other.stale
        self.next_offsets.update(other.next_offsets)
        self.journaled_by_type.update(other.journaled_by_type)
        self.rejected_by_reason.update(other.rejected_by_reason)


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

    def link(self, key_id: str, mac: hmac.HMAC, prev_hash: bytes, shard: int, seq: int) -> bytes:
        """Set this entry's place in its shard's keyed hash chain; returns its hash."""
        assert self.entry is not None
        self.event_json = self.event_json or canonical_json(self.event)
        self.detail_json = canonical_json(self.entry.detail)
        self.prev_hash = prev_hash
        header = link_header(
            key_id,
            shard,
            seq,
            self.event_type,
            self.event["account_id"],
            self.event["occurred_at"],
            self.entry.price_version,
            self.cause_event_id,
        )
        self.hash = chain_link(
            mac,
            prev_hash,
            header,
            self.event_json,
            self.entry,
            self.record.value,
            self.detail_json,
        )
        return self.hash

    @property
    def derived(self) -> bool:
        return self.cause_event_id is not None


class LedgerWriter:
    """Journals batches of records for consumer group `group_id` over connection `conn`,
    linking each entry into its shard's hash chain with the current key of `keys`."""

    def __init__(
        self,
        conn: psycopg.Connection,
        fold: LedgerFold,
        *,
        keys: ChainKeys,
        group_id: str,
        deadletter_topic: str,
        codec: Codec | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        deadletter_max_bytes: int = DEADLETTER_MAX_BYTES,
    ):
        self.conn = conn
        self.fold = fold
        self.key_id = keys.current
        mac = keys.mac(self.key_id)
        assert mac is not None
        self._mac = mac
        self.group_id = group_id
        self.deadletter_topic = deadletter_topic
        self.codec = codec or Codec.default()
        self.clock = clock  # the ledger's own clock: bounds occurred_at and PeriodTicks
        self.deadletter_max_bytes = deadletter_max_bytes
        # Called inside each batch transaction with the shards the batch writes, after their
        # offsets are locked; raises to refuse the batch (the shard lease fence).
        self.fence: Callable[[psycopg.Cursor, set[int]], None] | None = None
        # Per shard: (config_seq, the versions journaled there, the fold they make), as of
        # the last committed batch; a shard absent here uses `fold` (nothing journaled yet).
        self._configs: dict[int, tuple[int, ShardConfig, LedgerFold]] = {}
        self._prepared: Prepared = {}  # of the batch being written (see `prepare`)

    def fold_for(self, shard: int) -> LedgerFold:
        """The fold of `shard`: its journaled price-book and policy versions."""
        cached = self._configs.get(shard)
        return cached[2] if cached is not None else self.fold

    def stored_offsets(self, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        rows = self.conn.execute(
            QUERIES["stored_offsets"], {"group_id": self.group_id, "topics": list(topics)}
        ).fetchall()
        self.conn.commit()
        return {(t, p): o for t, p, o in rows}

    def prepare(self, records: Sequence[Record]) -> Prepared:
        """What of `records` does not depend on the journal (Avro decode, bounds, canonical
        JSON and content hash), done ahead: the consumer prepares the next batch while the
        previous one is being written. Pure; safe to run beside `write_batch` in another
        thread. `write_batch(..., prepared=)` uses it only for the very same bytes."""
        out: Prepared = {}
        decode = self.codec.decode
        for record in records:
            value = record.value
            if value is None:
                continue  # a tombstone: refused inside the batch
            try:
                d = decode(value)
            except DecodeError as exc:
                out[(record.topic, record.partition, record.offset)] = (
                    value,
                    _without_traceback(exc),
                    "",
                    b"",
                )
                continue
            event_json = canonical_json(d.event)
            out[(record.topic, record.partition, record.offset)] = (
                value,
                d,
                event_json,
                content_hash(d.event_type, event_json),
            )
        return out

    def write_batch(
        self,
        records: Sequence[Record],
        *,
        replay: bool = False,
        fetched: Fetched | None = None,
        prepared: Prepared | None = None,
    ) -> BatchResult:
        """Journal `records` in one transaction. `fetched` says which offsets the consumer
        fetched per partition (without it, the records' own first and last offsets). With
        `replay`, the records come from another journal in its order (`ledger replay`) or from
        quarantine (`ledger rejects replay`): that order is kept exactly, Kafka offsets are
        neither checked nor stored, and a record rejected again gets no second dead-letter
        copy. A batch that fails for a reason tied to its data is split (module docstring)."""
        started = time.perf_counter()
        items = [InputRecord.of(r) for r in records]
        if not replay:
            items.sort(key=lambda r: (r.topic, r.partition, r.offset))
        self._prepared = prepared or {}
        try:
            result = self._transaction(items, replay, fetched, {})
        except Exception as exc:
            if not splittable(exc):
                raise
            log.warning("batch_split", error=one_line(exc), records=len(items))
            result = self._isolate(items, replay, fetched, exc)
        finally:
            self._prepared = {}
        log.info(
            "batch_committed",
            records=len(items),
            journaled=result.journaled,
            duplicates=result.duplicates,
            rejected=result.rejected,
            stale=result.stale,
            split=result.split,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return result

    def _transaction(
        self,
        records: list[InputRecord],
        replay: bool,
        fetched: Fetched | None,
        poison: dict[tuple[str, int, int], str],
    ) -> BatchResult:
        try:
            with self.conn.transaction():
                result = self._write(records, replay, fetched, poison)
        except BaseException:
            self._configs.clear()  # it may hold versions of the rolled-back batch: reload
            if not self.conn.closed:
                self.conn.rollback()
            raise
        self.conn.commit()
        return result

    def _isolate(
        self,
        records: list[InputRecord],
        replay: bool,
        fetched: Fetched | None,
        error: Exception,
    ) -> BatchResult:
        """Write `records`, which failed together with `error`, by halves; a record that fails
        alone is quarantined as processing_error with the error's message."""
        if len(records) == 1:
            (record,) = records
            detail = f"{type(error).__name__}: {one_line(error)}"
            log.error(
                "record_isolated",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                error=detail[:500],
            )
            poison = {(record.topic, record.partition, record.offset): detail}
            result = self._transaction(records, replay, fetched, poison)
            result.split = True
            return result
        middle = len(records) // 2
        total = BatchResult(split=True)
        for part, part_fetched in zip(
            (records[:middle], records[middle:]),
            split_fetched(fetched, records[:middle], records[middle:]),
            strict=True,
        ):
            try:
                total.add(self._transaction(part, replay, part_fetched, {}))
            except Exception as exc:
                if not splittable(exc):
                    raise
                total.add(self._isolate(part, replay, part_fetched, exc))
        return total

    # --- the transaction ------------------------------------------------------------------

    def _write(
        self,
        records: list[InputRecord],
        replay: bool,
        fetched: Fetched | None,
        poison: dict[tuple[str, int, int], str],
    ) -> BatchResult:
        cur = self.conn.cursor()
        result = BatchResult()
        # No pipeline mode in a batch: a backend waiting inside a pipeline (no Sync yet) is not
        # "idle in transaction", so idle_in_transaction_session_timeout would not free the row
        # locks of a holder frozen there (make chaos: every shard stalled for the 30 s SIGSTOP).
        if not replay:
            records = self._fresh_records(cur, records, fetched, result)
        if self.fence is not None and not replay:
            self.fence(cur, {r.partition for r in records} | {p for _, p in result.next_offsets})
        now = self.clock()
        accepted: list[_Accepted] = []
        rejects: list[tuple[Record, str | None, str | None, str, str]] = []
        seen: dict[str, bytes] = {}
        shards = {r.partition for r in records}
        self._refresh_configs(cur, shards)
        # Versions published since the shard's last batch go first (never in a replay: there
        # they come from the source journal, in its order).
        publications = [] if replay else self._pending_configs(cur, shards, now)

        decoded = []
        hashed: dict[int, tuple[str, bytes]] = {}  # id(record) -> prepared (event_json, digest)
        prepared = self._prepared
        for record in records:
            failure = poison.get((record.topic, record.partition, record.offset))
            if failure is not None:
                # Named in the reject row when the bytes decode; this is the last resort for
                # a record, so nothing raised while naming it may stop the batch again.
                event_id = event_type = None
                with contextlib.suppress(Exception):
                    poisoned = self.codec.decode(record.value)
                    event_id, event_type = poisoned.event["event_id"], poisoned.event_type
                rejects.append(
                    (record, event_id, event_type, "processing_error", safe_text(failure))
                )
                continue
            ahead = prepared.get((record.topic, record.partition, record.offset))
            if ahead is not None and not (ahead[0] is record.value or ahead[0] == record.value):
                ahead = None
            if ahead is not None and isinstance(ahead[1], DecodeError):
                # Refused when decoded ahead. Not raised again: raising attaches this frame
                # (and the whole batch in its locals) to an error the prepared batch keeps.
                failed = ahead[1]
                rejects.append((record, None, None, failed.reason, safe_text(str(failed))))
                continue
            try:
                if record.tombstone:
                    raise TombstoneError("no value (tombstone)")
                if ahead is not None:
                    d = ahead[1]
                    hashed[id(record)] = (ahead[2], ahead[3])
                else:
                    d = self.codec.decode(record.value)
            except DecodeError as exc:
                rejects.append((record, None, None, exc.reason, safe_text(str(exc))))
                continue
            problem = self._implausible_time(record.partition, d.event, record.recorded_at or now)
            if problem is not None:
                rejects.append(
                    (record, d.event["event_id"], d.event_type, "implausible_time", problem)
                )
                continue
            decoded.append((record, d))
        ids = [d.event.get("event_id") for _, d in decoded]
        known = dict(cur.execute(QUERIES["known_events"], (ids,)).fetchall())
        for record, d in decoded:
            event_id = d.event["event_id"]
            ahead = hashed.get(id(record))
            if ahead is not None:
                event_json, digest = ahead
            else:
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
        accepted = publications + accepted
        books = _Books()
        self._load_books(
            cur, {a.event["account_id"] for a in accepted if a.event["account_id"]}, books
        )
        clocks = self._shard_clocks(
            cur, {a.record.partition for a in accepted if a.event_type == "PeriodTick"}
        )
        moved: set[int] = set()
        journaled: list[_Accepted] = []
        for item in accepted:
            if item.event_type == "PeriodTick":
                shard, tick_at = item.record.partition, item.event["tick_at"]
                problem = self._implausible_tick(
                    shard, tick_at, clocks.get(shard), item.record.recorded_at or now
                )
                if problem is not None:
                    rejects.append((item.record, item.event["event_id"], item.event_type, *problem))
                    continue
                previous, clocks[shard] = clocks.get(shard), tick_at
                moved.add(shard)
                journaled += self._period_tick(cur, item, books)
                journaled += self._close_months(cur, item, previous, books)
                continue
            if item.event_type == CONFIG_PUBLISHED:
                try:
                    journaled += self._publish_config(cur, item, books, journaled)
                except ValueError as exc:
                    detail = str(exc)
                    rejects.append(
                        (
                            item.record,
                            item.event["event_id"],
                            item.event_type,
                            "invalid_config",
                            detail,
                        )
                    )
                continue
            account_id = item.event["account_id"]
            if account_id in books.unreadable:
                rejects.append(
                    (
                        item.record,
                        item.event["event_id"],
                        item.event_type,
                        "processing_error",
                        f"the account book of {account_id} cannot be read "
                        f"({books.unreadable[account_id]}); its events are quarantined until "
                        "it is restored (ledger books restore)",
                    )
                )
                continue
            book, home = books.get(account_id) or (AccountBook(account_id), item.record.partition)
            if home is not None and home != item.record.partition:
                rejects.append(
                    (
                        item.record,
                        item.event["event_id"],
                        item.event_type,
                        "wrong_partition",
                        f"account {account_id} lives on shard {home}, the event arrived on "
                        f"partition {item.record.partition} (producers must key by account_id "
                        "with Kafka's default murmur2 partitioner)",
                    )
                )
                continue
            try:
                item.entry = self.fold_for(item.record.partition).post(
                    book, item.event_type, item.event
                )
            except Rejected as exc:
                rejects.append(
                    (item.record, item.event["event_id"], item.event_type, exc.reason, exc.detail)
                )
                continue
            except Exception:  # a bug must not block the partition; the event is kept
                detail = safe_text(traceback.format_exc(limit=3))
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
            books[account_id] = (book, item.record.partition)
            journaled.append(item)

        numbered = self._copy_journal(cur, journaled)
        config_seqs = {shard: seq for shard, seq, a in numbered if a.event_type == CONFIG_PUBLISHED}
        _execute_each(
            cur, "save_config_seq", [(seq, shard) for shard, seq in sorted(config_seqs.items())]
        )
        for shard, seq in config_seqs.items():
            _, config, fold = self._configs[shard]
            self._configs[shard] = (seq, config, fold)
        self._insert_rejects(cur, rejects, replay)
        save_books(
            cur,
            [
                (acct, *books[acct])
                for acct in sorted({j.event["account_id"] for j in journaled} - {""})
            ],
        )
        _execute_each(cur, "save_shard_clock", [(clocks[shard], shard) for shard in sorted(moved)])
        _execute_each(
            cur,
            "save_offset",
            [(self.group_id, t, p, o) for (t, p), o in sorted(result.next_offsets.items())],
        )
        if journaled:
            cur.execute(QUERIES["notify_journal"])
        if rejects and not replay:
            cur.execute(QUERIES["notify_outbox"])
        result.journaled = len(journaled)
        result.rejected = len(rejects)
        result.journaled_by_type = Counter(j.event_type for j in journaled)
        result.rejected_by_reason = Counter(r[3] for r in rejects)
        return result

    def _fresh_records(
        self,
        cur: psycopg.Cursor,
        records: list[InputRecord],
        fetched: Fetched | None,
        result: BatchResult,
    ) -> list[InputRecord]:
        """Lock the partitions' stored offsets; keep only records at or after them; move each
        stored offset to the end of what the consumer fetched. Refuse a fetch that started
        after the stored offset (its records would skip what lies between)."""
        ranges = dict(fetched) if fetched is not None else _ranges_of(records)
        for record in records:
            if (record.topic, record.partition) not in ranges:
                raise LedgerError(f"{record.topic}[{record.partition}]: no fetched range given")
        tps = sorted(ranges)
        params = {
            "group_id": self.group_id,
            "topics": [t for t, _ in tps],
            "partitions": [p for _, p in tps],
            "offsets": [ranges[tp][0] for tp in tps],
        }
        cur.execute(QUERIES["ensure_offsets"], params)  # so that the lock below has rows
        stored = {(t, p): o for t, p, o in cur.execute(QUERIES["lock_offsets"], params)}
        for tp in tps:
            start, _ = ranges[tp]
            if start > stored[tp]:
                raise OffsetGapError(
                    f"{tp[0]}[{tp[1]}] batch starts at offset {start}, "
                    f"stored next offset is {stored[tp]}"
                )
        fresh: list[InputRecord] = []
        for record in records:
            if record.offset < stored[(record.topic, record.partition)]:
                result.stale += 1
                continue
            fresh.append(record)
        result.next_offsets = {tp: ranges[tp][1] for tp in tps if ranges[tp][1] > stored[tp]}
        return fresh

    def _shard_clocks(self, cur: psycopg.Cursor, shards: set[int]) -> dict[int, datetime]:
        """The last PeriodTick journaled in each of `shards` (none yet: absent)."""
        if not shards:
            return {}
        rows = cur.execute(QUERIES["shard_clocks"], (sorted(shards),)).fetchall()
        return {shard: at for shard, at in rows if at is not None}

    def _implausible_time(self, shard: int, event: dict, now: datetime) -> str | None:
        """Why an event's occurred_at cannot be true, or None (policy [time])."""
        policy = self.fold_for(shard).policy
        at = event["occurred_at"]
        if at > now + policy.max_clock_skew:
            return (
                f"occurred_at {at.isoformat()} is later than the ledger's clock "
                f"{now.isoformat()} plus the allowed skew of {policy.max_clock_skew}"
            )
        if at < policy.earliest_event:
            return (
                f"occurred_at {at.isoformat()} is before the earliest plausible event "
                f"{policy.earliest_event.isoformat()}"
            )
        return None

    def _implausible_tick(
        self, shard: int, tick_at: datetime, last: datetime | None, now: datetime
    ) -> tuple[str, str] | None:
        """A PeriodTick moves a shard's clock only forward, by a bounded step, and never past
        the ledger's own clock plus the skew; (reason, detail) if this one may not."""
        policy = self.fold_for(shard).policy
        if tick_at > now + policy.max_clock_skew:
            return (
                "implausible_time",
                f"tick_at {tick_at.isoformat()} is later than the ledger's clock "
                f"{now.isoformat()} plus the allowed skew of {policy.max_clock_skew}",
            )
        if last is not None and tick_at < last:
            return (
                "implausible_time",
                f"tick_at {tick_at.isoformat()} goes back from the shard's last tick "
                f"{last.isoformat()}",
            )
        if last is not None and tick_at - last > policy.max_tick_step:
            return (
                "implausible_time",
                f"tick_at {tick_at.isoformat()} is more than {policy.max_tick_step} after the "
                f"shard's last tick {last.isoformat()}",
            )
        return None

    def _load_books(self, cur: psycopg.Cursor, account_ids: set[str], books: _Books) -> None:
        books.read(cur.execute(QUERIES["lock_books"], (sorted(account_ids),)).fetchall())
        # An account without a book is new, unless the journal has entries of it: a fresh
        # book would forget its grants and payments (and bill what they should pay).
        missing = sorted(account_ids - books.keys() - books.unreadable.keys())
        if missing:
            for (account_id,) in cur.execute(QUERIES["accounts_journaled"], (missing,)):
                books.unreadable[account_id] = "no book, yet the journal has entries of it"
                log.error("account_book_unreadable", account_id=account_id, error="no book")

    def _period_tick(
        self,
        cur: psycopg.Cursor,
        tick: _Accepted,
        books: _Books,
    ) -> list[_Accepted]:
        """Journal a PeriodTick (so projections see the shard's clock move, in order) and
        expire what is left of every grant in its shard whose expires_at has come."""
        shard, at = tick.record.partition, tick.event["tick_at"]
        tick.entry = Entry("noop", detail={"tick_at": at.isoformat()})
        out = [tick]
        books.read(cur.execute(QUERIES["lock_expiring_books"], (shard, at)))
        due = sorted(
            a
            for a, (book, s) in books.items()
            if s == shard and (when := book.next_expiry()) is not None and when <= at
        )
        fold = self.fold_for(shard)
        for account_id in due:
            derived = books.derive(
                account_id,
                "GrantExpired",
                lambda b, a=account_id: expiry_events(fold, tick.event, a, b),
            )
            for event, entry in derived or ():
                item = _Accepted(
                    tick.record,
                    "GrantExpired",
                    tick.fingerprint,
                    event,
                    b"",
                    entry=entry,
                    cause_event_id=tick.event["event_id"],
                )
                out.append(item)
        return out

    def _close_months(
        self,
        cur: psycopg.Cursor,
        tick: _Accepted,
        previous: datetime | None,
        books: _Books,
    ) -> list[_Accepted]:
        """The month close (`ledger.invoicing`): if the tick closes a month in its shard, an
        InvoiceIssued entry for each account with charges waiting that is due an invoice.
        Only books with something waiting for a closed month are read (an indexed query)."""
        shard, at = tick.record.partition, tick.event["tick_at"]
        policy = self.fold_for(shard).policy
        before, upto = months_to_close(policy, at, previous)
        if upto is None or upto == before:
            return []
        books.read(cur.execute(QUERIES["lock_billable_books"], (shard, upto)))
        due = sorted(
            a
            for a, (book, s) in books.items()
            if s == shard and (first := book.first_pending_month()) is not None and first <= upto
        )
        out = []
        for account_id in due:
            derived = books.derive(
                account_id,
                INVOICE_ISSUED,
                lambda b, a=account_id: invoice_events(policy, tick.event, previous, a, b),
            )
            for event, entry in derived or ():
                out.append(
                    _Accepted(
                        tick.record,
                        INVOICE_ISSUED,
                        tick.fingerprint,
                        event,
                        b"",
                        entry=entry,
                        cause_event_id=tick.event["event_id"],
                    )
                )
        return out

    # --- published configuration (ledger.config_versions) -----------------------------------

    def _refresh_configs(self, cur: psycopg.Cursor, shards: set[int]) -> None:
        """Reload the versions of any of `shards` whose journal moved on since they were
        cached (another writer held the shard, or nothing is cached yet)."""
        if not shards:
            return
        seqs = dict(cur.execute(QUERIES["shard_config_seqs"], (sorted(shards),)).fetchall())
        for shard in shards:
            seq = seqs.get(shard, 0)
            cached = self._configs.get(shard)
            if cached is not None and cached[0] == seq:
                continue
            if seq == 0:
                self._configs.pop(shard, None)
                continue
            config = ShardConfig()
            for event_id, payload, *published in cur.execute(
                QUERIES["shard_config_entries"], (shard,)
            ):
                try:
                    version = ConfigVersion.from_event(payload)
                except (ValueError, KeyError, TypeError) as exc:
                    version = _as_published(shard, event_id, published, exc)
                config.add(version)
            self._configs[shard] = (seq, config, config.fold(self.fold))

    def _pending_configs(
        self, cur: psycopg.Cursor, shards: set[int], now: datetime
    ) -> list[_Accepted]:
        """The publications not yet journaled on `shards`, as ConfigPublished events to
        journal first in this batch (a policy only once its effective_from has come)."""
        if not shards:
            return []
        rows = cur.execute(
            QUERIES["pending_config"], {"shards": sorted(shards), "now": now}
        ).fetchall()
        out = []
        for shard, pid, kind, name, effective, document, sha, published_at in rows:
            version = ConfigVersion(kind, name, effective, document, sha)
            value = self.codec.encode(CONFIG_PUBLISHED, version.event(shard, published_at))
            decoded = self.codec.decode(value)
            event_json = canonical_json(decoded.event)
            out.append(
                _Accepted(
                    InputRecord(CONFIG_TOPIC, shard, pid, None, value),
                    CONFIG_PUBLISHED,
                    decoded.fingerprint,
                    decoded.event,
                    content_hash(CONFIG_PUBLISHED, event_json),
                    event_json=event_json,
                )
            )
        return out

    def _publish_config(
        self,
        cur: psycopg.Cursor,
        item: _Accepted,
        books: _Books,
        journaled: list[_Accepted],
    ) -> list[_Accepted]:
        """Journal a ConfigPublished: from here on the shard uses the version; a price
        version re-rates the shard's held usage that it prices. ValueError: refused."""
        if item.record.topic != CONFIG_TOPIC:
            raise ValueError(
                "configuration is published with `ledger config publish`, never from Kafka "
                f"(this one came from {item.record.topic})"
            )
        version = ConfigVersion.from_event(item.event)
        shard = item.record.partition
        cached = self._configs.get(shard)
        config = ShardConfig() if cached is None else dataclasses.replace(cached[1])
        config.add(version)
        fold = config.fold(self.fold)
        self._configs[shard] = (cached[0] if cached else 0, config, fold)
        item.entry = Entry(
            "noop",
            detail={"kind": version.kind, "version": version.version, "ref": version.ref},
        )
        out = [item]
        if version.kind == PRICE_BOOK:
            out += self._rerate(cur, item, books, journaled, fold)
        return out

    def _rerate(
        self,
        cur: psycopg.Cursor,
        publication: _Accepted,
        books: _Books,
        journaled: list[_Accepted],
        fold: LedgerFold,
    ) -> list[_Accepted]:
        """One UsageRerated entry per held usage event of the shard that `fold` now prices,
        oldest first (held in earlier batches, then earlier in this one)."""
        shard = publication.record.partition
        held = [tuple(row) for row in cur.execute(QUERIES["held_usage"], (shard,))]
        held += [
            (j.event["event_id"], j.event["account_id"], j.event)
            for j in journaled
            if j.record.partition == shard
            and j.event_type == "UsageRecorded"
            and j.entry is not None
            and j.entry.status == "unpriced"
        ]
        done = {j.event["usage_event_id"] for j in journaled if j.event_type == "UsageRerated"}
        self._load_books(cur, {a for _, a, _ in held if a not in books}, books)
        out = []
        for event_id, account_id, usage in held:
            if event_id in done or account_id not in books:
                continue  # an unreadable (or missing) book's usage stays held (`_Books`)
            derived = books.derive(
                account_id,
                "UsageRerated",
                lambda b, u=usage: rerate_event(fold, publication.event["event_id"], u, b),
            )
            if derived is None:
                continue
            event, entry = derived
            item = _Accepted(
                publication.record,
                "UsageRerated",
                publication.fingerprint,
                event,
                b"",
                entry=entry,
                cause_event_id=publication.event["event_id"],
            )
            out.append(item)
            done.add(event_id)
        return out

    def _copy_journal(
        self, cur: psycopg.Cursor, journaled: list[_Accepted]
    ) -> list[tuple[int, int, _Accepted]]:
        """COPY the entries (and raw events, postings); returns them as (shard, seq, item)."""
        if not journaled:
            return []
        per_shard: dict[int, list[_Accepted]] = defaultdict(list)
        for item in journaled:
            per_shard[item.record.partition].append(item)
        numbered: list[tuple[int, int, _Accepted]] = []
        heads = []
        key_id, mac = self.key_id, self._mac
        shards = sorted(per_shard)
        # The shards' row locks are held until commit: their heads and sequences are ours.
        counts = [len(per_shard[s]) for s in shards]
        advanced = {
            shard: (last, head, journaled)
            for shard, last, head, journaled in cur.execute(
                QUERIES["advance_shards"], (shards, counts)
            )
        }
        behind = [
            (shard, n)
            for shard, n in zip(shards, counts, strict=True)
            if (journaled := advanced[shard][2]) is not None and journaled > advanced[shard][0] - n
        ]
        if behind:
            # shard_heads is the writer's working state, the journal the record: a head
            # behind it (changed by hand) would reuse sequence numbers, and every batch of
            # the shard would fail on them and be quarantined. Repaired, loudly.
            for shard, n in behind:
                log.error(
                    "shard_head_repaired",
                    shard=shard,
                    head_seq=advanced[shard][0] - n,
                    journal_seq=advanced[shard][2],
                )
            repaired = cur.execute(
                QUERIES["repair_shard_heads"], ([s for s, _ in behind], [n for _, n in behind])
            )
            advanced |= {shard: (last, head, j) for shard, last, head, j in repaired}
        for shard in shards:
            items = per_shard[shard]
            last, head, _ = advanced[shard]
            first = last - len(items) + 1
            head = bytes(head)
            for i, item in enumerate(items):
                head = item.link(key_id, mac, head, shard, first + i)
                numbered.append((shard, first + i, item))
            heads.append((head, shard))
        _execute_each(cur, "save_shard_head", heads)

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
                        key_id,
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
        return numbered

    def _insert_rejects(
        self,
        cur: psycopg.Cursor,
        rejects: list[tuple[Record, str | None, str | None, str, str]],
        replay: bool,
    ) -> None:
        """Store each reject with its raw bytes and, unless replaying, queue its dead-letter
        copy. The bytes are stored once: the copy's outbox row names the reject
        (`value_of_reject`) and the relay publishes the reject's bytes. A copy whose key +
        value + headers would exceed `deadletter_max_bytes` (LEDGER_DEADLETTER_MAX_BYTES,
        default 900 KiB) goes out as a reference instead: an empty value and the dlq_* headers
        plus `dlq_reject_id` (the `rejected_events` id), `dlq_truncated=true` and `dlq_size`.
        The reject row always keeps the full bytes."""
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
        _execute_each(
            cur,
            "insert_rejected",
            [
                (r.topic, r.partition, r.offset, eid, et, reason, detail, r.value, r.key)
                for r, eid, et, reason, detail in rejects
            ],
        )
        if replay:
            return  # replayed records came from a journal or from quarantine: copied already
        limit = self.deadletter_max_bytes
        positions = [(r.topic, r.partition, r.offset) for r, *_ in rejects]
        ids = {
            (topic, partition, offset): reject_id
            for topic, partition, offset, reject_id in cur.execute(
                QUERIES["reject_ids_at"], [list(column) for column in zip(*positions, strict=True)]
            )
        }
        copies = []
        for r, _, _, reason, detail in rejects:
            value = r.value or b""
            headers = _dead_letter_headers(r, reason, detail)
            size = len(r.key or b"") + len(value)
            size += sum(len(name.encode()) + len(hexed) // 2 for name, hexed in headers)
            reject_id = ids[(r.topic, r.partition, r.offset)]
            value_of: int | None = reject_id
            if size > limit:
                headers = _dead_letter_headers(
                    r, reason, detail, reject_id=reject_id, size=len(value)
                )
                value_of = None  # a reference: the record goes out with an empty value
                log.warning(
                    "dead_letter_by_reference", reject_id=reject_id, bytes=size, limit=limit
                )
            # Same key as the original, so the same partitioning: per-account order kept.
            copies.append((self.deadletter_topic, r.key, Jsonb(headers), value_of))
        _execute_each(cur, "insert_deadletter_copy", copies)


class _Books(dict[str, tuple[AccountBook, int]]):
    """A batch's account books: account id -> (book, home shard), as locked and read from
    `account_books`, then moved by the batch's events.

    A book that cannot be read (a superuser changed it into something the writer never
    writes) stops nothing but its own account: it is left out and named in `unreadable`, with
    one `account_book_unreadable` error line; that account's events are quarantined
    (processing_error, saying so), and a tick's expiries and month close and a price
    publication's re-rating pass it by, so the shard's clock, the other accounts' invoices
    and the shard's prices still move. What is passed by is done once the book is restored
    (`ledger books restore`): its expiries at the next tick, its invoice at the next month
    close (its charges as dated adjustment lines, as for late usage), its held usage at the
    next price publication; the quarantined events with `ledger rejects replay`."""

    def __init__(self) -> None:
        super().__init__()
        self.unreadable: dict[str, str] = {}  # account id -> why

    def read(self, rows: Iterable[tuple[str, Any, int]]) -> None:
        """Add the books of (account_id, book as JSON, home shard) rows not read yet."""
        for account_id, data, shard in rows:
            if account_id in self or account_id in self.unreadable:
                continue
            try:
                self[account_id] = (AccountBook.from_json(account_id, data), shard)
            except Exception as exc:
                self.unreadable[account_id] = describe_error(exc)
                log.error(
                    "account_book_unreadable",
                    account_id=account_id,
                    shard=shard,
                    error=self.unreadable[account_id],
                )

    def derive(self, account_id: str, what: str, derive: Callable[[AccountBook], _T]) -> _T | None:
        """`derive(book)` on the account's book (which it moves), for entries a tick or a
        publication derives; None, with the book as it was and an `account_skipped` error
        line, when it raises: a book that reads but holds what the fold never wrote must not
        stop the tick or the publication for every other account."""
        book, home = self[account_id]
        kept = book.copy()
        try:
            return derive(book)
        except Exception as exc:
            self[account_id] = (kept, home)
            log.error(
                "account_skipped", account_id=account_id, entry=what, error=describe_error(exc)
            )
            return None


def _as_published(
    shard: int, event_id: str, published: list, error: BaseException
) -> ConfigVersion:
    """The version a ConfigPublished entry whose payload no longer reads (changed by hand:
    verify reports its link) was made from, read from its `config_publications` row (checked
    against its sha256 as the entry would be), so that the shard goes on priced as journaled;
    one `config_entry_unreadable` error line each time the shard's versions are loaded. Raises
    the entry's error when that row is gone or changed too: nothing is priced by guess."""
    kind, name, effective, document, sha = published
    log.error(
        "config_entry_unreadable",
        shard=shard,
        event_id=event_id,
        error=describe_error(error),
        using="config_publications" if kind is not None else None,
    )
    if kind is None:
        raise error
    version = ConfigVersion(kind, name, effective, document, sha)
    try:
        return ConfigVersion.from_event(version.event(shard, effective))
    except (ValueError, KeyError, TypeError):
        raise error from None


def save_books(cur: psycopg.Cursor, books: Sequence[tuple[str, AccountBook, int]]) -> None:
    """Write (account_id, book, home shard) rows to `account_books` in one statement, with
    the columns the ticks' indexed queries read (next expiry, first month waiting for an
    invoice)."""
    saved = [
        (account_id, book.to_json(), shard, _iso(book.next_expiry()), book.first_pending_month())
        for account_id, book, shard in books
    ]
    if saved:
        cur.execute(QUERIES["save_books"], (Jsonb(saved, dumps=jsonb_dumps),))


def _execute_each(cur: psycopg.Cursor, query: str, rows: list) -> None:
    """The named statement once per row; nothing at all for no rows (psycopg's executemany
    costs a pipeline round trip even then, ~0.1 ms, and most batches have no config, clock
    or reject rows)."""
    if rows:
        cur.executemany(QUERIES[query], rows)


def _dead_letter_headers(
    record: Record,
    reason: str,
    detail: str,
    *,
    reject_id: int | None = None,
    size: int | None = None,
) -> list[list[str]]:
    """Original headers plus where the record came from and why it was rejected (hex values).
    With `reject_id` (a copy too big for Kafka): a reference to the `rejected_events` row
    instead of the original headers, with the original value's `size`."""
    headers = (
        [] if reject_id is not None else [[k, (v or b"").hex()] for k, v in record.headers or []]
    )
    headers += [
        ["dlq_reason", reason.encode().hex()],
        ["dlq_detail", detail[:1000].encode().hex()],
        ["dlq_topic", record.topic.encode().hex()],
        ["dlq_partition", str(record.partition).encode().hex()],
        ["dlq_offset", str(record.offset).encode().hex()],
    ]
    if reject_id is not None:
        headers += [
            ["dlq_reject_id", str(reject_id).encode().hex()],
            ["dlq_truncated", b"true".hex()],
            ["dlq_size", str(size).encode().hex()],
        ]
    return headers


def splittable(error: BaseException) -> bool:
    """Whether a failed batch should be split to find the record that caused `error`: errors
    tied to the data (PostgreSQL data exceptions, integrity violations, program limits such as
    an index row too large; Python errors from our own code), not the infrastructure's."""
    if isinstance(error, LedgerError):
        return False  # the writer's own refusals (an offset gap, a lost lease)
    if isinstance(error, psycopg.DataError | psycopg.IntegrityError):
        return True
    if isinstance(error, psycopg.Error):
        return (error.sqlstate or "")[:2] in ("22", "23", "54")
    return isinstance(error, Exception)


def split_fetched(
    fetched: Fetched | None, left: list[InputRecord], right: list[InputRecord]
) -> tuple[Fetched | None, Fetched | None]:
    """The fetched ranges of two halves of a batch (records in Kafka order): the left half
    ends after its last record of each partition, the right half starts there."""
    if fetched is None:
        return None, None
    last_left = {}
    for record in left:
        last_left[(record.topic, record.partition)] = record.offset + 1
    in_right = {(r.topic, r.partition) for r in right}
    left_ranges, right_ranges = {}, {}
    for tp, (start, end) in fetched.items():
        if tp in last_left:
            left_ranges[tp] = (start, last_left[tp])
            if tp in in_right:
                right_ranges[tp] = (last_left[tp], end)
            else:
                left_ranges[tp] = (start, end)
        elif tp in in_right:
            right_ranges[tp] = (start, end)
        else:
            left_ranges[tp] = (start, end)  # nothing but markers: the left half moves past
    return left_ranges, right_ranges


def _ranges_of(records: list[InputRecord]) -> dict[tuple[str, int], tuple[int, int]]:
    """Without the consumer's word, a batch's ranges are its records' own offsets."""
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    for record in records:
        tp = (record.topic, record.partition)
        start, _ = ranges.get(tp, (record.offset, record.offset))
        ranges[tp] = (start, record.offset + 1)
    return ranges


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def safe_text(text: str, limit: int = 4000) -> str:
    """Text for a reject's detail: no NUL (PostgreSQL text cannot hold it), bounded."""
    return text.replace("\x00", "\\x00")[:limit]


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _without_traceback(error: DecodeError) -> DecodeError:
    """`error`, kept for later (a batch decoded ahead), without the frames it was raised
    through, nor those of its causes. A traceback holds its frames and their locals, here the
    whole batch being prepared, which holds the error: a reference cycle that only the
    cyclic collector frees, keeping every such batch in memory until it runs."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return error


def _signed64(value: int) -> int:
    """CRC-64 fingerprints are unsigned; PostgreSQL bigint is signed."""
    return value - (1 << 64) if value >= 1 << 63 else value


__all__ = [
    "GENESIS",
    "BatchResult",
    "Fetched",
    "InputRecord",
    "LedgerWriter",
    "OffsetGapError",
    "Prepared",
    "Record",
    "splittable",
]
