"""`ledger verify`: prove the live state is what the journal says it is, and that the journal is
what was journaled.

In one REPEATABLE READ snapshot (so the live projection's rows and positions agree with each
other while workers keep running):
  1. the trial balance is zero in every currency, and every posting belongs to a journal
     entry;
  2. every shard's hash chain is intact, walked in shard_seq order: each entry links to the
     previous entry of its shard, its keyed link (HMAC-SHA256 under the chain key its
     `chain_key_id` names, `ledger.book.chain_link`) recomputes from what is stored (event
     payload, status, postings, rating detail, raw event bytes, position and the columns the
     readers use), its postings belong to its account in USD, no shard_seq is missing, and
     `shard_heads` ends where the journal ends. Entries journaled before the chain was keyed
     (`chain_key_id` NULL) must come first in their shard and are checked with their old
     per-account unkeyed links. The FIRST entry of each shard that does not verify is
     reported (shard, seq, event id): whoever changed it without the key could not make it,
     or anything after it, verify;
  3. with checkpoints (from the checkpoint topic, or a digest an auditor kept;
     `ledger.checkpoints`): the entry at each checkpoint's seq has the checkpoint's link, and
     no shard ends before a checkpoint of it (a cut tail names the first missing entry);
  4. every account book (`account_books`, the writer's own state: grants, what is left of
     each, receivable, home shard, next expiry) equals the book folded from the journal's
     entries as recorded (`ledger.book.apply_recorded`);
  5. the account-status projection recomputed from scratch up to the live positions equals the
     live one, column by column and state document by state document, its clock included;
  6. the invoices recomputed (read from the journal's InvoiceIssued entries) equal the issued
     ones (the `invoices` table);
  7. the receivables, from the journal's accounts alone: each account's invoiced receivable
     (customer:A:invoiced) is the sum of its issued invoices less what payments applied to
     them; its receivable (customer:A:receivable) is exactly what waits for an invoice in its
     book (charges by month and kind − payments made before the invoice); revenue:rounding is
     the sum of (exact − due) of the issued invoices; the projection's receivable is the sum
     of the two.
Each difference is reported with what it concerns; any difference means a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from ledger import chain_keys, db, shard_pool
from ledger.book import (
    REVENUE_ROUNDING,
    AccountBook,
    Entry,
    Posting,
    apply_recorded,
    canonical_json,
    chain_hash,
    chain_link,
    link_header,
)
from ledger.chain_keys import ChainKeys
from ledger.checkpoints import Checkpoint
from ledger.config_versions import CONFIG_PUBLISHED, published_policy
from ledger.db import QUERIES
from ledger.journal import GENESIS
from ledger.log import configure_logging, describe_error
from ledger.policy import Policy
from ledger.reports import trial_balance
from ledger.settings import Settings
from projections.account_status import AccountStatusProjection, InvoiceIssued
from projections.fold import invoice_row, status_row
from projections.rebuild import ShardState, recompute

STATUS_COLUMNS = (
    "account_id", "opened", "suspended", "reasons", "status_version", "credit_balance",
    "receivable", "state", "shard", "tier", "effective_limit", "month", "month_to_date_spend",
    "tick_sensitive",
)  # fmt: skip
STREAM_ROWS = 2000  # journal rows fetched at a time
INVOICE_COLUMNS = (
    "invoice_id", "account_id", "month", "issued_at", "currency", "exact_total", "amount_due",
    "lines",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Difference:
    # trial_balance | hash_chain | checkpoint | account_book | projection | invoice | position
    # | receivable
    check: str
    subject: str  # what it concerns: an account, an entry, a shard, an invoice
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.subject}: {self.detail}"


def verify(
    settings: Settings,
    dsn: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    keys: ChainKeys | None = None,
    checkpoints: list[Checkpoint] | None = None,
    notes: list[str] | None = None,
    jobs: int | None = None,
) -> list[Difference]:
    """Every difference found (none: verified). `keys` default to the settings' chain key
    file. With `checkpoints`, the journal is checked against them too, and `notes` (when
    given) receives what they do not cover. Shards are walked and recomputed `jobs` at a
    time, each in a process of its own sharing this snapshot (None: one per core from
    PARALLEL_FROM entries on; 1: all in this process)."""
    policy = Policy.load(settings.policy)
    projection = AccountStatusProjection(policy)
    keys = keys if keys is not None else chain_keys.load(settings)
    with db.connect(dsn) as conn:
        conn.execute(QUERIES["set_repeatable_read"])
        differences = _trial_balance(conn) + _orphan_postings(conn)
        positions = {
            shard: (position, clock)
            for shard, position, clock in conn.execute(
                QUERIES["projection_positions"], (projection.name,)
            )
        }
        upto = {s: p for s, (p, _) in positions.items()}
        journal_shards = [shard for (shard,) in conn.execute(QUERIES["journal_shards"])]
        entries = sum(seq for _, seq, _ in conn.execute(QUERIES["shard_chain_heads"]))
        processes = shard_pool.process_count(
            jobs, entries, PARALLEL_FROM, len(set(journal_shards) | set(upto))
        )
        if processes > 1:
            (snapshot,) = conn.execute(QUERIES["export_snapshot"]).fetchone()
            walked, shards = _verify_apart(
                settings, dsn, snapshot, keys, projection, checkpoints, journal_shards, upto,
                processes, progress,
            )  # fmt: skip
        else:
            walked = _walk_all(conn, journal_shards, keys, policy, checkpoints)
            shards = recompute(
                conn, projection, upto, progress=progress, keep=InvoiceIssued, tolerate=True
            )
        differences += _finish_journal(conn, walked, checkpoints, notes)
        # A shard whose journal does not fold is reported once, and left out of the checks of
        # what the projection made (a partial fold would differ from every row after it).
        unfoldable = {shard for shard, s in shards.items() if s.unfoldable is not None}
        differences += [
            Difference("projection", f"shard {shard}", str(shards[shard].unfoldable))
            for shard in sorted(unfoldable)
        ]
        shards = {shard: s for shard, s in shards.items() if shard not in unfoldable}
        for shard, (_, clock) in sorted(positions.items()):
            if shard in shards and shards[shard].clock != clock:
                differences.append(
                    Difference(
                        "position",
                        f"shard {shard}",
                        f"last tick live={clock} recomputed={shards[shard].clock}",
                    )
                )
        shard_column = STATUS_COLUMNS.index("shard")
        live, left_out = {}, set()
        for row in conn.execute(QUERIES["all_account_status"]):
            if row[shard_column] in unfoldable:
                left_out.add(row[0])
            else:
                live[row[0]] = row
        recomputed = {
            account_id: status_row(projection, shard, state)[: len(STATUS_COLUMNS)]
            for shard, s in shards.items()
            for account_id, state in s.states.items()
        }
        differences += _compare("projection", STATUS_COLUMNS, live, recomputed)
        # A state that says it folded past its shard's position would skip entries it never
        # folded (folded_through is bookkeeping, not compared with a recomputation).
        differences += [
            Difference(
                "projection",
                account_id,
                f"folded_through {folded} is past shard {shard}'s position {position}",
            )
            for account_id, shard, folded, position in conn.execute(
                QUERIES["status_folded_ahead"], (projection.name,)
            )
            if shard not in unfoldable
        ]
        issued = {row[0]: row for row in conn.execute(QUERIES["all_invoices"])}
        invoices = {
            effect.invoice["invoice_id"]: invoice_row(effect.invoice)
            for s in shards.values()
            for effect in s.effects
        }
        differences += _compare(
            "invoice",
            INVOICE_COLUMNS,
            {key: row for key, row in issued.items() if row[1] not in left_out},
            invoices,
        )
        owed = {
            account_id: state.receivable
            for s in shards.values()
            for account_id, state in s.states.items()
        }
        differences += _receivables(conn, issued, owed)
        conn.rollback()
    return differences


# Below this many entries, one process is faster than several (a process takes ~0.7 s to
# start; verify goes through ~4,000 entries a second in one).
PARALLEL_FROM = 50_000


def _verify_apart(
    settings: Settings,
    dsn: str,
    snapshot: str,
    keys: ChainKeys,
    projection: AccountStatusProjection,
    checkpoints: list[Checkpoint] | None,
    journal_shards: list[int],
    upto: dict[int, int],
    processes: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[_Walked, dict[int, ShardState]]:
    """Each shard walked (chain, checkpoints, books) and its projection recomputed, `processes`
    at a time (this one included), all in the snapshot `snapshot`; merged in shard order, as
    one process going through them in turn would have found them."""
    shards = sorted(set(journal_shards) | set(upto))
    secrets = ChainKeys(dict(keys.secrets), keys.source)  # without its HMAC objects
    total, done = sum(upto.values()), 0
    results: dict[int, tuple[_Walked, ShardState | None, Policy]] = {}
    calls = {
        shard: (
            dsn, snapshot, secrets, projection.default_policy, checkpoints, shard,
            shard in journal_shards, upto.get(shard),
        )
        for shard in shards
    }  # fmt: skip
    setup = (configure_logging, (settings,))  # a spawned process starts with no logging
    for shard, result in shard_pool.each_shard(processes, _verify_shard, calls, setup=setup):
        results[shard] = result
        done += upto.get(shard, 0)
        if progress is not None:
            progress(done, total)
    walked, states = _Walked(), {}
    for shard in shards:
        shard_walked, state, policy = results[shard]
        walked.merge(shard_walked)
        if state is not None:
            states[shard] = state
            projection.policies[shard] = policy
    return walked, states


def _verify_shard(
    dsn: str,
    snapshot: str,
    keys: ChainKeys,
    policy: Policy,
    checkpoints: list[Checkpoint] | None,
    shard: int,
    has_entries: bool,
    position: int | None,
) -> tuple[_Walked, ShardState | None, Policy]:
    """On a connection of its own (in this process or a spawned one), in the snapshot
    `snapshot`: the shard's walk, its projection recomputed up to `position` (None: the
    projection has no position there) and the policy in force at that position."""
    projection = AccountStatusProjection(policy)
    state = None
    with db.connect(dsn) as conn:
        conn.execute(QUERIES["set_repeatable_read"])
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        walked = _walk_all(conn, [shard] if has_entries else [], keys, policy, checkpoints)
        if position is not None:
            state = ShardState()
            state.advance(conn, projection, shard, position, keep=InvoiceIssued, tolerate=True)
        conn.rollback()
    return walked, state, projection.policies.get(shard, policy)


def _receivables(
    conn: psycopg.Connection, issued: dict[str, tuple], owed: dict[str, Decimal]
) -> list[Difference]:
    """Check 7: the receivable accounts against the issued invoices and the books."""
    out = []
    invoiced_total: dict[str, Decimal] = {}
    rounding = Decimal(0)
    for _, account_id, _, _, _, exact, due, _ in issued.values():
        invoiced_total[account_id] = invoiced_total.get(account_id, Decimal(0)) + due
        rounding += exact - due
    (posted,) = conn.execute(QUERIES["ledger_account_total"], (REVENUE_ROUNDING,)).fetchone()
    if posted != rounding:
        out.append(
            Difference(
                "receivable",
                REVENUE_ROUNDING,
                f"posted {_shown(posted)} != the issued invoices' exact − due {_shown(rounding)}",
            )
        )
    paid = dict(conn.execute(QUERIES["applied_to_invoices"]).fetchall())
    live, unreadable = _live_books(conn)  # an unreadable book: reported by _compare_books
    waiting = {account_id: _waiting(book) for account_id, (book, *_) in live.items()}
    balances = {a: (r, i) for a, r, i in conn.execute(QUERIES["receivable_balances"])}
    for account_id in sorted(set(balances) | set(invoiced_total) | set(waiting)):
        receivable, invoiced = balances.get(account_id, (Decimal(0), Decimal(0)))
        unpaid = invoiced_total.get(account_id, Decimal(0)) - paid.get(account_id, Decimal(0))
        if invoiced != unpaid:
            out.append(
                Difference(
                    "receivable",
                    account_id,
                    f"invoiced receivable {_shown(invoiced)} != issued invoices less what was "
                    f"paid on them {_shown(unpaid)}",
                )
            )
        if account_id not in unreadable and receivable != waiting.get(account_id, Decimal(0)):
            out.append(
                Difference(
                    "receivable",
                    account_id,
                    f"receivable {_shown(receivable)} != what waits for an invoice "
                    f"{_shown(waiting.get(account_id, Decimal(0)))}",
                )
            )
        if account_id in owed and owed[account_id] != receivable + invoiced:
            out.append(
                Difference(
                    "receivable",
                    account_id,
                    f"the projection's receivable {_shown(owed[account_id])} != the journal's "
                    f"{_shown(receivable + invoiced)}",
                )
            )
    return out


def _waiting(book: AccountBook) -> Decimal:
    charges = sum((v for kinds in book.pending.values() for v in kinds.values()), Decimal(0))
    return charges - book.prepaid


def _trial_balance(conn: psycopg.Connection) -> list[Difference]:
    tb = trial_balance(conn)
    return [
        Difference("trial_balance", currency, f"postings sum to {total}, not 0")
        for currency, total in sorted(tb.totals.items())
        if total != 0
    ]


def _orphan_postings(conn: psycopg.Connection) -> list[Difference]:
    """Postings of no journal entry: invisible to every check that reads entries, yet in every
    sum over postings (the first 100)."""
    return [
        Difference(
            "postings",
            f"entry ({shard}, {seq})",
            f"{count} posting(s) summing to {total} of a journal entry that does not exist",
        )
        for shard, seq, count, total in conn.execute(QUERIES["orphan_postings"])
    ]


@dataclasses.dataclass
class _ShardWalk:
    last_seq: int = 0
    head: bytes = GENESIS
    keyed: bool = False  # a keyed entry was seen: no unkeyed one may follow
    broken: bool = False  # its first broken entry is reported; the rest is not checked


@dataclasses.dataclass
class _Walked:
    """What walking shards of the journal found, before the checks that need all of them."""

    out: list[Difference] = dataclasses.field(default_factory=list)
    walks: dict[int, _ShardWalk] = dataclasses.field(default_factory=dict)
    books: dict[str, tuple[AccountBook, int]] = dataclasses.field(default_factory=dict)
    unfoldable: set[str] = dataclasses.field(default_factory=set)
    legacy_heads: dict[str, bytes] = dataclasses.field(default_factory=dict)  # last unkeyed link

    def merge(self, other: _Walked) -> None:
        """Another walk's shards (all after this one's): an account with entries in both
        does not fold, as if one walk had gone through them all."""
        self.out += other.out
        self.walks |= other.walks
        self.unfoldable |= other.unfoldable
        for account_id, (book, shard) in other.books.items():
            if account_id not in self.books:
                self.books[account_id] = (book, shard)
            elif account_id not in self.unfoldable:
                self.unfoldable.add(account_id)
                home = self.books[account_id][1]
                self.out.append(
                    Difference(
                        "account_book",
                        account_id,
                        f"the journal does not fold: it has entries in shard {home} and in "
                        f"shard {shard}",
                    )
                )


def check_journal(
    conn: psycopg.Connection,
    keys: ChainKeys,
    policy: Policy,
    checkpoints: list[Checkpoint] | None = None,
    notes: list[str] | None = None,
) -> list[Difference]:
    """The hash chains, the checkpoints and the account books (checks 2-4 of the module
    docstring), in one pass over the journal, shard after shard."""
    shards = [shard for (shard,) in conn.execute(QUERIES["journal_shards"]).fetchall()]
    walked = _walk_all(conn, shards, keys, policy, checkpoints)
    return _finish_journal(conn, walked, checkpoints, notes)


def _walk_all(
    conn: psycopg.Connection,
    shards: list[int],
    keys: ChainKeys,
    policy: Policy,
    checkpoints: list[Checkpoint] | None,
) -> _Walked:
    """`shards` walked one after the other in this process, with one state."""
    walked = _Walked()
    for shard in shards:
        _walk_shard(conn, shard, walked, keys, policy, checkpoints)
    return walked


def _walk_shard(
    conn: psycopg.Connection,
    shard: int,
    walked: _Walked,
    keys: ChainKeys,
    policy: Policy,
    checkpoints: list[Checkpoint] | None,
) -> None:
    """One shard's hash chain, checkpoints and the books of its accounts, into `walked`."""
    out, books, unfoldable = walked.out, walked.books, walked.unfoldable
    walk = walked.walks.get(shard) or _ShardWalk()  # kept once the shard has an entry
    legacy_heads = walked.legacy_heads
    shard_policy = policy  # the policy journaled on the shard so far (default: `policy`)
    at_seq: dict[int, list[Checkpoint]] = {}
    for cp in checkpoints or ():
        if cp.shard == shard:
            at_seq.setdefault(cp.seq, []).append(cp)

    # Streamed through a server-side cursor: memory grows with the accounts (their books), not
    # with the journal's length.
    rows = conn.cursor(name=f"verify_chain_entries_{shard}")
    rows.itersize = STREAM_ROWS
    rows.execute(QUERIES["chain_entries"], (shard,))
    for row in rows:
        (account_id, shard, seq, event_id, event_type, status, payload, detail, prev_hash,
         entry_hash, raw, accounts, amounts, key_id, occurred_at, price_version, cause,
         postings_owned) = row  # fmt: skip
        prev_hash, entry_hash = bytes(prev_hash), bytes(entry_hash)
        postings = [(a, Decimal(v)) for a, v in zip(accounts, amounts, strict=True)]
        walked.walks[shard] = walk
        where = f"account {account_id!r} entry ({shard}, {seq}) {event_type} {event_id}"
        if not walk.broken:
            problem = None
            if seq != walk.last_seq + 1:
                problem = (
                    f"entries ({shard}, {walk.last_seq + 1}..{seq - 1}) are missing: the "
                    "shard's sequence has a gap"
                )
            else:
                entry = Entry(status, tuple(Posting(a, v) for a, v in postings), detail=detail)
                problem = _link_problem(
                    keys, walk, legacy_heads, entry, account_id, key_id, prev_hash, entry_hash,
                    link_header(key_id or "", shard, seq, event_type, account_id, occurred_at,
                                price_version, cause),
                    canonical_json(payload), bytes(raw or b""), postings_owned,
                )  # fmt: skip
            if problem is None:
                for cp in at_seq.get(seq, ()):
                    if cp.head != entry_hash:
                        problem = (
                            f"differs from the {cp.describe()} ({cp.where}): the journal up to "
                            "this entry was changed, or linked anew, after it was checkpointed"
                        )
                        break
            if problem is not None:
                walk.broken = True
                out.append(Difference("hash_chain", where, problem))
            walk.keyed = walk.keyed or key_id is not None
        walk.last_seq, walk.head = seq, entry_hash
        if event_type == CONFIG_PUBLISHED:  # a policy applies from its entry on, as written
            published = published_policy(payload)
            shard_policy = shard_policy if published is None else published
        if account_id and account_id not in unfoldable:
            book, home = books.setdefault(account_id, (AccountBook(account_id), shard))
            try:
                if home != shard:
                    raise ValueError(f"it has entries in shard {home} and in shard {shard}")
                if not isinstance(payload, dict) or not isinstance(detail, dict):
                    # Only a change behind the writer's back stores another JSON value.
                    raise TypeError(
                        f"entry ({shard}, {seq}) holds a payload of JSON type "
                        f"{_json_type(payload)} and a detail of {_json_type(detail)}, "
                        "where the writer stores objects"
                    )
                apply_recorded(book, event_type, payload, detail, postings, shard_policy)
            except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
                unfoldable.add(account_id)
                out.append(
                    Difference("account_book", account_id, f"the journal does not fold: {exc}")
                )
    rows.close()


