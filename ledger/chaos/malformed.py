"""Malformed and odd records, each kind switchable, each with the fate the ledger owes it.

    kind            what is sent                                              fate
    tombstone       a null value                                              quarantine
    random          random bytes                                              quarantine
    magic           a valid body behind the wrong magic bytes (C3 02)         quarantine
    fingerprint     a valid body with an unknown schema fingerprint           quarantine
    truncated       a valid encoding cut short                                quarantine
    absurd          valid Avro: 10^15 tokens, negative tokens, $99,999,999,999 quarantine
    nul             valid Avro with a NUL character in a string               quarantine
    control         valid Avro with control characters in a payment-method id either, $0
    big             a 1 MB value (valid header, garbage body)                 quarantine
    longid          valid Avro with a 3,000-character event or account id     quarantine
    conflict        an acknowledged event's id again, with another body       quarantine
    redelivery      an acknowledged event again, byte for byte                journaled once
    unknown_account usage of an account never opened                          journaled
    year1970        usage dated 1970 (before any price: unpriced)             either, $0
    year2999        usage dated 2999                                          quarantine
    forged_tick     a PeriodTick for 2999 not sent by the scheduler           quarantine

"either" records may be journaled or quarantined (the rules may tighten), but never both and
never neither; they move no money either way, so the totals do not depend on the choice.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import fastavro
import structlog
from kafka import KafkaProducer

from ledger import topics
from ledger.chaos.model import ACCEPT, EITHER, QUARANTINE, Model, SentRecord, digest
from ledger.chaos.traffic import TOKEN_MODELS, Progress, account_ids, det_id
from ledger.codec import MAGIC, Codec
from ledger.kafka_auth import client_options
from ledger.settings import Settings

log = structlog.get_logger(__name__)

KINDS = (
    "tombstone", "random", "magic", "fingerprint", "truncated", "absurd", "nul", "control",
    "big", "longid", "conflict", "redelivery", "unknown_account", "year1970", "year2999",
    "forged_tick",
)  # fmt: skip
BIG_BYTES = 1_000_000


class Bad:
    """One record to send: where, what, and what must become of it."""

    def __init__(
        self,
        kind: str,
        fate: str,
        event_type: str | None,
        key: bytes | None,
        value: bytes | None,
        *,
        event: dict | None = None,
        partition: int | None = None,
    ):
        self.kind, self.fate, self.event_type = kind, fate, event_type
        self.key, self.value, self.event, self.partition = key, value, event, partition

    @property
    def topic_base(self) -> str:
        return topics.topic_for(self.event_type or "UsageRecorded")


def encode_unchecked(event_type: str, datum: dict) -> bytes:
    """Single-object encoding WITHOUT the codec's validation: what a careless producer sends."""
    codec = Codec.default()
    schema = codec.schema(event_type)
    buf = io.BytesIO()
    buf.write(MAGIC + codec.fingerprint(event_type).to_bytes(8, "little"))
    fastavro.schemaless_writer(buf, schema, datum)
    return buf.getvalue()


