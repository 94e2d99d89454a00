"""Projections recomputed from the journal: the shared fold from scratch, and the rebuild.

`recompute` folds every shard's journal up to given positions into fresh states, in memory,
with the same loop the live worker uses, so its result must equal the live projection byte for
byte (`ledger verify` checks that). `rebuild` writes such a recomputation into a new table while
the ledger consumer and the live projection keep running, then swaps it in atomically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime

import psycopg
import structlog

from ledger import db, shard_pool
from ledger.db import QUERIES
from ledger.errors import UnfoldableEntryError
from ledger.log import configure_logging
from ledger.policy import Policy
from ledger.settings import Settings
from projections.account_status import AccountStatus, AccountStatusProjection, Effect
from projections.fold import fold_entries, status_row
from projections.worker import read_entries

log = structlog.get_logger(__name__)

CHUNK = 5000
Progress = Callable[[int, int], None]


@dataclasses.dataclass
class ShardState:
    """One shard's projection as recomputed: its accounts, clock and position."""

    states: dict[str, AccountStatus] = dataclasses.field(default_factory=dict)
    clock: datetime | None = None
    position: int = 0
    effects: list[Effect] = dataclasses.field(default_factory=list)
    # Why the shard could not be folded past `position` (advance with tolerate=True), or None.
    unfoldable: str | None = None

    def advance(
        self,
        conn: psycopg.Connection,
        projection: AccountStatusProjection,
        shard: int,
        upto: int,
        *,
        keep: type[Effect] | None = None,
        progress: Callable[[int], None] | None = None,
        tolerate: bool = False,
    ) -> set[str]:
        """Fold this shard's entries (position, upto]; returns the accounts touched. Effects
        of type `keep` are added to `effects`. An entry that does not fold raises
        UnfoldableEntryError; with `tolerate`, the shard stops there instead, and
        `unfoldable` says why (verify reports it)."""
        touched: set[str] = set()
        while self.position < upto and self.unfoldable is None:
            end = min(upto, self.position + CHUNK)
            entries = read_entries(conn, shard, self.position, end)
            touched |= {e.account_id for e in entries if e.account_id}
            before = set(self.states)
            # Accounts a month-turn or close tick revisited change too, even with no effect.
            try:
                effects, self.clock = fold_entries(
                    projection, self.states, entries, self.clock, visited=touched
                )
            except UnfoldableEntryError as exc:
                if not tolerate:
                    raise
                self.unfoldable = str(exc)
                break
            touched |= set(self.states) - before
            touched |= {e.account_id for e in effects}
            if keep is not None:
                self.effects += [e for e in effects if isinstance(e, keep)]
            done, self.position = end - self.position, end
            if progress is not None:
                progress(done)
        return touched


def recompute(
    conn: psycopg.Connection,
    projection: AccountStatusProjection,
    positions: dict[int, int],
    *,
    progress: Progress | None = None,
    keep: type[Effect] | None = None,
    tolerate: bool = False,
) -> dict[int, ShardState]:
    """Every shard folded from scratch up to `positions[shard]`, with the effects of type
    `keep` (only those: all of them would grow with the journal); `tolerate` as for
    ShardState.advance."""
    total, done = sum(positions.values()), 0
    shards = {}

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for shard, upto in sorted(positions.items()):
        shards[shard] = ShardState()
        shards[shard].advance(
            conn, projection, shard, upto, keep=keep, progress=tick, tolerate=tolerate
        )
    return shards


# Below this many entries to fold, one process is faster than several (measured on the
# benchmark's journal: 31,403 entries rebuilt in 1.6 s by one process, 2.0 s by two).
PARALLEL_FROM = 50_000


def _fold_shard(dsn: str, policy: Policy, shard: int, upto: int) -> tuple[ShardState, Policy]:
    """One shard folded from scratch up to `upto` on a connection of its own (in this process
    or a spawned one); its state and the policy in force there at `upto` (the default, unless
    the shard journaled one)."""
    projection = AccountStatusProjection(policy)
    with db.connect(dsn) as conn:
        state = ShardState()
        state.advance(conn, projection, shard, upto)
    return state, projection.policies.get(shard, policy)


