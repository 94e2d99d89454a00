"""Every event type through real Kafka: produced with the producer API, consumed, decoded
equal, and the very same record bytes read by the independent reference `avro` library."""

import io
import json

import avro.io
import avro.schema
import pytest
from kafka import KafkaConsumer

from ledger.codec import HEADER_LEN, Codec
from ledger.errors import InvalidEventError
from ledger.producer import EventProducer
from tests.harness import read_records
from tests.test_codec import SAMPLES, with_defaults

# Every event type that travels on Kafka (ConfigPublished is journaled from the database).
ON_KAFKA = {t: e for t, e in SAMPLES.items() if t != "ConfigPublished"}


def test_every_event_type_round_trips_through_kafka(settings, stack):
    codec = Codec.default()
    with EventProducer(stack.bootstrap, settings) as producer:
        for event_type, event in sorted(ON_KAFKA.items()):
            producer.send(event_type, event)
        topic_names = sorted({producer.topic(t) for t in ON_KAFKA})

    records = read_records(stack.bootstrap, topic_names, len(ON_KAFKA))
    assert len(records) == len(ON_KAFKA)

    for record in records:
        headers = dict(record.headers)
        event_type = headers["event_type"].decode()
        assert headers["schema_fingerprint"].decode() == f"{codec.fingerprint(event_type):016x}"
        expected = with_defaults(event_type, SAMPLES[event_type])
        decoded = codec.decode(record.value)
        assert decoded.event_type == event_type
        assert decoded.event == expected
        assert record.key == (expected["account_id"].encode() or None)
        # The independent reference implementation reads the same bytes to the same values.
        schema = avro.schema.parse(json.dumps(codec.schema(event_type)))
        body = io.BytesIO(record.value[HEADER_LEN:])
        assert avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(body)) == expected
        assert body.tell() == len(record.value) - HEADER_LEN


def test_the_producer_refuses_an_invalid_event_and_sends_nothing(settings, stack):
    event = dict(SAMPLES["CreditPurchased"], amount=12.5)  # a float for money
    with EventProducer(stack.bootstrap, settings) as producer:
        with pytest.raises(InvalidEventError, match="amount"):
            producer.send("CreditPurchased", event)
        topic = producer.topic("CreditPurchased")
    reader = KafkaConsumer(
        topic,
        bootstrap_servers=stack.bootstrap,
        enable_incremental_fetch_sessions=False,
        auto_offset_reset="earliest",
        group_id=None,
        consumer_timeout_ms=1500,
    )
    assert list(reader) == []
    reader.close()


def test_topic_creation_is_idempotent_with_the_configured_partitions(settings, stack):
    from kafka import KafkaAdminClient

    from ledger import topics

    # The `settings` fixture created them already: a second run creates nothing.
    assert topics.create_topics(stack.bootstrap, settings) == []
    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap)
    try:
        described = admin.describe_topics(topics.all_topics(settings))
    finally:
        admin.close()
    assert sorted(t["name"] for t in described) == sorted(topics.all_topics(settings))
    assert {len(t["partitions"]) for t in described} == {settings.partitions}
