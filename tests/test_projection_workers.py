"""Projection workers sharing a journal (real PostgreSQL, no Kafka: the writer is handed
records). A worker skips looking a shard's policy up in the journal only where its own last
step left the shard; after another worker folded a new policy there, it must look again."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import psycopg

from ledger.config_versions import policy_version
from ledger.configure import publish
from projections.worker import ProjectionWorker
from tests.test_journal import opened

SHIPPED = Path(__file__).parents[1] / "ledger" / "policy.toml"


def drain(worker: ProjectionWorker) -> None:
    while worker.run_once():
        pass


def limit(dsn: str, account_id: str) -> Decimal:
    with psycopg.connect(dsn) as conn:
        (value,) = conn.execute(
            "SELECT effective_limit FROM account_status WHERE account_id = %s", (account_id,)
        ).fetchone()
    return value


def test_a_worker_resuming_after_another_follows_the_policy_journaled_meanwhile(
    writer, dsn, base_settings, tmp_path
):
    with psycopg.connect(dsn) as conn:
        publish(conn, [policy_version(SHIPPED)])
    writer.write_batch([opened("a", 0)])  # the policy is journaled on shard 0 first
    first = ProjectionWorker(base_settings, dsn)
    second = ProjectionWorker(base_settings, dsn)
    try:
        drain(first)
        assert limit(dsn, "a") == 50

        # A new policy (tier 1 up to $70 a month), folded by the other worker.
        edited = tmp_path / "policy.toml"
        text = SHIPPED.read_text()
        edited.write_text(
            text.replace('version = "2026-01"', 'version = "2026-02"').replace(
                'monthly_limit = "50"', 'monthly_limit = "70"', 1
            )
        )
        with psycopg.connect(dsn) as conn:
            publish(conn, [policy_version(edited)])
        writer.write_batch([opened("b", 1)])
        drain(second)
        assert (limit(dsn, "a"), limit(dsn, "b")) == (50, 70)  # a was not folded again

        # The first worker again: the shard moved on without it, so it reads the policy
        # journaled there (a stale one would give c a $50 limit).
        writer.write_batch([opened("c", 2)])
        drain(first)
        assert limit(dsn, "c") == 70
    finally:
        first.close()
        second.close()