def _finish_journal(
    conn: psycopg.Connection,
    walked: _Walked,
    checkpoints: list[Checkpoint] | None,
    notes: list[str] | None,
) -> list[Difference]:
    """The checks that need every shard walked: the heads, the checkpoints' coverage, the
    books."""
    out = list(walked.out)
    walks = walked.walks
    for shard, last_seq, head in conn.execute(QUERIES["shard_chain_heads"]):
        walk = walks.get(shard, _ShardWalk())
        if (last_seq, bytes(head)) != (walk.last_seq, walk.head) and not walk.broken:
            out.append(
                Difference(
                    "hash_chain",
                    f"shard {shard}",
                    f"shard_heads says the chain ends at seq {last_seq}, the journal ends at "
                    f"seq {walk.last_seq} (or with another link)",
                )
            )
    out += _checkpoint_coverage(walks, checkpoints, notes)
    out += _compare_books(conn, walked.books, walked.unfoldable)
    return out


def _json_type(value: object) -> str:
    """The JSON type of a value as psycopg loads it."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _link_problem(
    keys: ChainKeys,
    walk: _ShardWalk,
    legacy_heads: dict[str, bytes],
    entry: Entry,
    account_id: str,
    key_id: str | None,
    prev_hash: bytes,
    entry_hash: bytes,
    header: str,
    payload_json: str,
    raw: bytes,
    postings_owned: bool,
) -> str | None:
    """Why this entry's link does not verify, or None."""
    if not postings_owned:
        return "a posting names another account or currency than the entry"
    if key_id is None:  # journaled before the chain was keyed: its old per-account link
        if walk.keyed:
            return "an unkeyed entry after keyed ones (unkeyed links are only older entries)"
        expected_prev = legacy_heads.get(account_id, GENESIS) if account_id else GENESIS
        if prev_hash != expected_prev:
            return "does not link to the previous entry of its account (unkeyed link)"
        if chain_hash(prev_hash, payload_json, entry, raw) != entry_hash:
            return "content changed since it was journaled (unkeyed hash mismatch)"
        if account_id:
            legacy_heads[account_id] = entry_hash
        return None
    if prev_hash != walk.head:
        return "does not link to the previous entry of its shard"
    mac = keys.mac(key_id)
    if mac is None:
        return (
            f"linked with chain key {key_id!r}, which the key file does not hold: it cannot "
            "be verified"
        )
    if chain_link(mac, prev_hash, header, payload_json, entry, raw) != entry_hash:
        return (
            "content changed since it was journaled (hash mismatch: its keyed link does not "
            "verify; changed, or linked anew without the chain key)"
        )
    return None


