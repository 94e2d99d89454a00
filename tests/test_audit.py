"""Audit and verification: reproducible bills, as-of audits, rebuilds, tamper evidence."""

import random
import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from ledger.audit import audit_bill
from ledger.errors import LedgerError
from ledger.policy import Policy
from ledger.replay import replay
from ledger.verify import verify
from projections.rebuild import rebuild
from tests.conftest import new_database
from tests.harness import wait_until

MARCH = datetime(2026, 3, 1, tzinfo=UTC)
CLOSE = datetime(2026, 4, 4, 0, 5, tzinfo=UTC)
MODELS = [
    "accounts/fireworks/models/llama-v3p1-8b-instruct",
    "accounts/fireworks/models/deepseek-r1",
    "accounts/fireworks/models/qwen3-235b-a22b",
    "accounts/acme/models/unpriced",
]


def month_of_traffic(ledger, accounts: int = 220, usage: int = 10_000, seed: int = 3) -> int:
    """A month of traffic with daily ticks and the close; returns the events sent."""
    rng = random.Random(seed)
    sent = []

    def send(event_type, account_id, at, **fields):
        event = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "account_id": account_id,
            "occurred_at": at,
            **fields,
        }
        ledger.producer.send(event_type, event)
        sent.append(event_type)

    for n in range(accounts):
        a = f"au-{n:03d}"
        send("AccountOpened", a, MARCH, created_at=MARCH)
        if n % 2:
            send("PaymentMethodAdded", a, MARCH, payment_method_id=f"pm-{n}", kind="card")
        if n % 5 == 0:
            send(
                "CreditPurchased",
                a,
                MARCH + timedelta(days=2),
                grant_id="b",
                amount=Decimal(rng.choice(["10", "25", "60"])),
                payment_reference="ch",
            )
        if n % 7 == 0:
            send(
                "CreditGranted",
                a,
                MARCH,
                grant_id="promo",
                amount=Decimal("5"),
                kind="promotional",
                expires_at=MARCH + timedelta(days=9),
                reason="",
            )
    for day in range(31):
        start = MARCH + timedelta(days=day)
        for _ in range(usage // 31):
            at = start + timedelta(seconds=rng.randrange(86_400))
            send(
                "UsageRecorded",
                f"au-{rng.randrange(accounts):03d}",
                at,
                request_id=str(uuid.uuid4()),
                product="serverless",
                model=rng.choice(MODELS),
                service_tier=rng.choice(["standard", "batch"]),
                input_tokens=int(rng.lognormvariate(11, 1)),
                cached_input_tokens=0,
                output_tokens=int(rng.lognormvariate(6, 1)),
            )
        ledger.producer.flush()
        ledger.period_tick(start + timedelta(days=1))
        sent += ["PeriodTick"] * 4
    ledger.period_tick(CLOSE)
    ledger.producer.flush()
    return len(sent) + 4


@pytest.fixture
def month(ledger):
    events = month_of_traffic(ledger)
    ledger.settle(events, timeout=180)
    assert events >= 10_000
    return ledger


def audits(dsn, accounts, as_of=None):
    with psycopg.connect(dsn) as conn:
        return {a: audit_bill(conn, Policy.load(), a, "2026-03", as_of) for a in accounts}


@pytest.mark.slow
def test_verify_passes_and_audits_are_identical_over_rebuilds_and_a_replay(
    month, base_settings, stack
):
    ledger = month
    assert verify(base_settings, ledger.dsn) == []
    with psycopg.connect(ledger.dsn) as conn:
        invoiced = [
            a
            for (a,) in conn.execute(
                "SELECT account_id FROM invoices WHERE month = '2026-03' ORDER BY 1 LIMIT 4"
            )
        ]
    sample = [*invoiced, "au-007"]  # four invoiced, one with an expiring promotion
    assert len(invoiced) == 4
    first = audits(ledger.dsn, sample)
    for bill in first.values():
        assert bill["usage"] and bill["checksum"]
    for a in invoiced:
        assert first[a]["status"] == "issued"
        with psycopg.connect(ledger.dsn) as conn:
            (due,) = conn.execute(
                "SELECT amount_due FROM invoices WHERE account_id = %s", (a,)
            ).fetchone()
        assert Decimal(first[a]["amount_due"]) == due  # the audit reproduces the invoice
    for _ in range(3):
        rebuild(base_settings, ledger.dsn)
        assert verify(base_settings, ledger.dsn) == []
        assert {a: b["checksum"] for a, b in audits(ledger.dsn, sample).items()} == {
            a: b["checksum"] for a, b in first.items()
        }
    copy = new_database(stack)
    replay(base_settings, ledger.dsn, copy)
    assert verify(base_settings, copy) == []
    assert audits(copy, sample) == first


def test_an_as_of_audit_before_a_late_event_differs_by_exactly_that_event(ledger):
    ledger.open_account("late-1")
    ledger.send("PaymentMethodAdded", "late-1", payment_method_id="pm", kind="card")
    r1 = "accounts/fireworks/models/deepseek-r1"
    ledger.use("late-1", model=r1, output_tokens=500_000, occurred_at=MARCH + timedelta(days=3))
    ledger.period_tick(CLOSE)
    ledger.settle(3 + 4)
    with psycopg.connect(ledger.dsn) as conn:
        (before,) = conn.execute("SELECT max(recorded_at) FROM journal_entries").fetchone()
    late = ledger.use(
        "late-1", model=r1, output_tokens=250_000, occurred_at=MARCH + timedelta(days=20)
    )  # arrives after the close
    ledger.settle(3 + 4 + 1)
    [old] = audits(ledger.dsn, ["late-1"], as_of=before).values()
    [new] = audits(ledger.dsn, ["late-1"]).values()
    assert set(new["events"]) - set(old["events"]) == {late["event_id"]}
    assert set(old["events"]) <= set(new["events"])
    assert [(u["meter"], Decimal(u["quantity"])) for u in old["usage"]] == [
        ("output_tokens", 500_000)
    ]
    assert [(u["meter"], Decimal(u["quantity"])) for u in new["usage"]] == [
        ("output_tokens", 750_000)
    ]
    assert Decimal(new["usage_to_receivable"]) - Decimal(old["usage_to_receivable"]) == 2
    assert old["invoice"] == new["invoice"]  # the issued invoice never changes
    assert old["checksum"] != new["checksum"]


def test_a_journal_row_changed_by_hand_is_reported_with_its_account_and_entry(
    ledger, base_settings, admin_dsn
):
    ledger.open_account("t-1")
    ledger.open_account("t-2")
    ledger.use("t-2", output_tokens=100_000)
    ledger.use("t-2", output_tokens=200_000)
    ledger.settle(4)
    assert verify(base_settings, ledger.dsn) == []
    with psycopg.connect(admin_dsn) as conn:
        (shard, seq, event_id) = conn.execute(
            "SELECT shard, shard_seq, event_id FROM journal_entries WHERE account_id = 't-2' "
            "AND event_type = 'UsageRecorded' ORDER BY shard_seq LIMIT 1"
        ).fetchone()
        conn.execute("SET session_replication_role = replica")  # a superuser, past the guard
        conn.execute(
            "UPDATE journal_entries SET payload = jsonb_set(payload::jsonb, "
            "'{output_tokens}', '1') WHERE shard = %s AND shard_seq = %s",
            (shard, seq),
        )
    differences = verify(base_settings, ledger.dsn)
    chain = [d for d in differences if d.check == "hash_chain"]
    assert len(chain) == 1
    assert chain[0].subject == f"account 't-2' entry ({shard}, {seq}) UsageRecorded {event_id}"
    assert "hash mismatch" in chain[0].detail
    with psycopg.connect(admin_dsn) as conn:  # undo, so the fixture's checks hold
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "UPDATE journal_entries SET payload = jsonb_set(payload::jsonb, "
            "'{output_tokens}', '100000') WHERE shard = %s AND shard_seq = %s",
            (shard, seq),
        )
    assert verify(base_settings, ledger.dsn) == []


