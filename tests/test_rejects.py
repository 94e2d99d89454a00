"""Quarantined events are never lost: once fixed, `ledger rejects replay` journals them."""

import copy
import dataclasses
import json
import unicodedata
import uuid
from decimal import Decimal
from importlib import resources

import psycopg
from kafka import KafkaProducer

from ledger import chain_keys, topics
from ledger.book import LedgerFold
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.journal import LedgerWriter
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.rejects import replay_rejects, summary
from ledger.replay import StoredRecord
from tests.harness import LLAMA_70B, wait_until
from tests.test_cli import ledger_cli, services_env


def dead_letter_copies(ledger) -> int:
    return ledger.db.execute(
        "SELECT count(*) FROM outbox WHERE topic = %s", (ledger.settings.topic(topics.DEADLETTER),)
    ).fetchone()[0]


def test_fixed_rejects_are_journaled_and_the_rest_stay_open(ledger, tmp_path):
    ledger.open_account("rj")
    # Too big for the shipped policy (100M tokens per event): rejected as absurd.
    big = ledger.use("rj", model=LLAMA_70B, input_tokens=150_000_000)
    # Written with a schema version the ledger does not know yet: unknown fingerprint.
    newer = copy.deepcopy(Codec.default().schema("UsageRecorded"))
    newer["fields"].append({"name": "region", "type": "string", "default": "us"})
    writer = Codec.load()
    writer.register(newer, current=True)
    event = {
        "event_id": str(uuid.uuid4()),
        "account_id": "rj",
        "occurred_at": ledger.tick(),
        "request_id": "r",
        "product": "serverless",
        "model": LLAMA_70B,
        "service_tier": "standard",
        "input_tokens": 1_000_000,
        "region": "eu",
    }
    raw = KafkaProducer(bootstrap_servers=ledger.bootstrap, acks="all")
    raw.send(
        ledger.settings.topic(topics.USAGE), value=writer.encode("UsageRecorded", event), key=b"rj"
    )
    raw.send(ledger.settings.topic(topics.USAGE), value=b"not avro", key=b"rj")
    raw.flush()
    raw.close()
    ledger.settle(4)
    assert sorted(r[3] for r in ledger.rejected()) == [
        "absurd_quantity",
        "bad_magic",
        "unknown_fingerprint",
    ]
    dead_letters = dead_letter_copies(ledger)

    # The fixes: a policy with a higher bound, and the writer schema added to history.
    policy = tmp_path / "policy.toml"
    shipped = resources.files("ledger").joinpath("policy.toml").read_text("utf-8")
    policy.write_text(
        shipped.replace(
            "max_tokens_per_event = 100_000_000", "max_tokens_per_event = 1_000_000_000"
        )
    )
    fixed_settings = dataclasses.replace(ledger.settings, policy=policy)
    codec = Codec.load()
    codec.register(newer)
    outcome = replay_rejects(fixed_settings, ledger.dsn, codec=codec)
    assert len(outcome.journaled) == 2
    assert dict(outcome.still_rejected) == {"bad_magic": 1}
    assert dead_letter_copies(ledger) == dead_letters  # no second dead-letter copy

    ledger.settle(4)
    journaled = {e for (e,) in ledger.db.execute("SELECT event_id FROM journal_entries")}
    assert {big["event_id"], event["event_id"]} <= journaled
    # $135 (150M × 0.90) + $0.90: $1 of credit, the rest owed.
    assert ledger.account("rj")["receivable"] == Decimal("134.9")
    assert summary(ledger.dsn) == [
        ("absurd_quantity", 0, 1),
        ("bad_magic", 1, 0),
        ("unknown_fingerprint", 0, 1),
    ]
    # Replaying again changes nothing.
    again = replay_rejects(fixed_settings, ledger.dsn, codec=codec)
    assert (again.journaled, dict(again.still_rejected)) == ([], {"bad_magic": 1})