def _checkpoint_coverage(
    walks: dict[int, _ShardWalk],
    checkpoints: list[Checkpoint] | None,
    notes: list[str] | None,
) -> list[Difference]:
    """Shards that end before a checkpoint of them (a cut tail); notes on what no
    checkpoint covers yet."""
    if checkpoints is None:
        return []
    out = []
    highest: dict[int, Checkpoint] = {}
    for cp in checkpoints:
        if cp.shard not in highest or cp.seq > highest[cp.shard].seq:
            highest[cp.shard] = cp
    for shard, cp in sorted(highest.items()):
        walk = walks.get(shard, _ShardWalk())
        if cp.seq > walk.last_seq:
            named = f" (its last was event {cp.event_id})" if cp.event_id else ""
            out.append(
                Difference(
                    "checkpoint",
                    f"entry ({shard}, {walk.last_seq + 1})",
                    f"missing: shard {shard} ends at seq {walk.last_seq}, but a {cp.describe()} "
                    f"({cp.where}) covers entries up to seq {cp.seq}{named}: entries were "
                    "removed",
                )
            )
    if notes is not None:
        for shard, walk in sorted(walks.items()):
            cp = highest.get(shard)
            if cp is None:
                notes.append(f"shard {shard}: no checkpoint yet (seq 1..{walk.last_seq} uncovered)")
            elif walk.last_seq > cp.seq:
                notes.append(
                    f"shard {shard}: seq {cp.seq + 1}..{walk.last_seq} journaled after the "
                    f"latest checkpoint ({cp.at.isoformat()}); not covered yet"
                )
    return out


