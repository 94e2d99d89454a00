"""How the demo ends on the terminal: the summary tables (accounts, billing, the books,
events, the reconciliation) and the commands to look further."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ledger import db
from ledger.db import QUERIES
from ledger.demo.expected import ZERO
from ledger.demo.month import MONTH
from ledger.demo.summary import DemoResult, DemoSummary, usd
from ledger.demo.worker_process import WORKER_ROLES
from ledger.redact import redact


def print_summary(console: Console, s: DemoSummary, worker_exit: int | None) -> None:
    accounts = Table(title="accounts by status (after the month turned)", title_justify="left")
    accounts.add_column("status")
    accounts.add_column("accounts", justify="right")
    for label, n in s.accounts_by_status:
        accounts.add_row(label, f"{n:,}", style="red" if label != "active" else None)
    accounts.add_row("suspended at some point", f"{s.suspended_ever:,}", style="dim")
    for reason, n in s.suspended_by_reason.items():
        accounts.add_row(f"  for {reason}", f"{n:,}", style="dim")
    accounts.add_row("reinstated at some point", f"{s.reinstated_ever:,}", style="dim")
    console.print(accounts)

    billing = Table(title=f"billing period {MONTH}", title_justify="left")
    billing.add_column("")
    billing.add_column("", justify="right")
    for threshold, n in s.warnings.items():
        billing.add_row(f"spend-limit warnings {threshold} % (downstream)", f"{n:,}")
    if not s.warnings:
        billing.add_row("spend-limit warnings (downstream)", "0")
    billing.add_row(
        "accounts that reached their spend limit",
        f"{s.suspended_by_reason.get('SPEND_LIMIT_REACHED', 0):,}",
    )
    billing.add_row(f"invoices issued for {MONTH}", f"{s.invoices:,}")
    billing.add_row("  total amount due", f"${s.invoiced:,.2f}")
    billing.add_row("breakage (promotional credit expired unused)", usd(s.breakage))
    console.print(billing)

    money = Table(title="the books (USD)", title_justify="left")
    money.add_column("")
    money.add_column("amount", justify="right")
    money.add_row("revenue (usage)", usd(s.revenue))
    money.add_row("revenue (breakage)", usd(s.breakage))
    money.add_row("credits outstanding (grant balances)", usd(s.credits_outstanding))
    money.add_row("receivable", usd(s.receivable))
    money.add_row("promotional expense", usd(s.promotional_expense))
    money.add_row("cash received", usd(s.cash))
    for currency, total in sorted(s.trial_balance.items()) or [("USD", ZERO)]:
        money.add_row(
            f"trial balance {currency} ({s.postings:,} postings)",
            f"[green]{total:.9f}[/]" if total == 0 else f"[bold red]{total:.9f}[/]",
        )
    console.print(money)

    flow = Table(title="events", title_justify="left")
    flow.add_column("")
    flow.add_column("", justify="right")
    flow.add_row("produced", f"{s.produced:,}  (PeriodTicks {s.ticks_sent:,})")
    flow.add_row(
        "journaled",
        f"{s.journaled:,}  ("
        + ", ".join(f"{k} {v:,}" for k, v in sorted(s.entries_by_status.items()))
        + f"; GrantExpired {s.derived:,}, InvoiceIssued {s.invoice_entries:,}, "
        + f"ConfigPublished {s.configured:,})",
    )
    flow.add_row(
        "rejected",
        f"{s.rejected:,}"
        + (
            "  (" + ", ".join(f"{k} {v:,}" for k, v in sorted(s.rejected_by_reason.items())) + ")"
            if s.rejected_by_reason
            else ""
        ),
    )
    flow.add_row("unpriced entries", f"{s.unpriced:,}")
    flow.add_row(
        "status events downstream",
        f"{s.status_events:,}  (+ warnings {sum(s.warnings.values()):,}, "
        f"invoices {s.invoices_downstream:,})",
    )
    flow.add_row(
        "ledger throughput",
        f"{s.events_per_second:,.0f} events/s  ({s.produced:,} in {s.ledger_seconds:.1f} s, "
        "produce start → all journaled, waiting for the journal at each tick)",
    )
    flow.add_row("worker exit code", str(worker_exit))
    console.print(flow)

    checks = Table(title="reconciliation: ledger vs simulator", title_justify="left")
    for col in ("check", "ledger", "expected", ""):
        checks.add_column(col, justify="left" if col == "check" else "right")
    for what, got, want, ok in s.checks():
        checks.add_row(what, got, want, "[green]✓[/]" if ok else "[bold red]✗[/]")
    console.print(checks)


def print_next_steps(console: Console, result: DemoResult, conn_dsn: str) -> None:
    s, settings = result.summary, result.settings
    assert s is not None and settings is not None
    ledger = _ledger_command()
    # The commands below only read: the reader's URL (settings want the writer's beside it).
    env = redact(
        f"LEDGER_DATABASE_URL={conn_dsn} LEDGER_READER_DATABASE_URL={settings.reader_database_url}"
    )
    env += " "
    worker_env = f"{env}LEDGER_TOPIC_PREFIX={settings.topic_prefix} "
    worker_env += f"LEDGER_CONSUMER_GROUP={settings.consumer_group} "
    if result.current_run:  # the local stack's commands see this run without any setting
        env = worker_env = ""
    with db.connect(settings.reader_database_url or conn_dsn) as conn:
        suspended = conn.execute(QUERIES["demo_sample_account"], (True, True)).fetchone()
        reinstated = conn.execute(QUERIES["demo_sample_account"], (False, False)).fetchone()
        invoiced = conn.execute(QUERIES["demo_sample_invoiced"], (MONTH,)).fetchone()

    def hint(what: str, command: str) -> None:
        console.print(f"  # {what}\n  {command}", highlight=False, soft_wrap=True)

    console.print("\n[bold]next[/]:")
    hint(f"the invoices issued for {MONTH}", f"{env}{ledger} invoices list --month {MONTH}")
    samples = (
        (invoiced, f"an invoiced account (the most invoice lines for {MONTH})"),
        ((result.limit_account,), "an account that reached its spend limit in March"),
        (suspended, "an account suspended now"),
        (reinstated, "a reinstated account"),
    )
    shown: set[str] = set()
    for row, what in samples:
        if row and row[0] and row[0] not in shown:
            shown.add(row[0])
            hint(what, f"{env}{ledger} account show {row[0]}")
    hint("the trial balance", f"{env}{ledger} trial-balance")
    roles = " ".join(f"--role {role}" for role in WORKER_ROLES)
    hint(
        "run the worker on the demo's topics again (it resumes from the stored offsets; "
        "without the scheduler, whose wall clock would close every month since March)",
        f"{worker_env}{ledger} worker {roles}".strip(),
    )
    url = settings.console_url
    hint(
        f"the web console over the demo's data (read-only; then open {url})",
        f"{env}{ledger} console",
    )
    if result.current_run:
        hint(
            "this run stays the local stack's current one until the next demo; to go back to "
            "the stack's own database and topics",
            f"{ledger} stack use-main",
        )
    if not result.external_services:
        hint("stop Kafka and PostgreSQL", f"{ledger} stack down")


def _ledger_command() -> str:
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "ledger":
        try:
            return str(argv0.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(argv0)
    return "ledger"
