"""Projection worker: reads the journal shard by shard and keeps `account_status` current.

One transaction per pass over the shards behind: lock their position rows (SKIP LOCKED, so
several workers split the shards and never process one twice), read each locked shard's
entries after its position, fold them shard by shard, save the account states, the outbox rows
of every status change and the new positions, commit. Positions are per shard and shard
sequences are gapless and commit in order, so no entry that commits late can be skipped.
(A transaction per shard cost eight of everything per pass, the commit included, where the
ledger had committed one batch touching every shard: under load the projection spent more on
that than on folding.)

A worker frozen inside a pass (SIGSTOP, a paused VM, a host gone without closing its
connection) would hold its shards' position rows, and every other worker skips a locked row:
those shards' projection, and so their suspensions, would wait for it. So the connection sets
`idle_in_transaction_session_timeout` to `LEDGER_LEASE_TIMEOUT_S`: PostgreSQL ends such a
session and another worker takes the shards at its next pass. Passes are sized (like the
ledger's batches, `BatchSizer`) so that one takes at most a quarter of that; a pass the server
ended anyway (a machine too loaded) is redone smaller, from the stored positions.
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
from ledger.errors import UnfoldableEntryError
from ledger.log import describe_error
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

# Entries one pass may fold at most (fewer when a pass takes over a quarter of the lease
# timeout, BatchSizer). A pass writes each account it touched once, so larger passes write
# fewer states per entry: on the bench's 202,818-entry journal 20,000 drained 15 % faster
# than 5,000 (64-72k against 52-63k entries/s in-process) for 22 MiB more peak RSS (90 MiB).
STEP_MAX_ENTRIES = 20_000
# A shard whose next entry does not fold (a journal changed behind the writer's back) is
# tried again this often by a live worker; each attempt logs `projection_shard_stopped`.
STOPPED_RETRY_S = 30.0


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


def read_entries_of_shards(
    conn: psycopg.Connection, ranges: list[tuple[int, int, int]]
) -> dict[int, list[JournalEntry]]:
    """`read_entries` for several (shard, after, upto) ranges at once, by shard."""
    columns = [list(column) for column in zip(*ranges, strict=True)] if ranges else [[], [], []]
    rows = conn.execute(QUERIES["read_entries_of_shards"], (POSTINGS_ONLY, *columns)).fetchall()
    postings: dict[tuple[int, int], list[tuple[str, Decimal]]] = {}
    for shard, seq, ledger_account, amount in conn.execute(
        QUERIES["read_entry_postings_of_shards"], columns
    ).fetchall():
        postings.setdefault((shard, seq), []).append((ledger_account, amount))
    out: dict[int, list[JournalEntry]] = {shard: [] for shard, _, _ in ranges}
    for row in rows:
        out[row[0]].append(
            JournalEntry(
                *row[:6],
                {} if row[6] is None else row[6],
                tuple(postings.get((row[0], row[1]), ())),
            )
        )
    return out


class ProjectionWorker:
    def __init__(
        self,
        settings: Settings,
        dsn: str,
        *,
        codec: Codec | None = None,
        batch_size: int = STEP_MAX_ENTRIES,
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
        self._passes = 0
        # A live worker (`run`) folds on past a shard whose next entry does not fold: that
        # shard waits (retried every `stopped_retry_s`), the others go on. `drain` raises.
        self.isolate = False
        self.stopped_retry_s = STOPPED_RETRY_S
        self.stopped: dict[int, float] = {}  # shard -> when it is tried again (monotonic)

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
        """One pass over the shards with entries not folded yet, in one transaction; returns
        the number of entries applied."""
        name = self.projection.name
        behind = self.conn.execute(QUERIES["shards_behind"], (name,)).fetchall()
        if self.stopped:
            now = time.monotonic()
            behind = [row for row in behind if self.stopped.get(row[0], now) <= now]
        for shard, _, has_position, _ in behind:
            if not has_position:
                self.conn.execute(QUERIES["ensure_position"], (name, shard))
        self.conn.commit()
        if not behind:
            return 0
        return self._pass({shard: (head, position) for shard, head, _, position in behind})

    def _pass(self, behind: dict[int, tuple[int, int]]) -> int:
        """Fold up to a step's worth of entries (BatchSizer) of the shards `behind` (shard ->
        (head, position as last seen)) in one transaction. A pass takes whole shards' backlogs
        while they fit, starting one shard further at each pass so that every shard gets its
        turn under a backlog; a pass that took a few entries of every shard would write as
        many account states per entry as there are shards."""
        name = self.projection.name
        started = time.monotonic()
        order = sorted(behind)
        self._passes += 1
        first = self._passes % len(order)
        planned: dict[int, int] = {}  # shard -> entries planned
        room = self.sizer.limit
        for shard in order[first:] + order[:first]:
            if room <= 0:
                break
            head, position = behind[shard]
            planned[shard] = min(head - position, room)
            room -= planned[shard]
        ranges: list[tuple[int, int, int]] = []
        unreadable_policy: dict[int, str] = {}
        try:
            with self.conn.transaction():
                clocks: dict[int, datetime | None] = {}
                for shard, position, clock in self.conn.execute(
                    QUERIES["lock_positions"], (name, sorted(planned))
                ).fetchall():
                    head = behind[shard][0]
                    if position >= head:
                        continue  # another worker folded it since
                    ranges.append((shard, position, min(head, position + planned[shard])))
                    clocks[shard] = clock
                    # The shard's policy is known without asking the journal only where this
                    # worker's own last committed pass left the shard (failures forget it).
                    if self._policy_known.pop(shard, None) != position:
                        unread = self._use_policy_at(shard, position)
                        if unread is not None:
                            ranges.pop()  # the shard waits, like one whose entry won't fold
                            unreadable_policy[shard] = unread
                self._stop_shards(unreadable_policy)
                if not ranges:
                    return 0  # other workers hold these shards, or nothing new
                entries = read_entries_of_shards(self.conn, ranges)
                effects, clocks, failed = self._apply(entries, clocks)
                self._stop_shards(failed)
                ranges = [r for r in ranges if r[0] not in failed]
                shards = [shard for shard, _, _ in ranges]
                self.conn.execute(
                    QUERIES["save_positions"],
                    (shards, [upto for _, _, upto in ranges], [clocks[s] for s in shards], name),
                )
                if effects:
                    self.conn.execute(QUERIES["notify_outbox"])
        except psycopg.errors.IdleInTransactionSessionTimeout:
            # The server ended the pass: this worker was frozen or starved in the middle of
            # it. Another worker may have the shards by now; this one redoes it smaller.
            log.warning(
                "projection_step_timed_out",
                shards=[shard for shard, _, _ in ranges],
                entries=sum(upto - after for _, after, upto in ranges),
                seconds=round(time.monotonic() - started, 1),
            )
            self.sizer.limit = max(1, self.sizer.limit // 2)
            raise
        applied = sum(upto - after for _, after, upto in ranges)
        self.sizer.written(applied, time.monotonic() - started)
        for shard, _, upto in ranges:
            self._policy_known[shard] = upto
            if self.stopped.pop(shard, None) is not None:
                log.info("projection_shard_resumed", shard=shard)
        log.debug("projection_step", shards=len(ranges), entries=applied, effects=len(effects))
        return applied

    def _use_policy_at(self, shard: int, position: int) -> str | None:
        """The policy journaled on `shard` at or before `position` (another worker may have
        folded the entries since this one last did): the shard's policy from here. Returns
        why not when that entry does not read (changed by hand): under `isolate` the shard
        then waits as for an entry that does not fold; otherwise UnfoldableEntryError."""
        row = self.conn.execute(QUERIES["shard_policy_at"], (shard, position)).fetchone()
        if row is None:
            self.projection.policies.pop(shard, None)
            return None
        try:
            self.projection.configure(shard, row[0])
        except (ValueError, KeyError, TypeError) as exc:
            why = (
                f"the policy journaled on shard {shard} at or before entry {position} does not "
                f"read: {describe_error(exc)} (`ledger verify` says what changed)"
            )
            if not self.isolate:
                raise UnfoldableEntryError(why) from exc
            return why
        return None

    def _stop_shards(self, failed: dict[int, str]) -> None:
        """The shards whose entries did not fold wait; each is logged at every attempt."""
        for shard, error in sorted(failed.items()):
            self.stopped[shard] = time.monotonic() + self.stopped_retry_s
            log.error(
                "projection_shard_stopped",
                shard=shard,
                error=error,
                retry_in_s=self.stopped_retry_s,
            )

    def _apply(
        self, entries: dict[int, list[JournalEntry]], clocks: dict[int, datetime | None]
    ) -> tuple[list[Effect], dict[int, datetime | None], dict[int, str]]:
        """Fold each shard's entries (an account lives on one shard) and write the states,
        outbox rows and invoices; returns the effects, each shard's clock after, and (when
        `isolate`) the shards left out because an entry of theirs did not fold, with why."""
        loaded, unreadable = self._load(
            QUERIES["load_account_status"],
            sorted({e.account_id for shard_entries in entries.values() for e in shard_entries}),
        )
        effects: list[Effect] = []
        rows: list[tuple] = []
        failed: dict[int, str] = {}
        for shard, shard_entries in entries.items():
            after = shard_entries[0].shard_seq - 1  # the shard's position: states fold to it
            states: dict[str, AccountStatus] = {}

            def tick_sensitive(
                shard: int = shard, after: int = after, states: dict = states
            ) -> Iterable[tuple[str, AccountStatus]]:
                found, broken = self._load(QUERIES["load_tick_sensitive"], shard)
                for account_id, why in broken.items():
                    if account_id not in states:
                        found[account_id] = self._recompute(account_id, shard, after, why)
                return found.items()

            # An account without a state row is new to the projection, unless the shard's
            # folded entries hold some of it (its row deleted by hand): folded again too.
            stateless = sorted(
                {e.account_id for e in shard_entries} - loaded.keys() - unreadable.keys() - {""}
            )
            if stateless:
                for (account_id,) in self.conn.execute(
                    QUERIES["accounts_folded_before"], (stateless, shard, after)
                ):
                    unreadable[account_id] = "no state row, yet entries of it were folded"
            try:
                for e in shard_entries:
                    if e.account_id in states:
                        continue
                    if e.account_id in loaded:
                        states[e.account_id] = loaded[e.account_id]
                    elif e.account_id in unreadable:
                        why = unreadable[e.account_id]
                        states[e.account_id] = self._recompute(e.account_id, shard, after, why)
                refolded: list[JournalEntry] = []
                shard_effects, clocks[shard] = fold_entries(
                    self.projection,
                    states,
                    shard_entries,
                    clocks[shard],
                    tick_sensitive,
                    refolded=refolded,
                )
                if refolded:
                    # The shard's position was behind what its states had folded (moved
                    # back by hand, or restored from an older backup than the states).
                    log.error(
                        "projection_entries_already_folded",
                        shard=shard,
                        position=after,
                        skipped=len(refolded),
                        first=refolded[0].shard_seq,
                        last=refolded[-1].shard_seq,
                    )
            except UnfoldableEntryError as exc:
                if not self.isolate:
                    raise
                # Its states were copies (from_json): dropped with the shard's partial fold.
                failed[shard] = str(exc)
                self.projection.policies.pop(shard, None)  # a partial fold may have set it
                continue
            effects += shard_effects
            rows += [status_row(self.projection, shard, s) for s in states.values()]
        invoices = [invoice_row(e.invoice) for e in effects if isinstance(e, InvoiceIssued)]
        with self.conn.cursor() as cur:
            # No statement for an empty list (psycopg pays a round trip for one).
            for query, params in (
                ("save_account_status", rows),
                ("insert_outbox", [self._outbox_row(e) for e in effects]),
                ("insert_invoice", invoices),
            ):
                if params:
                    cur.executemany(QUERIES[query], params)
        return effects, clocks, failed

    def _load(self, query: str, *params) -> tuple[dict[str, AccountStatus], dict[str, str]]:
        """The account states a query selects, and those that cannot be read ({account: why}:
        a row changed by hand into something this worker never writes)."""
        states, unreadable = {}, {}
        for account_id, state, folded_through in self.conn.execute(query, params):
            try:
                states[account_id] = AccountStatus.from_json(account_id, state)
            except Exception as exc:
                unreadable[account_id] = describe_error(exc)
            else:
                states[account_id].folded_through = folded_through
        return states, unreadable

    def _recompute(self, account_id: str, shard: int, through: int, why: str) -> AccountStatus:
        """An account state that cannot be read, folded again from the journal up to the
        shard's position (`through`), as a rebuild would fold it; the pass goes on from it
        and writes it back. A state is derived data; the journal is the record. The fold's
        effects are dropped: they were published when the entries were first folded. Raises
        UnfoldableEntryError if the account's entries do not fold (the shard then waits)."""
        from ledger.audit import account_journal

        log.error(
            "projection_state_unreadable",
            account_id=account_id,
            shard=shard,
            error=why,
            recomputed_through=through,
        )
        entries, _ = account_journal(self.conn, account_id, shard, through=through)
        states = {account_id: AccountStatus(account_id)}
        fold_entries(AccountStatusProjection(self.projection.default_policy), states, entries, None)
        return states[account_id]

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
        self.isolate = True
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
