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
from kafka.errors import KafkaError

from ledger import metrics
from ledger.backoff import Outage
from ledger.log import describe_error
from ledger.producer import EventProducer
from ledger.settings import Settings

log = structlog.get_logger(__name__)

TICK_NAMESPACE = uuid.UUID("0c0ffee0-7a1c-4b6e-9d2b-6b1f1d5c7e42")

# One attempt to send a tick: Kafka acknowledges it within this long, or the producer expires
# it (so nothing is left queued behind the attempt) and the scheduler sends it again. Short,
# so that a stop is never held up for long. No idempotent producer: ticks are deduplicated
# by event id, and kafka-python's idempotent producer was seen stuck for good after a batch
# expired while the broker was down.
SEND_TIMEOUT_S = 2.5
SCHEDULER_PRODUCER_OPTIONS = {
    "client_id": "ledger-scheduler",
    "enable_idempotence": False,
    "bootstrap_timeout_ms": int(SEND_TIMEOUT_S * 1000),
    "max_block_ms": int(SEND_TIMEOUT_S * 1000),
    "request_timeout_ms": int(SEND_TIMEOUT_S * 800),
    "delivery_timeout_ms": int(SEND_TIMEOUT_S * 1000),
}


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


def send_ticks(producer: EventProducer, at: datetime, *, timeout: float | None = None) -> int:
    """Send the PeriodTick at `at` to every partition of the control topic and wait until
    Kafka has acknowledged each one; raises (a KafkaError) if any was not, so the caller can
    send the same tick again (same event ids: the ledger drops the copies)."""
    ticks = tick_events(at, producer.partitions("PeriodTick"))
    if not ticks:
        raise KafkaError(f"no partitions known for {producer.topic('PeriodTick')}")
    futures = [
        producer.send("PeriodTick", event, partition=partition) for partition, event in ticks
    ]
    producer.flush(timeout)
    for future in futures:
        future.get(timeout=timeout)  # raises the error of a send Kafka did not acknowledge
    return len(ticks)


def run_scheduler(
    settings: Settings,
    bootstrap: str,
    stop: threading.Event,
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Send a tick every `tick_interval_s` until `stop` is set. While Kafka is down the tick
    in hand is retried (with backoff, one `dependency_down` line every few seconds naming
    it) until it is acknowledged; it is never skipped. The interval runs from the send."""
    outage = Outage("scheduler", "kafka")
    producer: EventProducer | None = None
    pending: datetime | None = None  # a tick not acknowledged yet
    log.info("scheduler_started", interval_s=settings.tick_interval_s)
    try:
        while not stop.is_set():
            at = pending if pending is not None else clock()
            try:
                if producer is None:
                    producer = EventProducer(bootstrap, settings, **SCHEDULER_PRODUCER_OPTIONS)
                sent = send_ticks(producer, at, timeout=SEND_TIMEOUT_S + 1)
            except KafkaError as exc:
                pending = at
                stop.wait(outage.failed(exc, tick_at=at.isoformat()))
                continue
            outage.ok()
            metrics.LAST_TICK.set(at.timestamp())
            pending = None
            log.info("period_tick_sent", tick_at=at.isoformat(), partitions=sent)
            stop.wait(settings.tick_interval_s)
    finally:
        if pending is not None:
            log.warning("period_tick_unsent", tick_at=pending.isoformat())
        if producer is not None:
            _close(producer, wait=pending is None)
        log.info("scheduler_stopped")


def _close(producer: EventProducer, *, wait: bool) -> None:
    """Close the producer; with a tick still unacknowledged (Kafka down), hardly waiting:
    its records have expired already (or are about to), and the next scheduler sends its own
    tick."""
    try:
        producer.close(timeout=SEND_TIMEOUT_S if wait else 1.0)
    except KafkaError as exc:
        log.warning("scheduler_producer_close_failed", error=describe_error(exc))
