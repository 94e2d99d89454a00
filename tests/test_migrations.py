"""Migrations: applied in order, recorded, idempotent, and equal to the declared schema."""

import json
import uuid
from datetime import UTC, datetime
from importlib import resources

import psycopg

from ledger import chain_keys, db
from ledger.book import AccountBook, Entry, LedgerFold, canonical_json, chain_hash
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.journal import GENESIS, LedgerWriter
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.runner import on_server, with_database
from ledger.verify import check_journal
from tests.conftest import database_name
from tests.test_journal import opened


def test_migrations_produce_exactly_the_declared_schema(dsn, owner_dsn, stack):
    declared = resources.files("ledger.sql").joinpath("schema.sql").read_text("utf-8")
    name = "declared_" + database_name(dsn).rsplit("ledger_test_", 1)[1]
    with psycopg.connect(stack.owner_dsn, autocommit=True) as owner:
        owner.execute(f'CREATE DATABASE "{name}"')
    try:
        other = with_database(owner_dsn, name)
        with psycopg.connect(other) as conn:
            conn.execute(declared)
            conn.commit()
            from_declaration = db.describe_schema(conn)
        with psycopg.connect(dsn) as conn:
            from_migrations = db.describe_schema(conn)
        assert from_migrations["columns"], "the description must not be empty"
        assert from_migrations == from_declaration
    finally:
        with psycopg.connect(stack.owner_dsn, autocommit=True) as owner:
            owner.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_migrate_records_versions_and_is_idempotent(dsn, owner_dsn):
    assert db.migrate(owner_dsn) == []  # the template already has them all
    with psycopg.connect(dsn) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [v for v, _, _ in db.migrations()]


def test_a_journal_from_before_the_keyed_chain_still_verifies_and_the_keyed_chain_follows_it(
    stack, base_settings
):
    """Migration 0008 on a journal written with unkeyed per-account links: those entries keep
    verifying by the old rule, the shard's keyed chain starts from its last one, and a change
    to an old entry is still found."""
    name, dsn = _database_before(stack, 8)
    with psycopg.connect(dsn) as conn:
        # One event journaled the old way: a payment method of an account not opened yet.
        at = datetime(2026, 3, 1, tzinfo=UTC)
        event = {"event_id": str(uuid.uuid4()), "account_id": "old-1", "occurred_at": at,
                 "payment_method_id": "pm", "kind": "card"}  # fmt: skip
        raw = Codec.default().encode("PaymentMethodAdded", event)
        payload = canonical_json(event)
        old_hash = chain_hash(GENESIS, payload, Entry("noop"), raw)
        conn.execute(
            "INSERT INTO raw_events (event_id, event_type, account_id, topic, kafka_partition, "
            "kafka_offset, fingerprint, content_hash, raw, occurred_at) "
            "VALUES (%s, 'PaymentMethodAdded', 'old-1', 'billing.payment-methods.v1', 0, 0, 0, "
            "'', %s, %s)",
            (event["event_id"], raw, at),
        )
        conn.execute(
            "INSERT INTO journal_entries (shard, shard_seq, event_id, account_id, event_type, "
            "status, occurred_at, payload, prev_hash, entry_hash) "
            "VALUES (0, 1, %s, 'old-1', 'PaymentMethodAdded', 'noop', %s, %s, %s, %s)",
            (event["event_id"], at, payload, GENESIS, old_hash),
        )
        conn.execute("INSERT INTO shard_heads (shard, last_seq) VALUES (0, 1)")
        conn.execute(
            "INSERT INTO account_books (account_id, book, last_hash, shard) "
            "VALUES ('old-1', %s, %s, 0)",
            (json.dumps(AccountBook("old-1").to_json()), old_hash),
        )
        conn.commit()
    assert db.migrate(dsn) == [v for v, _, _ in db.migrations() if v >= 8]  # 0008 and later
    keys = chain_keys.load(base_settings)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT head_hash FROM shard_heads").fetchone()[0] == old_hash
        writer = LedgerWriter(conn, _fold(), keys=keys, group_id="ledger", deadletter_topic="dlq")
        writer.write_batch([opened("old-1", 0), opened("new-1", 1)])
        rows = conn.execute(
            "SELECT shard_seq, chain_key_id, prev_hash, entry_hash FROM journal_entries "
            "WHERE shard = 0 ORDER BY shard_seq"
        ).fetchall()
        assert [(seq, key) for seq, key, *_ in rows] == [
            (1, None),
            (2, keys.current),
            (3, keys.current),
        ]
        assert rows[1][2] == old_hash  # the keyed chain starts from the old entry
        assert check_journal(conn, keys, Policy.load()) == []
    # The change only a superuser can make (it bypasses the append-only triggers).
    with psycopg.connect(with_database(stack.admin_dsn, name)) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "UPDATE journal_entries SET payload = jsonb_set(payload::jsonb, '{kind}', '\"bank\"') "
            "WHERE shard_seq = 1"
        )
        [changed] = check_journal(conn, keys, Policy.load())
        conn.rollback()
    on_server(stack.owner_dsn, "drop_database", name)
    assert changed.subject.startswith("account 'old-1' entry (0, 1) PaymentMethodAdded")
    assert "unkeyed hash mismatch" in changed.detail


