"""What a demo run ends with: the reconciliation of the ledger against the simulator (read
back from the demo database and the downstream reader), and the run's result."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import psycopg

from ledger.db import QUERIES
from ledger.demo.expected import ZERO, Expected
from ledger.demo.month import MONTH, MONTH_END
from ledger.demo.simulation import Simulation
from ledger.demo.status_reader import StatusReader
from ledger.reports import trial_balance
from ledger.settings import Settings


@dataclasses.dataclass
class DemoSummary:
    produced: int  # events and PeriodTicks sent to Kafka
    journaled: int  # journal entries (derived GrantExpired entries included)
    rejected: int
    entries_by_status: dict[str, int]  # posted / unpriced / noop
    rejected_by_reason: dict[str, int]
    accounts_by_status: list[tuple[str, int]]  # ("active", n), ("suspended: A+B", n), ...
    revenue: Decimal
    credits_outstanding: Decimal
    receivable: Decimal
    promotional_expense: Decimal
    cash: Decimal
    trial_balance: dict[str, Decimal]
    postings: int
    ledger_seconds: float  # produce start → last event journaled (or rejected)
    status_events: int  # suspensions and reinstatements seen downstream (deduplicated)
    suspended_ever: int  # accounts with at least one AccountSuspended downstream
    reinstated_ever: int  # accounts with at least one AccountReinstated downstream
    expected: Expected
    # Billing periods.
    derived: int = 0  # journal entries derived from a tick: GrantExpired
    invoice_entries: int = 0  # ... and InvoiceIssued (the month close)
    configured: int = 0  # ConfigPublished entries (price and policy versions, per shard)
    ticks_sent: int = 0  # PeriodTicks sent (one per partition per tick time)
    ticks_journaled: int = 0
    breakage: Decimal = ZERO  # revenue:breakage
    expired_left: Decimal = ZERO  # balance left on grants whose expires_at has passed
    suspended_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)  # ever
    limit_suspended_now: int = 0  # accounts with SPEND_LIMIT_REACHED after the month turned
    warnings: dict[int, int] = dataclasses.field(default_factory=dict)  # threshold → seen
    invoices: int = 0  # issued for MONTH
    invoiced: Decimal = ZERO  # their total amount due
    invoices_downstream: int = 0  # InvoiceIssued events for MONTH seen downstream
    accounts_owing: int = 0  # accounts whose receivable is at least half a cent
    invoice_mismatches: int = 0  # accounts whose invoice does not equal their receivable

    @property
    def unpriced(self) -> int:
        return self.entries_by_status.get("unpriced", 0)

    @property
    def balanced(self) -> bool:
        return all(total == 0 for total in self.trial_balance.values())

    @property
    def events_per_second(self) -> float:
        return self.produced / self.ledger_seconds if self.ledger_seconds > 0 else 0.0

    def checks(self) -> list[tuple[str, str, str, bool]]:
        """(what, ledger, expected, ok) for everything that must reconcile."""
        e = self.expected
        return [
            (
                "journaled + rejected = produced + derived",
                f"{self.journaled + self.rejected:,}",
                f"{self.produced:,} + {self.derived:,} GrantExpired"
                f" + {self.invoice_entries:,} InvoiceIssued"
                f" + {self.configured:,} ConfigPublished",
                self.journaled + self.rejected
                == self.produced + self.derived + self.invoice_entries + self.configured,
            ),
            (
                "period ticks journaled",
                f"{self.ticks_journaled:,}",
                f"{self.ticks_sent:,}",
                self.ticks_journaled == self.ticks_sent,
            ),
            (
                "rejected (meter glitches)",
                f"{self.rejected:,}",
                f"{e.rejected:,}",
                self.rejected == e.rejected,
            ),
            (
                "unpriced usage",
                f"{self.unpriced:,}",
                f"{e.unpriced:,}",
                self.unpriced == e.unpriced,
            ),
            ("revenue (usage)", usd(self.revenue), usd(e.revenue), self.revenue == e.revenue),
            (
                "promotional expense (grants − revoked)",
                usd(self.promotional_expense),
                usd(e.promotional),
                self.promotional_expense == e.promotional,
            ),
            ("cash received", usd(self.cash), usd(e.cash), self.cash == e.cash),
            (
                "breakage ≤ promotions expiring in March",
                usd(self.breakage),
                f"0 … {usd(e.expiring)}",
                ZERO <= self.breakage <= e.expiring,
            ),
            (
                "GrantExpired entries ≤ expiring grants",
                f"{self.derived:,}",
                f"≤ {e.expiring_grants:,}",
                self.derived <= e.expiring_grants,
            ),
            (
                "balance left on expired grants",
                usd(self.expired_left),
                usd(ZERO),
                self.expired_left == 0,
            ),
            (
                f"invoices {MONTH} = receivable ≥ ½¢, per account",
                f"{self.invoices:,}  ({self.invoice_mismatches:,} differ)",
                f"{self.accounts_owing:,}",
                self.invoices == self.accounts_owing and self.invoice_mismatches == 0,
            ),
            (
                "InvoiceIssued entries journaled",
                f"{self.invoice_entries:,}",
                f"{self.invoices:,}",
                self.invoice_entries == self.invoices,
            ),
            (
                "InvoiceIssued seen downstream",
                f"{self.invoices_downstream:,}",
                f"{self.invoices:,}",
                self.invoices_downstream == self.invoices,
            ),
            (
                "accounts suspended for SPEND_LIMIT_REACHED",
                f"{self.suspended_by_reason.get('SPEND_LIMIT_REACHED', 0):,}",
                f"≥ {e.limit_certain:,} (March spend ≥ final limit)",
                self.suspended_by_reason.get("SPEND_LIMIT_REACHED", 0) >= e.limit_certain,
            ),
            (
                "SPEND_LIMIT_REACHED after the month turned",
                f"{self.limit_suspended_now:,}",
                "0",
                self.limit_suspended_now == 0,
            ),
            (
                "trial balance",
                ", ".join(f"{c} {t:.9f}" for c, t in sorted(self.trial_balance.items())) or "0",
                "0",
                self.balanced,
            ),
        ]

    @property
    def ok(self) -> bool:
        return all(ok for *_, ok in self.checks())


def usd(amount: Decimal) -> str:
    return f"${amount:,.9f}"


def summarise(
    conn: psycopg.Connection,
    sim: Simulation,
    *,
    produced: int,
    ledger_seconds: float,
    downstream: StatusReader | None = None,
    ticks_sent: int = 0,
) -> DemoSummary:
    """Read the demo database back: what was journaled, balances, statuses, invoices, trial
    balance; and what the downstream reader saw."""
    journaled, rejected = conn.execute(QUERIES["demo_counts"]).fetchone()
    by_status = dict(conn.execute(QUERIES["demo_entries_by_status"]).fetchall())
    by_reason = dict(conn.execute(QUERIES["demo_rejected_by_reason"]).fetchall())
    accounts = [
        ("suspended: " + " + ".join(reasons) if suspended else "active", n)
        for suspended, reasons, n in conn.execute(QUERIES["demo_accounts_by_status"])
    ]
    revenue, credits, receivable, promotional, cash = conn.execute(
        QUERIES["demo_balances"]
    ).fetchone()
    derived, ticks, configured, invoice_entries = conn.execute(
        QUERIES["demo_journal_kinds"]
    ).fetchone()
    breakage, expired_left = conn.execute(
        QUERIES["demo_breakage"], (max(sim.ticks, default=MONTH_END),)
    ).fetchone()
    invoices, invoiced = conn.execute(QUERIES["demo_invoices_of_month"], (MONTH,)).fetchone()
    owing, mismatches = conn.execute(QUERIES["demo_invoice_check"], (MONTH,)).fetchone()
    (limited_now,) = conn.execute(QUERIES["demo_limit_suspended_now"]).fetchone()
    tb = trial_balance(conn)
    conn.commit()
    return DemoSummary(
        produced=produced,
        journaled=journaled,
        rejected=rejected,
        entries_by_status=by_status,
        rejected_by_reason=by_reason,
        accounts_by_status=accounts,
        revenue=Decimal(revenue),
        credits_outstanding=Decimal(credits),
        receivable=Decimal(receivable),
        promotional_expense=Decimal(promotional),
        cash=Decimal(cash),
        trial_balance=tb.totals,
        postings=tb.postings,
        ledger_seconds=ledger_seconds,
        status_events=downstream.status_events if downstream else 0,
        suspended_ever=len(downstream.suspended_accounts) if downstream else 0,
        reinstated_ever=len(downstream.reinstated_accounts) if downstream else 0,
        expected=sim.expected,
        derived=derived,
        invoice_entries=invoice_entries,
        configured=configured,
        ticks_sent=ticks_sent,
        ticks_journaled=ticks,
        breakage=Decimal(breakage),
        expired_left=Decimal(expired_left),
        suspended_by_reason=(
            {r: len(a) for r, a in sorted(downstream.reasons_ever.items())} if downstream else {}
        ),
        limit_suspended_now=limited_now,
        warnings=dict(sorted(downstream.warnings.items())) if downstream else {},
        invoices=invoices,
        invoiced=Decimal(invoiced),
        invoices_downstream=(
            sum(1 for month in downstream.invoices.values() if month == MONTH) if downstream else 0
        ),
        accounts_owing=owing,
        invoice_mismatches=mismatches,
    )


@dataclasses.dataclass
class DemoResult:
    exit_code: int
    run_id: str = ""
    dsn: str = ""
    settings: Settings | None = None
    summary: DemoSummary | None = None
    worker_exit: int | None = None
    error: str | None = None
    external_services: bool = False
    current_run: bool = False  # the local stack's current run: plain commands see it
    limit_account: str | None = None  # an account suspended for SPEND_LIMIT_REACHED
