"""`ledger audit`: one account's bill for one month, reproduced from the journal alone.

The bill is built from journal entries only (never from projection tables): usage lines by
product, model, tier and meter with quantities, unit prices and price versions; usage held as
unpriced; credits applied grant by grant; grants, expiries and revocations; payments; and the
invoice, recomputed by folding the account's entries and its shard's PeriodTicks with the same
projection code that issued it. `as_of` keeps only entries recorded at or before that time, so
the bill shows what the ledger knew then. The checksum is the SHA-256 of the bill's canonical
JSON (without `as_of`): identical on every replay of the same journal.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg

from ledger.book import AccountBook, apply_recorded, canonical_json
from ledger.config_versions import CONFIG_PUBLISHED, published_policy
from ledger.db import QUERIES
from ledger.errors import LedgerError
from ledger.invoicing import INVOICE_ISSUED
from ledger.log import describe_error
from ledger.money import plain
from ledger.policy import Policy
from projections import billing
from projections.account_status import (
    AccountStatus,
    AccountStatusProjection,
    InvoiceIssued,
    JournalEntry,
)
from projections.fold import fold_entries

ZERO = Decimal(0)
GRANT_EVENTS = ("AccountOpened", "CreditGranted", "CreditPurchased", "CreditRevoked",
                "GrantExpired")  # fmt: skip
PAYMENT_EVENTS = ("CreditPurchased", "InvoicePaid")


def audit_bill(
    conn: psycopg.Connection,
    policy: Policy,
    account_id: str,
    month: str,
    as_of: datetime | None = None,
) -> dict[str, Any]:
    entries, extra = _account_entries(conn, account_id, as_of)

    projection = AccountStatusProjection(policy)
    states = {account_id: AccountStatus(account_id)}
    effects, _ = fold_entries(projection, states, entries, None)
    issued = [
        e.invoice for e in effects if isinstance(e, InvoiceIssued) and e.invoice["month"] == month
    ]

    in_month = [
        e
        for e in entries
        if e.account_id == account_id
        and billing.month_of(e.occurred_at) == month
        and e.event_type != INVOICE_ISSUED  # the month close: the bill's `invoice` below
    ]
    bill: dict[str, Any] = {
        "account_id": account_id,
        "month": month,
        "currency": "USD",
        **_usage(in_month, extra),
        "credit_grants": _grants(in_month, extra),
        "payments": _payments(in_month, extra),
    }
    if issued:
        invoice = issued[0]
        bill["invoice"] = {
            k: invoice[k] for k in ("invoice_id", "issued_at", "lines", "exact_total", "amount_due")
        }
        bill["status"] = "issued"
        bill["amount_due"] = invoice["amount_due"]
    else:
        # Not closed yet (or nothing to bill): what the close would issue now, from what
        # waits in the account's book as the journal records it.
        book = recorded_book(account_id, entries, extra, policy)
        preview = billing.close_month(account_id, month, book.pending, book.prepaid, datetime.min)
        bill["invoice"] = None
        bill["status"] = "open"
        bill["amount_due"] = preview.invoice["amount_due"] if preview.invoice else "0.00"
    bill["events"] = sorted(extra[e.shard_seq][0] for e in in_month)
    bill["checksum"] = bill_checksum(bill)
    bill["as_of"] = as_of.isoformat() if as_of else None
    return bill


def journal_book(conn: psycopg.Connection, policy: Policy, account_id: str) -> AccountBook:
    """An account's book as its journal entries record it (what `ledger verify` folds)."""
    entries, extra = _account_entries(conn, account_id, None)
    return recorded_book(account_id, entries, extra, policy)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `restore_book` did with one account's book."""

    account_id: str
    changed: bool
    was: str  # "unreadable: <why>", "missing", "different" or "equal"


