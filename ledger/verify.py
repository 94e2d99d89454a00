"""`ledger verify`: prove the live state is what the journal says it is.

In one REPEATABLE READ snapshot (so the live projection's rows and positions agree with each
other while workers keep running):
  1. the trial balance is zero in every currency;
  2. every account's hash chain is intact: each entry links to the previous entry of the same
     account, and its hash recomputes from what is stored (event payload, status, postings,
     rating detail, raw event bytes); the first broken link of each account is reported;
  3. the account-status projection recomputed from scratch up to the live positions equals the
     live one, column by column and state document by state document, its clock included;
  4. the invoices recomputed equal the issued ones;
  5. every account's receivable is what its issued invoices still owe plus what is not yet
     invoiced (charges waiting + rounding carry − payments waiting to be applied).
Each difference is reported with what it concerns; any difference means a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import psycopg

from ledger import db
from ledger.book import Entry, Posting, canonical_json, chain_hash
from ledger.db import QUERIES
from ledger.journal import GENESIS
from ledger.policy import Policy
from ledger.reports import trial_balance
from ledger.settings import Settings
from projections.account_status import AccountStatusProjection, InvoiceIssued
from projections.fold import invoice_row, status_row
from projections.rebuild import recompute

STATUS_COLUMNS = (
    "account_id", "opened", "suspended", "reasons", "status_version", "credit_balance",
    "receivable", "state", "shard", "tier", "effective_limit", "month", "month_to_date_spend",
    "tick_sensitive",
)  # fmt: skip
INVOICE_COLUMNS = (
    "invoice_id", "account_id", "month", "issued_at", "currency", "exact_total", "amount_due",
    "lines",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Difference:
    check: str  # trial_balance | hash_chain | projection | invoice | position | receivable
    subject: str  # what it concerns: an account, an entry, a shard, an invoice
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.subject}: {self.detail}"


def verify(
    settings: Settings, dsn: str, *, progress: Callable[[int, int], None] | None = None
) -> list[Difference]:
    projection = AccountStatusProjection(Policy.load(settings.policy))
    with db.connect(dsn) as conn:
        conn.execute(QUERIES["set_repeatable_read"])
        differences = _trial_balance(conn)
        differences += check_hash_chains(conn)
        positions = {
            shard: (position, clock)
            for shard, position, clock in conn.execute(
                QUERIES["projection_positions"], (projection.name,)
            )
        }
        shards = recompute(
            conn, projection, {s: p for s, (p, _) in positions.items()}, progress=progress
        )
        for shard, (_, clock) in sorted(positions.items()):
            if shards[shard].clock != clock:
                differences.append(
                    Difference(
                        "position",
                        f"shard {shard}",
                        f"last tick live={clock} recomputed={shards[shard].clock}",
                    )
                )
        live = {row[0]: row for row in conn.execute(QUERIES["all_account_status"])}
        recomputed = {
            account_id: status_row(projection, shard, state)
            for shard, s in shards.items()
            for account_id, state in s.states.items()
        }
        differences += _compare("projection", STATUS_COLUMNS, live, recomputed)
        issued = {row[0]: row for row in conn.execute(QUERIES["all_invoices"])}
        invoices = {
            effect.invoice["invoice_id"]: invoice_row(effect.invoice)
            for s in shards.values()
            for effect in s.effects
            if isinstance(effect, InvoiceIssued)
        }
        differences += _compare("invoice", INVOICE_COLUMNS, issued, invoices)
        differences += [
            Difference(
                "receivable",
                account_id,
                f"receivable {state.receivable} != invoices owed {state.invoiced_outstanding} "
                f"+ not yet invoiced {state.unbilled}",
            )
            for s in shards.values()
            for account_id, state in sorted(s.states.items())
            if state.receivable != state.invoiced_outstanding + state.unbilled
        ]
        conn.rollback()
    return differences


def _trial_balance(conn: psycopg.Connection) -> list[Difference]:
    tb = trial_balance(conn)
    return [
        Difference("trial_balance", currency, f"postings sum to {total}, not 0")
        for currency, total in sorted(tb.totals.items())
        if total != 0
    ]


def check_hash_chains(conn: psycopg.Connection) -> list[Difference]:
    """The first broken link of every account whose chain does not verify."""
    broken: dict[str, Difference] = {}
    previous: dict[str, bytes] = {}
    for row in conn.execute(QUERIES["chain_entries"]):
        (account_id, shard, seq, event_id, event_type, status, payload, detail, prev_hash,
         entry_hash, raw, accounts, amounts) = row  # fmt: skip
        key = account_id or f"(ticks of shard {shard})"
        if key in broken:
            continue
        where = f"account {account_id!r} entry ({shard}, {seq}) {event_type} {event_id}"
        expected_prev = GENESIS if not account_id else previous.get(account_id, GENESIS)
        entry = Entry(
            status,
            tuple(Posting(a, Decimal(v)) for a, v in zip(accounts, amounts, strict=True)),
            detail=detail,
        )
        recomputed = chain_hash(bytes(prev_hash), canonical_json(payload), entry, bytes(raw or b""))
        if bytes(prev_hash) != expected_prev:
            broken[key] = Difference("hash_chain", where, "does not link to the previous entry")
        elif recomputed != bytes(entry_hash):
            broken[key] = Difference(
                "hash_chain", where, "content changed since it was journaled (hash mismatch)"
            )
        previous[account_id] = bytes(entry_hash)
    return sorted(broken.values(), key=lambda d: d.subject)


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
