"""Crash safety: a worker killed with SIGKILL at random moments and restarted ends with the
same journal, balances and downstream status sequence as a run that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaConsumer

from ledger import topics
from ledger.codec import Codec
from ledger.producer import EventProducer
from tests.conftest import new_database
from tests.harness import wait_until

ACCOUNTS = 400
USAGE_EVENTS = 50_000
T0 = datetime(2026, 4, 1, tzinfo=UTC)
MODELS = [
    "accounts/fireworks/models/llama-v3p1-8b-instruct",
    "accounts/fireworks/models/llama-v3p3-70b-instruct",
    "accounts/fireworks/models/deepseek-r1",
]


def workload(seed: int = 11):
    """(phase 1: accounts, phase 2: 50,000 usage events), the same on every call."""
    rng = random.Random(seed)
    ids = iter(uuid.UUID(int=rng.getrandbits(128)) for _ in range(10**6))
    setup = []
    for i in range(ACCOUNTS):
        account = f"crash-{i:04d}"
        at = T0 + timedelta(seconds=i)
        setup.append(
            (
                "AccountOpened",
                {
                    "event_id": str(next(ids)),
                    "account_id": account,
                    "occurred_at": at,
                    "created_at": at,
                },
            )
        )
        if i % 3 == 0:
            setup.append(
                (
                    "PaymentMethodAdded",
                    {
                        "event_id": str(next(ids)),
                        "account_id": account,
                        "occurred_at": at,
                        "payment_method_id": f"pm-{i}",
                        "kind": "card",
                    },
                )
            )
    usage = []
    for n in range(USAGE_EVENTS):
        usage.append(
            (
                "UsageRecorded",
                {
                    "event_id": str(next(ids)),
                    "account_id": f"crash-{rng.randrange(ACCOUNTS):04d}",
                    "occurred_at": T0 + timedelta(hours=1, seconds=n),
                    "request_id": f"req-{n}",
                    "product": "serverless",
                    "model": rng.choice(MODELS),
                    "service_tier": rng.choice(["standard", "standard", "batch"]),
                    "input_tokens": int(rng.lognormvariate(9.5, 1.2)),
                    "cached_input_tokens": 0,
                    "output_tokens": int(rng.lognormvariate(5.5, 1)),
                },
            )
        )
    return setup, usage


class Run:
    """One run of the whole pipeline on its own topics and database."""

    def __init__(self, stack, base_settings, dsn, tmp_path: Path, name: str):
        self.settings = base_settings.__class__(
            **{
                **base_settings.__dict__,
                "topic_prefix": f"{name}-{uuid.uuid4().hex[:8]}.",
                "consumer_group": f"{name}-{uuid.uuid4().hex[:8]}",
                "partitions": 4,
            }
        )
        self.stack = stack
        self.dsn = dsn
        self.log = tmp_path / f"{name}-worker.log"
        self.worker: subprocess.Popen | None = None
        self.kills = 0
        topics.create_topics(stack.bootstrap, self.settings)

    def start_worker(self) -> None:
        env = os.environ | {
            "LEDGER_KAFKA_BOOTSTRAP": self.stack.bootstrap,
            "LEDGER_DATABASE_URL": self.dsn,
            "LEDGER_HOME": str(self.settings.home),  # the session's chain key
            "LEDGER_TOPIC_PREFIX": self.settings.topic_prefix,
            "LEDGER_CONSUMER_GROUP": self.settings.consumer_group,
            "LEDGER_PARTITIONS": "4",
            "LEDGER_BATCH_MAX_EVENTS": "500",
            "LEDGER_LOG_FORMAT": "json",
        }
        with self.log.open("a") as log:
            self.worker = subprocess.Popen(
                # No scheduler: wall-clock ticks would land at different points in each run.
                [
                    sys.executable,
                    "-m",
                    "ledger.cli",
                    "worker",
                    "--role",
                    "ledger",
                    "--role",
                    "projections",
                    "--role",
                    "relay",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill_worker(self) -> None:
        assert self.worker is not None and self.worker.poll() is None, "worker died by itself"
        self.worker.send_signal(signal.SIGKILL)
        self.worker.wait(timeout=10)
        self.kills += 1

    def stop_worker(self) -> int:
        assert self.worker is not None
        self.worker.send_signal(signal.SIGTERM)
        return self.worker.wait(timeout=60)

    def produce(self, events) -> None:
        with EventProducer(self.stack.bootstrap, self.settings, linger_ms=20) as producer:
            for event_type, event in events:
                producer.send(event_type, event)

    def journaled(self) -> int:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(
                "SELECT (SELECT count(*) FROM journal_entries"
                "        WHERE event_type <> 'ConfigPublished') + "
                "(SELECT count(*) FROM rejected_events)"
            ).fetchone()[0]

    def settled(self, expected: int) -> bool:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(
                "SELECT (SELECT count(*) FROM journal_entries"
                "        WHERE event_type <> 'ConfigPublished') = %s"
                " AND NOT EXISTS (SELECT 1 FROM shard_heads h LEFT JOIN projection_positions p"
                "   ON p.shard = h.shard WHERE coalesce(p.position, 0) < h.last_seq)"
                " AND NOT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL)",
                (expected,),
            ).fetchone()[0]

    def outcome(self) -> dict:
        with psycopg.connect(self.dsn) as conn:
            q = conn.execute
            return {
                "entries": q(
                    "SELECT event_type, status, count(*) FROM journal_entries "
                    "WHERE event_type <> 'ConfigPublished' GROUP BY 1, 2 ORDER BY 1, 2"
                ).fetchall(),
                "rejected": q("SELECT count(*) FROM rejected_events").fetchone()[0],
                "ledger_accounts": q(
                    "SELECT ledger_account, sum(amount) FROM postings GROUP BY 1 ORDER BY 1"
                ).fetchall(),
                "accounts": q(
                    "SELECT account_id, suspended, reasons, status_version, "
                    "credit_balance, receivable FROM account_status "
                    "ORDER BY 1"
                ).fetchall(),
                "trial_balance": q("SELECT coalesce(sum(amount), 0) FROM postings").fetchone()[0],
                "status_changes": sorted(
                    (d.event["account_id"], d.event["status_version"], d.event_type)
                    for (value,) in q(
                        "SELECT value FROM outbox WHERE topic = %s",
                        (self.settings.topic(topics.STATUS),),
                    )
                    for d in [Codec.default().decode(bytes(value))]
                    if d.event_type in ("AccountSuspended", "AccountReinstated")
                ),
            }

    def status_sequence(self, expected: int) -> tuple[list, int]:
        """Status events downstream, deduplicated by (account, status_version)."""
        reader = KafkaConsumer(
            self.settings.topic(topics.STATUS),
            bootstrap_servers=self.stack.bootstrap,
            enable_incremental_fetch_sessions=False,
            auto_offset_reset="earliest",
            group_id=None,
        )
        codec, seen, raw = Codec.default(), {}, 0
        deadline = time.monotonic() + 60
        while len(seen) < expected and time.monotonic() < deadline:
            for records in reader.poll(timeout_ms=500).values():
                for r in records:
                    d = codec.decode(r.value)
                    if d.event_type not in ("AccountSuspended", "AccountReinstated"):
                        continue
                    raw += 1
                    key = (d.event["account_id"], d.event["status_version"])
                    seen.setdefault(key, (d.event_type, tuple(d.event.get("reasons", ()))))
        reader.close()
        return sorted((*k, *v) for k, v in seen.items()), raw


@pytest.mark.slow
def test_sigkilled_worker_loses_and_duplicates_nothing(stack, base_settings, tmp_path):
    setup, usage = workload()
    total = len(setup) + len(usage)
    rng = random.Random(2026)

    # The reference: one uninterrupted worker.
    reference = Run(stack, base_settings, new_database(stack), tmp_path, "reference")
    reference.start_worker()
    reference.produce(setup)
    wait_until(lambda: reference.journaled() >= len(setup), 120, "reference setup")
    reference.produce(usage)
    wait_until(lambda: reference.settled(total), 300, "reference settled")
    assert reference.stop_worker() == 0

    # The same events while the worker is SIGKILLed at random moments and restarted.
    crashed = Run(stack, base_settings, new_database(stack), tmp_path, "crashed")
    crashed.start_worker()
    crashed.produce(setup)
    wait_until(lambda: crashed.journaled() >= len(setup), 120, "crashed setup")
    producing = threading.Thread(target=crashed.produce, args=(usage,), daemon=True)
    producing.start()
    for _ in range(4):
        # Let this incarnation get into its stride (group joined, batches committing), then
        # pull the plug at a random moment.
        progress = crashed.journaled() + rng.randrange(500, 3_000)
        wait_until(lambda p=progress: crashed.journaled() >= p, 120, "worker progress")
        time.sleep(rng.uniform(0, 0.5))
        crashed.kill_worker()
        crashed.start_worker()
    producing.join(timeout=120)
    wait_until(lambda: crashed.settled(total), 300, "crashed settled")
    assert crashed.stop_worker() == 0
    assert crashed.kills == 4

    expected, got = reference.outcome(), crashed.outcome()
    assert expected["trial_balance"] == got["trial_balance"] == 0
    assert sum(n for _, _, n in got["entries"]) == total
    assert got == expected
    ref_seq, _ = reference.status_sequence(len(expected_versions(expected)))
    got_seq, raw = crashed.status_sequence(len(expected_versions(expected)))
    assert len(ref_seq) == len(expected_versions(expected)) > 0
    assert got_seq == ref_seq
    assert raw >= len(got_seq)  # duplicates may be re-sent; deduplication is the consumer's


def expected_versions(outcome: dict) -> list:
    """(account, status_version) of every status change the projection wrote to the outbox
    (versions are journal positions, so they are not 1..n)."""
    return [(a, v) for a, v, _ in outcome["status_changes"]]
