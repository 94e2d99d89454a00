"""`ledger offsets audit`: every Kafka record below the stored offsets left its trace in the
journal (journaled, a redelivery of a journaled event, or quarantined), or is named."""

from __future__ import annotations

import dataclasses
import uuid

import psycopg
from kafka import KafkaProducer

from ledger.book import canonical_json, content_hash
from ledger.codec import Codec
from ledger.offsets import PartitionAudit, Unaccounted, account_for, audit
from ledger.rejects import dismiss
from ledger.retention import prune
from tests.harness import T0
from tests.test_cli import ledger_cli, services_env
from tests.test_poison import raw_value, usage

CODEC = Codec.default()


def encoded(account_id: str = "acct-a") -> tuple[str, bytes, bytes]:
    """(event_id, Kafka value, content hash) of a usage event."""
    event = usage(account_id, T0)
    value = raw_value("UsageRecorded", event)
    decoded = CODEC.decode(value)
    return event["event_id"], value, content_hash("UsageRecorded", canonical_json(decoded.event))


def test_each_record_is_counted_by_what_became_of_it_and_runs_of_missing_ones_are_ranges():
    a, a_value, a_hash = encoded()
    c, c_value, _ = encoded()
    e, e_value, _ = encoded()
    journal = {a: (a_hash, "usage", 0, 0), e: (b"another body", "usage", 0, 7)}
    asked: list[list[str]] = []

    def journaled(event_ids: list[str]) -> dict:
        asked.append(event_ids)
        return {i: journal[i] for i in event_ids if i in journal}

    one = PartitionAudit("usage", 0, first=0, stored=20, end=25)
    records = [
        (0, a_value),  # journaled from here
        (1, b"garbage"),  # quarantined
        (2, a_value),  # a redelivery of offset 0
        (3, c_value),  # nowhere
        (4, b"junk"),  # does not decode, and no reject says so
        (5, None),  # a tombstone, no reject
        (6, b"garbage"),  # quarantined, then pruned
        (7, e_value),  # its event_id journaled with another body
    ]
    account_for(one, records, {1: False, 6: True}, journaled, CODEC)

    assert (one.journaled, one.redelivered, one.quarantined, one.pruned) == (1, 1, 1, 1)
    assert one.unaccounted == [
        Unaccounted(3, 5, 3, f"event {c} is neither journaled nor quarantined"),
        Unaccounted(
            7,
            7,
            1,
            f"event {e} was journaled from another record with a different body, "
            "and this one was not quarantined",
        ),
    ]
    assert (one.records, one.missing) == (8, 4)
    assert sorted(asked[0]) == sorted({a, c, e})  # one lookup for the chunk

    # The next chunk goes on from offset 9 (8 was a transaction marker): the run continues;
    # a counted record ends it.
    account_for(one, [(9, b"junk"), (10, a_value), (11, None)], {}, journaled, CODEC)
    assert [(u.first, u.last, u.records) for u in one.unaccounted] == [
        (3, 5, 3),
        (7, 9, 2),
        (11, 11, 1),
    ]
    assert one.unaccounted[1].why.startswith(f"event {e}")  # said of the run's first record
    assert one.unaccounted[2].why == "a tombstone"
    assert one.redelivered == 2


def test_the_audit_finds_records_skipped_by_a_stored_offset_moved_forward(
    ledger, stack, dsn, admin_dsn
):
    acct = "acct-audit"
    ledger.open_account(acct)
    first_use = ledger.use(acct)
    ledger.use(acct)
    ledger.producer.send("UsageRecorded", first_use).get(timeout=30)  # a redelivery
    usage_topic = ledger.producer.topic("UsageRecorded")
    raw = KafkaProducer(bootstrap_servers=ledger.bootstrap, acks="all")
    partition = raw.send(usage_topic, value=b"not avro", key=acct.encode()).get(30).partition
    ledger.settle(3 + 1)

    audits = audit(ledger.settings, ledger.bootstrap, dsn)
    assert sum(a.missing for a in audits) == 0
    assert sum(a.journaled for a in audits) == 3
    assert (sum(a.redelivered for a in audits), sum(a.quarantined for a in audits)) == (1, 1)
    usage_audit = next(a for a in audits if (a.topic, a.partition) == (usage_topic, partition))
    assert (usage_audit.first, usage_audit.stored) == (0, 4)

    # Retention prunes the dismissed reject: its trace is kept, and the audit counts it.
    ((reject_id,),) = ledger.db.execute("SELECT id FROM rejected_events").fetchall()
    assert dismiss(dsn, reject_id, "a test record")
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute("UPDATE rejected_events SET resolved_at = now() - interval '100 days'")
    pruned = prune(dataclasses.replace(ledger.settings, rejects_retention_days=30), dsn)
    assert pruned.rejects == 1
    assert ledger.db.execute(
        "SELECT topic, kafka_partition, kafka_offset, reason, resolution FROM pruned_rejects"
    ).fetchall() == [(usage_topic, partition, 3, "bad_magic", "dismissed: a test record")]

    # With the ledger stopped, three usage events arrive and the stored offset is moved past
    # them by hand: the restarted ledger never reads them.
    ledger.stop()
    skipped = [ledger.use(acct) for _ in range(3)]
    ledger.db.execute(
        "UPDATE consumer_offsets SET next_offset = next_offset + 3 "
        "WHERE topic = %s AND kafka_partition = %s",
        (usage_topic, partition),
    )
    ledger.start()
    ledger.use(acct)
    ledger.settle(3 + 1)  # the reject row is pruned
    journaled = {r[0] for r in ledger.db.execute("SELECT event_id FROM raw_events")}
    assert not {s["event_id"] for s in skipped} & journaled

    audits = audit(ledger.settings, ledger.bootstrap, dsn)
    usage_audit = next(a for a in audits if (a.topic, a.partition) == (usage_topic, partition))
    assert usage_audit.unaccounted == [
        Unaccounted(4, 6, 3, f"event {skipped[0]['event_id']} is neither journaled nor quarantined")
    ]
    assert (usage_audit.journaled, usage_audit.redelivered) == (3, 1)
    assert (usage_audit.quarantined, usage_audit.pruned, usage_audit.stored) == (0, 1, 8)
    assert [a for a in audits if a.missing] == [usage_audit]

    env = services_env(stack, dsn) | {
        "LEDGER_TOPIC_PREFIX": ledger.settings.topic_prefix,
        "LEDGER_CONSUMER_GROUP": ledger.settings.consumer_group,
    }
    result = ledger_cli("offsets", "audit", env=env)
    assert result.returncode == 1, result.stderr
    assert (
        f"UNACCOUNTED {usage_topic}[{partition}] offsets 4..6 (3 records): "
        f"event {skipped[0]['event_id']} is neither journaled nor quarantined"
    ) in result.stdout
    assert "3 records below the stored offsets left no trace in the journal" in result.stdout
    other = next(p for p in range(4) if p != partition)
    result = ledger_cli("offsets", "audit", "--shard", str(other), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every record below the stored offsets is journaled" in result.stdout
    assert str(uuid.UUID(skipped[0]["event_id"])) not in result.stdout
