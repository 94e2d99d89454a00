"""The outbox relay never blocks: a row Kafka refuses is parked and later rows go out; a
dead-letter copy too big for Kafka is a reference; the relay rides out a PostgreSQL restart."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from kafka import KafkaProducer

from ledger import db, topics
from ledger.relay import OutboxRelay
from ledger.runner import start_worker, stop_worker
from ledger.stack import kafka, postgres, procs
from tests.harness import read_records, wait_until
from tests.test_cli import ledger_cli, services_env

MB = 1_000_000


def outbox_rows(conn, *ids):
    """{id: (published, parked, park_reason, attempts)}"""
    rows = conn.execute(
        "SELECT id, published_at IS NOT NULL, parked_at IS NOT NULL, park_reason, attempts "
        "FROM outbox WHERE id = ANY(%s)",
        (list(ids),),
    )
    return {row[0]: row[1:] for row in rows}


def insert_outbox(conn, topic: str, key: bytes | None, value: bytes) -> int:
    (row_id,) = conn.execute(
        "INSERT INTO outbox (topic, message_key, value) VALUES (%s, %s, %s) RETURNING id",
        (topic, key, value),
    ).fetchone()
    return row_id


def test_a_1mb_reject_is_sent_as_a_reference_and_a_later_suspension_is_not_delayed(ledger):
    usage = ledger.settings.topic(topics.USAGE)
    deadletter = ledger.settings.topic(topics.DEADLETTER)
    garbage = os.urandom(MB)
    raw = KafkaProducer(bootstrap_servers=ledger.bootstrap, acks="all", max_request_size=2 * MB)
    raw.send(usage, key=b"big-1", value=garbage).get(timeout=30)
    raw.close()
    # Right behind it, another account runs out of credit without a payment method.
    ledger.open_account("late-1")
    sent = time.monotonic()
    ledger.use("late-1", output_tokens=2_000_000)  # $1.80 > the $1 sign-up credit
    wait_until(lambda: ledger.status_of("late-1"), 60, "the suspension of late-1 downstream")
    delay = time.monotonic() - sent
    print(f"\nsuspension arrived {delay * 1000:.0f} ms after its usage was sent")
    assert [(t, r) for t, r, _ in ledger.status_of("late-1")] == [
        ("AccountSuspended", ("CREDITS_EXHAUSTED_NO_PAYMENT_METHOD",))
    ]

    (reject_id, reason, stored) = ledger.db.execute(
        "SELECT id, reason, raw FROM rejected_events"
    ).fetchone()
    assert bytes(stored) == garbage  # the reject keeps every byte
    (copy,) = read_records(ledger.bootstrap, [deadletter], 1)
    headers = dict(copy.headers)
    assert headers["dlq_reject_id"] == str(reject_id).encode()
    assert headers["dlq_truncated"] == b"true"
    assert headers["dlq_size"] == str(MB).encode()
    assert headers["dlq_reason"] == reason.encode()
    assert (copy.key, copy.value) == (b"big-1", b"")
    parked = ledger.db.execute("SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL")
    assert parked.fetchone()[0] == 0


def test_the_worker_applies_the_dead_letter_bound_setting(settings, stack, dsn, tmp_path):
    """`ledger worker` with LEDGER_DEADLETTER_MAX_BYTES=2048: a 4 KB reject goes out as a
    reference, a small one byte for byte; SIGTERM then stops the worker cleanly."""
    env = os.environ | {
        **services_env(stack, dsn),
        "LEDGER_HOME": str(settings.home),  # the session's chain key
        "LEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "LEDGER_CONSUMER_GROUP": settings.consumer_group,
        "LEDGER_DEADLETTER_MAX_BYTES": "2048",
    }
    worker = start_worker(("ledger", "relay"), env, tmp_path / "worker.log")
    try:
        raw = KafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
        raw.send(settings.topic(topics.USAGE), key=b"a", value=b"\x00" * 4096).get(timeout=30)
        raw.send(settings.topic(topics.USAGE), key=b"a", value=b"small").get(timeout=30)
        raw.close()
        copies = read_records(stack.bootstrap, [settings.topic(topics.DEADLETTER)], 2, 60)
    finally:
        code = stop_worker(worker, timeout=10)
    assert code == 0, (tmp_path / "worker.log").read_text()
    with psycopg.connect(dsn) as conn:
        ids = dict(conn.execute("SELECT octet_length(raw), id FROM rejected_events"))
    big, small = sorted(copies, key=lambda r: -len(dict(r.headers)))
    assert dict(big.headers)["dlq_reject_id"] == str(ids[4096]).encode()
    assert big.value == b""
    assert small.value == b"small" and "dlq_reject_id" not in dict(small.headers)


def test_an_outbox_row_kafka_refuses_is_parked_and_later_rows_are_published(ledger, stack):
    env = services_env(stack, ledger.dsn)
    empty = ledger_cli("outbox", "parked", env=env)
    assert (empty.returncode, empty.stdout) == (0, "no parked outbox rows\n")
    dlq = ledger.settings.topic(topics.DEADLETTER)
    with psycopg.connect(ledger.dsn) as conn:  # one transaction: the relay sees all at once
        bad_topic = insert_outbox(conn, "no such topic!\x1b[2J", b"k1", b"x")
        too_big = insert_outbox(conn, dlq, b"k2", b"x" * (1024 * 1024 + 1))
        behind = insert_outbox(conn, dlq, b"k2", b"second of k2")
        other_key = insert_outbox(conn, dlq, b"k3", b"first of k3")
        no_key = insert_outbox(conn, dlq, None, b"no key")
        conn.execute("SELECT pg_notify('ledger_outbox', '')")
    ids = (bad_topic, too_big, behind, other_key, no_key)
    wait_until(
        lambda: (
            outbox_rows(ledger.db, other_key, no_key)
            == {
                other_key: (True, False, None, 0),
                no_key: (True, False, None, 0),
            }
        ),
        30,
        "later rows published",
    )
    assert outbox_rows(ledger.db, *ids) == {
        bad_topic: (False, True, "invalid_topic", 1),
        too_big: (False, True, "message_too_large", 1),
        behind: (False, False, None, 0),  # same topic and key as a parked row: it waits
        other_key: (True, False, None, 0),
        no_key: (True, False, None, 0),
    }
    assert all(t.is_alive() for t in ledger._threads), "a worker role died"

    listed = ledger_cli("outbox", "parked", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "invalid_topic" in listed.stdout and "message_too_large" in listed.stdout
    assert "\x1b" not in listed.stdout and "\\x1b[2J" in listed.stdout
    as_json = ledger_cli("outbox", "parked", "--json", env=env)
    rows = {r["id"]: r for r in json.loads(as_json.stdout)}
    assert rows[too_big]["waiting"] == 1 and rows[too_big]["size"] > 1024 * 1024
    assert rows[bad_topic]["waiting"] == 0

    # Retry un-parks; the relay tries again, and Kafka refuses them again.
    retried = ledger_cli("outbox", "retry", "--all", env=env)
    assert retried.returncode == 0, retried.stderr
    assert f"un-parked 2 outbox row(s): {bad_topic}, {too_big}" in retried.stdout
    wait_until(
        lambda: [r[3] for r in outbox_rows(ledger.db, bad_topic, too_big).values()] == [2, 2],
        30,
        "the retried rows refused a second time",
    )
    # Once the row can go (here: made smaller), a retry publishes it, then the row behind it.
    ledger.db.execute("UPDATE outbox SET value = 'first of k2' WHERE id = %s", (too_big,))
    one = ledger_cli("outbox", "retry", "--id", str(too_big), env=env)
    assert one.returncode == 0 and f"un-parked 1 outbox row(s): {too_big}" in one.stdout
    wait_until(
        lambda: all(r[0] for r in outbox_rows(ledger.db, too_big, behind).values()),
        30,
        "the retried row and the row behind it published",
    )
    copies = read_records(ledger.bootstrap, [dlq], 4)
    assert [r.value for r in copies if r.key == b"k2"] == [b"first of k2", b"second of k2"]
    assert sorted(r.value for r in copies) == sorted(
        [b"first of k2", b"second of k2", b"first of k3", b"no key"]
    )
    not_parked = ledger_cli("outbox", "retry", "--id", str(other_key), env=env)
    assert not_parked.returncode == 4
    assert f"outbox row {other_key} is not parked" in not_parked.stdout
    neither = ledger_cli("outbox", "retry", env=env)
    assert neither.returncode == 1 and "give either --id N or --all" in neither.stderr


def test_a_row_the_broker_refuses_as_too_large_is_parked_not_fatal(ledger):
    """The producer allows the record, the topic's `max.message.bytes` does not: the broker's
    refusal parks the row like the producer's own would, and the relay goes on."""
    from kafka.admin import KafkaAdminClient, NewTopic

    small = ledger.settings.topic("small-records.v1")
    admin = KafkaAdminClient(bootstrap_servers=ledger.bootstrap)
    try:
        admin.create_topics([NewTopic(small, 1, 1, topic_configs={"max.message.bytes": "2048"})])
    finally:
        admin.close()
    dlq = ledger.settings.topic(topics.DEADLETTER)
    with psycopg.connect(ledger.dsn) as conn:
        refused = insert_outbox(conn, small, b"s1", b"y" * 16_384)
        after = insert_outbox(conn, dlq, b"s2", b"after the refused one")
        conn.execute("SELECT pg_notify('ledger_outbox', '')")
    wait_until(
        lambda: (
            outbox_rows(ledger.db, refused, after)
            == {refused: (False, True, "message_too_large", 1), after: (True, False, None, 0)}
        ),
        30,
        "the refused row parked and the next one published",
    )
    assert all(t.is_alive() for t in ledger._threads), "a worker role died"