def restore_book(conn: psycopg.Connection, policy: Policy, account_id: str) -> Restored:
    """Write an account's book (`account_books`) as its journal entries record it: for a book a
    superuser changed by hand (`ledger verify` reports it; the writer quarantines the events
    of an account whose book it cannot read). The book's row is locked first, as the writer
    locks it for a batch, so the journal read after it is the account's whole journal and no
    batch moves the book until the transaction ends (a book deleted by hand is written anew:
    the writer holds such an account's events meanwhile). An equal book is left as it is.
    Raises LedgerError when the account has no journal entries, or when its entries do not
    fold (then the journal itself was changed: nothing is written)."""
    from ledger.journal import save_books

    with conn.transaction():
        row = conn.execute(QUERIES["lock_book"], (account_id,)).fetchone()
        try:
            entries, extra = _account_entries(conn, account_id, None)
            book = recorded_book(account_id, entries, extra, policy)
        except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
            raise LedgerError(
                f"the journal entries of account {account_id!r} do not fold ({exc}); "
                "run `ledger verify`: the book is left as it is"
            ) from exc
        if row is None:
            was = "missing"  # deleted by hand: the writer holds the account's events meanwhile
        else:
            try:
                same = AccountBook.from_json(account_id, row[0]) == book
                was = "equal" if same else "different"
            except Exception as exc:  # whatever was written there by hand
                was = f"unreadable: {describe_error(exc)}"
        if was != "equal":
            save_books(conn.cursor(), [(account_id, book, entries[0].shard)])
    return Restored(account_id, was != "equal", was)


def _account_entries(
    conn: psycopg.Connection, account_id: str, as_of: datetime | None
) -> tuple[list[JournalEntry], dict[int, tuple]]:
    """The account's entries and its shard's ticks, as journaled by `as_of` (None: all), and
    per shard_seq (event_id, price_version, detail)."""
    row = conn.execute(QUERIES["account_shard"], (account_id,)).fetchone()
    if row is None:
        raise LedgerError(f"account {account_id!r} has no journal entries")
    return account_journal(conn, account_id, row[0], as_of)


def account_journal(
    conn: psycopg.Connection,
    account_id: str,
    shard: int,
    as_of: datetime | None = None,
    through: int | None = None,
) -> tuple[list[JournalEntry], dict[int, tuple]]:
    """The entries of an account and of its shard ('': ticks, published versions), in shard
    order, as recorded by `as_of` and up to shard_seq `through` (None: all), and per
    shard_seq (event_id, price_version, detail)."""
    params = {"shard": shard, "account_id": account_id, "as_of": as_of}
    rows = conn.execute(QUERIES["audit_entries"], params).fetchall()
    if through is not None:
        rows = [r for r in rows if r[1] <= through]
    entries = [JournalEntry(*r[:7], tuple(zip(r[7], r[8], strict=True))) for r in rows]
    return entries, {r[1]: (r[9], r[10], r[11]) for r in rows}


def recorded_book(
    account_id: str, entries: list[JournalEntry], extra: dict, policy: Policy
) -> AccountBook:
    """The account's book folded from its entries as recorded (`ledger.book.apply_recorded`),
    each under the policy in force on its shard at that entry (`policy` until one was
    published there), as `ledger verify` folds it."""
    book = AccountBook(account_id)
    for e in entries:
        if e.event_type == CONFIG_PUBLISHED:
            published = published_policy(e.payload)
            policy = policy if published is None else published
        elif e.account_id == account_id:
            apply_recorded(
                book, e.event_type, e.payload, extra[e.shard_seq][2], list(e.postings), policy
            )
    return book


def bill_checksum(bill: dict[str, Any]) -> str:
    content = {k: v for k, v in bill.items() if k not in ("checksum", "as_of")}
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()


