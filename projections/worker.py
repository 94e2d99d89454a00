"""Projection worker: reads the journal shard by shard and keeps `account_status` current.

Per shard, one transaction per step: lock the shard's position row (SKIP LOCKED, so several
workers split the shards and never process one twice), read the entries after it, fold them,
save the account states, the outbox rows of every status change and the new position, commit.
Positions are per shard and shard sequences are gapless and commit in order, so no entry that
commits late can be skipped.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from decimal import Decimal

import psycopg
import structlog
from psycopg.types.json import Jsonb

from ledger import db, topics
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.settings import Settings
from projections.account_status import (
    AccountStatus,
    AccountStatusProjection,
    JournalEntry,
    StatusChanged,
)

log = structlog.get_logger(__name__)

STATUS_EVENT_NAMESPACE = uuid.UUID("6f1d2c1e-3b7a-4f51-9a59-1f0f4f3c2b10")


def status_event(change: StatusChanged) -> tuple[str, dict]:
    """The output event for a status change. Its event_id is derived from (account,
    status_version), so a replay produces the very same event."""
    event = {
        "event_id": str(
            uuid.uuid5(STATUS_EVENT_NAMESPACE, f"{change.account_id}:{change.status_version}")
        ),
        "account_id": change.account_id,
        "occurred_at": change.effective_at,
        "effective_at": change.effective_at,
        "status_version": change.status_version,
    }
    if change.suspended:
        return "AccountSuspended", {**event, "reasons": list(change.reasons)}
    return "AccountReinstated", event


def read_entries(conn: psycopg.Connection, shard: int, after: int, upto: int):
    for row in conn.execute(QUERIES["read_entries"], (shard, after, upto)):
        shard_, seq, account_id, event_type, status, occurred_at, payload, accts, amounts = row
        yield JournalEntry(
            shard_,
            seq,
            account_id,
            event_type,
            status,
            occurred_at,
            payload,
            tuple(zip(accts, amounts, strict=True)),
        )


class ProjectionWorker:
    def __init__(
        self, settings: Settings, dsn: str, *, codec: Codec | None = None, batch_size: int = 5000
    ):
        self.settings = settings
        self.dsn = dsn
        self.codec = codec or Codec.default()
        self.projection = AccountStatusProjection()
        self.batch_size = batch_size
        self.status_topic = settings.topic(topics.STATUS)
        self.conn = db.connect(dsn)

    def close(self) -> None:
        self.conn.close()

    def run_once(self) -> int:
        """One pass over every shard; returns the number of entries applied."""
        heads = self.conn.execute(QUERIES["known_shards"]).fetchall()
        for shard, _ in heads:
            self.conn.execute(QUERIES["ensure_position"], (self.projection.name, shard))
        self.conn.commit()
        return sum(self._step(shard, head) for shard, head in heads)

    def _step(self, shard: int, head: int) -> int:
        name = self.projection.name
        with self.conn.transaction():
            row = self.conn.execute(QUERIES["lock_position"], (name, shard)).fetchone()
            if row is None or row[0] >= head:
                return 0  # another worker holds this shard, or nothing new
            position = row[0]
            upto = min(head, position + self.batch_size)
            entries = list(read_entries(self.conn, shard, position, upto))
            changes = self._apply(entries)
            self.conn.execute(QUERIES["save_position"], (upto, name, shard, upto))
            if changes:
                self.conn.execute(QUERIES["notify_outbox"])
        log.debug("projection_step", shard=shard, entries=len(entries), changes=len(changes))
        return len(entries)

    def _apply(self, entries: list[JournalEntry]) -> list[StatusChanged]:
        ids = sorted({e.account_id for e in entries})
        states = {
            account_id: AccountStatus.from_json(account_id, state)
            for account_id, state in self.conn.execute(QUERIES["load_account_status"], (ids,))
        }
        changes: list[StatusChanged] = []
        for entry in entries:
            state = states.setdefault(entry.account_id, AccountStatus(entry.account_id))
            changes += self.projection.apply(state, entry)
        with self.conn.cursor() as cur:
            cur.executemany(
                QUERIES["save_account_status"], [_status_row(s) for s in states.values()]
            )
            cur.executemany(QUERIES["insert_outbox"], list(self._outbox_rows(changes)))
        return changes

    def _outbox_rows(self, changes: Iterable[StatusChanged]):
        for change in changes:
            event_type, event = status_event(change)
            headers = [[k, v.hex()] for k, v in self.codec.headers(event_type)]
            yield (
                self.status_topic,
                change.account_id.encode(),
                self.codec.encode(event_type, event),
                Jsonb(headers),
            )

    def run(self, stop: threading.Event) -> None:
        listener = db.connect(self.dsn, autocommit=True)
        listener.execute("LISTEN ledger_journal")
        log.info("projection_worker_started", projection=self.projection.name)
        try:
            while not stop.is_set():
                if self.run_once():
                    continue
                timeout = self.settings.poll_interval_ms / 1000
                for _ in listener.notifies(timeout=timeout, stop_after=1):
                    pass
        finally:
            listener.close()
            self.close()
            log.info("projection_worker_stopped")


def _status_row(state: AccountStatus) -> tuple:
    return (
        state.account_id,
        state.opened,
        state.suspended,
        list(state.reasons),
        state.status_version,
        state.credit_balance,
        state.receivable,
        Jsonb(state.to_json()),
    )


__all__ = ["Decimal", "ProjectionWorker", "status_event"]
