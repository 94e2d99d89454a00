"""Projection workers sharing a journal (real PostgreSQL, no Kafka: the writer is handed
records). A worker skips looking a shard's policy up in the journal only where its own last
step left the shard; after another worker folded a new policy there, it must look again. A
rebuild that folds shards in processes of their own gives what one process gives."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from structlog.testing import capture_logs

from ledger.config_versions import policy_version
from ledger.configure import publish
from ledger.errors import UnfoldableEntryError
from ledger.policy import Policy
from ledger.verify import verify
from projections.account_status import AccountStatusProjection
from projections.rebuild import ShardState, _fold_apart, rebuild, recompute
from projections.worker import STEP_MAX_ENTRIES, ProjectionWorker
from tests.harness import T0, wait_until
from tests.test_console_http import usage
from tests.test_journal import opened, record

SHIPPED = Path(__file__).parents[1] / "ledger" / "policy.toml"


def limit(dsn: str, account_id: str) -> Decimal:
    with psycopg.connect(dsn) as conn:
        (value,) = conn.execute(
            "SELECT effective_limit FROM account_status WHERE account_id = %s", (account_id,)
        ).fetchone()
    return value


def raised_policy(tmp_path: Path) -> Path:
    """The shipped policy as version 2026-02, with tier 1 up to $70 a month (not $50)."""
    edited = tmp_path / "policy.toml"
    edited.write_text(
        SHIPPED.read_text()
        .replace('version = "2026-01"', 'version = "2026-02"')
        .replace('monthly_limit = "50"', 'monthly_limit = "70"', 1)
    )
    return edited


def test_a_worker_resuming_after_another_follows_the_policy_journaled_meanwhile(
    writer, dsn, base_settings, tmp_path
):
    with psycopg.connect(dsn) as conn:
        publish(conn, [policy_version(SHIPPED)])
    writer.write_batch([opened("a", 0)])  # the policy is journaled on shard 0 first
    first = ProjectionWorker(base_settings, dsn)
    second = ProjectionWorker(base_settings, dsn)
    try:
        first.drain()
        assert limit(dsn, "a") == 50

        # A new policy (tier 1 up to $70 a month), folded by the other worker.
        with psycopg.connect(dsn) as conn:
            publish(conn, [policy_version(raised_policy(tmp_path))])
        writer.write_batch([opened("b", 1)])
        second.drain()
        assert (limit(dsn, "a"), limit(dsn, "b")) == (50, 70)  # a was not folded again

        # The first worker again: the shard moved on without it, so it reads the policy
        # journaled there (a stale one would give c a $50 limit).
        writer.write_batch([opened("c", 2)])
        first.drain()
        assert limit(dsn, "c") == 70
    finally:
        first.close()
        second.close()


def test_a_rebuild_folding_shards_in_processes_equals_one_process(
    writer, dsn, base_settings, tmp_path
):
    # Shards 0 and 1 journal the shipped policy; then shard 1 and the new shards 2 and 3 the
    # raised one (a limit is the current policy's: b's is 70 now).
    with psycopg.connect(dsn) as conn:
        publish(conn, [policy_version(SHIPPED)])
    writer.write_batch([opened("a", 0, 0), opened("b", 0, 1)])
    with psycopg.connect(dsn) as conn:
        publish(conn, [policy_version(raised_policy(tmp_path))])
    writer.write_batch([opened("c", 1, 1), opened("d", 0, 2), opened("e", 0, 3)])
    worker = ProjectionWorker(base_settings, dsn)
    try:
        worker.drain()
    finally:
        worker.close()
    with psycopg.connect(dsn) as conn:
        live = conn.execute("SELECT * FROM account_status ORDER BY account_id").fetchall()
        heads = dict(conn.execute("SELECT shard, last_seq FROM shard_heads").fetchall())
    assert [limit(dsn, a) for a in "abcde"] == [50, 70, 70, 70, 70]

    # Each shard's states, clock and the policy in force at its end, from child processes,
    # equal those of one process folding the shards in turn.
    apart = AccountStatusProjection(Policy.load())
    shards = {s: ShardState() for s in heads}
    _fold_apart(base_settings, dsn, apart, shards, heads, 2, lambda _: None)
    together = AccountStatusProjection(Policy.load())
    with psycopg.connect(dsn) as conn:
        expected = recompute(conn, together, heads)
    assert shards == expected
    assert {s: apart.policies[s] for s in heads} == {
        s: together.policies.get(s, together.default_policy) for s in heads
    }
    assert {p.tiers[0].monthly_limit for p in apart.policies.values()} == {50, 70}

    # Both rebuilds give the live rows: a's limit is still 50, its shard's policy (the rows
    # were once made with the policy of the shard folded last, for every shard).
    for jobs in (1, 2):
        assert rebuild(base_settings, dsn, jobs=jobs) == 5
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT * FROM account_status ORDER BY account_id").fetchall()
        assert rows == live
    assert verify(base_settings, dsn) == []


def test_a_worker_frozen_inside_a_step_frees_its_shard_after_the_lease_timeout(
    writer, dsn, base_settings
):
    settings = dataclasses.replace(base_settings, lease_timeout_s=3)
    writer.write_batch([opened("frozen", 0), usage("frozen", 1, T0, 40_000_000)])  # > $1
    frozen = ProjectionWorker(settings, dsn)
    other = ProjectionWorker(settings, dsn)
    inside, thaw = threading.Event(), threading.Event()
    step = frozen._apply

    def stuck(*args):  # after the shard's position is locked and its entries read
        inside.set()
        thaw.wait(60)
        return step(*args)

    frozen._apply = stuck
    stop = threading.Event()
    thread = threading.Thread(target=frozen.run, args=(stop,), name="frozen-projection")
    thread.start()
    try:
        assert inside.wait(30), "the frozen worker never started its step"
        started = time.monotonic()
        # Another worker skips the locked shard, until the server ends the frozen step.
        wait_until(lambda: other.run_once() > 0, 30, "the other worker folding the shard")
        waited = time.monotonic() - started
        print(f"\nthe other worker had the shard {waited:.1f} s after the freeze")
        assert 2 < waited < 15
        assert suspensions(dsn, "frozen") == 1

        # Thawed, the frozen worker finds its step ended; it goes on from the stored position
        # and folds nothing twice.
        thaw.set()
        writer.write_batch([opened("later", 1)])
        wait_until(lambda: folded(dsn, "later"), 30, "the thawed worker folding new entries")
        assert thread.is_alive()
    finally:
        thaw.set()
        stop.set()
        thread.join(timeout=30)
        other.close()
    assert not thread.is_alive()
    assert suspensions(dsn, "frozen") == 1


def test_drain_redoes_smaller_a_step_the_server_ended(writer, dsn, base_settings):
    settings = dataclasses.replace(base_settings, lease_timeout_s=3)
    writer.write_batch([opened("slow", 0), usage("slow", 1, T0, 40_000_000)])
    worker = ProjectionWorker(settings, dsn)
    step, slowed = worker._apply, []

    def slow_once(*args):  # the first step idles in its transaction past the timeout
        if not slowed:
            slowed.append(time.sleep(4))
        return step(*args)

    worker._apply = slow_once
    try:
        assert worker.drain() == 2  # the step redone, on a new connection
        assert worker.sizer.limit == STEP_MAX_ENTRIES // 2  # halved by the timed-out step
    finally:
        worker.close()
    assert slowed and suspensions(dsn, "slow") == 1


def suspensions(dsn: str, account_id: str) -> int:
    """Status changes of `account_id` written to the outbox."""
    with psycopg.connect(dsn) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM outbox WHERE message_key = %s", (account_id.encode(),)
        ).fetchone()
    return n


def suspended(dsn: str, account_id: str) -> bool:
    with psycopg.connect(dsn) as conn:
        sql = "SELECT suspended FROM account_status WHERE account_id = %s"
        return conn.execute(sql, (account_id,)).fetchone()[0]


def folded(dsn: str, account_id: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT 1 FROM account_status WHERE account_id = %s", (account_id,)
        ).fetchone()
    return row is not None


def test_a_shard_whose_entry_does_not_fold_waits_and_the_other_shards_go_on(
    writer, dsn, admin_dsn, base_settings
):
    """An entry changed behind the writer's back into something no fold can read stops its
    own shard's projection, not every shard's: a live worker (`isolate`) folds the others,
    logs the stopped shard at each attempt, and resumes it once the entry is restored.
    `drain` (replay, tests) raises instead."""
    writer.write_batch([opened("st-a", 0, partition=0), opened("st-b", 0, partition=1)])
    with psycopg.connect(admin_dsn, autocommit=True) as su:
        su.execute("SET session_replication_role = replica")  # a superuser, past the guard
        [(original,)] = su.execute(
            "SELECT payload::text FROM journal_entries WHERE account_id = 'st-a'"
        ).fetchall()
        su.execute("UPDATE journal_entries SET payload = '[1]' WHERE account_id = 'st-a'")
    positions = "SELECT shard, position FROM projection_positions ORDER BY shard"
    worker = ProjectionWorker(base_settings, dsn)
    try:
        with pytest.raises(UnfoldableEntryError, match=r"\(0, 1\) AccountOpened of account 'st-a'"):
            worker.drain()
        worker.conn.rollback()
        worker.isolate, worker.stopped_retry_s = True, 3600.0
        with capture_logs() as logs:
            assert worker.run_once() == 1  # st-b's entry
            assert worker.run_once() == 0  # shard 0 waits: not even read
        assert list(worker.stopped) == [0]
        stopped = [line for line in logs if line["event"] == "projection_shard_stopped"]
        assert len(stopped) == 1 and stopped[0]["shard"] == 0
        assert "payload is a list, not a JSON object" in stopped[0]["error"]
        with psycopg.connect(dsn) as conn:
            assert conn.execute(positions).fetchall() == [(0, 0), (1, 1)]
            assert conn.execute(
                "SELECT account_id FROM account_status ORDER BY account_id"
            ).fetchall() == [("st-b",)]
        # Restored: the next attempt folds it, and the shard is no longer stopped.
        with psycopg.connect(admin_dsn, autocommit=True) as su:
            su.execute("SET session_replication_role = replica")
            su.execute(
                "UPDATE journal_entries SET payload = %s::json WHERE account_id = 'st-a'",
                (original,),
            )
        worker.stopped_retry_s = 0.0
        worker.stopped[0] = 0.0
        with capture_logs() as logs:
            assert worker.run_once() == 1
        assert worker.stopped == {}
        resumed = [line for line in logs if line["event"] == "projection_shard_resumed"]
        assert [line["shard"] for line in resumed] == [0]
        with psycopg.connect(dsn) as conn:
            assert conn.execute(positions).fetchall() == [(0, 1), (1, 1)]
    finally:
        worker.close()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            "UPDATE account_status SET state = '[]' WHERE account_id = 'ps-a'",
            "AttributeError: 'list' object has no attribute 'get'",
        ),
        (
            "DELETE FROM account_status WHERE account_id = 'ps-a'",
            "no state row, yet entries of it were folded",
        ),
    ],
    ids=["unreadable", "deleted"],
)
def test_an_account_state_changed_by_hand_is_folded_again_from_the_journal(
    writer, dsn, admin_dsn, base_settings, change, error
):
    """A superuser turns a suspended account's projected state into a JSON array, or deletes
    it. The live worker neither stops (it would, for every shard, at each pass) nor starts
    the account afresh (a fresh state would not know it was opened and suspended): it folds
    that account's state again from the journal up to the shard's position, goes on from it
    (so the payment method added next reinstates the account, which only a state that knows
    the suspension can tell), and writes it back; verify then finds the projection equal to
    a rebuild."""
    writer.write_batch([opened("ps-a", 0), usage("ps-a", 0, T0, 6_000_000)])  # $1.32: past the $1
    worker = ProjectionWorker(base_settings, dsn)
    try:
        worker.drain()
        assert suspensions(dsn, "ps-a") == 1 and suspended(dsn, "ps-a")
        with psycopg.connect(admin_dsn, autocommit=True) as su:
            su.execute(change)
        added = record(
            "billing.payment-methods.v1", "PaymentMethodAdded", "ps-a", 0,
            payment_method_id="pm", kind="card",
        )  # fmt: skip
        writer.write_batch([added, opened("ps-b", 1)])
        worker.isolate = True
        with capture_logs() as logs:
            assert worker.run_once() == 2
        assert worker.stopped == {}
        [unreadable] = [e for e in logs if e["event"] == "projection_state_unreadable"]
        assert (unreadable["account_id"], unreadable["shard"]) == ("ps-a", 0)
        assert (unreadable["recomputed_through"], unreadable["error"]) == (2, error)
        assert suspensions(dsn, "ps-a") == 2  # suspended, then reinstated
        assert not suspended(dsn, "ps-a")
    finally:
        worker.close()
    assert verify(base_settings, dsn) == []


def test_a_position_moved_back_folds_nothing_twice(writer, dsn, admin_dsn, base_settings):
    """A shard's projection position moved back by hand (or the positions restored from a
    backup older than the states): the entries its states already folded are skipped, so no
    usage is counted twice and no status change is sent twice; verify names a state that says
    it folded past its shard's position (it would skip entries it never folded)."""
    writer.write_batch([opened("pm-a", 0), usage("pm-a", 0, T0, 6_000_000)])  # $1.32: past $1
    worker = ProjectionWorker(base_settings, dsn)
    columns = "suspended, reasons, status_version, credit_balance, receivable, state"
    row = f"SELECT {columns} FROM account_status WHERE account_id = 'pm-a'"
    try:
        worker.drain()
        with psycopg.connect(dsn, autocommit=True) as conn:
            before = conn.execute(row).fetchone()
            (position,) = conn.execute(
                "SELECT position FROM projection_positions WHERE shard = 0"
            ).fetchone()
            conn.execute("UPDATE projection_positions SET position = 0 WHERE shard = 0")
        assert before[0] and suspensions(dsn, "pm-a") == 1
        writer.write_batch([opened("pm-b", 1)])
        with capture_logs() as logs:
            assert worker.run_once() == position + 1
        [skipped] = [e for e in logs if e["event"] == "projection_entries_already_folded"]
        assert (skipped["shard"], skipped["position"], skipped["skipped"]) == (0, 0, 2)
        with psycopg.connect(dsn) as conn:
            assert conn.execute(row).fetchone() == before
        assert suspensions(dsn, "pm-a") == 1
        assert folded(dsn, "pm-b")
    finally:
        worker.close()
    assert verify(base_settings, dsn) == []
    with psycopg.connect(admin_dsn, autocommit=True) as su:
        su.execute("UPDATE account_status SET folded_through = 1000 WHERE account_id = 'pm-b'")
    [ahead] = verify(base_settings, dsn)
    assert (ahead.check, ahead.subject) == ("projection", "pm-b")
    assert ahead.detail == f"folded_through 1000 is past shard 0's position {position + 1}"