@pytest.mark.slow
def test_rebuilding_while_events_flow_ends_verified_with_no_duplicate_status_events(
    ledger, base_settings
):
    done = threading.Event()
    sent = []

    def traffic():
        rng = random.Random(9)
        for n in range(150):
            a = f"rb-{n:03d}"
            sent.append(ledger.open_account(a))
            for _ in range(12):
                sent.append(
                    ledger.use(a, model=MODELS[1], output_tokens=rng.randrange(10_000, 40_000))
                )
            if n % 3 == 0:
                sent.append(
                    ledger.send("PaymentMethodAdded", a, payment_method_id="pm", kind="card")
                )
        done.set()

    flow = threading.Thread(target=traffic)
    flow.start()
    wait_until(lambda: ledger.journaled() > 300, 60, "traffic under way")
    rebuild(base_settings, ledger.dsn)
    wait_until(lambda: ledger.journaled() > 1000, 60, "more traffic")
    rebuild(base_settings, ledger.dsn)
    flow.join(timeout=120)
    assert done.is_set()
    ledger.settle(len(sent), timeout=120)
    assert verify(base_settings, ledger.dsn) == []

    events = [
        (t, e)
        for t, e in ledger.read_status_events()
        if t in ("AccountSuspended", "AccountReinstated")
    ]
    keys = [(e["account_id"], e["status_version"]) for _, e in events]
    assert len(keys) == len(set(keys)), "a status event was published twice"
    versions = {}
    for account_id, version in keys:
        versions.setdefault(account_id, []).append(version)
    with psycopg.connect(ledger.dsn) as conn:
        live = dict(
            conn.execute(
                "SELECT account_id, status_version FROM account_status WHERE status_version > 0"
            )
        )
    # Versions are journal positions: strictly increasing per account, the last one published
    # is the live one.
    assert live and {a: v[-1] for a, v in versions.items()} == live
    assert all(v == sorted(set(v)) for v in versions.values())


