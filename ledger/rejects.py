"""`ledger rejects`: what was quarantined, and feeding it again once it is fixed.

An event is rejected for a reason that may go away: its writer schema was unknown (add it
to `schemas/history/`), a bound in the policy was too tight, a bug raised a processing error.
`replay` feeds each open reject, one at a time and in rejection order, through the same writer
as the live consumer (its own transaction, no Kafka offsets, no second dead-letter copy). One
that is now accepted is journaled, and the projections pick it up like any entry; its reject
row is marked resolved. One still refused stays open, with the reason it gets now.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import structlog

from ledger import db, topics
from ledger.book import LedgerFold
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.errors import DecodeError
from ledger.journal import LedgerWriter
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.replay import StoredRecord
from ledger.settings import Settings

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class RejectsReplayed:
    journaled: list[int] = dataclasses.field(default_factory=list)
    duplicates: list[int] = dataclasses.field(default_factory=list)
    still_rejected: Counter = dataclasses.field(default_factory=Counter)


def summary(dsn: str) -> list[tuple[str, int, int]]:
    """(reason, open, resolved) per rejection reason."""
    with db.connect(dsn) as conn:
        return conn.execute(QUERIES["rejects_by_reason"]).fetchall()


def replay_rejects(
    settings: Settings,
    dsn: str,
    *,
    reason: str | None = None,
    limit: int = 100_000,
    codec: Codec | None = None,
) -> RejectsReplayed:
    codec = codec or Codec.default()
    fold = LedgerFold(PriceBook.load(settings.price_book), Policy.load(settings.policy))
    outcome = RejectsReplayed()
    with db.connect(dsn) as conn:
        writer = LedgerWriter(
            conn,
            fold,
            group_id=settings.consumer_group,
            deadletter_topic=settings.topic(topics.DEADLETTER),
            codec=codec,
        )
        rows = conn.execute(QUERIES["open_rejects"], {"reason": reason, "limit": limit})
        for reject_id, topic, partition, offset, key, raw, old_reason in rows.fetchall():
            record = StoredRecord(topic, partition, offset, key, bytes(raw))
            result = writer.write_batch([record], replay=True)
            if result.journaled:
                outcome.journaled.append(reject_id)
                resolution = "journaled"
            elif result.duplicates:
                outcome.duplicates.append(reject_id)
                resolution = "already journaled (same event_id and body)"
            else:
                outcome.still_rejected[_reason_now(codec, raw, old_reason)] += 1
                continue
            conn.execute(QUERIES["resolve_reject"], (resolution, reject_id))
            conn.commit()
            log.info("reject_resolved", id=reject_id, was=old_reason, resolution=resolution)
    return outcome


def _reason_now(codec: Codec, raw: bytes, old_reason: str) -> str:
    try:
        codec.decode(bytes(raw))
    except DecodeError as exc:
        return exc.reason
    return old_reason
