"""`ledger scheduler`: the only place the wall clock enters billing.

Every `tick_interval_s` it sends one PeriodTick to EACH partition of the control topic, so every
shard's journal records the same moments in its own order. The ledger expires grants and the
projections turn months and close them when a tick says the time has come; a replay of the
journal replays the ticks, so it reproduces every number.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from ledger.producer import EventProducer
from ledger.settings import Settings

log = structlog.get_logger(__name__)

TICK_NAMESPACE = uuid.UUID("0c0ffee0-7a1c-4b6e-9d2b-6b1f1d5c7e42")


def tick_events(at: datetime, partitions: list[int]) -> list[tuple[int, dict]]:
    """One PeriodTick per partition; event ids derived from (time, partition), so a scheduler
    that sends the same tick twice (two schedulers, a retry) is deduplicated by the ledger."""
    at = at.astimezone(UTC).replace(microsecond=0)
    return [
        (
            p,
            {
                "event_id": str(uuid.uuid5(TICK_NAMESPACE, f"{at.isoformat()}:{p}")),
                "account_id": "",
                "occurred_at": at,
                "tick_at": at,
            },
        )
        for p in partitions
    ]


def send_ticks(producer: EventProducer, at: datetime) -> int:
    ticks = tick_events(at, producer.partitions("PeriodTick"))
    for partition, event in ticks:
        producer.send("PeriodTick", event, partition=partition)
    producer.flush()
    return len(ticks)


def run_scheduler(
    settings: Settings,
    bootstrap: str,
    stop: threading.Event,
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    with EventProducer(bootstrap, settings) as producer:
        log.info("scheduler_started", interval_s=settings.tick_interval_s)
        while not stop.is_set():
            at = clock()
            sent = send_ticks(producer, at)
            log.info("period_tick_sent", tick_at=at.isoformat(), partitions=sent)
            stop.wait(settings.tick_interval_s)
    log.info("scheduler_stopped")
