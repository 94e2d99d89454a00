"""Well-formed traffic for the fault run: a seeded plan of billing events per producer, and the
producer threads that send it (plain idempotent ones and transactional ones that abort some of
their transactions). What Kafka acknowledges goes into the Model.

Every producer owns its own accounts (all their events go through it, roughly in order) and
draws from its own `random.Random(f"{seed}:{producer}")`, so a seed gives the same events, ids
and transaction boundaries on every run. Event times start at T0 (November 2026, priced by the
price book's 2026-07 version) and advance one second per event and producer.
"""

from __future__ import annotations

import collections
import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from kafka import KafkaProducer

from ledger import topics
from ledger.chaos.model import STEP_PRICES, TOKEN_PRICES, Model
from ledger.codec import Codec
from ledger.kafka_auth import client_options
from ledger.producer import EventProducer, new_event
from ledger.settings import Settings

log = structlog.get_logger(__name__)

T0 = datetime(2026, 11, 2, tzinfo=UTC)
TOKEN_MODELS = sorted(TOKEN_PRICES)
IMAGE_MODELS = sorted(STEP_PRICES)
TIERS = ("standard", "standard", "standard", "batch", "priority")
PURCHASES = (Decimal("10"), Decimal("25"), Decimal("50"), Decimal("100"))
GRANTS = (Decimal("5"), Decimal("20"))
SEND_ATTEMPTS = 20
BEHIND_WAIT_MAX_S = 120.0
# A broker is down for at most 15 s in a fault run and the transaction coordinator moves to
# another node within the 6 s broker session timeout: a commit still waiting after 20 s is hung
# (and a producer that hangs longer leaves its accounts' shards without traffic, which would
# count as a ledger stall).
TRANSACTION_END_TIMEOUT_S = 20.0

Planned = tuple[str, dict]  # (event type, event)


def account_ids(accounts: int) -> list[str]:
    return [f"acct-{i:06d}" for i in range(accounts)]


def det_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def plan(seed: int, producer: int, producers: int, accounts: int, events: int) -> Iterator[Planned]:
    """The events of one producer: its accounts opened (some with a payment method or a spend
    limit), then usage of several models, purchases, grants and payment-method changes until
    `events` events in all."""
    rng = random.Random(f"{seed}:{producer}")
    mine = account_ids(accounts)[producer::producers]
    clock = T0 + timedelta(minutes=producer)
    sent = 0
    purchases: collections.Counter[str] = collections.Counter()

    def event(event_type: str, account: str, **fields: Any) -> Planned:
        nonlocal clock, sent
        clock += timedelta(seconds=1)
        sent += 1
        return event_type, new_event(
            event_type, account, occurred_at=clock, event_id=det_id(rng), **fields
        )

    for account in mine:
        if sent >= events:
            return
        yield event("AccountOpened", account, created_at=clock)
        if rng.random() < 0.4 and sent < events:
            yield event(
                "PaymentMethodAdded", account, payment_method_id=f"pm-{account}", kind="card"
            )
        if rng.random() < 0.05 and sent < events:
            limit = rng.choice((Decimal("100"), Decimal("1000"), None))
            yield event("SpendLimitConfigured", account, monthly_limit=limit)
    while sent < events and mine:
        account = rng.choice(mine)
        roll = rng.random()
        if roll < 0.85:
            yield usage(event, rng, account, sent)
        elif roll < 0.90:
            purchases[account] += 1
            yield event(
                "CreditPurchased",
                account,
                grant_id=f"buy-{purchases[account]}",
                amount=rng.choice(PURCHASES),
                payment_reference=f"ch-{sent}",
            )
        elif roll < 0.95:
            purchases[account] += 1
            yield event(
                "CreditGranted",
                account,
                grant_id=f"grant-{purchases[account]}",
                amount=rng.choice(GRANTS),
                kind=rng.choice(("promotional", "goodwill")),
                expires_at=None,
                reason="chaos",
            )
        else:
            kind = rng.choice(("PaymentMethodAdded", "PaymentMethodRemoved", "PaymentFailed"))
            fields: dict[str, Any] = {"payment_method_id": f"pm-{account}"}
            if kind == "PaymentMethodAdded":
                fields["kind"] = "card"
            elif kind == "PaymentFailed":
                fields["failure_code"] = "card_declined"
            yield event(kind, account, **fields)


