"""A worker that reaches PostgreSQL but no Kafka broker (a network partition, a firewall rule)
must not keep what it holds: its standbys see it alive in PostgreSQL and would wait forever.
The shard holder lets its leases run out and the active relay gives its lock up, once no
broker answered for `KAFKA_SILENT_LIMIT_S`; a standby that reaches Kafka takes both over.

The cut worker's Kafka clients go through a proxy the test cuts (`tests.netcut`); the
standby's connect directly to the same broker."""

from __future__ import annotations

import dataclasses
import threading
import time
from types import SimpleNamespace

import psycopg
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from structlog.testing import capture_logs

from ledger import metrics, topics
from ledger.backoff import (
    KAFKA_SILENT_LIMIT_S,
    METADATA_MAX_AGE_S,
    KafkaContact,
    kafka_reconnect_options,
    kafka_silent_s,
)
from ledger.consumer import run_ledger_consumer
from ledger.relay import OutboxRelay
from ledger.worker import start_roles
from tests.harness import Ledger, read_records, wait_until
from tests.netcut import ConnectProxy


def lease_holders(dsn: str) -> dict[int, str]:
    """Shard → holder of every lease not expired."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT shard, holder FROM shard_leases WHERE expires_at > clock_timestamp()"
        ).fetchall()
    return dict(rows)


def worker(settings, bootstrap, dsn, stop, roles, kafka_options=None):
    """The ledger and relay roles (and any other of `roles`) in threads, their Kafka clients
    built with `kafka_options` besides their own; the threads and the relay."""
    options = kafka_options or {}
    relay = OutboxRelay(settings, bootstrap, dsn, producer_options=options)
    threads = start_roles(
        settings,
        bootstrap,
        dsn,
        roles,
        stop,
        targets={
            "ledger": lambda: run_ledger_consumer(
                settings, bootstrap, dsn, stop, consumer_options=options
            ),
            "relay": lambda: relay.run(stop),
        },
    )
    return threads, relay


def test_a_worker_cut_off_from_kafka_hands_its_shards_and_the_relay_to_a_standby(
    settings, stack, dsn
):
    settings = dataclasses.replace(settings, lease_timeout_s=3)  # the least allowed: quicker
    proxy = ConnectProxy()
    ledger = Ledger(settings, stack.bootstrap, dsn)  # for sending and reading; no roles
    stops = {"cut": threading.Event(), "standby": threading.Event()}
    threads: list[threading.Thread] = []
    try:
        started, cut_relay = worker(
            settings,
            stack.bootstrap,
            dsn,
            stops["cut"],
            ("ledger", "projections", "relay"),
            {"proxy_url": proxy.url},
        )
        threads += started
        ledger.open_account("before-cut")
        ledger.wait_journaled(1, 60)
        wait_until(lambda: len(lease_holders(dsn)) == settings.partitions, 30, "every shard held")
        (cut_holder,) = set(lease_holders(dsn).values())
        assert proxy.tunnels > 0  # its clients go through the proxy

        started, _ = worker(settings, stack.bootstrap, dsn, stops["standby"], ("ledger", "relay"))
        threads += started
        time.sleep(3)  # the standby is up and waiting (its leases and relay lock refused)
        assert set(lease_holders(dsn).values()) == {cut_holder}

        proxy.cut()
        cut_at = time.monotonic()
        # An account opened after the cut runs out of credit with no payment method: only a
        # worker that reaches Kafka can journal it and publish the suspension.
        ledger.open_account("after-cut")
        ledger.use("after-cut", output_tokens=2_000_000)  # $1.80 > the $1 sign-up credit
        wait_until(lambda: ledger.status_of("after-cut"), 90, "the suspension downstream")
        took = time.monotonic() - cut_at
        print(f"\nsuspension published {took:.1f} s after the cut")
        holders = lease_holders(dsn)
        assert len(holders) == settings.partitions
        assert cut_holder not in holders.values(), "the cut worker still holds shards"
        assert [t for t, _, _ in ledger.status_of("after-cut")] == ["AccountSuspended"]
        # It took the silence (counted from the client's last answer, up to one metadata
        # refresh before the cut) and the lease running out.
        assert took > KAFKA_SILENT_LIMIT_S - METADATA_MAX_AGE_S
        # The cut relay gave its lock up on the silence alone, before the suspension needed
        # it: it never tried to send and failed.
        assert cut_relay.handovers >= 1
        assert cut_relay.kafka_outages == 0
        assert ledger.journaled() == 3  # two sign-ups and the usage, once each
    finally:
        for stop in stops.values():
            stop.set()
        for thread in threads:
            thread.join(timeout=30)
        proxy.close()
        ledger.close()
    assert not [t.name for t in threads if t.is_alive()]
    ledger.assert_trial_balance_zero()


def test_kafka_contact_counts_from_the_last_answer_of_any_client():
    def client(kind: str, silent_s: float) -> SimpleNamespace:
        last_ms = (time.monotonic() - silent_s) * 1000
        return SimpleNamespace(**{kind: SimpleNamespace(_last_successful_refresh_ms=last_ms)})

    contact = KafkaContact("test", limit_s=10)
    contact.heard_at = time.monotonic() - 60  # as if it had started a minute ago
    assert contact.hears(client("_cluster", 2))  # a consumer that heard 2 s ago
    assert contact.hears(client("_metadata", 11))  # the last answer of any client counts
    contact.heard_at = time.monotonic() - 60
    assert not contact.hears(client("_metadata", 11))  # a producer silent for 11 s
    assert contact.cut_off
    assert (
        11
        <= metrics.REGISTRY.get_sample_value("ledger_kafka_silent_seconds", {"role": "test"})
        < 12
    )
    # No client (it could not be made): the silence goes on from the last answer heard.
    contact.heard_at = time.monotonic() - 11
    assert not contact.hears(None)
    assert contact.hears(client("_metadata", 0))  # a new client got an answer
    contact.heard_at = time.monotonic() - 11
    assert not contact.hears(None)
    with capture_logs() as logs:
        contact.reset()
        assert contact.hears(None)  # the count starts again (the role just took over)
    assert logs == []  # and nothing was heard: no `kafka_reachable`
    # A client that does not say when it last heard (another kafka-python) switches it off.
    assert kafka_silent_s(SimpleNamespace()) is None
    contact.heard_at = time.monotonic() - 60
    assert contact.hears(SimpleNamespace())


def test_the_kafka_clients_in_use_say_when_a_broker_last_answered(stack):
    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap, **kafka_reconnect_options())
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, **kafka_reconnect_options())
    try:
        consumer.topics()
        for client in (consumer, producer):
            silent = kafka_silent_s(client)
            assert silent is not None and silent < METADATA_MAX_AGE_S
    finally:
        consumer.close()
        producer.close()


def test_a_producer_the_relay_gives_up_sends_nothing_after_the_network_heals(settings, stack, dsn):
    """Records sent into a cut and not acked are dropped with the producer: the rows stay
    unpublished and are sent again by the next producer, in order. A producer left retrying
    in the background would put them on the topic later, after newer ones."""
    proxy = ConnectProxy()
    # Requests time out after 2 s: a producer left running would retry within seconds.
    options = {"proxy_url": proxy.url, "request_timeout_ms": 2000}
    relay = OutboxRelay(settings, stack.bootstrap, dsn, producer_options=options)
    topic = settings.topic(topics.DEADLETTER)
    try:
        producer = relay._ensure_producer()
        producer.send(topic, key=b"k", value=b"before").get(timeout=30)
        proxy.cut()
        stale = producer.send(topic, key=b"k", value=b"stale")
        time.sleep(1)
        assert not stale.is_done  # in flight, not acked
        relay._close_producer()
        assert stale.is_done and stale.failed()  # given up, not left to a thread
        assert not producer._sender.is_alive()
        proxy.heal()
        after = KafkaProducer(bootstrap_servers=stack.bootstrap)
        after.send(topic, key=b"k", value=b"after").get(timeout=30)
        after.close()
        time.sleep(6)  # three of the old producer's request timeouts
        values = [r.value for r in read_records(stack.bootstrap, [topic], 2)]
        assert values == [b"before", b"after"]
        reader = KafkaConsumer(bootstrap_servers=stack.bootstrap)
        try:
            ends = reader.end_offsets(
                [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic)]
            )
        finally:
            reader.close()
        assert sum(ends.values()) == 2  # nothing else on the topic, later or earlier
    finally:
        relay._close_producer()
        proxy.close()


def test_the_ledger_role_waits_for_kafka_at_start_up_instead_of_crashing(settings, stack, dsn):
    proxy = ConnectProxy()
    proxy.cut()  # no broker answers yet
    stop = threading.Event()
    failures: list[str] = []
    ledger = Ledger(settings, stack.bootstrap, dsn)
    with capture_logs() as logs:
        threads = start_roles(
            settings,
            stack.bootstrap,
            dsn,
            ("ledger",),
            stop,
            failures,
            targets={
                "ledger": lambda: run_ledger_consumer(
                    settings, stack.bootstrap, dsn, stop, consumer_options={"proxy_url": proxy.url}
                )
            },
        )

        def down() -> list[dict]:
            return [
                e
                for e in logs
                if e["event"] == "dependency_down" and e.get("dependency") == "kafka"
            ]

        try:
            wait_until(lambda: down(), 30, "the ledger role waiting for Kafka")
            time.sleep(5)  # more attempts than one, each giving up after 2 s
            assert failures == []
            proxy.heal()
            ledger.open_account("after-kafka-came")
            ledger.wait_journaled(1, 60)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            proxy.close()
            ledger.close()
    assert failures == []
    assert not [e for e in logs if e["event"] == "role_crashed"]
    assert down()[0]["role"] == "ledger"
    assert [e for e in logs if e["event"] == "dependency_back" and e.get("dependency") == "kafka"]