def test_a_journal_from_before_payloads_became_json_still_verifies(stack, base_settings):
    """Migration 0014 on a journal whose payloads and details are jsonb: they become json
    holding jsonb's text of them (not the canonical text hashed), and still verify, as the
    entries written after it, which hold the canonical text itself."""
    name, dsn = _database_before(stack, 14)
    keys = chain_keys.load(base_settings)
    texts = "SELECT payload::text, detail::text FROM journal_entries ORDER BY shard, shard_seq"
    try:
        with psycopg.connect(dsn) as conn:
            writer = LedgerWriter(conn, _fold(), keys=keys, group_id="ledger", deadletter_topic="d")
            writer.write_batch([opened("j-1", 0), opened("j-2", 1)])
            before = conn.execute(texts).fetchall()
        assert db.migrate(dsn) == [v for v, _, _ in db.migrations() if v >= 14]
        with psycopg.connect(dsn) as conn:
            assert conn.execute(texts).fetchall() == before  # jsonb's text, as it was
            assert all(": " in payload for payload, _ in before)  # not the canonical text
            assert check_journal(conn, keys, Policy.load()) == []
            writer = LedgerWriter(conn, _fold(), keys=keys, group_id="ledger", deadletter_topic="d")
            writer.write_batch([opened("j-3", 2)])
            payload, detail = conn.execute(texts).fetchall()[-1]
            assert payload == canonical_json(json.loads(payload))
            assert detail == canonical_json(json.loads(detail))
            assert json.loads(payload)["account_id"] == "j-3"
            assert check_journal(conn, keys, Policy.load()) == []
        # A change to an entry from before the migration is still found.
        with psycopg.connect(with_database(stack.admin_dsn, name)) as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute(
                "UPDATE journal_entries SET payload = jsonb_set(payload::jsonb, '{account_id}', "
                "'\"j-9\"') WHERE shard_seq = 1"
            )
            [changed] = [d for d in check_journal(conn, keys, Policy.load()) if "hash" in d.detail]
            conn.rollback()
        assert "hash mismatch" in changed.detail
    finally:
        on_server(stack.owner_dsn, "drop_database", name)


def _database_before(stack, version: int) -> tuple[str, str]:
    """A new database with the schema as it was before migration `version`: its name, and the
    owner's URL of it (migrations run as the owner)."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    on_server(stack.owner_dsn, "create_database", name)
    dsn = with_database(stack.owner_dsn, name)
    with psycopg.connect(dsn) as conn:
        conn.execute(QUERIES["create_migrations_table"])
        for number, migration, text in db.migrations():
            if number < version:
                conn.execute(text)
                conn.execute(QUERIES["record_migration"], (number, migration))
    return name, dsn


def _fold() -> LedgerFold:
    return LedgerFold(PriceBook.load(), Policy.load())
