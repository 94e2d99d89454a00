"""Riding out restarts: the worker keeps running while PostgreSQL or the Kafka broker restarts,
loses and doubles nothing, and resumes journaling within seconds of the dependency's return;
a crashed role is restarted; SIGTERM during an outage stops a real worker promptly.

These tests restart servers, so they run on a private Kafka + PostgreSQL (their own `home`
under the session's), never on the session's shared stack.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import structlog

from ledger import log as ledger_log
from ledger import runner, topics
from ledger import stack as local_stack
from ledger.log import LIBRARY_LOGGERS, configure_logging
from ledger.producer import EventProducer
from ledger.reports import trial_balance
from ledger.scheduler import run_scheduler, tick_events
from ledger.settings import Settings
from ledger.stack import kafka, postgres, procs, tansu
from ledger.worker import start_roles
from projections.worker import ProjectionWorker
from tests.conftest import new_database
from tests.harness import LLAMA_70B, T0, wait_until

# Generous bounds for this shared 2-core machine; the target is 5 s.
RESUME_BOUND_S = 15.0
STOP_BOUND_S = 5.0
ACCOUNTS = 20


# --- a private stack, restarted at will ---------------------------------------------------------


class OwnStack:
    """A Kafka + PostgreSQL of this module's own, which the tests stop and start again on the
    same ports and data directories."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.info = local_stack.up(settings)

    def _state(self) -> dict:
        return procs.load_json(self.settings.home.resolve() / "stack.json")

    def _broker_module(self):
        return tansu if self.info.broker == "tansu" else kafka

    def postgres_port(self) -> int:
        return self._state()["postgres"]["port"]

    def crash_postgres(self) -> None:
        """`pg_ctl stop -m immediate`: every backend killed, no shutdown checkpoint."""
        out = postgres._run(
            [
                str(postgres.bindir() / "pg_ctl"),
                "-D",
                str(postgres.data_dir(self.settings)),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
            self.settings,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert postgres.running_pid(self.settings) is None

    def start_postgres(self, port: int) -> None:
        state = postgres.start(self.settings, {"port": port})
        assert state["port"] == port, f"PostgreSQL came back on {state['port']}, not {port}"

    def stop_broker(self) -> None:
        self._broker_module().stop(self.settings)
        assert self._broker_module().running_pid(self.settings) is None

    def start_broker(self) -> None:
        kind = self.info.broker
        previous = self._state()[kind]
        state = self._broker_module().start(self.settings, previous)
        assert state["port"] == previous["port"], "the broker came back on another port"

    def heal(self) -> None:
        """Whatever a test stopped, running again (same ports)."""
        if postgres.running_pid(self.settings) is None:
            self.start_postgres(self.postgres_port())
        if self._broker_module().running_pid(self.settings) is None:
            self.start_broker()

    def down(self) -> None:
        local_stack.down(self.settings)


@pytest.fixture(scope="module", autouse=True)
def production_logging(base_settings: Settings) -> Iterator[None]:
    """The roles run in this process log as `ledger worker` does (plain tracebacks, library
    records through structlog), not with structlog's unconfigured default, whose rich
    tracebacks with locals take seconds to render a failed batch on a busy machine. The
    previous configuration is restored afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved_levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    was_configured = ledger_log._configured
    configure_logging(
        dataclasses.replace(base_settings, log_format="console", log_level="INFO"),
        force=True,
        cache_loggers=False,
    )
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        ledger_log._configured = was_configured


@pytest.fixture(scope="module")
def own(base_settings: Settings) -> Iterator[OwnStack]:
    settings = dataclasses.replace(
        base_settings,
        home=base_settings.home / "ride-out",
        kafka_bootstrap=None,
        database_url=None,
    )
    stack = OwnStack(settings)
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture
def healed(own: OwnStack) -> Iterator[OwnStack]:
    """The private stack, left running and healthy whatever the test did to it."""
    try:
        yield own
    finally:
        own.heal()


def per_test_settings(own: OwnStack, **changes) -> Settings:
    prefix = f"r{uuid.uuid4().hex[:10]}."
    settings = dataclasses.replace(
        own.settings,
        topic_prefix=prefix,
        consumer_group=f"{prefix}ledger",
        partitions=4,
        batch_max_ms=100,
        poll_interval_ms=100,
        **changes,
    )
    topics.create_topics(own.info.bootstrap, settings)
    return settings


# --- reading the database across restarts ---------------------------------------------------


def query(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, connect_timeout=3) as conn:
        return conn.execute(sql, params).fetchall()


def journaled_or_none(dsn: str) -> int | None:
    """Journal entries so far; None while PostgreSQL does not answer."""
    try:
        return query(dsn, "SELECT count(*) FROM journal_entries")[0][0]
    except psycopg.OperationalError:
        return None


# --- a stream of events sent while a dependency restarts -----------------------------------


class Stream:
    """Sends account openings, then usage, from a thread until stopped, asynchronously (a
    send while the broker is down waits in the producer); remembers every event id."""

    def __init__(self, bootstrap: str, settings: Settings, rate_per_s: float = 150):
        self.producer = EventProducer(bootstrap, settings)
        self.interval = 1 / rate_per_s
        self.futures: list[tuple[str, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)
        self._lock = threading.Lock()

    def _run(self) -> None:
        n = 0
        at = T0
        for i in range(ACCOUNTS):
            at += timedelta(seconds=1)
            self._send("AccountOpened", f"ride-{i:02d}", at, created_at=at)
        while not self._stop.is_set():
            n += 1
            at += timedelta(seconds=1)
            self._send(
                "UsageRecorded",
                f"ride-{n % ACCOUNTS:02d}",
                at,
                request_id=f"req-{n}",
                product="serverless",
                model=LLAMA_70B,
                service_tier="standard",
                input_tokens=1000 + n % 97,
                output_tokens=100 + n % 13,
            )
            self._stop.wait(self.interval)

    def _send(self, event_type: str, account_id: str, at: datetime, **fields) -> None:
        event = {"event_id": str(uuid.uuid4()), "account_id": account_id, "occurred_at": at}
        future = self.producer.send(event_type, event | fields)
        with self._lock:
            self.futures.append((event["event_id"], future))

    def start(self) -> Stream:
        self._thread.start()
        return self

    def sent(self) -> int:
        with self._lock:
            return len(self.futures)

    def finish(self) -> set[str]:
        """Stop sending; the ids of every event sent, once Kafka has acknowledged each."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.producer.flush(timeout=120)
        ids = set()
        for event_id, future in self.futures:
            future.get(timeout=1)  # raises if Kafka never took it
            ids.add(event_id)
        self.producer.close(timeout=10)
        return ids


class Worker:
    """The ledger's roles in threads, as `ledger worker` runs them, with the crash record."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        dsn: str,
        roles,
        stop: threading.Event | None = None,
        **targets,
    ):
        self.stop_event = stop or threading.Event()
        self.failures: list[str] = []
        self.threads = start_roles(
            settings,
            bootstrap,
            dsn,
            tuple(roles),
            self.stop_event,
            self.failures,
            targets=targets or None,
        )

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), f"{thread.name} did not stop"


def assert_exactly_once(dsn: str, sent: set[str]) -> None:
    """Every event sent is a raw event and a journal entry exactly once; nothing else."""
    wait_until(
        lambda: (
            query(
                dsn,
                "SELECT count(*) FROM journal_entries WHERE event_id = ANY(%s)",
                (list(sent),),
            )[0][0]
            >= len(sent)
        ),
        60,
        f"{len(sent)} events journaled",
    )
    raw = dict(query(dsn, "SELECT event_id, count(*) FROM raw_events GROUP BY 1"))
    entries = dict(
        query(
            dsn,
            "SELECT event_id, count(*) FROM journal_entries WHERE event_type <> 'PeriodTick' "
            "GROUP BY 1",
        )
    )
    assert query(dsn, "SELECT count(*) FROM rejected_events")[0][0] == 0
    missing = sent - set(entries)
    assert not missing, f"{len(missing)} events sent but never journaled"
    extra = set(entries) - sent
    assert not extra, f"{len(extra)} journal entries for events never sent"
    assert all(n == 1 for n in entries.values()), "an event journaled twice"
    assert set(raw) >= sent
    assert all(n == 1 for n in raw.values())


def settle(dsn: str) -> None:
    """Until the projection has applied every entry and the outbox is published."""
    wait_until(
        lambda: query(
            dsn,
            "SELECT NOT EXISTS (SELECT 1 FROM shard_heads h LEFT JOIN projection_positions p"
            " ON p.shard = h.shard WHERE coalesce(p.position, 0) < h.last_seq)"
            " AND NOT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL)",
        )[0][0],
        60,
        "projections caught up and outbox published",
    )
    with psycopg.connect(dsn) as conn:
        tb = trial_balance(conn)
    assert tb.balanced, f"trial balance is not zero: {tb.totals}"


def time_to_resume(dsn: str, back_at: float) -> float:
    """Seconds from `back_at` until the journal grows past what it held once PostgreSQL
    answered again."""
    base = wait_until(lambda: journaled_or_none(dsn), 60, "PostgreSQL answering")
    wait_until(lambda: (journaled_or_none(dsn) or 0) > base, 60, "journaling resumed")
    return time.monotonic() - back_at


# --- (a) PostgreSQL restart -----------------------------------------------------------------


def test_postgresql_immediate_restart_mid_stream_loses_and_doubles_nothing(healed: OwnStack):
    settings = per_test_settings(healed)
    dsn = new_database(healed.info)
    bootstrap = healed.info.bootstrap
    worker = Worker(settings, bootstrap, dsn, ("ledger", "projections", "relay"))
    stream = Stream(bootstrap, settings).start()
    try:
        wait_until(lambda: (journaled_or_none(dsn) or 0) >= 200, 60, "200 events journaled")
        port = healed.postgres_port()
        healed.crash_postgres()
        # A backlog builds up in Kafka while PostgreSQL is away.
        at_crash = stream.sent()
        wait_until(lambda: stream.sent() >= at_crash + 200, 30, "200 events sent meanwhile")
        healed.start_postgres(port)
        back_at = time.monotonic()
        resumed_s = time_to_resume(dsn, back_at)
        print(f"journaling resumed {resumed_s:.1f} s after PostgreSQL was back")
        wait_until(lambda: stream.sent() >= at_crash + 400, 30, "more events after restart")
        sent = stream.finish()
        assert_exactly_once(dsn, sent)
        settle(dsn)
    finally:
        worker.stop()
    assert resumed_s <= RESUME_BOUND_S, f"journaling resumed only after {resumed_s:.1f} s"
    # The projection reconnects by itself; it never needed its supervisor.
    assert "projections" not in worker.failures, worker.failures


# --- (b) broker restart -------------------------------------------------------------------


class TickClock:
    """The scheduler's clock: a new minute of 3 March 2026 at each call, until frozen."""

    def __init__(self):
        self.handed_out: list[datetime] = []
        self.frozen = False
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            if self.frozen and self.handed_out:
                return self.handed_out[-1]
            at = datetime(2026, 3, 3, tzinfo=UTC) + timedelta(minutes=len(self.handed_out))
            self.handed_out.append(at)
            return at


def test_broker_restart_mid_stream_loses_and_doubles_nothing(healed: OwnStack):
    settings = per_test_settings(healed, tick_interval_s=1)
    dsn = new_database(healed.info)
    bootstrap = healed.info.bootstrap
    clock = TickClock()
    stop = threading.Event()
    worker = Worker(
        settings,
        bootstrap,
        dsn,
        ("ledger", "projections", "relay", "scheduler"),
        stop,
        scheduler=lambda: run_scheduler(settings, bootstrap, stop, clock=clock),
    )
    stream = Stream(bootstrap, settings).start()
    try:
        wait_until(lambda: (journaled_or_none(dsn) or 0) >= 200, 60, "200 events journaled")
        healed.stop_broker()
        at_stop = stream.sent()
        wait_until(lambda: stream.sent() >= at_stop + 200, 30, "200 events sent meanwhile")
        ticks_during_outage = len(clock.handed_out)
        healed.start_broker()
        back_at = time.monotonic()
        resumed_s = time_to_resume(dsn, back_at)
        print(f"journaling resumed {resumed_s:.1f} s after the broker was back")
        wait_until(lambda: stream.sent() >= at_stop + 400, 30, "more events after restart")
        wait_until(lambda: len(clock.handed_out) > ticks_during_outage + 1, 30, "ticks again")
        sent = stream.finish()
        assert_exactly_once(dsn, sent)
        # Every tick the scheduler took from its clock reached every partition's journal:
        # the one in hand when the broker went away was retried, not skipped.
        clock.frozen = True
        expected = {
            event["event_id"]
            for at in list(clock.handed_out)
            for _, event in tick_events(at, list(range(settings.partitions)))
        }
        wait_until(
            lambda: (
                {
                    row[0]
                    for row in query(
                        dsn,
                        "SELECT event_id FROM journal_entries WHERE event_type = 'PeriodTick'",
                    )
                }
                >= expected
            ),
            60,
            "every tick journaled",
        )
        settle(dsn)
    finally:
        worker.stop()
    assert resumed_s <= RESUME_BOUND_S, f"journaling resumed only after {resumed_s:.1f} s"
    assert "scheduler" not in worker.failures, worker.failures
    assert "projections" not in worker.failures, worker.failures


# --- (c) a crashed role is restarted --------------------------------------------------------


def test_a_crashed_role_is_restarted_and_logged_on_one_line(healed: OwnStack, monkeypatch):
    settings = per_test_settings(healed)
    dsn = new_database(healed.info)
    bootstrap = healed.info.bootstrap
    crashes = []
    real_run_once = ProjectionWorker.run_once

    def crash_twice(self):
        if len(crashes) < 2:
            crashes.append(1)
            raise RuntimeError("injected failure\nsecond line")
        return real_run_once(self)

    monkeypatch.setattr(ProjectionWorker, "run_once", crash_twice)
    calls = []

    def flaky() -> None:
        calls.append(time.monotonic())
        raise ValueError(f"flaky role, run {len(calls)}")

    with structlog.testing.capture_logs() as logs:
        worker = Worker(settings, bootstrap, dsn, ("ledger", "projections", "flaky"), flaky=flaky)
        try:
            wait_until(lambda: len(calls) >= 4, 30, "the flaky role restarted three times")
            with EventProducer(bootstrap, settings) as producer:
                producer.send(
                    "AccountOpened",
                    {
                        "event_id": str(uuid.uuid4()),
                        "account_id": "acct-crash",
                        "occurred_at": T0,
                        "created_at": T0,
                    },
                ).get(timeout=30)
            wait_until(
                lambda: query(dsn, "SELECT count(*) FROM account_status")[0][0] == 1,
                30,
                "the account projected after the projection's restarts",
            )
        finally:
            worker.stop()
    assert worker.failures.count("projections") == 2
    assert all(t.is_alive() is False for t in worker.threads)
    # Backoff doubles: each wait is longer than the one before.
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.45 and gaps[1] >= 0.95 and gaps[2] >= 1.95, gaps
    crashed = [e for e in logs if e["event"] == "role_crashed" and e["role"] == "projections"]
    assert len(crashed) == 2
    assert crashed[0]["error"] == "RuntimeError: injected failure second line"
    assert "exc_info" not in crashed[0]
    assert crashed[0]["restart_in_s"] == 0.5 and crashed[1]["restart_in_s"] == 1.0


# --- (d) SIGTERM during an outage -----------------------------------------------------------


def worker_env(own: OwnStack, settings: Settings, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    return env | {
        "LEDGER_HOME": str(own.settings.home),
        "LEDGER_KAFKA_BOOTSTRAP": own.info.bootstrap,
        "LEDGER_DATABASE_URL": dsn,
        "LEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "LEDGER_CONSUMER_GROUP": settings.consumer_group,
        "LEDGER_PARTITIONS": str(settings.partitions),
        "LEDGER_TICK_INTERVAL_S": "1",
        "LEDGER_LOG_FORMAT": "json",
    }


def log_events(path: Path) -> list[dict]:
    """The worker's output, each line a JSON event (anything else fails the test)."""
    events = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"not a structured log line: {line!r}") from None
    return events


@pytest.mark.parametrize("dependency", ["postgresql", "kafka"])
def test_sigterm_during_an_outage_stops_the_worker_promptly(
    healed: OwnStack, tmp_path: Path, dependency: str
):
    settings = per_test_settings(healed)
    dsn = new_database(healed.info)
    log_path = tmp_path / "worker.log"
    proc = runner.start_worker(
        ("ledger", "projections", "relay", "scheduler"),
        worker_env(healed, settings, dsn),
        log_path,
    )
    try:
        wait_until(
            lambda: (
                query(dsn, "SELECT count(*) FROM journal_entries WHERE event_type = 'PeriodTick'")[
                    0
                ][0]
                > 0
            ),
            60,
            "the worker journaling the scheduler's ticks",
        )
        port = healed.postgres_port()
        if dependency == "postgresql":
            healed.crash_postgres()
        else:
            healed.stop_broker()
        down_role = "projections" if dependency == "postgresql" else "scheduler"
        wait_until(
            lambda: any(
                e.get("event") == "dependency_down" and e.get("role") == down_role
                for e in log_events(log_path)
            ),
            30,
            f"the {down_role} role noticing the outage",
        )
        assert proc.poll() is None, "the worker exited during the outage"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        took = time.monotonic() - started
        print(f"worker stopped {took:.1f} s after SIGTERM during a {dependency} outage")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if dependency == "postgresql" and postgres.running_pid(healed.settings) is None:
            healed.start_postgres(port)
    assert code == 0
    assert took <= STOP_BOUND_S, f"the worker took {took:.1f} s to stop"
    events = log_events(log_path)
    assert any(e.get("event") == "worker_stopped" for e in events)
    # While the dependency was down: one dependency_down line per role every few seconds, and
    # no identical client-library line twice within the library's repeat window.
    last: dict[tuple, float] = {}
    for e in events:
        at = datetime.fromisoformat(e["timestamp"]).timestamp()
        if e.get("event") == "dependency_down":
            key = ("dependency_down", e["role"])
        elif str(e.get("logger", "")).startswith(("kafka", "psycopg")):
            key = (e["logger"], e["level"], e["event"])
        else:
            continue
        if key in last:
            assert at - last[key] >= 4.9, f"{key} repeated after {at - last[key]:.1f} s"
        last[key] = at


# --- client-library logs ---------------------------------------------------------------------

LOGGING_SCRIPT = """
import logging
import structlog
from ledger.log import configure_logging
from ledger.settings import Settings

configure_logging(Settings.from_env())
conn = logging.getLogger("kafka.net.connection")
for attempt in range(20):
    conn.error("%s: Connection failed: %s", "<node 1>", "111 ECONNREFUSED")
try:
    raise ConnectionResetError("peer went away")
except ConnectionResetError:
    logging.getLogger("psycopg.pool").warning("error in pool worker", exc_info=True)


def crash():
    secret_local = "a local variable's value"
    raise RuntimeError("role failed")


try:
    crash()
except RuntimeError:
    structlog.get_logger("ledger.worker").error("role_crash", exc_info=True)
"""


def run_logging_script(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    out = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stderr


def test_client_library_logs_are_structured_and_repeats_held_back():
    lines = run_logging_script(LEDGER_LOG_FORMAT="json").splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    kafka_lines = [e for e in events if e.get("logger") == "kafka.net.connection"]
    assert [e["event"] for e in kafka_lines] == ["<node 1>: Connection failed: 111 ECONNREFUSED"]
    assert kafka_lines[0]["level"] == "error"
    pool = [e for e in events if e.get("logger") == "psycopg.pool"]
    assert len(pool) == 1
    assert pool[0]["error"] == "ConnectionResetError: peer went away"
    assert "exception" not in pool[0]
    # Our own event with exc_info keeps its (plain) traceback; nothing is outside JSON.
    crash = [e for e in events if e["event"] == "role_crash"]
    assert "RuntimeError: role failed" in crash[0]["exception"]
    assert len(events) == len([line for line in lines if line.strip()])


def test_debug_level_shows_every_library_line():
    lines = run_logging_script(LEDGER_LOG_FORMAT="json", LEDGER_LOG_LEVEL="DEBUG").splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    kafka_lines = [e for e in events if e.get("logger") == "kafka.net.connection"]
    assert len(kafka_lines) == 20
    pool = [e for e in events if e.get("logger") == "psycopg.pool"]
    assert "ConnectionResetError: peer went away" in pool[0]["exception"]


def test_console_tracebacks_are_plain_without_locals():
    output = run_logging_script(LEDGER_LOG_FORMAT="console")
    assert "Traceback (most recent call last)" in output
    assert "RuntimeError: role failed" in output
    assert "a local variable's value" not in output  # rich's show_locals would print it
    assert "╭" not in output  # no rich panels
