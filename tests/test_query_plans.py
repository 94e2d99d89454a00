"""Queries that run for every batch read what the batch needs, not the journal: counted in rows
PostgreSQL actually read (EXPLAIN ANALYZE), on a journal of 20,000 entries, so a plan that
scans the journal fails here long before it would slow a large one down."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg.types.json import Jsonb

from ledger.db import QUERIES

SHARDS = list(range(8))
ENTRIES = 20_000


def rows_read(conn: psycopg.Connection, query: str, params, table: str) -> int:
    """Rows of `table` the executed plan read, those its filters dropped included."""
    (plan,) = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, params).fetchone()
    total = 0

    def walk(node: dict) -> None:
        nonlocal total
        if node.get("Relation Name") == table:
            loops = node.get("Actual Loops", 1)
            total += (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * loops
        for child in node.get("Plans", []):
            walk(child)

    walk((plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"])
    return total


@pytest.fixture
def large_journal(owner_dsn: str) -> psycopg.Connection:
    """20,000 usage entries over 8 shards, two configuration versions journaled on each."""
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO config_publications (kind, version, effective_from, document, sha256)
               VALUES ('price_book', 'p1', '2026-01-01', '{}', 'x'),
                      ('policy', 'q1', '2026-01-01', '{}', 'y')"""
        )
        conn.execute(
            """INSERT INTO journal_entries (shard, shard_seq, event_id, account_id, event_type,
                                            status, occurred_at, payload, prev_hash, entry_hash)
               SELECT n %% 8, n / 8 + 3, 'e' || n, 'acct-' || (n %% 500), 'UsageRecorded',
                      'posted', '2026-03-01', '{}', '\\x00', '\\x00'
                 FROM generate_series(0, %s - 1) AS n""",
            (ENTRIES,),
        )
        for shard in SHARDS:
            for seq, (kind, version) in enumerate([("price_book", "p1"), ("policy", "q1")], 1):
                conn.execute(
                    """INSERT INTO journal_entries (shard, shard_seq, event_id, account_id,
                                                    event_type, status, occurred_at, payload,
                                                    prev_hash, entry_hash)
                       VALUES (%s, %s, %s, '', 'ConfigPublished', 'noop', '2026-01-01', %s,
                               '\\x00', '\\x00')""",
                    (shard, seq, f"config:{kind}:{version}:{shard}", Jsonb({"kind": kind})),
                )
        conn.execute("ANALYZE journal_entries")
        yield conn


def test_finding_the_configuration_still_to_journal_reads_only_configuration_entries(
    large_journal,
):
    params = {"shards": SHARDS, "now": datetime(2026, 3, 2, tzinfo=UTC)}
    pending = large_journal.execute(QUERIES["pending_config"], params).fetchall()
    assert pending == []  # both versions are journaled on every shard
    read = rows_read(large_journal, QUERIES["pending_config"], params, "journal_entries")
    assert read <= 2 * len(SHARDS), f"read {read} journal rows for 16 configuration entries"


@pytest.mark.parametrize(
    ("query", "params"),
    [
        ("shard_config_entries", (3,)),  # a writer's configuration cache, when it is stale
        ("shard_policy_at", (3, 10_000)),  # a projection taking over a shard
    ],
)
def test_a_shards_configuration_is_read_from_its_configuration_entries(
    large_journal, query, params
):
    assert large_journal.execute(QUERIES[query], params).fetchall()  # there is one to find
    read = rows_read(large_journal, QUERIES[query], params, "journal_entries")
    assert read <= 2 * len(SHARDS), f"{query} read {read} journal rows"


def test_finding_a_shards_held_usage_reads_only_its_unpriced_entries(large_journal):
    """Run for every shard when a price version is published (re-rating what was held)."""
    large_journal.execute(
        """INSERT INTO journal_entries (shard, shard_seq, event_id, account_id, event_type,
                                        status, occurred_at, payload, prev_hash, entry_hash)
           SELECT 3, 100000 + n, 'held-' || n, 'acct-3', 'UsageRecorded', 'unpriced',
                  '2026-03-01', '{}', '\\x00', '\\x00'
             FROM generate_series(1, 5) AS n"""
    )
    large_journal.execute("ANALYZE journal_entries")
    assert len(large_journal.execute(QUERIES["held_usage"], (3,)).fetchall()) == 5
    read = rows_read(large_journal, QUERIES["held_usage"], (3,), "journal_entries")
    assert read <= 20, f"held_usage read {read} journal rows for 5 held entries"


def test_advancing_the_shard_heads_reads_one_journal_row_per_shard(large_journal):
    """Every batch: the heads move on, and each shard's last journaled sequence number comes
    back with them (to catch a head left behind its journal by hand), from the index's end."""
    params = (SHARDS, [1] * len(SHARDS))
    read = rows_read(large_journal, QUERIES["advance_shards"], params, "journal_entries")
    assert read <= len(SHARDS), f"advance_shards read {read} journal rows"


@pytest.mark.parametrize(
    ("query", "params", "found"),
    [
        # A batch's accounts without a book: new ones, and one whose book was deleted.
        ("accounts_journaled", ([f"new-{n}" for n in range(100)] + ["acct-7"],), ["acct-7"]),
        # A pass's accounts without a state row, by what the shard's projection folded.
        (
            "accounts_folded_before",
            ([f"new-{n}" for n in range(100)] + ["acct-7"], 7, 100_000),
            ["acct-7"],
        ),
    ],
)
def test_looking_up_accounts_without_a_book_or_state_reads_only_their_entries(
    large_journal, query, params, found
):
    assert [a for (a,) in large_journal.execute(QUERIES[query], params)] == found
    read = rows_read(large_journal, QUERIES[query], params, "journal_entries")
    assert read <= 2 * ENTRIES // 500, f"{query} read {read} journal rows"
