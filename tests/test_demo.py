"""`ledger demo`: the simulator on its own, and a small demo run end to end on the session
stack (a real worker process, real Kafka and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import urllib.parse
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
from psycopg import sql
from rich.console import Console

from ledger import demo
from ledger import stack as local_stack
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
        "CreditGranted",
        "CreditRevoked",
        "SpendLimitConfigured",
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

    # Promotions that expire within March, and accounts that run into their spend limit.
    promos = [e for t, e in sim.events if t == "CreditGranted" and e["expires_at"] is not None]
    assert promos and all(demo.MONTH_START < e["expires_at"] < demo.MONTH_END for e in promos)
    assert sim.expected.expiring == sum(e["amount"] for e in promos)
    assert sim.expected.expiring_grants == len(promos)
    assert 0 < sim.expected.breakage <= sim.expected.expiring
    assert sim.expected.limit_reached > 0 and sim.expected.revoked > 0

    # The clock: every midnight of March, the month turn, and the close after the grace.
    assert len(sim.ticks) == 31 + 2 and sim.ticks == sorted(sim.ticks)
    assert sim.ticks[0] == demo.MONTH_START
    assert sim.ticks[-2] == datetime(2026, 4, 1, 0, 1, tzinfo=UTC)
    assert sim.ticks[-1] == datetime(2026, 4, 4, 0, 5, tzinfo=UTC)  # 72 h after March


def test_summary_checks_fail_on_an_unbalanced_trial_balance():
    summary = demo.DemoSummary(
        produced=3,
        journaled=5,
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
        expected=demo.Expected(
            revenue=Decimal("0.5"), promotional=Decimal(1), expiring=Decimal(2), expiring_grants=1
        ),
        derived=1,  # one GrantExpired entry, derived from a tick
        invoice_entries=1,  # and the month close's InvoiceIssued
        breakage=Decimal("0.5"),
        invoices=1,
        invoices_downstream=1,
        accounts_owing=1,
    )
    assert summary.ok and summary.events_per_second == 2.0
    assert not dataclasses.replace(summary, trial_balance={"USD": Decimal("0.01")}).ok
    assert not dataclasses.replace(summary, revenue=Decimal("0.49")).ok
    assert not dataclasses.replace(summary, rejected=1).ok
    assert not dataclasses.replace(summary, derived=0).ok  # 5 journaled for 3 produced + 1
    assert not dataclasses.replace(summary, invoice_entries=0).ok  # an invoice not journaled
    assert not dataclasses.replace(summary, configured=1).ok  # a ConfigPublished unaccounted
    assert not dataclasses.replace(summary, breakage=Decimal("2.01")).ok
    assert not dataclasses.replace(summary, expired_left=Decimal("0.01")).ok
    assert not dataclasses.replace(summary, invoice_mismatches=1).ok
    assert not dataclasses.replace(summary, invoices_downstream=0).ok
    assert not dataclasses.replace(summary, limit_suspended_now=1).ok
    assert not dataclasses.replace(summary, ticks_sent=4).ok


OLD_RUN = "20200101_000000_0001"  # an earlier demo run's leftovers, which the next run drops


def _leave_an_old_run(stack, settings: Settings) -> str:
    from kafka.admin import KafkaAdminClient, NewTopic

    with psycopg.connect(stack.owner_dsn, autocommit=True) as owner:
        owner.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"demo_{OLD_RUN}")))
    topic = f"{settings.topic_prefix}demo-{OLD_RUN.replace('_', '-')}.billing.usage.v1"
    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        admin.close()
    return topic


def _plain_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    """`ledger ...` as a user types it after `make demo`: only LEDGER_HOME, nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_HOME"] = str(settings.home)
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_demo_runs_end_to_end_and_reconciles(base_settings: Settings, stack):
    settings = dataclasses.replace(base_settings, partitions=4, batch_max_ms=100)
    old_topic = _leave_an_old_run(stack, settings)
    out = io.StringIO()
    # Seed 4: at 40 accounts, one account's March spend reaches its final limit (a suspension
    # for SPEND_LIMIT_REACHED whatever order the topics are journaled in) and a grant is revoked.
    result = demo.run(
        settings, accounts=40, seed=4, console=Console(file=out, width=160, force_terminal=False)
    )
    text = out.getvalue()
    try:
        assert result.exit_code == 0, text
        assert result.worker_exit == 0
        s = result.summary
        assert s is not None
        assert (
            s.journaled + s.rejected
            == s.produced + s.derived + s.invoice_entries + s.configured
            > 1000
        )
        assert s.invoice_entries == s.invoices
        assert s.ticks_sent == s.ticks_journaled == (31 + 2) * 4  # the demo's clock, 4 partitions
        assert s.balanced and s.trial_balance
        assert s.revenue == s.expected.revenue > 0
        assert s.promotional_expense == s.expected.promotional >= Decimal(40)
        assert s.cash == s.expected.cash
        assert s.unpriced == s.expected.unpriced
        assert Decimal(0) <= s.breakage <= s.expected.expiring and s.expired_left == 0
        assert s.suspended_ever >= 1 and s.reinstated_ever >= 1
        assert sum(n for _, n in s.accounts_by_status) == 40
        assert s.status_events >= s.suspended_ever + s.reinstated_ever
        # Spend limits: someone reached theirs in March (warned at 100 %), and the month turn
        # lifted every limit suspension.
        assert s.expected.limit_certain >= 1 and s.expected.revoked >= 1
        assert s.suspended_by_reason.get("SPEND_LIMIT_REACHED", 0) >= s.expected.limit_certain
        assert s.warnings.get(100, 0) >= 1
        assert s.limit_suspended_now == 0 and result.limit_account is not None
        # March closed after the grace period: invoices equal to what is owed, seen downstream.
        assert s.invoices >= 1 and s.invoiced > 0
        assert s.invoices == s.accounts_owing == s.invoices_downstream
        assert s.invoice_mismatches == 0
        # The downstream reader printed each output event, then the summary and next steps.
        assert text.count(" suspended ") + text.count(" reinstated ") >= s.status_events
        assert text.count("  limit ") >= sum(s.warnings.values())
        assert text.count(f"  INV-{demo.MONTH}-acct-") >= s.invoices
        assert "demo OK" in text and "account show acct-" in text
        # It ends with the web console's URL, and the command that serves it over this data.
        assert (
            text.rstrip()
            .splitlines()[-1]
            .startswith("web console over this demo's data: http://127.0.0.1:8780/")
        )
        assert "# the web console over the demo's data" in text and "ledger console\n" in text
        assert f"invoices list --month {demo.MONTH}" in text
        assert f"account show {result.limit_account}" in text
        assert "worker --role ledger --role projections --role relay" in text
        assert urllib.parse.urlsplit(result.dsn).path == f"/demo_{result.run_id}"
        # Least privilege: the worker ran as the writer, the printed commands read as the
        # reader; neither owns the database nor is a superuser.
        for url, role in ((result.dsn, "writer"), (result.settings.reader_database_url, "reader")):
            with psycopg.connect(url) as conn:
                user, superuser = conn.execute(
                    "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
                ).fetchone()
            assert (user, superuser) == (getattr(settings.db_roles, role), False)
        # The run is the local stack's current one: plain commands see it without settings;
        # the older run's database and topics are gone.
        if settings.database_url:  # the tests run against external services: no local stack
            assert local_stack.current_run(settings) is None
        else:
            assert local_stack.current_run(settings)["database"] == f"demo_{result.run_id}"
            shown = _plain_cli(settings, "account", "show", result.limit_account, "--json")
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)["known"] is True
            march = _plain_cli(settings, "invoices", "list", "--month", demo.MONTH)
            assert march.returncode == 0 and f"INV-{demo.MONTH}-" in march.stdout, march.stderr
            main = _plain_cli(settings, "stack", "use-main")
            assert main.returncode == 0 and result.run_id in main.stdout
            assert local_stack.current_run(settings) is None
        with psycopg.connect(stack.owner_dsn) as owner:
            names = {r[0] for r in owner.execute("SELECT datname FROM pg_database")}
        assert f"demo_{OLD_RUN}" not in names and f"demo_{result.run_id}" in names
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap)
        try:
            assert old_topic not in admin.list_topics()
        finally:
            admin.close()
        worker_log = (settings.home / "demo-worker.log").read_text()
        assert "worker_started" in worker_log
        assert (settings.home / "demo-worker.log").stat().st_size > 0
    finally:
        local_stack.set_current_run(settings, None)  # the session's other tests use `ledger`
        if result.run_id:
            with psycopg.connect(stack.owner_dsn, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(f"demo_{result.run_id}")
                    )
                )