def _compare_books(
    conn: psycopg.Connection, folded: dict[str, tuple[AccountBook, int]], unfoldable: set[str]
) -> list[Difference]:
    """Each account_books row against the book folded from the journal."""
    out = []
    live, unreadable = _live_books(conn)
    for account_id in sorted(set(live) | set(folded) | set(unreadable)):
        if account_id in unreadable:
            why = unreadable[account_id]
            out.append(Difference("account_book", account_id, f"the book cannot be read: {why}"))
            continue
        if account_id in unfoldable:
            continue
        if account_id not in folded:
            out.append(Difference("account_book", account_id, "a book without journal entries"))
            continue
        if account_id not in live:
            out.append(Difference("account_book", account_id, "journal entries without a book"))
            continue
        want, home = folded[account_id]
        have, shard, next_expiry, first_pending = live[account_id]
        found = _book_fields(have, shard, next_expiry) | {"first_pending_month": first_pending}
        expected = _book_fields(want, home, want.next_expiry()) | {
            "first_pending_month": want.first_pending_month()
        }
        for field in sorted(set(found) | set(expected)):
            if found.get(field) != expected.get(field):
                out.append(
                    Difference(
                        "account_book",
                        account_id,
                        f"{field}: book={_shown(found.get(field))} "
                        f"journal={_shown(expected.get(field))}",
                    )
                )
    return out