def usage(event, rng: random.Random, account: str, n: int) -> Planned:
    tier = rng.choice(TIERS)
    if rng.random() < 0.1:
        return event(
            "UsageRecorded",
            account,
            request_id=f"req-{n}",
            product="image",
            model=rng.choice(IMAGE_MODELS),
            service_tier=tier,
            steps=rng.randrange(1, 60),
        )
    return event(
        "UsageRecorded",
        account,
        request_id=f"req-{n}",
        product="serverless",
        model=rng.choice(TOKEN_MODELS),
        service_tier=tier,
        input_tokens=int(rng.lognormvariate(7.5, 1.2)),
        output_tokens=int(rng.lognormvariate(5.5, 1.0)),
    )


class Progress:
    """Events acknowledged so far (all producers), and a pace to keep: at most `rate` events
    per second, and at most `max_behind` events ahead of what the ledger has consumed
    (`consumed`, the stored offsets summed over the input partitions), so that a machine that
    cannot drain `rate` is offered what it can drain plus a bounded backlog, never a backlog
    that grows through the whole run."""

    def __init__(
        self,
        rate: float | None,
        max_behind: int | None = None,
        consumed: Callable[[], float | None] | None = None,
    ):
        self.rate = rate
        self.max_behind = max_behind
        self.consumed = consumed
        self.sent = 0
        self.started = time.monotonic()
        self.held_s = 0.0  # time the producers waited for the ledger (all threads, overlapping)
        self._lock = threading.Lock()
        self._consumed: tuple[float, float | None] = (0.0, None)  # (when read, value)
        self.samples: collections.deque[tuple[str, dict, bytes]] = collections.deque(maxlen=500)

    def add(self, n: int) -> None:
        with self._lock:
            self.sent += n

    def pace(self, stop: threading.Event) -> None:
        """Sleep while the producers are ahead of `rate` events per second, or more than
        `max_behind` events ahead of the ledger (but no longer than BEHIND_WAIT_MAX_S in one
        go: a ledger that does not move at all is the checker's to report, not a reason to
        hang the run)."""
        if self.rate:
            while not stop.is_set():
                ahead = self.sent / self.rate - (time.monotonic() - self.started)
                if ahead <= 0:
                    break
                stop.wait(min(ahead, 0.5))
        if not self.max_behind or self.consumed is None:
            return
        since = time.monotonic()
        while not stop.is_set() and time.monotonic() - since < BEHIND_WAIT_MAX_S:
            consumed = self._read_consumed()
            if consumed is None or self.sent - consumed <= self.max_behind:
                break
            stop.wait(0.5)
        with self._lock:
            self.held_s += time.monotonic() - since

    def _read_consumed(self) -> float | None:
        """`consumed()`, read at most every half second for all the producer threads."""
        with self._lock:
            at, value = self._consumed
            if time.monotonic() - at < 0.5:
                return value
        value = self.consumed() if self.consumed is not None else None
        with self._lock:
            self._consumed = (time.monotonic(), value)
        return value


def run_plain(
    name: str,
    events: Iterator[Planned],
    bootstrap: str,
    settings: Settings,
    model: Model,
    progress: Progress,
    stop: threading.Event,
) -> None:
    """Send with an idempotent acks=all producer, 200 at a time; what failed is sent again
    (the same bytes: a Kafka-level duplicate is the ledger's to drop)."""
    codec = Codec.default()
    with EventProducer(
        bootstrap, settings, client_id=f"chaos-{name}", linger_ms=10, delivery_timeout_ms=60_000
    ) as producer:
        batch: list[Planned] = []
        for planned in events:
            if stop.is_set():
                return
            batch.append(planned)
            if len(batch) >= 200:
                _send_plain(producer, batch, model, progress, codec, stop)
                batch = []
                progress.pace(stop)
        _send_plain(producer, batch, model, progress, codec, stop)


