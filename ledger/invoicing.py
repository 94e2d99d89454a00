"""The month close, in the journal: which invoices a PeriodTick issues and their postings. Pure.

The one implementation used by the journal writer, the rule harness, replay (which re-runs the
writer) and, through the journal, every reader. When a shard's ledger clock (its journaled
PeriodTicks) moves past the close of month M (end of M + the policy's grace period), every
account of the shard with charges waiting (the book's `pending`) gets, for each month newly
closed by that tick, at most one derived `InvoiceIssued` entry:

    event_id     INV-<M>-<account>           (an invoice id is issued once)
    occurred_at  the tick's tick_at           (= the invoice's issued_at)
    cause        the tick's event_id
    payload      the invoice: lines, exact_total, amount_due, rounding (exact − due)
    postings     customer:A:receivable  −exact    (what it invoiced leaves "not yet invoiced")
                 customer:A:invoiced    +due      (issued invoices owe exactly their amounts)
                 revenue:rounding       exact−due (the rounding to the cent, either way)

The lines are `projections.billing.close_month`'s (usage of M, dated adjustment lines for
late usage of earlier months, credit_revoked, payments_applied). An invoice whose amount due is
not positive is not issued: its amounts wait for the next close. A month already closed (by an
earlier tick of the shard, or invoiced for the account) is never closed again: late charges for
it go on the next invoice. Months are only ever closed in order, by a tick later than the last.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from ledger.book import (
    REVENUE_ROUNDING,
    AccountBook,
    Entry,
    balanced_entry,
    invoiced_account,
    receivable_account,
    settle_unbilled,
)
from ledger.policy import Policy
from projections import billing

INVOICE_ISSUED = "InvoiceIssued"
# What an InvoiceIssued entry's payload holds besides the event's own fields: the invoice.
INVOICE_FIELDS = ("invoice_id", "account_id", "month", "issued_at", "currency", "lines",
                  "exact_total", "amount_due", "rounding")  # fmt: skip


def months_to_close(
    policy: Policy, tick_at: datetime, previous: datetime | None
) -> tuple[str | None, str | None]:
    """(the last month closed before, the last month closed after) a tick at `tick_at` that
    follows the shard's tick at `previous` (None: its first). Equal: the tick closes nothing."""
    before = billing.closed_through(previous, policy.grace_hours)
    if previous is not None and tick_at <= previous:
        return before, before
    return before, billing.closed_through(tick_at, policy.grace_hours)


def invoice_events(
    policy: Policy,
    tick_event: dict[str, Any],
    previous: datetime | None,
    account_id: str,
    book: AccountBook,
) -> list[tuple[dict[str, Any], Entry]]:
    """The InvoiceIssued events (derived from a PeriodTick at `tick_event['tick_at']` that
    follows the shard's tick at `previous`) and their entries for one account book, which is
    moved by them. Empty if the tick closes no month or nothing is due."""
    tick_at = tick_event["tick_at"]
    before, upto = months_to_close(policy, tick_at, previous)
    if upto is None or upto == before or not book.pending:
        return []
    first = billing.next_month(before) if before else min(min(book.pending), upto)
    if book.last_invoice is not None and first <= book.last_invoice:
        first = billing.next_month(book.last_invoice)
    out = []
    for month in billing.months_between(first, upto):
        if not book.pending:
            break
        close = billing.close_month(account_id, month, book.pending, book.prepaid, tick_at)
        invoice = close.invoice
        if invoice is None:
            continue
        exact, due = Decimal(invoice["exact_total"]), Decimal(invoice["amount_due"])
        book.pending, book.prepaid = close.pending, close.prepaid
        book.receivable -= exact
        book.invoiced += due
        book.last_invoice = month
        settle_unbilled(book)
        entry = balanced_entry(
            (receivable_account(account_id), -exact),
            (invoiced_account(account_id), due),
            (REVENUE_ROUNDING, exact - due),
            detail={
                "invoice_id": invoice["invoice_id"],
                "month": month,
                "exact_total": invoice["exact_total"],
                "amount_due": invoice["amount_due"],
                "rounding": invoice["rounding"],
            },
        )
        event = {
            "event_id": invoice["invoice_id"],
            "occurred_at": tick_at,
            "tick_event_id": tick_event["event_id"],
            **invoice,
        }
        out.append((event, entry))
    return out


def invoice_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The invoice an InvoiceIssued entry's payload (as journaled) carries."""
    return {k: payload[k] for k in INVOICE_FIELDS}


__all__ = ["INVOICE_FIELDS", "INVOICE_ISSUED", "invoice_events", "invoice_of", "months_to_close"]