class Maker:
    def __init__(self, rng: random.Random, accounts: int, progress: Progress):
        self.rng = rng
        self.accounts = account_ids(accounts)
        self.progress = progress
        self.n = 0

    def usage(self, account: str | None = None, **over) -> dict:
        self.n += 1
        event = {
            "event_id": det_id(self.rng),
            "account_id": account or self.rng.choice(self.accounts),
            "occurred_at": datetime(2026, 11, 20, tzinfo=UTC) + timedelta(seconds=self.n),
            "request_id": f"bad-{self.n}",
            "product": "serverless",
            "model": self.rng.choice(TOKEN_MODELS),
            "service_tier": "standard",
            "input_tokens": 100,
            "cached_input_tokens": 0,
            "output_tokens": 100,
            "gpu_seconds": None,
            "gpu_type": None,
            "training_tokens": 0,
            "images": 0,
            "steps": 0,
        }
        event.update(over)
        return event

    def key(self) -> bytes:
        return self.rng.choice(self.accounts).encode()

    def valid(self) -> bytes:
        return encode_unchecked("UsageRecorded", self.usage())

    def build(self, kind: str) -> Bad | None:
        rng = self.rng
        if kind == "tombstone":
            return Bad(kind, QUARANTINE, None, self.key(), None)
        if kind == "random":
            return Bad(kind, QUARANTINE, None, self.key(), rng.randbytes(rng.randrange(1, 200)))
        if kind == "magic":
            return Bad(kind, QUARANTINE, None, self.key(), b"\xc3\x02" + self.valid()[2:])
        if kind == "fingerprint":
            return Bad(
                kind, QUARANTINE, None, self.key(), MAGIC + rng.randbytes(8) + self.valid()[10:]
            )
        if kind == "truncated":
            value = self.valid()
            return Bad(
                kind, QUARANTINE, None, self.key(), value[: rng.randrange(10, len(value) - 1)]
            )
        if kind == "big":
            header = self.valid()[:10]
            return Bad(kind, QUARANTINE, None, self.key(), header + b"\xff" * BIG_BYTES)
        if kind == "absurd":
            choice = rng.randrange(3)
            if choice == 0:
                event = self.usage(input_tokens=10**15)
            elif choice == 1:
                event = self.usage(output_tokens=-rng.randrange(1, 1000))
            else:
                event = {
                    "event_id": det_id(rng),
                    "account_id": rng.choice(self.accounts),
                    "occurred_at": datetime(2026, 11, 20, tzinfo=UTC),
                    "grant_id": f"absurd-{self.n}",
                    "amount": Decimal("99999999999"),
                    "payment_reference": "absurd",
                }
                return self._valid(kind, QUARANTINE, "CreditPurchased", event)
            return self._valid(kind, QUARANTINE, "UsageRecorded", event)
        if kind == "nul":
            return self._valid(kind, QUARANTINE, "UsageRecorded", self.usage(request_id="r\x00q"))
        if kind == "control":
            event = {
                "event_id": det_id(rng),
                "account_id": rng.choice(self.accounts),
                "occurred_at": datetime(2026, 11, 20, tzinfo=UTC),
                "payment_method_id": "pm-\x01\x07\x1b[31m\x7f-" + str(self.n),
                "kind": "card\x08\x0c",
            }
            return self._valid(kind, EITHER, "PaymentMethodAdded", event)
        if kind == "longid":
            long = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=3000))
            if rng.random() < 0.5:
                return self._valid(kind, QUARANTINE, "UsageRecorded", self.usage(event_id=long))
            return self._valid(kind, QUARANTINE, "UsageRecorded", self.usage(account=long))
        if kind == "unknown_account":
            event = self.usage(account=f"ghost-{rng.randrange(10**6):06d}")
            return self._valid(kind, ACCEPT, "UsageRecorded", event)
        if kind == "year1970":
            event = self.usage(
                occurred_at=datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=self.n)
            )
            return self._valid(kind, EITHER, "UsageRecorded", event)
        if kind == "year2999":
            event = self.usage(
                occurred_at=datetime(2999, 1, 1, tzinfo=UTC) + timedelta(seconds=self.n)
            )
            return self._valid(kind, QUARANTINE, "UsageRecorded", event)
        if kind == "forged_tick":
            at = datetime(2999, 12, 31, tzinfo=UTC)
            event = {"event_id": det_id(rng), "account_id": "", "occurred_at": at, "tick_at": at}
            bad = self._valid(kind, QUARANTINE, "PeriodTick", event)
            bad.key = None
            return bad
        if kind in ("conflict", "redelivery"):
            if not self.progress.samples:
                return None
            event_type, original, value = rng.choice(list(self.progress.samples))
            if kind == "redelivery":
                return Bad(
                    kind, ACCEPT, event_type, original["account_id"].encode(), value, event=original
                )
            changed = dict(original)
            changed["input_tokens"] = original.get("input_tokens", 0) + 1
            changed["occurred_at"] = original["occurred_at"] + timedelta(seconds=1)
            full = self.usage(**changed)
            return self._valid(kind, QUARANTINE, event_type, full)
        raise ValueError(f"unknown malformed kind {kind!r} (known: {', '.join(KINDS)})")

    def _valid(self, kind: str, fate: str, event_type: str, event: dict) -> Bad:
        key = event["account_id"].encode() if event["account_id"] else None
        return Bad(kind, fate, event_type, key, encode_unchecked(event_type, event), event=event)


