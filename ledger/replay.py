"""`ledger replay`: rebuild a journal from another journal's raw events, in its order.

Finance and auditors replay history into an empty database to reproduce every number: the
events are fed to the same fold in exactly the source journal's order (shard by shard, by
sequence), PeriodTicks included, so entries, hash chains, balances and invoices come out
identical. The replay database is an audit copy: its outbox is marked published, so nothing
it derives is ever sent to Kafka again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime

import structlog

from ledger import chain_keys, db, shard_pool, topics
from ledger.book import LedgerFold
from ledger.db import QUERIES
from ledger.errors import LedgerError
from ledger.journal import LedgerWriter
from ledger.log import configure_logging
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.settings import Settings
from projections.worker import ProjectionWorker

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class StoredRecord:
    """A raw event as journaled, in the shape of a Kafka record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple = ()
    recorded_at: datetime | None = None  # when the source journal recorded it: its clock


# Below this many events, one process is faster than several: starting one takes what
# ~1,500 events take to replay.
PARALLEL_FROM = 10_000


def replay(
    settings: Settings,
    source_dsn: str,
    target_dsn: str,
    *,
    batch_size: int = 2000,
    progress: Callable[[int, int], None] | None = None,
    jobs: int | None = None,
) -> int:
    """Replay every event journaled in `source_dsn` into the empty, migrated `target_dsn`
    (the writer's: `ledger replay` migrates it as the owner first), then bring its
    projections up to date. Returns the number of events replayed. `source_dsn` is only
    read: a reader's URL is enough.

    Shards are independent (an account, its chain, clock and configuration versions all live
    on one), so `jobs` processes replay one shard each at a time (None: one per core, from
    PARALLEL_FROM events on; 1: all in this process, shard after shard)."""
    db.require_current_schema(target_dsn)
    with db.connect(source_dsn) as source, db.connect(target_dsn) as target:
        if not target.execute(QUERIES["journal_is_empty"]).fetchone()[0]:
            raise LedgerError("replay target already has a journal: replay into an empty one")
        shards = dict(source.execute(QUERIES["replay_shards"]).fetchall())
    total, done = sum(shards.values()), 0

    def count(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    processes = shard_pool.process_count(jobs, total, PARALLEL_FROM, len(shards))
    if processes > 1:
        calls = {s: (settings, source_dsn, target_dsn, [s], batch_size) for s in shards}
        setup = (configure_logging, (settings,))  # a spawned process starts with no logging
        for _, replayed in shard_pool.each_shard(processes, replay_shards, calls, setup=setup):
            count(replayed)
    else:
        replay_shards(settings, source_dsn, target_dsn, sorted(shards), batch_size, count)
    worker = ProjectionWorker(settings, target_dsn)
    try:
        worker.drain()
    finally:
        worker.close()
    with db.connect(target_dsn) as target:
        target.execute(QUERIES["mark_all_published"])
    log.info("replay_finished", events=done)
    return done


def replay_shards(
    settings: Settings,
    source_dsn: str,
    target_dsn: str,
    shards: list[int],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """The raw events of `shards`, fed to the writer in their source journal order, in
    batches; returns how many (`progress` gets each batch's count)."""
    fold = LedgerFold(PriceBook.load(settings.price_book), Policy.load(settings.policy))
    done = 0
    with db.connect(source_dsn) as source, db.connect(target_dsn) as target:
        writer = LedgerWriter(
            target,
            fold,
            keys=chain_keys.load(settings),
            group_id="replay",
            deadletter_topic=settings.topic(topics.DEADLETTER),
        )
        with source.cursor(name="replay_source") as cur:
            cur.itersize = batch_size
            cur.execute(QUERIES["replay_source"], (shards,))
            while rows := cur.fetchmany(batch_size):
                records = [
                    StoredRecord(
                        topic, partition, offset, account_id.encode() or None, raw, (), recorded
                    )
                    for topic, partition, offset, account_id, raw, recorded in rows
                ]
                result = writer.write_batch(records, replay=True)
                if result.rejected or result.duplicates:
                    raise LedgerError(
                        f"replay diverged: {result.rejected} rejected, {result.duplicates} "
                        "duplicates among events the source journal accepted"
                    )
                done += len(records)
                if progress is not None:
                    progress(len(records))
    return done