def test_an_unreadable_state_revisited_at_the_month_turn_is_folded_again(
    writer, dsn, admin_dsn, base_settings
):
    """The same for a state the month's first tick revisits without an entry of its own (an
    account suspended for its spend limit, `tick_sensitive`): folded again from the journal,
    so the new month reinstates it."""
    spend = record(
        "billing.usage.v1",
        "UsageRecorded",
        "ts-a",
        0,
        request_id="r",
        product="serverless",
        model="accounts/fireworks/models/deepseek-r1",
        service_tier="standard",
        output_tokens=7_500_000,
    )  # fmt: skip  ($60: past the new account's $50 limit)
    added = record(
        "billing.payment-methods.v1", "PaymentMethodAdded", "ts-a", 0,
        payment_method_id="pm", kind="card",
    )  # fmt: skip
    writer.write_batch([opened("ts-a", 0), added, spend])
    worker = ProjectionWorker(base_settings, dsn)
    try:
        worker.drain()
        written = suspensions(dsn, "ts-a")  # the limit's warnings, then its suspension
        assert suspended(dsn, "ts-a")
        with psycopg.connect(admin_dsn, autocommit=True) as su:
            su.execute("UPDATE account_status SET state = '{}' WHERE account_id = 'ts-a'")
        april = datetime(2026, 4, 1, 0, 1, tzinfo=UTC)
        tick = record("billing.control.v1", "PeriodTick", "", 0, tick_at=april, occurred_at=april)
        writer.write_batch([tick])
        worker.isolate = True
        with capture_logs() as logs:
            assert worker.run_once() == 1
        assert worker.stopped == {}
        [unreadable] = [e for e in logs if e["event"] == "projection_state_unreadable"]
        assert (unreadable["account_id"], unreadable["recomputed_through"]) == ("ts-a", 3)
        assert suspensions(dsn, "ts-a") == written + 1  # reinstated by the new month
        assert not suspended(dsn, "ts-a")
    finally:
        worker.close()
    assert verify(base_settings, dsn) == []


