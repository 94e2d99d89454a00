"""`ledger prune`: retention without loss.

Deleted, and nothing else: outbox rows published more than `LEDGER_OUTBOX_RETENTION_DAYS`
ago, and rejects resolved (journaled by `ledger rejects replay`, or dismissed by an operator
with `ledger rejects resolve`) more than `LEDGER_REJECTS_RETENTION_DAYS` ago whose dead-letter
copies are all published (the copies go with them). The journal (raw events, entries,
postings, invoices) keeps everything. The deleting is done by the database function
`ledger_prune` (owned by the owner role, SECURITY DEFINER), so the writer role that runs it
needs no DELETE privilege on either table, and it refuses a retention under one day.
"""

from __future__ import annotations

import dataclasses

import structlog

from ledger import db
from ledger.db import QUERIES
from ledger.settings import Settings

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Pruned:
    outbox_rows: int
    rejects: int


def prune(settings: Settings, dsn: str) -> Pruned:
    """Delete what retention allows (see the module doc); returns what was deleted."""
    with db.connect(dsn) as conn:
        outbox_rows, rejects = conn.execute(
            QUERIES["prune"], (settings.outbox_retention_days, settings.rejects_retention_days)
        ).fetchone()
        conn.commit()
    pruned = Pruned(outbox_rows, rejects)
    log.info(
        "pruned",
        outbox_rows=outbox_rows,
        rejects=rejects,
        outbox_retention_days=settings.outbox_retention_days,
        rejects_retention_days=settings.rejects_retention_days,
    )
    return pruned
