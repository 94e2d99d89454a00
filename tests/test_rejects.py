"""Quarantined events are never lost: once fixed, `ledger rejects replay` journals them."""

import copy
import dataclasses
import uuid
from decimal import Decimal
from importlib import resources

from kafka import KafkaProducer

from ledger import topics
from ledger.codec import Codec
from ledger.rejects import replay_rejects, summary
from tests.harness import LLAMA_70B


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