def test_a_shard_whose_journaled_policy_no_longer_reads_waits_and_the_others_go_on(
    writer, dsn, admin_dsn, base_settings, tmp_path
):
    """A worker that takes a shard over reads the policy journaled there up to its position.
    If that entry was changed by hand, the shard waits (as for an entry that does not fold)
    and the pass folds the other shards; `drain` raises."""
    with psycopg.connect(dsn) as conn:
        publish(conn, [policy_version(raised_policy(tmp_path))])
    writer.write_batch([opened("pa", 0), opened("pb", 0, partition=1)])
    ProjectionWorker(base_settings, dsn).drain()
    with psycopg.connect(admin_dsn, autocommit=True) as su:
        su.execute("SET session_replication_role = replica")
        su.execute(
            'UPDATE journal_entries SET payload = \'{"kind": "policy"}\' '
            "WHERE event_type = 'ConfigPublished' AND shard = 0"
        )
    writer.write_batch([opened("pc", 1), opened("pd", 1, partition=1)])
    worker = ProjectionWorker(base_settings, dsn)  # knows no shard's policy yet
    try:
        with pytest.raises(UnfoldableEntryError, match="policy journaled on shard 0"):
            worker.drain()
        worker.conn.rollback()
        worker.isolate, worker.stopped_retry_s = True, 3600.0
        with capture_logs() as logs:
            assert worker.run_once() == 1  # shard 1's new entry
        assert list(worker.stopped) == [0]
        [stopped] = [e for e in logs if e["event"] == "projection_shard_stopped"]
        assert stopped["shard"] == 0 and "KeyError" in stopped["error"]
        assert folded(dsn, "pd") and not folded(dsn, "pc")
        assert limit(dsn, "pd") == 70  # shard 1 kept its journaled policy
    finally:
        worker.close()
