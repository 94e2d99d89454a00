"""Nothing stops a shard: records the journal cannot store, a batch that fails in PostgreSQL,
transactional producers, offsets Kafka deleted, implausible times, the wrong partition.
Real Kafka and PostgreSQL."""

from __future__ import annotations

import io
import secrets
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import fastavro
import psycopg
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2

from ledger import bounds, topics
from ledger.codec import MAGIC, Codec
from ledger.journal import splittable
from ledger.offsets import LostRange, accept_loss, lost_ranges
from ledger.scheduler import send_ticks
from tests.harness import LLAMA_70B, T0, Ledger, wait_until
from tests.test_journal import opened

CREDITS_EXHAUSTED = "CREDITS_EXHAUSTED_NO_PAYMENT_METHOD"


def raw_value(event_type: str, event: dict) -> bytes:
    """Our wire format without the producer's checks: what another client could send."""
    codec = Codec.default()
    schema = codec.schema(event_type)
    datum = {f["name"]: event.get(f["name"], f.get("default")) for f in schema["fields"]}
    buf = io.BytesIO()
    buf.write(MAGIC + codec.fingerprint(event_type).to_bytes(8, "little"))
    fastavro.schemaless_writer(buf, schema, datum)
    return buf.getvalue()


def usage(account_id: str, at: datetime, **fields) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "account_id": account_id,
        "occurred_at": at,
        "request_id": str(uuid.uuid4()),
        "product": "serverless",
        "model": LLAMA_70B,
        "service_tier": "standard",
        "input_tokens": 10,
        **fields,
    }


def reasons(ledger: Ledger) -> Counter:
    return Counter(row[3] for row in ledger.rejected())


def test_poison_records_are_quarantined_and_the_rest_of_their_batch_is_journaled(ledger):
    acct = "acct-poison"
    key = acct.encode()
    raw = KafkaProducer(bootstrap_servers=ledger.bootstrap, acks="all")

    def send(event_type: str, value: bytes | None) -> None:
        raw.send(ledger.producer.topic(event_type), value=value, key=key)

    at = ledger.tick()
    opened_event = {"event_id": str(uuid.uuid4()), "account_id": acct, "occurred_at": at}
    send("AccountOpened", raw_value("AccountOpened", opened_event | {"created_at": at}))
    send("UsageRecorded", raw_value("UsageRecorded", usage(acct, at, request_id="req\x00")))
    long_id = secrets.token_urlsafe(3000)[:3000]  # incompressible: too big for an index entry
    send("UsageRecorded", raw_value("UsageRecorded", usage(long_id, at)))
    send("UsageRecorded", raw_value("UsageRecorded", usage("acct\x00x", at)))
    grant = {
        "event_id": str(uuid.uuid4()),
        "account_id": acct,
        "occurred_at": at,
        "grant_id": long_id,
        "amount": Decimal("5"),
        "kind": "goodwill",
    }
    send("CreditGranted", raw_value("CreditGranted", grant))
    for name in topics.INPUTS:  # a tombstone on every input topic
        raw.send(ledger.settings.topic(name), value=None, key=key)
    # $1.80 of usage: more than the sign-up credit, and no payment method.
    good = usage(acct, ledger.tick(), input_tokens=0, output_tokens=2_000_000)
    send("UsageRecorded", raw_value("UsageRecorded", good))
    raw.flush()
    raw.close()

    ledger.settle(2 + 4 + len(topics.INPUTS))
    assert reasons(ledger) == Counter(
        {"tombstone": len(topics.INPUTS), "unstorable_value": 2, "oversized_field": 2}
    )
    journaled = {row[0] for row in ledger.db.execute("SELECT event_id FROM raw_events").fetchall()}
    assert journaled == {opened_event["event_id"], good["event_id"]}
    ((event_type, reasons_now, version),) = ledger.status_of(acct)
    assert (event_type, reasons_now) == ("AccountSuspended", (CREDITS_EXHAUSTED,))
    assert version > 0


def test_a_batch_postgresql_refuses_is_split_and_only_the_failing_record_quarantined(
    writer, dsn, monkeypatch
):
    # Validation no longer foresees an over-long id: PostgreSQL's index refuses it instead.
    monkeypatch.setattr(bounds, "MAX_ID_BYTES", 1_000_000)
    records = [opened(f"acct-{i}", i) for i in range(10)]
    records[6] = opened(secrets.token_urlsafe(3000)[:3000], 6)

    result = writer.write_batch(records)

    assert (result.journaled, result.rejected, result.split) == (9, 1, True)
    with psycopg.connect(dsn) as conn:
        rejected = conn.execute("SELECT kafka_offset, reason, detail FROM rejected_events")
        ((offset, reason, detail),) = rejected.fetchall()
        (next_offset,) = conn.execute("SELECT next_offset FROM consumer_offsets").fetchone()
        accounts = {r[0] for r in conn.execute("SELECT account_id FROM raw_events")}
    assert (offset, reason) == (6, "processing_error")
    assert "index row" in detail
    assert next_offset == 10
    assert accounts == {f"acct-{i}" for i in range(10) if i != 6}


