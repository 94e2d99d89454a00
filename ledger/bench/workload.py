"""The benchmark's input: accounts and skewed usage over several products and priced models,
encoded as the ledger's producers would, and produced to the input topics."""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ledger import topics
from ledger.bench import BenchError
from ledger.codec import Codec
from ledger.kafka_auth import client_options
from ledger.rating import PriceBook
from ledger.settings import Settings

T0 = datetime(2026, 3, 1, tzinfo=UTC)  # inside the first price version
USAGE_SPAN = timedelta(days=27)
PAYMENT_METHOD_SHARE = 0.4
PRODUCT_WEIGHTS = {"serverless": 85, "image": 8, "on_demand": 5, "fine_tuning": 2}
TIER_WEIGHTS = {"standard": 80, "batch": 15, "priority": 5}
ACCOUNT_SKEW = 0.8  # Zipf exponent of usage over accounts


@dataclasses.dataclass
class Message:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def make_events(
    accounts: int, events: int, seed: int
) -> tuple[list[tuple[str, dict]], dict[str, int]]:
    """(event_type, event) in production order, and how many of each type."""
    rng = random.Random(seed)
    version = PriceBook.load().version_at(T0)
    if version is None:
        raise BenchError(f"the price book has no version in force at {T0:%Y-%m-%d}")
    ids = [f"bench-acct-{i:06d}" for i in range(accounts)]
    out: list[tuple[str, dict]] = []

    def event(event_type: str, account_id: str, when: datetime, **fields: Any) -> None:
        uid = uuid.UUID(int=rng.getrandbits(128), version=4)
        out.append(
            (
                event_type,
                {"event_id": str(uid), "account_id": account_id, "occurred_at": when, **fields},
            )
        )

    for i, account_id in enumerate(ids):
        when = T0 + timedelta(seconds=i)
        event("AccountOpened", account_id, when, created_at=when)
    for i, account_id in enumerate(ids):
        if rng.random() < PAYMENT_METHOD_SHARE:
            event(
                "PaymentMethodAdded",
                account_id,
                T0 + timedelta(hours=1, seconds=i),
                payment_method_id=f"pm-{rng.getrandbits(48):012x}",
                kind="card",
            )

    # Heavy-tailed usage: a few accounts send most of it.
    ranked = ids[:]
    rng.shuffle(ranked)
    cum_weights = []
    total = 0.0
    for rank in range(1, accounts + 1):
        total += rank**-ACCOUNT_SKEW
        cum_weights.append(total)
    models = {
        "serverless": sorted(version.serverless),
        "image": sorted(version.image),
        "fine_tuning": sorted(version.fine_tuning),
        "on_demand": sorted(version.on_demand),  # GPU types
    }
    products = [p for p in PRODUCT_WEIGHTS if models[p]]
    product_weights = [PRODUCT_WEIGHTS[p] for p in products]
    tiers, tier_weights = list(TIER_WEIGHTS), list(TIER_WEIGHTS.values())
    owners = rng.choices(ranked, cum_weights=cum_weights, k=events)
    step = USAGE_SPAN / max(events, 1)
    start = T0 + timedelta(hours=2)
    for i, account_id in enumerate(owners):
        product = rng.choices(products, product_weights)[0]
        fields: dict[str, Any] = {
            "request_id": f"req-{rng.getrandbits(64):016x}",
            "product": product,
            "service_tier": rng.choices(tiers, tier_weights)[0],
        }
        if product == "serverless":
            fields["model"] = rng.choice(models["serverless"])
            prompt = min(200_000, max(1, int(rng.lognormvariate(7.0, 1.2))))
            cached = int(prompt * rng.uniform(0.2, 0.9)) if rng.random() < 0.3 else 0
            fields["input_tokens"] = prompt - cached
            fields["cached_input_tokens"] = cached
            fields["output_tokens"] = min(32_000, max(1, int(rng.lognormvariate(5.5, 1.0))))
        elif product == "image":
            model = rng.choice(models["image"])
            fields["model"] = model
            if "step" in version.image[model]:
                fields["steps"] = rng.choice((4, 20, 28, 30, 50)) * rng.randint(1, 4)
            else:
                fields["images"] = rng.randint(1, 4)
        elif product == "fine_tuning":
            fields["model"] = rng.choice(models["fine_tuning"])
            fields["training_tokens"] = rng.randint(100_000, 20_000_000)
        else:  # on_demand: GPU time in seconds, millisecond resolution
            fields["model"] = "accounts/bench/deployedModels/custom"
            fields["gpu_type"] = rng.choice(models["on_demand"])
            fields["gpu_seconds"] = Decimal(rng.randint(1_000, 3_600_000)).scaleb(-3)
        event("UsageRecorded", account_id, start + step * i, **fields)

    counts: dict[str, int] = {}
    for event_type, _ in out:
        counts[event_type] = counts.get(event_type, 0) + 1
    return out, counts


def encode_events(
    settings: Settings, codec: Codec, events: list[tuple[str, dict]]
) -> list[Message]:
    headers = {t: codec.headers(t) for t in {t for t, _ in events}}
    names = {t: settings.topic(topics.topic_for(t)) for t in headers}
    return [
        Message(names[t], e["account_id"].encode(), codec.encode(t, e), headers[t])
        for t, e in events
    ]


def produce(bootstrap: str, messages: list[Message], settings: Settings) -> tuple[float, str]:
    """Send everything and wait for the acks; returns (seconds, broker API version)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="ledger-bench",
        acks="all",
        linger_ms=20,
        batch_size=512 * 1024,
        max_request_size=1024 * 1024,
        compression_type=None,
        **client_options(settings),
    )
    try:
        api = ".".join(str(v) for v in producer.config.get("api_version") or ())
        started = time.perf_counter()
        futures = [
            producer.send(m.topic, value=m.value, key=m.key, headers=m.headers) for m in messages
        ]
        producer.flush()
        seconds = time.perf_counter() - started
        failed = [f for f in futures if f.failed()]
        if failed:
            raise BenchError(f"{len(failed)} sends failed, first: {failed[0].exception}")
        return seconds, api
    finally:
        producer.close()


def add_noise(
    messages: list[Message], duplicates: float, malformed: float, seed: int
) -> tuple[list[Message], int, int]:
    """The input with a share of `duplicates` (a usage record sent again byte for byte, as a
    producer retry would: the ledger drops it as a redelivery) and of `malformed` records
    (random bytes, or a usage record cut short: the ledger quarantines them), each at a
    random place in the input with its account's key (so on its partition). Returns
    (messages, duplicates added, malformed added)."""
    rng = random.Random(seed + 1)
    usage = [i for i, m in enumerate(messages) if m.topic.endswith(topics.USAGE)]
    extra: dict[int, list[Message]] = {}
    n_dup = round(len(usage) * duplicates)
    n_bad = round(len(usage) * malformed)
    for _ in range(n_dup):
        m = messages[rng.choice(usage)]
        extra.setdefault(rng.randrange(len(messages)), []).append(
            Message(m.topic, m.key, m.value, m.headers)
        )
    for k in range(n_bad):
        m = messages[rng.choice(usage)]
        value = rng.randbytes(rng.randint(1, 120)) if k % 2 else m.value[: len(m.value) // 2]
        extra.setdefault(rng.randrange(len(messages)), []).append(
            Message(m.topic, m.key, value, m.headers)
        )
    out: list[Message] = []
    for i, m in enumerate(messages):
        out.append(m)
        out.extend(extra.get(i, ()))
    return out, n_dup, n_bad