def _send_plain(producer, batch, model, progress, codec, stop) -> None:
    pending = list(batch)
    for attempt in range(SEND_ATTEMPTS):
        if not pending or stop.is_set():
            break
        futures = [(planned, producer.send(*planned)) for planned in pending]
        try:
            producer.flush(timeout=90)
        except Exception as exc:
            log.warning("chaos.flush_failed", error=str(exc), attempt=attempt)
        pending = []
        for planned, future in futures:
            if future.is_done and future.succeeded():
                event_type, event = planned
                meta = future.value
                model.accept(
                    event_type,
                    event,
                    topic=meta.topic,
                    partition=meta.partition,
                    offset=meta.offset,
                )
                if event_type == "UsageRecorded":
                    progress.samples.append((event_type, event, codec.encode(*planned)))
                progress.add(1)
            else:
                pending.append(planned)
        if pending:
            log.warning("chaos.resending", records=len(pending), attempt=attempt)
            time.sleep(min(2**attempt * 0.2, 5))
    if pending and not stop.is_set():
        raise RuntimeError(f"{len(pending)} events could not be sent in {SEND_ATTEMPTS} attempts")


def run_transactional(
    name: str,
    events: Iterator[Planned],
    bootstrap: str,
    settings: Settings,
    model: Model,
    progress: Progress,
    stop: threading.Event,
    *,
    seed: int,
    abort_ratio: float,
) -> None:
    """Send in Kafka transactions of 10 to 200 events; abort a seeded share of them (their
    events must never be journaled). A transaction that fails is retried whole with a new
    producer of the same transactional id (which fences the old one and aborts what it left)."""
    rng = random.Random(f"{seed}:{name}:transactions")
    codec = Codec.default()
    txn_id = f"{settings.topic_prefix}chaos-{name}"
    producer = _transactional_producer(bootstrap, txn_id, settings)
    try:
        events = iter(events)
        while not stop.is_set():
            group = [p for _, p in zip(range(rng.randrange(10, 200)), events, strict=False)]
            if not group:
                return
            abort = rng.random() < abort_ratio
            for attempt in range(SEND_ATTEMPTS):
                try:
                    producer.begin_transaction()
                    futures = []
                    for event_type, event in group:
                        value = codec.encode(event_type, event)
                        futures.append(
                            producer.send(
                                settings.topic(topics.topic_for(event_type)),
                                value=value,
                                key=event["account_id"].encode(),
                                headers=codec.headers(event_type),
                            )
                        )
                    finish(producer.abort_transaction if abort else producer.commit_transaction)
                    break
                except Exception as exc:
                    log.warning("chaos.transaction_failed", producer=name, error=str(exc))
                    with contextlib.suppress(Exception):
                        producer.close(timeout=5)
                    if stop.is_set():
                        return
                    time.sleep(min(2**attempt * 0.2, 5))
                    producer = _transactional_producer(bootstrap, txn_id, settings)
            else:
                raise RuntimeError(f"{name}: a transaction failed {SEND_ATTEMPTS} times")
            if abort:
                model.abort([event["event_id"] for _, event in group])
            else:
                model.committed_transaction()
                for (event_type, event), future in zip(group, futures, strict=True):
                    meta = future.value if future.is_done and future.succeeded() else None
                    model.accept(
                        event_type,
                        event,
                        topic=meta.topic if meta else "",
                        partition=meta.partition if meta else -1,
                        offset=meta.offset if meta else -1,
                    )
            progress.add(len(group))
            progress.pace(stop)
    finally:
        with contextlib.suppress(Exception):
            producer.close(timeout=10)


def finish(end_transaction, timeout_s: float = TRANSACTION_END_TIMEOUT_S) -> None:
    """Commit or abort, but give up after `timeout_s`: kafka-python 3.0.12 can wait forever
    for the end of a transaction whose coordinator was killed at the wrong moment (seen in a
    fault run: a broker kill, then commit_transaction never returned). Giving up counts as a
    failed transaction: it is retried whole with a new producer of the same transactional id,
    which fences the old one (what the old one had committed is not journaled twice: the
    ledger drops a Kafka-level duplicate by event_id)."""
    done = threading.Event()
    errors: list[BaseException] = []

    def body() -> None:
        try:
            end_transaction()
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=body, name="end-transaction", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"the transaction did not end within {timeout_s:.0f}s")
    if errors:
        raise errors[0]


def _transactional_producer(bootstrap: str, txn_id: str, settings: Settings) -> KafkaProducer:
    deadline = time.monotonic() + 120
    while True:
        try:
            producer = KafkaProducer(
                bootstrap_servers=bootstrap,
                client_id=txn_id,
                transactional_id=txn_id,
                acks="all",
                enable_idempotence=True,
                linger_ms=10,
                **client_options(settings),
            )
            producer.init_transactions()
            return producer
        except Exception as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("chaos.transactional_init_failed", error=str(exc))
            time.sleep(1)