def test_only_data_errors_split_a_batch_infrastructure_errors_are_retried():
    assert splittable(psycopg.errors.ProgramLimitExceeded("index row size 3024 exceeds"))
    assert splittable(psycopg.errors.UntranslatableCharacter("\\u0000 cannot be converted"))
    assert splittable(psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"))
    assert splittable(ValueError("a bug"))
    assert not splittable(psycopg.OperationalError("connection lost"))
    assert not splittable(psycopg.errors.AdminShutdown("terminating connection"))
    assert not splittable(psycopg.errors.SerializationFailure("could not serialize"))
    assert not splittable(psycopg.errors.UndefinedTable("relation does not exist"))


def test_a_stale_fetch_is_dropped_and_a_fetch_past_the_stored_offset_refused(writer, dsn):
    """The zombie fence, by fetched ranges: offsets need not be contiguous."""
    first = [opened("a", 0), opened("b", 3)]  # 1, 2: transaction markers, say
    writer.write_batch(first, fetched={(first[0].topic, 0): (0, 5)})
    again = writer.write_batch([opened("a2", 3)], fetched={(first[0].topic, 0): (2, 5)})
    assert (again.stale, again.journaled) == (1, 0)
    with pytest.raises(Exception, match="batch starts at offset 7, stored next offset is 5"):
        writer.write_batch([opened("c", 7)], fetched={(first[0].topic, 0): (7, 8)})


def test_transactional_producers_are_journaled_and_aborted_transactions_are_not(ledger):
    acct = "acct-tx"
    tx = KafkaProducer(
        bootstrap_servers=ledger.bootstrap,
        transactional_id=f"billing-api-{uuid.uuid4().hex[:8]}",
        enable_idempotence=True,
        acks="all",
    )
    codec = Codec.default()
    at = ledger.tick()
    events = {
        "opened": (
            "AccountOpened",
            {
                "event_id": str(uuid.uuid4()),
                "account_id": acct,
                "occurred_at": at,
                "created_at": at,
            },
        ),
        "u1": ("UsageRecorded", usage(acct, ledger.tick())),
        "aborted": ("UsageRecorded", usage(acct, ledger.tick(), input_tokens=999)),
        "u2": ("UsageRecorded", usage(acct, ledger.tick())),
    }

    def send(name: str) -> None:
        event_type, event = events[name]
        tx.send(
            ledger.producer.topic(event_type),
            value=codec.encode(event_type, event),
            key=acct.encode(),
            headers=codec.headers(event_type),
        )

    tx.init_transactions()
    for batch, commit in ((("opened", "u1"), True), (("aborted",), False), (("u2",), True)):
        tx.begin_transaction()
        for name in batch:
            send(name)
        if commit:
            tx.commit_transaction()
        else:
            tx.abort_transaction()
    tx.close()
    last = ledger.use(acct)  # plain producer, after the markers

    ledger.settle(4)
    journaled = {r[0] for r in ledger.db.execute("SELECT event_id FROM raw_events").fetchall()}
    expected = {events[n][1]["event_id"] for n in ("opened", "u1", "u2")} | {last["event_id"]}
    assert journaled == expected
    assert ledger.rejected() == []
    usage_topic = ledger.producer.topic("UsageRecorded")
    (partition, stored) = ledger.db.execute(
        "SELECT kafka_partition, next_offset FROM consumer_offsets WHERE topic = %s",
        (usage_topic,),
    ).fetchone()
    tp = TopicPartition(usage_topic, partition)
    reader = KafkaConsumer(bootstrap_servers=ledger.bootstrap, group_id=None)
    try:
        assert stored == reader.end_offsets([tp])[tp]  # past every marker, nothing left behind
    finally:
        reader.close()


def test_offsets_kafka_deleted_stop_their_shard_until_an_operator_accepts_the_loss(
    settings, stack, dsn
):
    ledger = Ledger(settings, stack.bootstrap, dsn)
    try:
        acct = "acct-lost"
        ledger.open_account(acct)
        sent = [ledger.use(acct) for _ in range(3)]
        usage_topic = ledger.producer.topic("UsageRecorded")
        partition = (
            ledger.producer.send("UsageRecorded", usage(acct, ledger.tick()))
            .get(timeout=30)
            .partition
        )
        tp = TopicPartition(usage_topic, partition)
        admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap)
        admin.delete_records({tp: 2})  # the first two usage events are gone before any read
        admin.close()
        other = next(
            name
            for name in (f"acct-other-{i}" for i in range(100))
            if _partition(ledger, name) != partition
        )

        ledger.start()
        ledger.open_account(other)
        wait_until(lambda: ledger.journaled() >= 1, 30, "the other shard journals")
        assert lost_ranges(settings, stack.bootstrap, dsn) == [
            LostRange(usage_topic, partition, 0, 2)
        ]
        stopped = ledger.db.execute(
            "SELECT count(*) FROM raw_events WHERE account_id = %s", (acct,)
        ).fetchone()[0]
        assert stopped == 0  # the whole shard waits, nothing was skipped

        accepted = accept_loss(settings, stack.bootstrap, dsn, partition, "retention ran out")
        assert [(r.stored, r.log_start) for r in accepted] == [(0, 2)]
        wait_until(
            lambda: (
                ledger.db.execute(
                    "SELECT count(*) FROM raw_events WHERE account_id = %s", (acct,)
                ).fetchone()[0]
                == 3
            ),  # the account's opening, the third and fourth usage
            30,
            "the shard resumes after the loss is accepted",
        )
        kept = {r[0] for r in ledger.db.execute("SELECT event_id FROM raw_events")}
        assert not {e["event_id"] for e in sent[:2]} & kept
        (note,) = ledger.db.execute("SELECT note FROM accepted_offset_losses").fetchone()
        assert note == "retention ran out"
        ledger.stop()
        ledger.assert_trial_balance_zero()
    finally:
        ledger.close()


