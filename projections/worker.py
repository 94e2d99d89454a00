"""Projection worker: reads the journal shard by shard and keeps `account_status` current.

Per shard, one transaction per step: lock the shard's position row (SKIP LOCKED, so several
workers split the shards and never process one twice), read the entries after it, fold them,
save the account states, the outbox rows of every status change and the new position, commit.
Positions are per shard and shard sequences are gapless and commit in order, so no entry that
commits late can be skipped.

A worker frozen inside a step (SIGSTOP, a paused VM, a host gone without closing its
connection) would hold its shard's position row, and every other worker skips a locked row:
the shard's projection, and so its suspensions, would wait for it. So the connection sets
`idle_in_transaction_session_timeout` to `LEDGER_LEASE_TIMEOUT_S`: PostgreSQL ends such a
session and another worker takes the shard at its next pass. Steps are sized (like the ledger's
batches, `BatchSizer`) so that one takes at most a quarter of that; a step the server ended
anyway (a machine too loaded) is redone smaller, from the stored position.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

import psycopg
import structlog
from psycopg.types.json import Jsonb

from ledger import db, metrics, topics
from ledger.backoff import Outage
from ledger.codec import Codec
from ledger.consumer import BatchSizer
from ledger.db import QUERIES
from ledger.policy import Policy
from ledger.settings import Settings
from projections.account_status import (
    POSTINGS_ONLY,
    AccountStatus,
    AccountStatusProjection,
    Effect,
    InvoiceIssued,
    JournalEntry,
)
from projections.fold import fold_entries, invoice_row, output_event, status_row

log = structlog.get_logger(__name__)


def read_entries(conn: psycopg.Connection, shard: int, after: int, upto: int) -> list[JournalEntry]:
    """The entries of `shard` in (after, upto] with their postings, for the account_status fold:
    the payload of an event type it folds from the postings alone (POSTINGS_ONLY) is not
    read (an empty dict). The entries are read first: the postings of every entry seen have
    committed with it, so the second read (a later snapshot, under read committed) has them
    all."""
    rows = conn.execute(QUERIES["read_entries"], (POSTINGS_ONLY, shard, after, upto)).fetchall()
    postings: dict[int, list[tuple[str, Decimal]]] = {}
    for seq, ledger_account, amount in conn.execute(
        QUERIES["read_entry_postings"], (shard, after, upto)
    ).fetchall():
        postings.setdefault(seq, []).append((ledger_account, amount))
    return [
        JournalEntry(*row[:6], {} if row[6] is None else row[6], tuple(postings.get(row[1], ())))
        for row in rows
    ]


class ProjectionWorker:
    def __init__(
        self, settings: Settings, dsn: str, *, codec: Codec | None = None, batch_size: int = 5000
    ):
        self.settings = settings
        self.dsn = dsn
        self.codec = codec or Codec.default()
        self.policy = Policy.load(settings.policy)
        self.projection = AccountStatusProjection(self.policy)
        self.sizer = BatchSizer(batch_size, settings.lease_timeout_s / 4)
        self.status_topic = settings.topic(topics.STATUS)
        self.conn = self._connect()
        # shard -> the position after this worker's last committed step there
        self._policy_known: dict[int, int] = {}

    def _connect(self) -> psycopg.Connection:
        return db.connect(self.dsn, idle_in_transaction_timeout_s=self.settings.lease_timeout_s)

    def close(self) -> None:
        _close_quietly(self.conn)

    def drain(self) -> int:
        """Fold until nothing is left to fold (as of each pass); returns the entries applied.
        For a caller that has stopped writing (replay, tests), not for a live worker. A step
        the server ended (`projection_step_timed_out`) is redone smaller on a new connection."""
        applied = 0
        while True:
            try:
                step = self.run_once()
            except psycopg.errors.IdleInTransactionSessionTimeout:
                _close_quietly(self.conn)
                self.conn = self._connect()
                continue
            if not step:
                return applied
            applied += step

    def run_once(self) -> int:
        """One pass over the shards with entries not folded yet; returns the number of
        entries applied."""
        name = self.projection.name
        behind = self.conn.execute(QUERIES["shards_behind"], (name,)).fetchall()
        for shard, _, has_position in behind:
            if not has_position:
                self.conn.execute(QUERIES["ensure_position"], (name, shard))
        self.conn.commit()
        return sum(self._step(shard, head) for shard, head, _ in behind)

    def _step(self, shard: int, head: int) -> int:
        name = self.projection.name
        # The shard's policy is known without asking the journal only where this worker's
        # own last committed step left the shard (any failure forgets it).
        known = self._policy_known.pop(shard, None)
        started = time.monotonic()
        entries: list[JournalEntry] = []
        try:
            with self.conn.transaction():
                row = self.conn.execute(QUERIES["lock_position"], (name, shard)).fetchone()
                if row is None or row[0] >= head:
                    return 0  # another worker holds this shard, or nothing new
                position, clock = row
                if position != known:
                    self._use_policy_at(shard, position)
                upto = min(head, position + self.sizer.limit)
                entries = read_entries(self.conn, shard, position, upto)
                effects, clock = self._apply(shard, entries, clock)
                self.conn.execute(QUERIES["save_position"], (upto, clock, name, shard, upto))
                if effects:
                    self.conn.execute(QUERIES["notify_outbox"])
        except psycopg.errors.IdleInTransactionSessionTimeout:
            # The server ended the step: this worker was frozen or starved in the middle of
            # it. Another worker may have the shard by now; this one redoes it smaller.
            log.warning(
                "projection_step_timed_out",
                shard=shard,
                entries=len(entries),
                seconds=round(time.monotonic() - started, 1),
            )
            self.sizer.limit = max(1, self.sizer.limit // 2)
            raise
        self.sizer.written(len(entries), time.monotonic() - started)
        self._policy_known[shard] = upto
        log.debug("projection_step", shard=shard, entries=len(entries), effects=len(effects))
        return len(entries)

    def _use_policy_at(self, shard: int, position: int) -> None:
        """The policy journaled on `shard` at or before `position` (another worker may have
        folded the entries since this one last did): the shard's policy from here."""
        row = self.conn.execute(QUERIES["shard_policy_at"], (shard, position)).fetchone()
        if row is None:
            self.projection.policies.pop(shard, None)
        else:
            self.projection.configure(shard, row[0])

    def _apply(
        self, shard: int, entries: list[JournalEntry], clock: datetime | None
    ) -> tuple[list[Effect], datetime | None]:
        states = self._load(QUERIES["load_account_status"], sorted({e.account_id for e in entries}))

        def tick_sensitive() -> Iterable[tuple[str, dict]]:
            return self.conn.execute(QUERIES["load_tick_sensitive"], (shard,))

        effects, clock = fold_entries(self.projection, states, entries, clock, tick_sensitive)
        with self.conn.cursor() as cur:
            cur.executemany(
                QUERIES["save_account_status"],
                [status_row(self.projection, shard, s) for s in states.values()],
            )
            cur.executemany(QUERIES["insert_outbox"], [self._outbox_row(e) for e in effects])
            cur.executemany(
                QUERIES["insert_invoice"],
                [invoice_row(e.invoice) for e in effects if isinstance(e, InvoiceIssued)],
            )
        return effects, clock

    def _load(self, query: str, *params) -> dict[str, AccountStatus]:
        return {
            account_id: AccountStatus.from_json(account_id, state)
            for account_id, state in self.conn.execute(query, params)
        }

    def _outbox_row(self, effect: Effect) -> tuple:
        event_type, event = output_event(effect)
        headers = [[k, v.hex()] for k, v in self.codec.headers(event_type)]
        return (
            self.status_topic,
            effect.account_id.encode(),
            self.codec.encode(event_type, event),
            Jsonb(headers),
        )

    def run(self, stop: threading.Event) -> None:
        """Keep the projection current until `stop` is set. When PostgreSQL goes away (a
        restart, a failover, a dropped connection) both connections are dropped and made
        again with backoff, logging `dependency_down` every few seconds; a step that was
        cut short rolls back and is redone from the stored position."""
        outage = Outage("projections", "postgresql")
        listener: psycopg.Connection | None = None
        log.info("projection_worker_started", projection=self.projection.name)
        try:
            while not stop.is_set():
                try:
                    if listener is None:
                        listener = self._listen()
                    if self.conn.closed or self.conn.broken:
                        self.conn = self._connect()
                    applied = self.run_once()
                    metrics.PROJECTION_ENTRIES.inc(applied)
                    outage.ok()
                    if applied:
                        continue
                    timeout = self.settings.poll_interval_ms / 1000
                    for _ in listener.notifies(timeout=timeout, stop_after=1):
                        pass
                except psycopg.errors.IdleInTransactionSessionTimeout:
                    self._drop_failed_connection()  # logged by the step; made again at once
                except (psycopg.OperationalError, psycopg.InterfaceError, db.DatabaseError) as exc:
                    _close_quietly(listener)
                    listener = None
                    self._drop_failed_connection()
                    stop.wait(outage.failed(exc))
        finally:
            _close_quietly(listener)
            self.close()
            log.info("projection_worker_stopped")

    def _listen(self) -> psycopg.Connection:
        listener = db.connect(self.dsn, autocommit=True)
        try:
            listener.execute("LISTEN ledger_journal")
        except BaseException:
            _close_quietly(listener)
            raise
        return listener

    def _drop_failed_connection(self) -> None:
        """After an error: a lost connection is closed (made again on the next attempt), a
        live one is rolled back."""
        if self.conn.closed:
            return
        if self.conn.broken:
            _close_quietly(self.conn)
            return
        try:
            self.conn.rollback()
        except psycopg.Error:
            _close_quietly(self.conn)


def _close_quietly(conn: psycopg.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(psycopg.Error):
            conn.close()


__all__ = ["ProjectionWorker", "fold_entries", "invoice_row", "output_event", "status_row"]
