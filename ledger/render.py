"""Human-readable tables for the CLI (rich). Printing lives here and in cli.py only."""

from __future__ import annotations

import sys
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
            head.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    console.print(head)
    if view.get("grants"):
        grants = Table(title="credit grants")
        grants.add_column("grant")
        grants.add_column("balance", justify="right")
        for gid, balance in view["grants"].items():
            grants.add_row(gid, balance)
        console.print(grants)
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
