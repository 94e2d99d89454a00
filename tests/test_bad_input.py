"""Bad input is quarantined with its reason, copied to the dead-letter topic, never blocks its
partition; duplicates are journaled once."""

import copy
import json
import uuid
from decimal import Decimal

from kafka import KafkaProducer

from ledger import topics
from ledger.codec import Codec
from ledger.producer import EventProducer
from tests.harness import LLAMA_70B, read_records, wait_until


def raw_producer(ledger) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=ledger.bootstrap, acks="all")


def future_usage_schema() -> dict:
    """A newer producer's UsageRecorded whose service_tier enum has a symbol we don't know."""
    schema = copy.deepcopy(Codec.default().schema("UsageRecorded"))
    for field in schema["fields"]:
        if field["name"] == "service_tier":
            field["type"]["symbols"] = [*field["type"]["symbols"], "flex"]
    return schema


def test_each_kind_of_bad_input_is_rejected_with_its_reason_and_the_partition_moves_on(ledger):
    usage_topic = ledger.settings.topic(topics.USAGE)
    codec = Codec.default()
    good = ledger.use("acct", input_tokens=10)  # sets the partition of "acct" on the topic
    ledger.settle(1)
    partition = ledger.db.execute("SELECT kafka_partition FROM raw_events").fetchone()[0]

    valid = codec.encode("UsageRecorded", good | {"event_id": str(uuid.uuid4())})
    negative = codec.encode(
        "UsageRecorded", good | {"event_id": str(uuid.uuid4()), "output_tokens": -5}
    )
    # The worker shares this process's codec: teach it a future writer schema, so the only
    # thing wrong with this event is the enum symbol.
    codec.register(future_usage_schema())
    future = Codec.load()
    future.register(future_usage_schema(), current=True)
    unknown_enum = future.encode(
        "UsageRecorded", good | {"event_id": str(uuid.uuid4()), "service_tier": "flex"}
    )
    bad = {
        "bad_magic": b"not avro at all",
        "unknown_fingerprint": b"\xc3\x01" + b"\x11" * 8 + valid[10:],
        "truncated_body": valid[:-3],
        "negative_quantity": negative,
        "unknown_enum_value": unknown_enum,
    }
    producer = raw_producer(ledger)
    for value in bad.values():
        producer.send(usage_topic, value=value, key=b"acct", partition=partition)
    producer.flush()
    producer.close()
    after = ledger.use("acct", input_tokens=20)  # a good event behind the bad ones
    ledger.settle(1 + len(bad) + 1)

    rejected = ledger.rejected()
    assert [r[3] for r in rejected] == list(bad)
    assert all(r[0] == usage_topic for r in rejected)
    assert "fingerprint 1111111111111111" in rejected[1][4]
    assert "output_tokens = -5" in rejected[3][4]
    assert "unknown enum value" in rejected[4][4]
    journaled = {r[0] for r in ledger.db.execute("SELECT event_id FROM journal_entries")}
    assert journaled == {good["event_id"], after["event_id"]}

    # A copy of each on the dead-letter topic, with the reason and origin in its headers.
    copies = read_records(ledger.bootstrap, [ledger.settings.topic(topics.DEADLETTER)], len(bad))
    assert [r.value for r in copies] == list(bad.values())
    headers = [dict(r.headers) for r in copies]
    assert [h["dlq_reason"].decode() for h in headers] == list(bad)
    assert {h["dlq_topic"].decode() for h in headers} == {usage_topic}


def test_every_event_produced_twice_is_journaled_once(ledger):
    events = [ledger.open_account("dup"), ledger.use("dup", input_tokens=1_000_000)]
    events.append(
        ledger.send(
            "CreditPurchased", "dup", grant_id="g1", amount=Decimal("5"), payment_reference="ch"
        )
    )
    again = EventProducer(ledger.bootstrap, ledger.settings)
    types = ["AccountOpened", "UsageRecorded", "CreditPurchased"]
    for event_type, event in zip(types, events, strict=True):
        again.send(event_type, event).get(timeout=30)
    again.close()
    ledger.settle(3)
    wait_until(
        lambda: (
            ledger.db.execute(
                "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets"
            ).fetchone()[0]
            == 6
        ),
        what="all six records consumed",
    )
    assert ledger.journaled() == 3
    assert ledger.rejected() == []
    assert ledger.account("dup")["credit_balance"] == Decimal("5.10")


def test_same_event_id_with_a_different_body_is_a_conflict_kept_aside(ledger):
    original = ledger.use("c1", input_tokens=1000)
    ledger.settle(1)
    forged = original | {"input_tokens": 999_999}
    ledger.producer.send("UsageRecorded", forged).get(timeout=30)
    ledger.settle(2)
    [(_, _, event_id, reason, _)] = ledger.rejected()
    assert (event_id, reason) == (original["event_id"], "duplicate_conflict")
    payload = ledger.db.execute(
        "SELECT payload FROM journal_entries WHERE event_id = %s", (original["event_id"],)
    ).fetchone()[0]
    assert payload["input_tokens"] == 1000  # the original is never overwritten
    assert json.dumps(payload)  # stored as JSON


def test_unpriced_model_usage_is_journaled_as_held_and_not_charged(ledger):
    ledger.open_account("u1")
    ledger.use("u1", model="accounts/acme/models/not-in-the-price-book", input_tokens=10**6)
    ledger.use("u1", model=LLAMA_70B, input_tokens=10**6)
    ledger.settle(3)
    statuses = dict(
        ledger.db.execute(
            "SELECT payload->>'model', status FROM journal_entries "
            "WHERE event_type = 'UsageRecorded'"
        )
    )
    assert statuses == {
        "accounts/acme/models/not-in-the-price-book": "unpriced",
        LLAMA_70B: "posted",
    }
    assert ledger.account("u1")["credit_balance"] == Decimal("0.1")