def test_the_relay_rides_out_a_postgresql_immediate_restart(settings, stack):
    """A private PostgreSQL server (the shared one stays up for everyone else); not under
    pytest's temp dir, which another pytest run may clean up under a running server."""
    home = tempfile.mkdtemp(prefix="ledger-relay-pg-")
    private = dataclasses.replace(settings, home=Path(home))
    state = postgres.start(private, {})
    stop = threading.Event()
    thread = None
    try:
        db.migrate(postgres.dsn(private, state["port"], "owner"))
        dsn = postgres.dsn(private, state["port"])  # the relay is the writer
        relay = OutboxRelay(settings, stack.bootstrap, dsn)
        thread = threading.Thread(target=relay.run, args=(stop,), name="relay")
        thread.start()
        dlq = settings.topic(topics.DEADLETTER)
        with psycopg.connect(dsn, autocommit=True) as conn:
            before = [insert_outbox(conn, dlq, b"acct", f"before {i}".encode()) for i in range(5)]
            wait_until(
                lambda: all(r[0] for r in outbox_rows(conn, *before).values()),
                30,
                "rows published before the restart",
            )

        immediate_stop(private)
        wait_until(lambda: relay.database_outages >= 1, 30, "the relay to notice the outage")
        assert thread.is_alive()
        state = postgres.start(private, state)  # same port, same data: crash recovery
        assert postgres.dsn(private, state["port"]) == dsn

        with psycopg.connect(dsn, autocommit=True) as conn:
            after = [insert_outbox(conn, dlq, b"acct", f"after {i}".encode()) for i in range(5)]
            conn.execute("SELECT pg_notify('ledger_outbox', '')")
            wait_until(
                lambda: all(r[0] for r in outbox_rows(conn, *after).values()),
                60,
                "rows published after the restart",
            )
            # The relay holds its advisory lock again, on its new session.
            held = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242002"
                " AND granted"
            ).fetchone()[0]
            assert held == 1
        assert thread.is_alive()
        values = [r.value for r in read_records(stack.bootstrap, [dlq], 10)]
        # Every row was marked after its ack and before the crash: none is sent twice.
        assert sorted(values) == sorted(
            [f"before {i}".encode() for i in range(5)] + [f"after {i}".encode() for i in range(5)]
        )
        assert [v for v in values if v.startswith(b"after")] == [
            f"after {i}".encode() for i in range(5)
        ]

        # Stopped while PostgreSQL is down again, the relay still stops promptly.
        immediate_stop(private)
        wait_until(lambda: relay.database_outages >= 2, 30, "the relay to notice the outage")
        stopping = time.monotonic()
        stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the relay did not stop"
        print(f"\nrelay stopped {time.monotonic() - stopping:.2f} s after the stop event")
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=10)
        postgres.stop(private)
        shutil.rmtree(home, ignore_errors=True)


