"""EventProducer and topics without a broker: KafkaProducer is replaced by a recorder."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from ledger import producer as producer_module
from ledger import topics
from ledger.codec import Codec
from ledger.errors import InvalidEventError
from ledger.producer import EventProducer, new_event
from ledger.settings import Settings


class FakeKafkaProducer:
    def __init__(self, **config):
        self.config = config
        self.sent: list[dict] = []
        self.flushed = 0
        self.closed = False

    def send(self, topic, value=None, key=None, headers=None, partition=None):
        self.sent.append(
            {"topic": topic, "value": value, "key": key, "headers": headers, "partition": partition}
        )
        return "future"

    def partitions_for(self, topic):
        return {2, 0, 1}

    def flush(self, timeout=None):
        self.flushed += 1

    def close(self, timeout=None):
        self.closed = True


@pytest.fixture
def fake(monkeypatch):
    made = []

    def factory(**config):
        made.append(FakeKafkaProducer(**config))
        return made[-1]

    monkeypatch.setattr(producer_module, "KafkaProducer", factory)
    return made


def test_send_encodes_keys_and_routes(fake):
    settings = Settings(topic_prefix="t1.")
    event = new_event("CreditPurchased", "acct-1", grant_id="g", amount=Decimal("10"))
    with EventProducer("localhost:9092", settings, linger_ms=0) as producer:
        assert producer.send("CreditPurchased", event) == "future"
    (kafka,) = fake
    assert kafka.config["acks"] == "all"
    assert kafka.config["enable_idempotence"] is True
    assert kafka.config["linger_ms"] == 0  # override wins
    assert kafka.config["bootstrap_servers"] == "localhost:9092"
    assert kafka.flushed >= 1 and kafka.closed
    (record,) = kafka.sent
    assert record["topic"] == "t1.billing.credits.v1"
    assert record["key"] == b"acct-1"
    assert record["partition"] is None
    codec = Codec.default()
    assert record["headers"] == codec.headers("CreditPurchased")
    decoded = codec.decode(record["value"])
    assert decoded.event_type == "CreditPurchased"
    assert decoded.event["amount"] == Decimal("10")
    assert decoded.event["event_id"] == event["event_id"]


def test_invalid_event_sends_nothing(fake):
    producer = EventProducer("localhost:9092", Settings())
    event = new_event("CreditPurchased", "acct-1", grant_id="g", amount=10.0)
    with pytest.raises(InvalidEventError, match="amount"):
        producer.send("CreditPurchased", event)
    with pytest.raises(InvalidEventError):
        producer.send("Nope", event)
    assert fake[0].sent == []


def test_tick_has_no_key_and_can_target_a_partition(fake):
    producer = EventProducer("localhost:9092", Settings())
    tick = new_event("PeriodTick", "", tick_at=dt.datetime(2025, 4, 1, tzinfo=dt.UTC))
    assert producer.partitions("PeriodTick") == [0, 1, 2]
    producer.send("PeriodTick", tick, partition=2)
    (record,) = fake[0].sent
    assert record["topic"] == "billing.control.v1"
    assert record["key"] is None and record["partition"] == 2


def test_new_event_fills_id_and_time():
    before = dt.datetime.now(dt.UTC)
    event = new_event("AccountOpened", "acct-9", created_at=before)
    assert uuid.UUID(event["event_id"]).version == 4
    assert event["account_id"] == "acct-9"
    assert before <= event["occurred_at"] <= dt.datetime.now(dt.UTC)
    fixed = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    assert new_event("AccountOpened", "a", fixed, created_at=fixed)["occurred_at"] == fixed
    Codec.default().encode("AccountOpened", event)


def test_topics():
    settings = Settings(topic_prefix="x-")
    assert topics.topic_for("UsageRecorded") == topics.USAGE == "billing.usage.v1"
    assert topics.topic_for("PeriodTick") == topics.CONTROL
    assert topics.topic_for("InvoiceIssued") == topics.STATUS
    assert topics.topic_for("InvoicePaid") == topics.PAYMENTS
    assert topics.input_topics(settings) == [
        "x-billing.usage.v1",
        "x-billing.accounts.v1",
        "x-billing.credits.v1",
        "x-billing.payment-methods.v1",
        "x-billing.control.v1",
    ]
    assert topics.all_topics(settings)[-4:] == [
        "x-billing.account-status.v1",
        "x-billing.account-status-snapshot.v1",
        "x-billing.deadletter.v1",
        "x-billing.checkpoints.v1",
    ]
    # Every event type but ConfigPublished, which the ledger journals from its database.
    journal_only = {"ConfigPublished"}
    assert sorted(topics.TOPIC_OF) == sorted(set(Codec.default().event_types()) - journal_only)
    with pytest.raises(ValueError):
        topics.topic_for("Nope")