def _usage(entries: list[JournalEntry], extra: dict) -> dict[str, Any]:
    lines: dict[tuple, list[Decimal]] = defaultdict(lambda: [ZERO, ZERO, ZERO])
    held: dict[tuple, list[Decimal]] = defaultdict(lambda: [ZERO, ZERO])
    burns: dict[str, Decimal] = defaultdict(lambda: ZERO)
    to_receivable = ZERO
    rerated = {e.payload["usage_event_id"] for e in entries if e.event_type == "UsageRerated"}
    for e in entries:
        if e.event_type not in ("UsageRecorded", "UsageRerated"):
            continue
        event_id, price_version, detail = extra[e.shard_seq]
        p = e.payload
        if e.status == "unpriced":
            if event_id in rerated:
                continue  # priced since: its UsageRerated entry carries the lines
            meters = ("input_tokens", "cached_input_tokens", "output_tokens", "training_tokens",
                      "images", "steps", "gpu_seconds")  # fmt: skip
            for meter in meters:
                if p.get(meter):
                    key = (p["product"], p["model"], p["service_tier"], meter)
                    held[key][0] += Decimal(str(p[meter]))
                    held[key][1] += 1
            continue
        for line in detail.get("lines", []):
            key = (p["product"], p["model"], p["service_tier"], line["meter"], line["unit"],
                   line["unit_price"], line["multiplier"], price_version)  # fmt: skip
            lines[key][0] += Decimal(line["quantity"])
            lines[key][1] += Decimal(line["amount"])
            lines[key][2] += 1
        for burn in detail.get("burns", []):
            burns[burn["grant_id"]] += Decimal(burn["amount"])
        to_receivable += Decimal(detail.get("to_receivable", "0"))
    names = ("product", "model", "service_tier", "meter", "unit", "unit_price", "multiplier",
             "price_version")  # fmt: skip
    usage = [
        dict(zip(names, key, strict=True))
        | {"quantity": plain(q), "amount": plain(a), "requests": int(n)}
        for key, (q, a, n) in sorted(lines.items())
    ]
    return {
        "usage": usage,
        "usage_total": plain(sum((Decimal(u["amount"]) for u in usage), ZERO)),
        "unpriced_usage": [
            dict(zip(("product", "model", "service_tier", "meter"), key, strict=True))
            | {"quantity": plain(q), "requests": int(n)}
            for key, (q, n) in sorted(held.items())
        ],
        "credits_applied": [
            {"grant_id": gid, "amount": plain(amount)} for gid, amount in sorted(burns.items())
        ],
        "usage_to_receivable": plain(to_receivable),
    }


def _grants(entries: list[JournalEntry], extra: dict) -> list[dict[str, str]]:
    out = []
    for e in entries:
        if e.event_type not in GRANT_EVENTS or e.status != "posted":
            continue
        detail = extra[e.shard_seq][2]
        if e.event_type == "CreditPurchased" and Decimal(detail.get("granted", "0")) == 0:
            continue  # it all paid the receivable: a payment (listed there), no credit
        amount = (
            detail.get("amount")
            or detail.get("granted")
            or detail.get("expired")
            or detail.get("removed")
            or "0"
        )
        out.append(
            {
                "event": e.event_type,
                "occurred_at": e.occurred_at.isoformat(),
                "grant_id": detail.get("grant_id", ""),
                "amount": amount,
            }
        )
    return out


def _payments(entries: list[JournalEntry], extra: dict) -> list[dict[str, str]]:
    out = []
    for e in entries:
        if e.event_type not in PAYMENT_EVENTS or e.status != "posted":
            continue
        detail = extra[e.shard_seq][2]
        out.append(
            {
                "event": e.event_type,
                "occurred_at": e.occurred_at.isoformat(),
                "reference": e.payload.get("payment_reference") or e.payload.get("invoice_id", ""),
                "amount": detail["paid"],
                "applied_to_receivable": detail["applied_to_receivable"],
            }
        )
    return out


def bill_as_csv(bill: dict[str, Any]) -> str:
    """One row per bill line: section, description, quantity, unit price, amount."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["section", "description", "quantity", "unit_price", "price_version", "amount"])
    for u in bill["usage"]:
        writer.writerow(
            [
                "usage",
                f"{u['product']} {u['model']} {u['service_tier']} "
                f"{u['meter']} per {u['unit']} x{u['multiplier']}",
                u["quantity"],
                u["unit_price"],
                u["price_version"],
                u["amount"],
            ]
        )
    for h in bill["unpriced_usage"]:
        writer.writerow(
            [
                "unpriced (held)",
                f"{h['product']} {h['model']} {h['meter']}",
                h["quantity"],
                "",
                "",
                "",
            ]
        )
    for c in bill["credits_applied"]:
        writer.writerow(["credits applied", c["grant_id"], "", "", "", f"-{c['amount']}"])
    for g in bill["credit_grants"]:
        writer.writerow(
            ["credit", f"{g['event']} {g['grant_id']} {g['occurred_at']}", "", "", "", g["amount"]]
        )
    for p in bill["payments"]:
        writer.writerow(
            [
                "payment",
                f"{p['event']} {p['reference']} {p['occurred_at']}",
                "",
                "",
                "",
                p["amount"],
            ]
        )
    for line in (bill["invoice"] or {}).get("lines", []):
        writer.writerow(
            ["invoice line", f"{line['kind']} {line['month']}", "", "", "", line["amount"]]
        )
    writer.writerow(["amount due", bill["status"], "", "", "", bill["amount_due"]])
    writer.writerow(["checksum", bill["checksum"], "", "", "", ""])
    return out.getvalue()
