"""`ledger demo`: the simulator on its own, and a small demo run end to end on the session
stack (a real worker process, real Kafka and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import io
from collections import Counter
from decimal import Decimal

import psycopg
from psycopg import sql
from rich.console import Console

from ledger import demo
from ledger.settings import Settings


def test_simulate_is_reproducible_and_covers_the_lifecycle():
    sim = demo.simulate(200, seed=3)
    again = demo.simulate(200, seed=3)
    assert sim.events == again.events
    assert demo.simulate(200, seed=4).events != sim.events

    counts = sim.counts()
    assert counts["AccountOpened"] == 200
    for event_type in (
        "UsageRecorded",
        "PaymentMethodAdded",
        "PaymentFailed",
        "CreditPurchased",
        "AccountHoldPlaced",
        "AccountHoldReleased",
    ):
        assert counts[event_type] > 0, event_type
    times = [event["occurred_at"] for _, event in sim.events]
    assert times == sorted(times)
    assert times[0] >= demo.MONTH_START and times[-1] < demo.MONTH_END

    first: dict[str, str] = {}
    for event_type, event in sim.events:
        first.setdefault(event["account_id"], event_type)
    assert set(first) == set(sim.accounts)
    assert set(first.values()) == {"AccountOpened"}

    with_card = {e["account_id"] for t, e in sim.events if t == "PaymentMethodAdded"}
    assert 0.3 <= len(with_card) / 200 <= 0.5
    for event_type, event in sim.events:
        if event_type in ("CreditPurchased", "InvoicePaid", "CreditGranted"):
            assert isinstance(event["amount"], Decimal)
        if event_type == "UsageRecorded" and event["product"] == "serverless":
            assert isinstance(event["input_tokens"], int)
    products = Counter(e["product"] for t, e in sim.events if t == "UsageRecorded")
    assert set(products) == {"serverless", "on_demand", "fine_tuning", "image"}
    assert sim.expected.revenue > 0 and sim.expected.unpriced > 0


def test_summary_checks_fail_on_an_unbalanced_trial_balance():
    summary = demo.DemoSummary(
        produced=3,
        journaled=3,
        rejected=0,
        entries_by_status={"posted": 3},
        rejected_by_reason={},
        accounts_by_status=[("active", 1)],
        revenue=Decimal("0.5"),
        credits_outstanding=Decimal("0.5"),
        receivable=Decimal(0),
        promotional_expense=Decimal(1),
        cash=Decimal(0),
        trial_balance={"USD": Decimal(0)},
        postings=6,
        ledger_seconds=1.5,
        status_events=0,
        suspended_ever=0,
        reinstated_ever=0,
        expected=demo.Expected(revenue=Decimal("0.5"), promotional=Decimal(1)),
    )
    assert summary.ok and summary.events_per_second == 2.0
    assert not dataclasses.replace(summary, trial_balance={"USD": Decimal("0.01")}).ok
    assert not dataclasses.replace(summary, revenue=Decimal("0.49")).ok
    assert not dataclasses.replace(summary, rejected=1).ok


def test_demo_runs_end_to_end_and_reconciles(base_settings: Settings, stack):
    settings = dataclasses.replace(base_settings, partitions=4, batch_max_ms=100)
    out = io.StringIO()
    result = demo.run(
        settings, accounts=40, seed=7, console=Console(file=out, width=160, force_terminal=False)
    )
    text = out.getvalue()
    try:
        assert result.exit_code == 0, text
        assert result.worker_exit == 0
        s = result.summary
        assert s is not None
        assert s.journaled + s.rejected == s.produced > 1000
        assert s.balanced and s.trial_balance
        assert s.revenue == s.expected.revenue > 0
        assert s.promotional_expense == s.expected.promotional >= Decimal(40)
        assert s.cash == s.expected.cash
        assert s.unpriced == s.expected.unpriced
        assert s.suspended_ever >= 1 and s.reinstated_ever >= 1
        assert sum(n for _, n in s.accounts_by_status) == 40
        assert s.status_events >= s.suspended_ever + s.reinstated_ever
        # The downstream reader printed each status event, then the summary and next steps.
        assert text.count(" suspended ") + text.count(" reinstated ") >= s.status_events
        assert "demo OK" in text and "account show acct-" in text
        assert result.dsn.endswith(f"/demo_{result.run_id}")
        assert (settings.home / "demo-worker.log").stat().st_size > 0
    finally:
        if result.run_id:
            with psycopg.connect(stack.dsn, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(f"demo_{result.run_id}")
                    )
                )