def _fold_apart(
    settings: Settings,
    dsn: str,
    projection: AccountStatusProjection,
    shards: dict[int, ShardState],
    behind: dict[int, int],
    jobs: int,
    report: Callable[[int], None],
) -> None:
    """The shards in `behind` (all at position 0) folded from scratch, `jobs` processes at a
    time (this one included), each shard in one process: shards are independent (an account
    lives on one, and so do its policy and clock), so the states are those of one process
    folding them in turn."""
    calls = {shard: (dsn, projection.default_policy, shard, upto) for shard, upto in behind.items()}
    setup = (configure_logging, (settings,))  # a spawned process starts with no logging
    for shard, (state, policy) in shard_pool.each_shard(jobs, _fold_shard, calls, setup=setup):
        shards[shard], projection.policies[shard] = state, policy
        report(0)


def rebuild(
    settings: Settings, dsn: str, *, progress: Progress | None = None, jobs: int | None = None
) -> int:
    """Rebuild `account_status` from the journal and swap it in; returns accounts rebuilt.

    1. fold each shard from scratch up to the live projection's position, chasing it while it
       moves (never past it: what the live projection has not applied, it will publish); the
       first pass folds `jobs` shards at a time, each in a process of its own (None: one per
       core, if there are at least PARALLEL_FROM entries to fold; 1: all in this process);
    2. COPY the states into `account_status_rebuild`;
    3. in one transaction: lock the live positions (the live worker pauses), fold the last
       entries up to them, replace those rows, swap the table's rows into `account_status`.
    Effects of the rebuilt fold are dropped: everything up to the live positions was already
    published by the live projection, so the rebuild publishes nothing twice."""
    projection = AccountStatusProjection(Policy.load(settings.policy))
    name = projection.name
    with db.connect(dsn) as conn:
        conn.execute(QUERIES["drop_status_rebuild"])
        conn.execute(QUERIES["create_status_rebuild"])
        conn.commit()
        shards: dict[int, ShardState] = {}
        total = 0

        def report(_: int) -> None:
            if progress is not None:
                progress(sum(s.position for s in shards.values()), total)

        while True:  # chase the live positions until a pass finds nothing new
            live = {s: p for s, p, _ in conn.execute(QUERIES["projection_positions"], (name,))}
            conn.commit()
            behind = {
                s: p for s, p in live.items() if shards.setdefault(s, ShardState()).position < p
            }
            if not behind:
                break
            total = sum(live.values())
            fresh = {s: p for s, p in behind.items() if shards[s].position == 0}
            processes = shard_pool.process_count(
                jobs, sum(fresh.values()), PARALLEL_FROM, len(fresh)
            )
            if processes > 1:
                _fold_apart(settings, dsn, projection, shards, fresh, processes, report)
                behind = {s: p for s, p in behind.items() if s not in fresh}
            for shard, upto in sorted(behind.items()):
                shards[shard].advance(conn, projection, shard, upto, progress=report)
        report(0)  # caught up: the bar ends at its total
        with conn.cursor().copy(QUERIES["copy_status_rebuild"]) as copy:
            for shard, state in sorted(shards.items()):
                for account in state.states.values():
                    copy.write_row(status_row(projection, shard, account))
        conn.commit()

        with conn.transaction():
            touched: set[str] = set()
            for shard, position, _ in conn.execute(
                QUERIES["lock_projection_positions"], (name,)
            ).fetchall():
                touched |= shards.setdefault(shard, ShardState()).advance(
                    conn, projection, shard, position
                )
            conn.execute(QUERIES["delete_status_rebuild_rows"], (sorted(touched),))
            with conn.cursor().copy(QUERIES["copy_status_rebuild"]) as copy:
                for shard, state in shards.items():
                    for account_id in touched & set(state.states):
                        copy.write_row(status_row(projection, shard, state.states[account_id]))
            conn.execute(QUERIES["swap_status_rebuild"])
        count = sum(len(s.states) for s in shards.values())
    log.info("projection_rebuilt", projection=name, accounts=count)
    return count