def _live_books(
    conn: psycopg.Connection,
) -> tuple[dict[str, tuple[AccountBook, int, datetime | None, str | None]], dict[str, str]]:
    """The writer's books (account_books) as (book, shard, next_expiry, first_pending_month)
    per account, and the books that cannot be read ({account: why}: changed by hand into
    something the writer never writes)."""
    live, unreadable = {}, {}
    for account_id, book, shard, next_expiry, first_pending in conn.execute(
        QUERIES["all_account_books"]
    ):
        try:
            live[account_id] = (AccountBook.from_json(account_id, book), shard, next_expiry,
                                first_pending)  # fmt: skip
        except Exception as exc:
            unreadable[account_id] = describe_error(exc)
    return live, unreadable


def _book_fields(book: AccountBook, shard: int, next_expiry: datetime | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "opened": book.opened,
        "receivable": book.receivable,
        "invoiced": book.invoiced,
        "prepaid": book.prepaid,
        "last_invoice": book.last_invoice,
        "next_order": book.next_order,
        "shard": shard,
        "next_expiry": next_expiry,
    }
    for month, kinds in book.pending.items():
        for kind, amount in kinds.items():
            fields[f"pending {month} {kind}"] = amount
    for grant in book.grants.values():
        for name in ("kind", "granted", "remaining", "expires_at", "order", "expired", "applied",
                     "revoked"):  # fmt: skip
            fields[f"grant {grant.grant_id!r} {name}"] = getattr(grant, name)
    return fields


def _shown(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value else "0"
    if isinstance(value, datetime):
        return value.isoformat()
    return "absent" if value is None else str(value)


def _compare(
    check: str, columns: tuple[str, ...], live: dict[str, tuple], recomputed: dict[str, tuple]
) -> list[Difference]:
    out = []
    for key in sorted(set(live) | set(recomputed)):
        if key not in recomputed:
            out.append(Difference(check, key, "live but not in the journal's recomputation"))
            continue
        if key not in live:
            out.append(Difference(check, key, "missing from the live table"))
            continue
        for column, have, want in zip(columns, live[key], recomputed[key], strict=True):
            if _normal(have) != _normal(want):
                out.append(
                    Difference(check, key, f"{column}: live={have!r} recomputed={_normal(want)!r}")
                )
    return out


def _normal(value: Any) -> Any:
    """Comparable form: JSON documents through JSON (as jsonb would store them); numbers as
    Decimals (numeric(38, 9) pads what the fold computed with fewer places)."""
    value = getattr(value, "obj", value)  # psycopg's Jsonb wrapper
    if isinstance(value, dict | list) and not (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        return json.loads(json.dumps(value, sort_keys=True))
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return Decimal(value)
    return value