def schedule(kinds: list[str], count: int, rng: random.Random) -> list[str]:
    """`count` kinds in a seeded order: evenly spread, 1 MB records at most one in 1,000."""
    if not kinds or count <= 0:
        return []
    big = [k for k in kinds if k == "big"]
    rest = [k for k in kinds if k != "big"]
    n_big = min(max(1, count // 1000), count) if big else 0
    out = ["big"] * n_big
    if rest:
        out += [rest[i % len(rest)] for i in range(count - n_big)]
    rng.shuffle(out)
    return out


def run_malformed(
    kinds: list[str],
    count: int,
    planned_events: int,
    *,
    seed: int,
    accounts: int,
    bootstrap: str,
    settings: Settings,
    model: Model,
    progress: Progress,
    stop: threading.Event,
    producers_done: Callable[[], bool],
) -> None:
    """Send the malformed records spread over the traffic: record i once the producers have
    sent i/count of their events."""
    rng = random.Random(f"{seed}:malformed")
    maker = Maker(rng, accounts, progress)
    order = schedule(kinds, count, rng)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="chaos-malformed",
        acks="all",
        enable_idempotence=True,
        max_request_size=2 * 1024 * 1024,
        linger_ms=0,
        **client_options(settings),
    )
    try:
        for i, kind in enumerate(order):
            while (
                not stop.is_set()
                and not producers_done()
                and progress.sent < planned_events * i / max(len(order), 1)
            ):
                stop.wait(0.05)
            if stop.is_set():
                return
            bad = maker.build(kind)
            while bad is None and not stop.is_set():  # needs an acknowledged event first
                stop.wait(0.2)
                bad = maker.build(kind)
            if bad is not None:
                _send(producer, bad, settings, model)
    finally:
        producer.close(timeout=10)


def _send(producer: KafkaProducer, bad: Bad, settings: Settings, model: Model) -> None:
    topic = settings.topic(bad.topic_base)
    headers = Codec.default().headers(bad.event_type) if bad.event_type else []
    partition = None
    if bad.key is None and bad.kind == "forged_tick":
        partition = 0
    for attempt in range(10):
        try:
            meta = producer.send(
                topic, value=bad.value, key=bad.key, headers=headers, partition=partition
            ).get(timeout=60)
            break
        except Exception as exc:
            log.warning("chaos.malformed_send_failed", kind=bad.kind, error=str(exc))
            model.lost_in_sending(bad.kind, bad.value)
            time.sleep(min(2**attempt * 0.2, 5))
    else:
        return
    if bad.fate == ACCEPT:
        assert bad.event is not None and bad.event_type is not None
        if bad.kind == "redelivery":
            model.redelivered(bad.event["event_id"])
        else:
            model.accept(
                bad.event_type,
                bad.event,
                kind=bad.kind,
                topic=meta.topic,
                partition=meta.partition,
                offset=meta.offset,
            )
        return
    event_id = bad.event.get("event_id") if bad.event else None
    if bad.kind == "conflict":
        event_id = None  # the id is the original's, which must stay journaled
    model.record(
        SentRecord(
            bad.kind, bad.fate, topic, meta.partition, meta.offset, digest(bad.value), event_id
        )
    )


__all__ = ["KINDS", "run_malformed", "schedule"]
