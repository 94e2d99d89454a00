"""Human-readable tables for the CLI (rich). Printing lives here and in cli.py only."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_account(view: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
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
