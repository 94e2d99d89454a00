"""Human-readable tables for the CLI (rich). Printing lives here and in cli.py only."""

from __future__ import annotations

import sys
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table


def print_account(view: dict[str, Any], console: Console | None = None) -> None:
    console = console or _console()
    if not view["known"]:
        console.print(f"account {view['account_id']}: no events journaled")
        return
    head = Table(title=f"account {view['account_id']}", show_header=False)
    head.add_column("field", style="bold")
    head.add_column("value")
    for key in (
        "opened",
        "status",
        "reasons",
        "status_version",
        "credit_balance",
        "receivable",
        "payment_methods",
        "payment_failed",
        "manual_hold",
        "tier",
        "effective_limit",
        "month",
        "month_to_date_spend",
        "headroom",
        "invoiced_outstanding",
    ):
        if key in view:
            value = view[key]
            if key == "tier" and value is None:
                value = "none (a contract limit)"
            head.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    console.print(head)
    if view.get("grants"):
        grants = Table(title="credit grants")
        grants.add_column("grant")
        grants.add_column("balance", justify="right")
        for gid, balance in view["grants"].items():
            grants.add_row(gid, balance)
        console.print(grants)
    if view.get("book_unreadable"):
        from ledger.rejects import printable  # what was written by hand may hold escapes

        console.print(
            f"not yet invoiced: unknown, the account book cannot be read "
            f"({printable(view['book_unreadable'])}); `ledger verify` names it, "
            f"`ledger books restore {view['account_id']}` writes it back",
            markup=False,
        )
    if view.get("open_charges"):
        charges = Table(title="not yet invoiced")
        for col in ("month", "kind", "amount"):
            charges.add_column(col, justify="right" if col == "amount" else "left")
        for month, kinds in sorted(view["open_charges"].items()):
            for kind, amount in sorted(kinds.items()):
                charges.add_row(month, kind, amount)
        console.print(charges)
    if view.get("invoices"):
        print_invoices(view["invoices"], f"invoices of {view['account_id']}", console)
    ledger = Table(title="ledger accounts (debit +, credit −)")
    ledger.add_column("ledger account")
    ledger.add_column("balance", justify="right")
    for acct, total in view["ledger_accounts"].items():
        ledger.add_row(acct, total)
    console.print(ledger)
    entries = Table(title="last entries")
    for col in ("seq", "occurred_at", "event_type", "status", "price_version", "charge"):
        entries.add_column(col, justify="right" if col in ("seq", "charge") else "left")
    for e in view["last_entries"]:
        entries.add_row(
            str(e["seq"]),
            e["occurred_at"],
            e["event_type"],
            e["status"],
            e["price_version"] or "",
            e["charge"],
        )
    console.print(entries)


def print_invoices(
    invoices: list[dict[str, Any]], title: str, console: Console | None = None
) -> None:
    console = console or _console()
    table = Table(title=title)
    for col in ("invoice", "account", "issued_at", "lines", "exact total", "amount due"):
        table.add_column(
            col, justify="right" if col in ("lines", "exact total", "amount due") else "left"
        )
    for inv in invoices:
        table.add_row(
            inv["invoice_id"],
            inv.get("account_id", ""),
            inv["issued_at"],
            str(len(inv["lines"]) if isinstance(inv["lines"], list) else inv["lines"]),
            inv["exact_total"],
            inv["amount_due"],
        )
    console.print(table)


def _console() -> Console:
    """The terminal's width on a TTY; wide enough for whole ids when piped or captured."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def money(amount: str | Decimal) -> str:
    """Money as an accountant reads it: cents always shown, further decimals only where the
    amount has them (5.000000000 → 5.00, 0.006220800 → 0.0062208); never rounded."""
    value = Decimal(amount)
    exact = value.normalize()
    if exact.as_tuple().exponent >= -2:
        return f"{value:,.2f}"
    return f"{exact:,f}"


def quantity(amount: str | Decimal) -> str:
    """A quantity at the precision it has: 1,200 tokens, 3,600.123456789 GPU-seconds."""
    value = Decimal(amount).normalize()
    return f"{value:,f}" if value.as_tuple().exponent < 0 else f"{value:,.0f}"


def print_bill(bill: dict[str, Any], console: Console | None = None) -> None:
    console = console or _console()
    as_of = f" as of {bill['as_of']}" if bill["as_of"] else ""
    console.print(
        f"[bold]bill of {bill['account_id']} for {bill['month']}{as_of}[/bold] ({bill['status']})"
    )
    usage = Table(title="usage")
    for col in (
        "product",
        "model",
        "tier",
        "meter",
        "quantity",
        "unit price",
        "per",
        "×",
        "version",
        "amount",
    ):
        usage.add_column(
            col, justify="right" if col in ("quantity", "unit price", "amount") else "left"
        )
    for u in bill["usage"]:
        usage.add_row(
            u["product"],
            u["model"].rsplit("/", 1)[-1],
            u["service_tier"],
            u["meter"],
            quantity(u["quantity"]),
            money(u["unit_price"]),
            u["unit"],
            quantity(u["multiplier"]),
            u["price_version"],
            money(u["amount"]),
        )
    usage.add_row("", "", "", "", "", "", "", "", "total", money(bill["usage_total"]))
    console.print(usage)
    if bill["unpriced_usage"]:
        held = Table(title="unpriced usage (held, not charged)")
        for col in ("product", "model", "meter", "quantity", "requests"):
            held.add_column(col)
        for h in bill["unpriced_usage"]:
            held.add_row(
                h["product"], h["model"], h["meter"], quantity(h["quantity"]), str(h["requests"])
            )
        console.print(held)
    credits = Table(title="credits and payments")
    for col in ("what", "when", "reference", "amount"):
        credits.add_column(col, justify="right" if col == "amount" else "left")
    for c in bill["credits_applied"]:
        credits.add_row("credit applied", "", c["grant_id"], money(-Decimal(c["amount"])))
    credits.add_row("usage to receivable", "", "", money(bill["usage_to_receivable"]))
    for g in bill["credit_grants"]:
        credits.add_row(g["event"], g["occurred_at"], g["grant_id"], money(g["amount"]))
    for p in bill["payments"]:
        credits.add_row(p["event"], p["occurred_at"], p["reference"], money(p["amount"]))
    console.print(credits)
    if bill["invoice"]:
        invoice = Table(
            title=f"invoice {bill['invoice']['invoice_id']} issued {bill['invoice']['issued_at']}"
        )
        for col in ("line", "month", "amount"):
            invoice.add_column(col, justify="right" if col == "amount" else "left")
        for line in bill["invoice"]["lines"]:
            invoice.add_row(line["kind"], line["month"], money(line["amount"]))
        invoice.add_row("exact total", "", money(bill["invoice"]["exact_total"]))
        console.print(invoice)
    console.print(
        f"amount due: [bold]{money(bill['amount_due'])}[/bold] {bill['currency']} "
        f"({bill['status']})"
    )
    console.print(f"events: {len(bill['events'])}   checksum: {bill['checksum']}")
