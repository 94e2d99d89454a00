"""A running ledger for end-to-end tests: worker roles in threads, a producer, a downstream
reader of the status topic, and a database handle. Real Kafka, real PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from kafka import KafkaConsumer

from ledger import topics
from ledger.codec import Codec
from ledger.kafka_auth import client_options
from ledger.producer import EventProducer
from ledger.reports import trial_balance
from ledger.scheduler import send_ticks
from ledger.settings import Settings
from ledger.worker import start_roles

# The scheduler is left out: tests send their own PeriodTicks at the times they choose.
ROLES = ("ledger", "projections", "relay")

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
LLAMA_70B = "accounts/fireworks/models/llama-v3p3-70b-instruct"


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.05)


def read_records(bootstrap: str, topic_names: list[str], count: int, timeout: float = 30):
    """The first `count` records of the topics (at least), read from the beginning."""
    reader = KafkaConsumer(
        *topic_names,
        bootstrap_servers=bootstrap,
        enable_incremental_fetch_sessions=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    records: list = []
    try:
        wait_until(
            lambda: (
                records.extend(r for rs in reader.poll(timeout_ms=200).values() for r in rs)
                or len(records) >= count
            ),
            timeout,
            f"{count} records on {', '.join(topic_names)}",
        )
    finally:
        reader.close()
    return records


class Ledger:
    def __init__(self, settings: Settings, bootstrap: str, dsn: str):
        self.settings = settings
        self.bootstrap = bootstrap
        self.dsn = dsn
        self.codec = Codec.default()
        self.producer = EventProducer(bootstrap, settings)
        self.db = psycopg.connect(dsn, autocommit=True)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clock = T0
        self._status_reader: KafkaConsumer | None = None
        self.status_events: list[tuple[str, dict]] = []

    # --- the worker -----------------------------------------------------------------------

    def start(self, roles: tuple[str, ...] = ROLES) -> Ledger:
        self._stop = threading.Event()
        self._threads = start_roles(self.settings, self.bootstrap, self.dsn, roles, self._stop)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), f"{thread.name} did not stop"

    def close(self) -> None:
        self.stop()
        self.producer.close()
        if self._status_reader is not None:
            self._status_reader.close()
        self.db.close()

    # --- producing ------------------------------------------------------------------------

    def tick(self, seconds: float = 1) -> datetime:
        """An event clock that moves forward, so events have distinct occurred_at times."""
        self._clock += timedelta(seconds=seconds)
        return self._clock

    def send(self, event_type: str, account_id: str, **fields: Any) -> dict:
        event = {
            "event_id": str(uuid.uuid4()),
            "account_id": account_id,
            "occurred_at": fields.pop("occurred_at", None) or self.tick(),
            **fields,
        }
        self.producer.send(event_type, event).get(timeout=30)
        return event

    def open_account(self, account_id: str) -> dict:
        return self.send("AccountOpened", account_id, created_at=self._clock)

    def use(self, account_id: str, model: str = LLAMA_70B, **quantities: Any) -> dict:
        fields = {
            "request_id": str(uuid.uuid4()),
            "product": "serverless",
            "model": model,
            "service_tier": "standard",
        }
        return self.send("UsageRecorded", account_id, **(fields | quantities))

    # --- reading --------------------------------------------------------------------------

    def journaled(self) -> int:
        """Journal entries, not counting the price and policy versions a `ledger worker`
        journals at start, nor the month close's InvoiceIssued entries (journaled with the
        tick that closes the month)."""
        return self.db.execute(
            "SELECT count(*) FROM journal_entries"
            " WHERE event_type NOT IN ('ConfigPublished', 'InvoiceIssued')"
        ).fetchone()[0]

    def rejected(self) -> list[tuple]:
        return self.db.execute(
            "SELECT topic, kafka_offset, event_id, reason, detail FROM rejected_events ORDER BY id"
        ).fetchall()

    def wait_journaled(self, count: int, timeout: float = 30) -> None:
        wait_until(
            lambda: self.journaled() + len(self.rejected()) >= count,
            timeout,
            f"{count} events journaled or rejected",
        )

    def wait_projected(self, timeout: float = 30) -> None:
        """Until the projection has applied every journal entry."""

        def caught_up() -> bool:
            heads = dict(self.db.execute("SELECT shard, last_seq FROM shard_heads"))
            positions = dict(self.db.execute("SELECT shard, position FROM projection_positions"))
            return all(positions.get(s, 0) >= h for s, h in heads.items())

        wait_until(caught_up, timeout, "projection caught up")

    def settle(self, events: int, timeout: float = 30) -> None:
        self.wait_journaled(events, timeout)
        self.wait_projected(timeout)
        wait_until(
            lambda: (
                self.db.execute(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL"
                ).fetchone()[0]
                == 0
            ),
            timeout,
            "outbox published",
        )
        published = self.db.execute(
            "SELECT count(*) FROM outbox WHERE topic = %s", (self.settings.topic(topics.STATUS),)
        ).fetchone()[0]
        self.read_status_events(expect=published, timeout=timeout)

    def account(self, account_id: str) -> dict:
        row = self.db.execute(
            "SELECT suspended, reasons, status_version, credit_balance, receivable, state "
            "FROM account_status WHERE account_id = %s",
            (account_id,),
        ).fetchone()
        assert row is not None, f"no status for {account_id}"
        keys = ("suspended", "reasons", "status_version", "credit_balance", "receivable", "state")
        return dict(zip(keys, row, strict=True))

    def read_status_events(self, expect: int | None = None, timeout: float = 15) -> list:
        """Status events seen downstream so far (and at least `expect` of them)."""
        if self._status_reader is None:
            self._status_reader = KafkaConsumer(
                self.settings.topic(topics.STATUS),
                bootstrap_servers=self.bootstrap,
                enable_incremental_fetch_sessions=False,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                group_id=None,
                **client_options(self.settings),
            )
        deadline = time.monotonic() + (timeout if expect is not None else 0.5)
        while True:
            for records in self._status_reader.poll(timeout_ms=200).values():
                for r in records:
                    decoded = self.codec.decode(r.value)
                    self.status_events.append((decoded.event_type, decoded.event))
            if expect is not None and len(self.status_events) >= expect:
                return list(self.status_events)
            if time.monotonic() > deadline:
                if expect is not None:
                    raise AssertionError(
                        f"expected {expect} status events, saw {len(self.status_events)}: "
                        f"{self.status_events}"
                    )
                return list(self.status_events)

    def status_of(self, account_id: str) -> list[tuple[str, tuple, int]]:
        """(event type, reasons, status_version) of the suspension and reinstatement events
        for one account."""
        return [
            (t, tuple(e.get("reasons", ())), e["status_version"])
            for t, e in self.read_status_events()
            if e["account_id"] == account_id and t in ("AccountSuspended", "AccountReinstated")
        ]

    def outputs_of(self, account_id: str, event_type: str) -> list[dict]:
        return [
            e
            for t, e in self.read_status_events()
            if e["account_id"] == account_id and t == event_type
        ]

    def period_tick(self, at: datetime) -> int:
        """A PeriodTick at `at` on every partition, as the scheduler sends them."""
        self._clock = max(self._clock, at)
        return send_ticks(self.producer, at)

    def assert_trial_balance_zero(self) -> None:
        with psycopg.connect(self.dsn) as conn:
            tb = trial_balance(conn)
        assert tb.balanced, f"trial balance is not zero: {tb.totals}"


def money(value: Any) -> Decimal:
    return Decimal(str(value))
