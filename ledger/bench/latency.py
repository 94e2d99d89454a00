"""(f) Suspension latency: how long a gateway waits to learn that an account must stop.

A whole worker (ledger, projections, relay) runs on the benchmark's topics and database once
the throughput phases have drained them. New accounts are opened; then, paced so the system is
not working off a backlog, each gets one usage event that uses up its $1 credit without a
payment method. A reader of the status topic (what a gateway runs) records when each account's
AccountSuspended arrives. Latency = arrival − send, on one machine's monotonic clock; it covers
the producer, the broker, the ledger batch (up to LEDGER_BATCH_MAX_MS), the projection (woken by
NOTIFY), the relay and the consumer's fetch.

Where that time goes, per stage, from the timestamps the database keeps (wall clock, same
machine): `ledger` send → the usage's row inserted by its batch (raw_events.recorded_at; the
batch commits after it), `projection` → the AccountSuspended outbox row (outbox.created_at),
`relay` → marked published after Kafka's acks (outbox.published_at), `delivery` → received
by the reader (below 0 when the reader had the record before the relay's mark).
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from kafka import KafkaConsumer

from ledger import topics
from ledger.bench import BenchError
from ledger.bench.proc_readings import CpuMeter
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.kafka_auth import client_options
from ledger.producer import EventProducer
from ledger.runner import start_worker, stop_worker

ROLES = ("ledger", "projections", "relay")
# Under load, the timed sends start this long after the background load: they measure the
# latency while the ledger is ingesting, not the step from idle to loaded (in the first half
# second after the load starts, suspensions took up to ~400 ms at 3,500 usage/s, then
# 40-230 ms; the README's Benchmark section says so).
LOAD_SETTLE_S = 2.0
MODEL = "accounts/fireworks/models/deepseek-r1"  # 200,000 output tokens = $1.60 > $1 credit


def measure_suspension_latency(
    bootstrap: str,
    settings,
    dsn: str,
    env: dict[str, str],
    log_path,
    *,
    accounts: int,
    interval_s: float = 0.05,
    background: list | None = None,
    background_rate: float = 0.0,
    meter: CpuMeter | None = None,
) -> dict[str, Any]:
    """Suspension latency of `accounts` accounts; with `background` (bench Messages) sent at
    `background_rate` per second from LOAD_SETTLE_S before the first timed send until the last
    arrival, so the ledger is busy meanwhile."""
    codec = Codec.default()
    arrived: dict[str, float] = {}
    arrived_wall: dict[str, float] = {}
    cores: dict[str, float] | None = None
    stop = threading.Event()
    reader = KafkaConsumer(
        settings.topic(topics.STATUS),
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="latest",
        enable_incremental_fetch_sessions=False,
        fetch_max_wait_ms=50,
        **client_options(settings),
    )

    def read() -> None:
        while not stop.is_set():
            for records in reader.poll(timeout_ms=100).values():
                now, wall = time.monotonic(), time.time()
                for record in records:
                    decoded = codec.decode(record.value)
                    account = decoded.event["account_id"]
                    if decoded.event_type == "AccountSuspended" and account.startswith("lat-"):
                        arrived.setdefault(account, now)
                        arrived_wall.setdefault(account, wall)

    # As deployed (deploy/): one process per role, so no role waits for another's GIL.
    procs = [
        start_worker((role,), env, log_path.with_name(f"{log_path.stem}-{role}.log"))
        for role in ROLES
    ]
    logs = str(log_path.with_name(f"{log_path.stem}-*.log"))
    thread = threading.Thread(target=read, daemon=True)
    load: threading.Thread | None = None
    sent_load: list[float] = []  # [records sent, seconds] of the background load
    try:
        names = [f"lat-{uuid.uuid4().hex[:8]}-{n}" for n in range(accounts)]
        with EventProducer(bootstrap, settings, linger_ms=0) as producer:
            at = datetime.now(UTC)
            for name in names:
                producer.send("AccountOpened", _event(name, at, created_at=at))
            producer.flush()
            _wait_settled(dsn, accounts, procs, logs)  # and the relay's backlog published
            reader.poll(timeout_ms=500)  # join the topic's end before the first send
            if meter is not None:
                meter.start()
            thread.start()
            if background:
                load = threading.Thread(
                    target=_paced_load,
                    args=(bootstrap, settings, background, background_rate, stop, sent_load),
                    daemon=True,
                )
                load.start()
                time.sleep(LOAD_SETTLE_S)
            sent: dict[str, float] = {}
            sent_wall: dict[str, float] = {}
            usage_ids: dict[str, str] = {}
            for name in names:
                event = _event(
                    name,
                    datetime.now(UTC),
                    request_id=name,
                    product="serverless",
                    model=MODEL,
                    service_tier="standard",
                    output_tokens=200_000,
                )
                usage_ids[name] = event["event_id"]
                sent_wall[name] = time.time()
                sent[name] = time.monotonic()
                producer.send("UsageRecorded", event).get(timeout=30)
                time.sleep(interval_s)
        deadline = time.monotonic() + 60
        while len(arrived) < accounts and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(arrived) < accounts:
            raise BenchError(f"latency: {len(arrived)} of {accounts} suspensions arrived")
        if meter is not None:
            cores = meter.stop({role: proc.pid for role, proc in zip(ROLES, procs, strict=True)})
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        if load is not None:
            load.join(timeout=30)
        reader.close()
        codes = [stop_worker(proc, timeout=60) for proc in procs]
    if any(codes):
        raise BenchError(f"latency workers exited with {codes}; see {logs}")
    millis = sorted((arrived[n] - sent[n]) * 1000 for n in names)
    stages = _stages(dsn, usage_ids, sent_wall, arrived_wall)
    return {
        "accounts": accounts,
        "p50_ms": _percentile(millis, 50),
        "p95_ms": _percentile(millis, 95),
        "p99_ms": _percentile(millis, 99),
        "max_ms": millis[-1],
        "samples_ms": [round(m, 2) for m in millis],
        **({"cpu_cores": cores} if cores is not None else {}),
        **({"stages_ms": stages} if stages else {}),
        "background_rate_target": round(background_rate, 1),
        "background_sent": int(sent_load[0]) if sent_load else 0,
        "background_rate": sent_load[0] / sent_load[1] if sent_load and sent_load[1] else 0.0,
    }


def _paced_load(
    bootstrap: str,
    settings,
    messages: list,
    rate: float,
    stop: threading.Event,
    out: list[float],
) -> None:
    """Send `messages` at `rate` per second (in 10 ms slices) until `stop` or the end."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="ledger-bench-load",
        acks="all",
        linger_ms=100,  # batched like a fleet of API servers; only the timed sends are unbatched
        **client_options(settings),
    )
    started = time.monotonic()
    sent = 0
    try:
        while sent < len(messages) and not stop.is_set():
            due = min(len(messages), int((time.monotonic() - started) * rate) + 1)
            while sent < due:
                m = messages[sent]
                producer.send(m.topic, value=m.value, key=m.key, headers=m.headers)
                sent += 1
            time.sleep(0.01)
        producer.flush(timeout=30)
    finally:
        out[:] = [sent, time.monotonic() - started]
        producer.close(timeout=10)


