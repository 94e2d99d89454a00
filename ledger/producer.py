"""Publish billing events to Kafka: validated, Avro-encoded, keyed by account, with headers.

with EventProducer(bootstrap, settings) as producer:
    producer.send("AccountOpened", new_event("AccountOpened", "acct-1", created_at=now))
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from kafka import KafkaProducer

from ledger import topics
from ledger.backoff import kafka_reconnect_options
from ledger.codec import Codec
from ledger.kafka_auth import client_options
from ledger.settings import Settings


def kafka_producer_options() -> dict[str, Any]:
    """Client options that make a producer ride out a broker restart (reconnect within ~1 s
    of the broker's return; see `ledger.backoff.kafka_reconnect_options`). Records queued
    while the broker is down are retried until `delivery_timeout_ms` (2 min)."""
    return kafka_reconnect_options()


def new_event(
    event_type: str, account_id: str, occurred_at: dt.datetime | None = None, **fields: Any
) -> dict:
    """An event dict with a fresh `event_id` and `occurred_at` (now, UTC, if not given).
    `event_type` is not part of the dict; it is there to read well at call sites."""
    del event_type
    return {
        "event_id": str(uuid.uuid4()),
        "account_id": account_id,
        "occurred_at": occurred_at if occurred_at is not None else dt.datetime.now(dt.UTC),
        **fields,
    }


class EventProducer:
    """Thin wrapper over KafkaProducer (acks=all, idempotent). Not for the ledger's own
    transactional output; for API servers, simulators, the scheduler and tests."""

    def __init__(
        self,
        bootstrap: str,
        settings: Settings,
        *,
        codec: Codec | None = None,
        **kafka_overrides: Any,
    ):
        self.settings = settings
        self.codec = codec or Codec.default()
        config: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "client_id": "ledger-producer",
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 5,
            "compression_type": None,
            **kafka_producer_options(),
            **client_options(settings),
        }
        config.update(kafka_overrides)
        self._producer = KafkaProducer(**config)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kafka_overrides: Any):
        """A producer for the configured brokers: LEDGER_KAFKA_BOOTSTRAP, else the local
        stack's Kafka (`ledger stack up`), wherever its port is."""
        from ledger import stack

        settings = settings or Settings.from_env()
        return cls(stack.kafka_bootstrap(settings), settings, **kafka_overrides)

    def topic(self, event_type: str) -> str:
        """The full topic name an event type is sent to."""
        return self.settings.topic(topics.topic_for(event_type))

    def send(self, event_type: str, event: dict, *, partition: int | None = None):
        """Validate, encode and send one event; returns kafka-python's FutureRecordMetadata.
        Raises InvalidEventError (and sends nothing) if the event does not match its schema.
        The key is the utf-8 account id (no key for the empty one, e.g. PeriodTick); pass
        `partition` to choose the partition yourself (e.g. one tick per partition)."""
        value = self.codec.encode(event_type, event)
        topic = self.topic(event_type)
        account_id = event.get("account_id", "")
        return self._producer.send(
            topic,
            value=value,
            key=account_id.encode() if account_id else None,
            headers=self.codec.headers(event_type),
            partition=partition,
        )

    def partitions(self, event_type: str) -> list[int]:
        """The partition numbers of the topic an event type is sent to."""
        return sorted(self._producer.partitions_for(self.topic(event_type)) or ())

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush outstanding sends and close the connection."""
        try:
            self._producer.flush(timeout)
        finally:
            self._producer.close(timeout)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
