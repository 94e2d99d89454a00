"""Billing periods and invoices, pure: UTC calendar months, the month close, invoice lines.

The month close is decided by the LEDGER WRITER from journaled PeriodTicks (`ledger.invoicing`)
and journaled as an `InvoiceIssued` entry; the projections only read it. Rules (written down
here and in the README):
- A month is the UTC calendar month of an event's `occurred_at`.
- Month M is *closed* once a PeriodTick at or after (end of M + grace period) is journaled.
- At the close of M, an account with amounts waiting gets ONE invoice for M whose lines are:
  the usage of M charged to the receivable (not covered by credits); `adjustment` lines, dated,
  for usage of earlier, already closed months that arrived late; `credit_revoked` charges; and
  `payments_applied` (credit purchases and payments that reduced the receivable before it was
  invoiced, as a negative line).
- Lines keep the ledger's 9 decimals (written with 9 places, as the journal holds them). The
  amount due is their exact sum rounded half-up to the cent; the difference (`rounding` =
  exact − due, under half a cent) is posted to `revenue:rounding` by the invoice's entry, so
  nothing is carried to the next invoice.
- An invoice whose amount due is not positive is not issued; its amounts wait, unchanged, for
  the next close.
- An issued invoice never changes; an invoice id is issued once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from ledger.money import plain, quantize

ZERO = Decimal(0)
CENT = Decimal("0.01")


_NO_OFFSET = timedelta(0)


def month_of(when: datetime) -> str:
    """The month of `when` in UTC, as strftime("%Y-%m") would write it, without its cost (this
    runs for every usage event and every journal entry)."""
    if when.tzinfo is not UTC and when.utcoffset() != _NO_OFFSET:  # naive: local time
        when = when.astimezone(UTC)
    return f"{when.year}-{when.month:02d}"


def month_start(month: str) -> datetime:
    year, mon = map(int, month.split("-"))
    return datetime(year, mon, 1, tzinfo=UTC)


def next_month(month: str) -> str:
    year, mon = map(int, month.split("-"))
    return f"{year + mon // 12}-{mon % 12 + 1:02d}"


def months_between(first: str, last: str) -> Iterator[str]:
    month = first
    while month <= last:
        yield month
        month = next_month(month)


def closed_through(clock: datetime | None, grace_hours: int) -> str | None:
    """The latest month whose close is due at `clock` (end of month + grace <= clock)."""
    if clock is None:
        return None
    month = month_of(clock - timedelta(hours=grace_hours))
    # `month` is the month that the grace-shifted clock falls in: that one is still open.
    year, mon = map(int, month.split("-"))
    return f"{year - (mon == 1)}-{(mon - 2) % 12 + 1:02d}"


def invoice_id(account_id: str, month: str) -> str:
    return f"INV-{month}-{account_id}"


@dataclasses.dataclass(frozen=True)
class Close:
    """What closing one month does to an account's waiting amounts."""

    invoice: dict[str, Any] | None
    pending: dict[str, dict[str, Decimal]]
    prepaid: Decimal


def close_month(
    account_id: str,
    month: str,
    pending: dict[str, dict[str, Decimal]],
    prepaid: Decimal,
    issued_at: datetime,
) -> Close:
    """Close `month` for one account: the invoice (or None) and what waits afterwards.
    Amounts of later months stay pending. If the amount due is not positive, nothing is
    issued and everything waits as it was."""
    later = {m: kinds for m, kinds in pending.items() if m > month}
    lines: list[dict[str, str]] = []
    for m in sorted(pending):
        if m > month:
            continue
        for kind in sorted(pending[m]):
            amount = pending[m][kind]
            if amount == 0:
                continue
            if kind == "usage" and m != month:
                kind = "adjustment"
            lines.append({"kind": kind, "month": m, "amount": plain(quantize(amount))})
    if prepaid:
        lines.append(
            {"kind": "payments_applied", "month": month, "amount": plain(quantize(-prepaid))}
        )
    exact = sum((Decimal(line["amount"]) for line in lines), ZERO)
    due = exact.quantize(CENT, rounding=ROUND_HALF_UP)
    if due <= 0:
        return Close(None, pending, prepaid)
    invoice = {
        "invoice_id": invoice_id(account_id, month),
        "account_id": account_id,
        "month": month,
        "issued_at": issued_at.isoformat(),
        "currency": "USD",
        "lines": lines,
        "exact_total": plain(exact),
        "amount_due": plain(due),
        "rounding": plain(exact - due),
    }
    return Close(invoice, later, ZERO)
