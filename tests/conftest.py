"""Shared pytest fixtures.

Session-scoped, in dependency order:

    base_settings  Settings for the whole session: LEDGER_* from the environment, but with a
                   private `home` in a fresh temp dir, so tests never touch (or stop) a
                   developer's own stack.
    stack          the running Kafka + PostgreSQL (a `ledger.stack.StackInfo`): started once
                   per session, stopped at the end. With LEDGER_KAFKA_BOOTSTRAP and/or
                   LEDGER_DATABASE_URL set, those services are used and nothing is started.

Add further fixtures (database connections, topics, ...) below, building on `stack`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from ledger import db, topics
from ledger import stack as local_stack
from ledger.book import LedgerFold
from ledger.journal import LedgerWriter
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.runner import on_server, with_database
from ledger.settings import Settings
from tests.harness import Ledger


@pytest.fixture(scope="session")
def base_settings() -> Iterator[Settings]:
    # Not under pytest's own temp dir: pytest deletes old session dirs when another pytest
    # starts, which would pull the data directory out from under a running PostgreSQL.
    home = Path(tempfile.mkdtemp(prefix="ledger-tests-"))
    yield dataclasses.replace(Settings.from_env(), home=home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(base_settings: Settings) -> Iterator[local_stack.StackInfo]:
    info = local_stack.up(base_settings)
    yield info
    local_stack.down(base_settings)  # touches nothing external


# --- more fixtures below ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def template_dsn(stack: local_stack.StackInfo) -> str:
    """A database with every migration applied, cloned by each test (CREATE DATABASE …
    TEMPLATE), so a test starts from a fresh schema in milliseconds."""
    return new_database(stack)


def new_database(stack: local_stack.StackInfo) -> str:
    """A fresh, migrated database on the stack's server (dropped with the cluster)."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    on_server(stack.dsn, "create_database", name)
    dsn = with_database(stack.dsn, name)
    db.migrate(dsn)
    return dsn


@pytest.fixture
def dsn(stack: local_stack.StackInfo, template_dsn: str) -> Iterator[str]:
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    template = urllib.parse.urlsplit(template_dsn).path.lstrip("/")
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    yield with_database(stack.dsn, name)
    on_server(stack.dsn, "drop_database", name)


@pytest.fixture
def settings(base_settings: Settings, stack: local_stack.StackInfo) -> Settings:
    """Per-test settings: unique topic names and consumer group, topics created."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    per_test = dataclasses.replace(
        base_settings,
        topic_prefix=prefix,
        consumer_group=f"{prefix}ledger",
        partitions=4,
        batch_max_ms=100,
        poll_interval_ms=100,
    )
    topics.create_topics(stack.bootstrap, per_test)
    return per_test


@pytest.fixture
def ledger(settings: Settings, stack: local_stack.StackInfo, dsn: str) -> Iterator[Ledger]:
    """A running ledger (consumer, projections, relay in threads) on this test's topics and
    database. Every test that uses it ends with the trial balance checked to be zero."""
    running = Ledger(settings, stack.bootstrap, dsn).start()
    try:
        yield running
        running.stop()
        running.assert_trial_balance_zero()
    finally:
        running.close()


@pytest.fixture
def writer(dsn: str) -> Iterator[LedgerWriter]:
    """A LedgerWriter on this test's database, with the shipped price book and policy (no
    Kafka: tests hand it records)."""
    conn = psycopg.connect(dsn)
    fold = LedgerFold(PriceBook.load(), Policy.load())
    yield LedgerWriter(conn, fold, group_id="ledger", deadletter_topic="dlq")
    conn.close()