def test_the_relay_rides_out_a_broker_restart(settings, dsn):
    """A private Kafka broker (the shared one stays up), stopped while the relay waits for
    acks and started again on the same port and data."""
    home = tempfile.mkdtemp(prefix="ledger-relay-kafka-")
    private = dataclasses.replace(settings, home=Path(home))
    state = kafka.start(private, {})
    bootstrap = f"{procs.HOST}:{state['port']}"
    stop = threading.Event()
    thread = None
    try:
        topics.create_topics(bootstrap, settings)
        dlq = settings.topic(topics.DEADLETTER)
        relay = OutboxRelay(settings, bootstrap, dsn)
        thread = threading.Thread(target=relay.run, args=(stop,), name="relay")
        thread.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            before = [insert_outbox(conn, dlq, b"acct", f"before {i}".encode()) for i in range(5)]
            wait_until(
                lambda: all(r[0] for r in outbox_rows(conn, *before).values()),
                30,
                "rows published before the restart",
            )
            kafka.stop(private)
            during = [insert_outbox(conn, dlq, b"acct", f"during {i}".encode()) for i in range(5)]
            conn.execute("SELECT pg_notify('ledger_outbox', '')")
            wait_until(lambda: relay.awaiting_acks == 5, 30, "the relay to send and wait")
            assert not any(r[0] for r in outbox_rows(conn, *during).values())
            restarted = time.monotonic()
            kafka.start(private, state)
            wait_until(
                lambda: all(r[0] for r in outbox_rows(conn, *during).values()),
                90,
                "rows published after the restart",
            )
            print(f"\npublished {time.monotonic() - restarted:.1f} s after the restart began")
            assert not any(r[1] for r in outbox_rows(conn, *before, *during).values())
        assert thread.is_alive()
        values = [r.value for r in read_records(bootstrap, [dlq], 10)]
        # Marked before the broker went away: exactly once. Sent during: at least once.
        assert sorted(v for v in values if v.startswith(b"before")) == [
            f"before {i}".encode() for i in range(5)
        ]
        assert {v for v in values if v.startswith(b"during")} == {
            f"during {i}".encode() for i in range(5)
        }
        print(f"duplicates of rows sent during the outage: {len(values) - 10}")
        stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the relay did not stop"
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=10)
        kafka.stop(private)
        shutil.rmtree(home, ignore_errors=True)