def test_a_dead_letter_copy_over_the_bound_carries_a_reference_to_the_reject(dsn, base_settings):
    """The writer alone (no Kafka): a copy over `deadletter_max_bytes` is a reference; one
    under it is the record byte for byte with its headers. The bytes are stored once: the
    copy's outbox row names its reject, and what the relay publishes is the reject's bytes."""
    fold = LedgerFold(PriceBook.load(), Policy.load())
    with psycopg.connect(dsn) as conn:
        writer = LedgerWriter(
            conn,
            fold,
            keys=chain_keys.load(base_settings),
            group_id="ledger",
            deadletter_topic="dlq",
        )
        writer.deadletter_max_bytes = 4096
        small = StoredRecord("in", 0, 0, b"acct-1", b"not avro", (("h", b"v"),))
        big = StoredRecord("in", 0, 1, b"acct-1", b"\x00" * 5000, (("h", b"v"),))
        assert writer.write_batch([small, big]).rejected == 2
        rejects = dict(conn.execute("SELECT kafka_offset, id FROM rejected_events"))
        copies = conn.execute(
            "SELECT message_key, value, headers, value_of_reject FROM outbox ORDER BY id"
        )
        (key_0, stored_0, headers_0, of_0), (key_1, value_1, headers_1, of_1) = copies.fetchall()
        relayed = conn.execute(QUERIES["unpublished"], (10,)).fetchall()
        value_0 = relayed[0][3]
        stored = conn.execute("SELECT raw FROM rejected_events WHERE kafka_offset = 1")
        assert bytes(stored.fetchone()[0]) == big.value  # the reject keeps every byte
    as_dict = lambda headers: {k: bytes.fromhex(v) for k, v in headers}  # noqa: E731
    assert (bytes(stored_0), of_0) == (b"", rejects[0])  # not a second copy of the bytes
    assert [bytes(r[3]) for r in relayed] == [b"not avro", b""]
    assert (bytes(key_0), bytes(value_0)) == (b"acct-1", b"not avro")
    assert of_1 is None  # a reference needs no bytes
    assert as_dict(headers_0)["h"] == b"v" and "dlq_reject_id" not in as_dict(headers_0)
    assert (bytes(key_1), bytes(value_1)) == (b"acct-1", b"")
    assert as_dict(headers_1) == {
        "dlq_reason": b"bad_magic",
        "dlq_detail": as_dict(headers_1)["dlq_detail"],
        "dlq_topic": b"in",
        "dlq_partition": b"0",
        "dlq_offset": b"1",
        "dlq_reject_id": str(rejects[1]).encode(),
        "dlq_truncated": b"true",
        "dlq_size": b"5000",
    }


def test_rejects_show_never_writes_a_control_character_to_the_terminal(ledger, stack):
    nasty = b"\x00\x1b[2J\x1b]0;owned\x07\r\x9b\x7f" + bytes(range(256))
    key = b"acct-\x1b[31m"
    raw = KafkaProducer(bootstrap_servers=ledger.bootstrap, acks="all")
    raw.send(ledger.settings.topic(topics.USAGE), key=key, value=nasty).get(timeout=30)
    raw.close()
    wait_until(ledger.rejected, 30, "the reject")
    (reject_id, partition, offset) = ledger.db.execute(
        "SELECT id, kafka_partition, kafka_offset FROM rejected_events"
    ).fetchone()
    env = services_env(stack, ledger.dsn)

    shown = ledger_cli("rejects", "show", str(reject_id), env=env)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    unsafe = sorted({hex(ord(c)) for c in out if unicodedata.category(c)[0] == "C" and c != "\n"})
    assert unsafe == [], f"control characters reached the terminal: {unsafe}"
    assert f"reject {reject_id} (open)" in out
    assert "reason:    bad_magic" in out
    assert (
        f"origin:    {ledger.settings.topic(topics.USAGE)} partition {partition} "
        f"offset {offset}, key hex {key.hex()}"
    ) in out
    assert "event:     (not decoded)" in out
    assert f"raw bytes: {len(nasty)}, the first 256:" in out
    assert "00000000  00 1b 5b 32 4a 1b 5d 30 3b 6f 77 6e 65 64 07 0d  |..[2J.]0;owned..|" in out
    assert f"... {len(nasty) - 256} more bytes" in out

    as_json = ledger_cli("rejects", "show", str(reject_id), "--json", "--bytes", "0", env=env)
    view = json.loads(as_json.stdout)
    assert bytes.fromhex(view["raw_hex"]) == nasty
    assert (view["size"], view["raw_truncated"]) == (len(nasty), False)
    assert view["origin"]["key_hex"] == key.hex()
    assert (view["reason"], view["event_id"], view["resolved_at"]) == ("bad_magic", None, None)

    missing = ledger_cli("rejects", "show", "999999", env=env)
    assert (missing.returncode, missing.stdout) == (4, "no rejected event with id 999999\n")
    no_id = ledger_cli("rejects", "show", env=env)
    assert no_id.returncode == 1 and "give the reject id" in no_id.stderr