def _partition(ledger: Ledger, account_id: str) -> int:
    """Kafka's default partitioner (murmur2 of the key), as every producer must use."""
    count = len(ledger.producer.partitions("AccountOpened"))
    return (murmur2(account_id.encode()) & 0x7FFFFFFF) % count


def test_far_future_and_ancient_events_and_forged_ticks_are_quarantined_and_change_nothing(
    ledger,
):
    acct = "acct-time"
    ledger.open_account(acct)
    ledger.use(acct)
    ledger.period_tick(T0 + timedelta(days=1))
    ledger.settle(2 + 4)
    before = ledger.account(acct)

    ledger.send(
        "UsageRecorded",
        acct,
        occurred_at=datetime(2999, 1, 1, tzinfo=UTC),
        **{
            k: v
            for k, v in usage(acct, T0).items()
            if k not in ("event_id", "account_id", "occurred_at")
        },
    )
    ledger.send(
        "PaymentMethodAdded",
        acct,
        occurred_at=datetime(1970, 1, 1, tzinfo=UTC),
        payment_method_id="pm-1",
        kind="card",
    )
    send_ticks(ledger.producer, datetime(2999, 6, 1, tzinfo=UTC))  # forged: every partition
    send_ticks(ledger.producer, T0)  # goes back from the last tick
    send_ticks(ledger.producer, T0 + timedelta(days=100))  # a step of more than 31 days
    partitions = len(ledger.producer.partitions("PeriodTick"))
    ledger.settle(2 + 4 + 2 + 3 * partitions)

    assert reasons(ledger) == Counter({"implausible_time": 2 + 3 * partitions})
    after = ledger.account(acct)
    assert after == before
    assert ledger.db.execute("SELECT count(*) FROM invoices").fetchone()[0] == 0
    clocks = {r[0] for r in ledger.db.execute("SELECT last_tick_at FROM shard_heads")}
    assert clocks <= {T0 + timedelta(days=1), None}


def test_an_event_on_another_partition_than_its_accounts_home_is_quarantined(ledger):
    acct = "acct-home"
    home = (
        ledger.producer.send(
            "AccountOpened",
            {
                "event_id": str(uuid.uuid4()),
                "account_id": acct,
                "occurred_at": ledger.tick(),
                "created_at": ledger.tick(),
            },
        )
        .get(timeout=30)
        .partition
    )
    ledger.settle(1)
    elsewhere = (home + 1) % len(ledger.producer.partitions("UsageRecorded"))
    stray = usage(acct, ledger.tick())
    ledger.producer.send("UsageRecorded", stray, partition=elsewhere).get(timeout=30)
    ledger.use(acct)
    ledger.settle(3)
    ((_, _, event_id, reason, detail),) = ledger.rejected()
    assert (event_id, reason) == (stray["event_id"], "wrong_partition")
    assert f"lives on shard {home}" in detail
    assert ledger.journaled() == 2