def test_a_new_relay_producer_knows_the_status_topics_before_its_first_send(settings, stack, dsn):
    """kafka-python looks a topic up at its first send, 100 ms after its last look-up: a new
    relay's first suspension waited for two of them (snapshot, then status) before this."""
    relay = OutboxRelay(settings, stack.bootstrap, dsn)
    try:
        producer = relay._ensure_producer()
        cluster = producer._metadata
        for base in (topics.STATUS, topics.STATUS_SNAPSHOT, topics.CHECKPOINTS):
            assert cluster.partitions_for_topic(settings.topic(base)) == set(
                range(settings.partitions)
            ), base
    finally:
        relay._close_producer()


def test_a_relay_whose_status_topic_is_missing_still_starts(settings, stack, dsn):
    """The look-up is best effort: other topics' rows (dead letters) must still go out."""
    missing = dataclasses.replace(settings, topic_prefix=f"{settings.topic_prefix}missing.")
    relay = OutboxRelay(missing, stack.bootstrap, dsn)
    try:
        producer = relay._ensure_producer()
        assert producer._metadata.partitions_for_topic(missing.topic(topics.STATUS)) is None
        deadletter = settings.topic(topics.DEADLETTER)
        producer.send(deadletter, key=b"k", value=b"v").get(timeout=30)
    finally:
        relay._close_producer()


def test_with_kafka_unreachable_the_relay_retries_marks_nothing_and_stops_promptly(settings, dsn):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind((procs.HOST, 0))
        nowhere = f"{procs.HOST}:{probe.getsockname()[1]}"
    relay = OutboxRelay(settings, nowhere, dsn)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="relay")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = insert_outbox(conn, settings.topic(topics.DEADLETTER), b"k", b"v")
        thread.start()
        try:
            wait_until(lambda: relay.kafka_outages >= 2, 60, "two attempts to reach Kafka")
            assert thread.is_alive()
            assert outbox_rows(conn, row) == {row: (False, False, None, 0)}
        finally:
            stopping = time.monotonic()
            stop.set()
            thread.join(timeout=10)
        assert not thread.is_alive(), "the relay did not stop"
        print(f"\nrelay stopped {time.monotonic() - stopping:.2f} s after the stop event")


def immediate_stop(settings) -> None:
    """`pg_ctl stop -m immediate`: the server quits without a checkpoint, as in a crash."""
    out = postgres._run(
        [
            str(postgres.bindir() / "pg_ctl"),
            "-D",
            str(postgres.data_dir(settings)),
            "-m",
            "immediate",
            "-w",
            "stop",
        ],
        settings,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