def _event(account_id: str, at: datetime, **fields) -> dict:
    return {"event_id": str(uuid.uuid4()), "account_id": account_id, "occurred_at": at, **fields}


def _wait_settled(dsn: str, accounts: int, procs, logs: str, timeout: float = 120) -> None:
    """Until the new accounts are opened in the projection and nothing is left to publish."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    raise BenchError(f"a latency worker exited with {proc.returncode}; see {logs}")
            opened, behind = conn.execute(QUERIES["bench_latency_ready"]).fetchone()
            if opened >= accounts and behind == 0:
                return
            time.sleep(0.1)
    raise BenchError(f"latency: the workers did not settle in {timeout}s; see {logs}")


STAGES = ("ledger", "projection", "relay", "delivery")


def _stages(
    dsn: str, usage_ids: dict[str, str], sent: dict[str, float], arrived: dict[str, float]
) -> dict[str, dict[str, float]]:
    """p50/p99/max in milliseconds of each stage (module docstring), over the accounts whose
    every timestamp is known."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(QUERIES["bench_latency_stages"], (list(usage_ids.values()),))
        stamps = {str(event_id): rest for event_id, *rest in rows}
    spans: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for name, event_id in usage_ids.items():
        journaled, queued, published = stamps.get(event_id, (None, None, None))
        if journaled is None or queued is None or published is None or name not in arrived:
            continue
        points = [
            sent[name],
            journaled.timestamp(),
            queued.timestamp(),
            published.timestamp(),
            arrived[name],
        ]
        for stage, start, end in zip(STAGES, points, points[1:], strict=False):
            spans[stage].append((end - start) * 1000)
    return {
        stage: {
            "p50_ms": _percentile(sorted(values), 50),
            "p99_ms": _percentile(sorted(values), 99),
            "max_ms": max(values),
        }
        for stage, values in spans.items()
        if values
    }


def _percentile(sorted_values: list[float], pct: int) -> float:
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]