def test_a_replay_that_diverges_stops_at_the_batch_that_did(
    ledger, base_settings, stack, admin_dsn
):
    """A batch the replay's target refuses part of (a raw event garbled by hand in the
    source) stops the replay with that error; no batch after it is written."""
    ledger.open_account("rd-1")
    uses = [ledger.use("rd-1", output_tokens=1_000) for _ in range(9)]
    ledger.settle(10)
    ledger.stop()
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # as a superuser can
        conn.execute(
            "UPDATE raw_events SET raw = %s WHERE event_id = %s", (b"garbled", uses[4]["event_id"])
        )
        order = [
            event_id
            for (event_id,) in conn.execute(
                "SELECT e.event_id FROM journal_entries e JOIN raw_events r USING (event_id)"
                " WHERE e.cause_event_id IS NULL ORDER BY e.shard, e.shard_seq"
            )
        ]
    at = order.index(uses[4]["event_id"])
    copy = new_database(stack)
    with pytest.raises(LedgerError, match="replay diverged: 1 rejected"):
        replay(base_settings, ledger.dsn, copy, batch_size=2, jobs=1)
    with psycopg.connect(copy) as conn:
        journaled = {e for (e,) in conn.execute("SELECT event_id FROM raw_events")}
        (rejected,) = conn.execute("SELECT count(*) FROM rejected_events").fetchone()
    # Every batch up to the one that diverged (batches of two, in the source's order), and
    # nothing after it.
    assert at + 2 < len(order)
    assert journaled == set(order[: at // 2 * 2 + 2]) - {order[at]} and rejected == 1
