"""Phase (e), with --profile: LedgerWriter.write_batch in-process (no Kafka) on the records
the ledger consumer would poll: once with its steps wrapped in timers, once under cProfile."""

from __future__ import annotations

import contextlib
import cProfile
import pstats
import time
from collections import defaultdict
from collections.abc import Callable

from ledger import chain_keys, db, topics
from ledger.bench import BenchError
from ledger.bench.raw_consume import input_consumer
from ledger.codec import Codec
from ledger.rating import PriceBook
from ledger.settings import Settings


def read_batches(bootstrap: str, settings: Settings, expected: int) -> list[list]:
    """Every input record, in batches as the ledger consumer polls them."""
    consumer = input_consumer(bootstrap, settings, "ledger-bench-profile")
    try:
        batches: list[list] = []
        count = 0
        deadline = time.monotonic() + 300
        while count < expected and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500, max_records=settings.batch_max_events)
            batch = [r for rs in polled.values() for r in rs]
            if batch:
                batches.append(batch)
                count += len(batch)
    finally:
        consumer.close(autocommit=False)
    if count != expected:
        raise BenchError(f"read {count} of {expected} records for the profile")
    return batches


class SectionTimer:
    """Wall time spent inside wrapped functions, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started

        return timed


def write_in_process(
    settings: Settings,
    dsn: str,
    batches: list[list],
    *,
    timer: SectionTimer | None = None,
    profiler: cProfile.Profile | None = None,
) -> float:
    """Seconds spent in LedgerWriter.write_batch over all batches, on a fresh database. With a
    timer, the writer's steps are timed (wrapped on this writer, its codec and its fold only,
    and on the names ledger.journal calls, restored afterwards)."""
    from unittest import mock

    from ledger import journal
    from ledger.book import LedgerFold
    from ledger.policy import Policy

    fold = LedgerFold(PriceBook.load(settings.price_book), Policy.load(settings.policy))
    codec = Codec.load()  # a private instance, so wrapping it leaves Codec.default() alone
    with db.connect(dsn) as conn, contextlib.ExitStack() as patches:
        writer = journal.LedgerWriter(
            conn,
            fold,
            keys=chain_keys.load(settings),
            group_id=settings.consumer_group,
            deadletter_topic=settings.topic(topics.DEADLETTER),
            codec=codec,
        )
        if timer is not None:
            codec.decode = timer.wrap("decode", codec.decode)  # type: ignore[method-assign]
            fold.post = timer.wrap("post", fold.post)  # type: ignore[method-assign]
            for name in ("_write", "_fresh_records", "_load_books", "_copy_journal"):
                setattr(writer, name, timer.wrap(name, getattr(writer, name)))
            for name in ("content_hash", "chain_link", "canonical_json"):
                wrapped = timer.wrap(name, getattr(journal, name))
                patches.enter_context(mock.patch.object(journal, name, wrapped))
        spent = 0.0
        for batch in batches:
            started = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            writer.write_batch(batch)
            if profiler is not None:
                profiler.disable()
            spent += time.perf_counter() - started
    return spent


def timed_sections(timer: SectionTimer, total: float) -> list[tuple[str, float]]:
    """(label, seconds) of write_batch's steps; the nested ones are indented."""
    t = timer.seconds
    inside_write = sum(
        t[k]
        for k in (
            "_fresh_records",
            "decode",
            "content_hash",
            "_load_books",
            "post",
            "_copy_journal",
        )
    )
    return [
        ("write_batch (total)", total),
        ("  lock offsets, order check", t["_fresh_records"]),
        ("  Avro decode", t["decode"]),
        ("  content_hash (canonical JSON + sha256)", t["content_hash"]),
        ("  lock + load account books", t["_load_books"]),
        ("  fold.post (rating, burn, entry)", t["post"]),
        ("  link + COPY raw_events/entries/postings", t["_copy_journal"]),
        ("    chain_link (HMAC-SHA256 keyed chain)", t["chain_link"]),
        ("    rows + PostgreSQL", t["_copy_journal"] - t["chain_link"]),
        ("  canonical_json (payload + detail, inside the steps above)", t["canonical_json"]),
        ("  rest: known_events, sort, save books/offsets", t["_write"] - inside_write),
        ("  COMMIT (deferred balance trigger)", total - t["_write"]),
    ]


# Functions whose cumulative time (under cProfile) says where it goes: (file suffix, name).
PROFILED = (
    ("ledger/journal.py", "write_batch", "write_batch (total)"),
    ("ledger/book.py", "canonical_json", "canonical_json (all callers)"),
    ("ledger/book.py", "_jsonable", "  of which _jsonable (recursive, pure Python)"),
    ("ledger/book.py", "post", "fold.post"),
    ("ledger/rating.py", "rate", "  of which PriceBook.rate"),
    ("ledger/rating.py", "to_json", "  of which ChargeLine.to_json (dataclasses.asdict)"),
    ("ledger/book.py", "copy", "  of which AccountBook.copy (rollback snapshot)"),
    ("ledger/codec.py", "decode", "Codec.decode"),
    ("psycopg/connection.py", "wait", "waiting on PostgreSQL (all statements)"),
    ("psycopg/_copy.py", "finish", "  of which end of COPY (server inserts rows)"),
    ("psycopg/transaction.py", "__exit__", "  of which COMMIT"),
)


def profile_sections(stats: pstats.Stats) -> list[tuple[str, float]]:
    """(label, cumulative seconds) of PROFILED, for the functions found in the profile.
    (cProfile counts a recursive function's cumulative time once, at its outermost call.)"""
    raw = stats.stats  # type: ignore[attr-defined]
    rows = []
    for suffix, name, label in PROFILED:
        ct = sum(v[3] for (f, _, fn), v in raw.items() if fn == name and f.endswith(suffix))
        if ct:
            rows.append((label, ct))
    return rows
