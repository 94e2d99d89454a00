"""Phases (a) and (b): plain kafka-python consumption of the input topics, with and without
Avro decoding: the ceiling the ledger is measured against."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from ledger import topics
from ledger.bench import BenchError
from ledger.errors import DecodeError
from ledger.kafka_auth import client_options
from ledger.settings import Settings

MIB = 1024 * 1024


@dataclasses.dataclass
class ConsumeRun:
    records: int
    seconds: float  # consumer created → last record
    warm_seconds: float  # consumer created → first record

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def steady_rate(self) -> float:
        return self.records / max(self.seconds - self.warm_seconds, 1e-9)


def input_consumer(bootstrap: str, settings: Settings, client_id: str):
    """A consumer reading every input partition from the beginning, configured as the ledger's
    own consumer: manual assignment (no group protocol; the ledger owns shards by PostgreSQL
    leases), its batch size, fetch sizes and fetch options."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.batch_max_events,
        fetch_max_wait_ms=min(settings.batch_max_ms, 500),
        max_partition_fetch_bytes=4 * MIB,
        # As ledger.consumer.kafka_consumer_options: kafka-python 3.0 can stop fetching an
        # assigned partition with incremental fetch sessions.
        enable_incremental_fetch_sessions=False,
        **client_options(settings),
    )
    parts = [
        TopicPartition(t, p)
        for t in topics.input_topics(settings)
        for p in range(settings.partitions)
    ]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    return consumer


def consume_raw(
    bootstrap: str,
    settings: Settings,
    expected: int,
    *,
    decode: Callable[[bytes], Any] | None,
    label: str,
    timeout: float,
) -> ConsumeRun:
    """Read (and optionally decode) every input record; nothing else."""
    started = time.perf_counter()
    consumer = input_consumer(bootstrap, settings, f"ledger-bench-{label}")
    try:
        first = None
        count = 0
        while count < expected:
            if time.perf_counter() - started > timeout:
                raise BenchError(f"{label}: read {count} of {expected} records in {timeout}s")
            polled = consumer.poll(timeout_ms=500, max_records=settings.batch_max_events)
            for records in polled.values():
                if first is None:
                    first = time.perf_counter()
                if decode is not None:
                    for record in records:
                        # The malformed share of the input fails here; the ledger rejects it.
                        with contextlib.suppress(DecodeError):
                            decode(record.value)
                count += len(records)
        done = time.perf_counter()
    finally:
        consumer.close(autocommit=False)
    assert first is not None
    return ConsumeRun(count, done - started, first - started)
