"""Read-only reports over the journal and projections: trial balance, one account's view."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import psycopg

from ledger.book import stored_pending
from ledger.db import QUERIES
from ledger.log import describe_error
from ledger.money import plain
from projections.billing import month_of


@dataclasses.dataclass(frozen=True)
class TrialBalance:
    totals: dict[str, Decimal]  # currency → sum of all postings
    postings: int

    @property
    def balanced(self) -> bool:
        return all(total == 0 for total in self.totals.values())


def trial_balance(conn: psycopg.Connection) -> TrialBalance:
    rows = conn.execute(QUERIES["trial_balance"]).fetchall()
    return TrialBalance({c: Decimal(t) for c, t, _ in rows}, sum(n for _, _, n in rows))


def account_view(conn: psycopg.Connection, account_id: str, last: int = 10) -> dict[str, Any]:
    """Everything `ledger account show` prints, as plain data (decimals as strings)."""
    row = conn.execute(QUERIES["account_status_row"], (account_id,)).fetchone()
    ledger = conn.execute(QUERIES["account_ledger_balances"], (account_id,)).fetchall()
    entries = conn.execute(QUERIES["account_last_entries"], (account_id, last)).fetchall()
    view: dict[str, Any] = {"account_id": account_id, "known": row is not None or bool(ledger)}
    if row is not None:
        (opened, suspended, reasons, version, credit, receivable, state, tier, limit, month,
         mtd, clock) = row  # fmt: skip
        if clock is not None and month is not None and month_of(clock) > month:
            # The shard's clock has turned the month since this account was last touched.
            month, mtd = month_of(clock), Decimal(0)
        view |= {
            "opened": opened,
            "status": "suspended" if suspended else "active",
            "reasons": list(reasons),
            "status_version": version,
            "credit_balance": plain(credit),
            "receivable": plain(receivable),
            "grants": state["grants"],
            "payment_methods": state["payment_methods"],
            "payment_failed": state["payment_failed"],
            "manual_hold": state["manual_hold"],
            # The tier's number (an integer); null when a contract limit replaces the tiers.
            "tier": int(tier) if tier.isdigit() else None,
            "limit_source": "tier" if tier.isdigit() else "contract",
            "effective_limit": plain(limit) if limit is not None else None,
            "month": month,
            "month_to_date_spend": plain(mtd),
            "headroom": plain(limit - mtd) if limit is not None else None,
            **_open_charges(conn, account_id),
            "invoiced_outstanding": state.get("invoiced_outstanding", "0"),
        }
    view["invoices"] = [
        _invoice(invoice_id, account_id, issued, due, exact, lines) | {"month": m}
        for invoice_id, m, issued, due, exact, lines in conn.execute(
            QUERIES["account_invoices"], (account_id,)
        )
    ]
    view["ledger_accounts"] = {acct: plain(total) for acct, total in ledger}
    view["last_entries"] = [
        {
            "seq": seq,
            "occurred_at": occurred.isoformat(),
            "event_type": event_type,
            "status": status,
            "price_version": price_version,
            "charge": plain(charge),
        }
        for seq, occurred, event_type, status, price_version, charge in entries
    ]
    return view


def _open_charges(conn: psycopg.Connection, account_id: str) -> dict[str, Any]:
    """`open_charges`: charges waiting for an invoice, by month and kind (the ledger writer's
    book); with `book_unreadable` (why) instead when the book's pending charges are not what
    the writer writes (changed by hand: the writer holds the account until it is restored)."""
    row = conn.execute(QUERIES["account_book_pending"], (account_id,)).fetchone()
    try:
        pending = stored_pending(row[0] if row else {})
    except (TypeError, ValueError, ArithmeticError) as exc:
        return {"open_charges": {}, "book_unreadable": describe_error(exc)}
    return {
        "open_charges": {
            month: {kind: str(amount) for kind, amount in kinds.items()}
            for month, kinds in pending.items()
        }
    }


def invoices_of_month(conn: psycopg.Connection, month: str) -> list[dict[str, Any]]:
    return [_invoice(*row) for row in conn.execute(QUERIES["invoices_of_month"], (month,))]


def _invoice(invoice_id, account_id, issued, due, exact, lines) -> dict[str, Any]:
    return {
        "invoice_id": invoice_id,
        "account_id": account_id,
        "issued_at": issued.isoformat(),
        "amount_due": plain(due),
        "exact_total": plain(exact),
        "lines": lines,
    }
