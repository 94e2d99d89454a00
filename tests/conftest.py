"""Shared pytest fixtures.

Session-scoped, in dependency order:

    base_settings  Settings for the whole session: LEDGER_* from the environment, but with a
                   private `home` in a fresh temp dir, so tests never touch (or stop) a
                   developer's own stack. A `ledger` child process started without
                   LEDGER_HOME gets an empty home of its own (pytest_configure).
    stack          the running Kafka + PostgreSQL (a `ledger.stack.StackInfo`): started once
                   per session, stopped at the end. With LEDGER_KAFKA_BOOTSTRAP and/or
                   LEDGER_DATABASE_URL set, those services are used and nothing is started.

Databases are made and migrated by the owner role; `dsn` (what the workers, the harness and
most tests use) is the least-privileged writer's, so the suite proves the workers need no more.
`owner_dsn`, `reader_dsn` and `admin_dsn` (the local cluster's superuser, for tests that play
an attacker with full access) reach the same database as the other roles.

Add further fixtures (database connections, topics, ...) below, building on `stack`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from ledger import chain_keys, db, topics
from ledger import stack as local_stack
from ledger.book import LedgerFold
from ledger.journal import LedgerWriter
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.runner import on_server, with_database
from ledger.settings import Settings
from tests.harness import Ledger

_CHILD_HOME = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # A `ledger` child a test starts without LEDGER_HOME finds an empty home of its own, never
    # the developer's stack or the demo run it may hold (whose topic prefix would leak in).
    config.stash[_CHILD_HOME] = tempfile.mkdtemp(prefix="ledger-tests-home-")
    os.environ["LEDGER_HOME"] = config.stash[_CHILD_HOME]


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(_CHILD_HOME, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


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
    """A fresh database on the stack's server, made and migrated by the owner role (dropped
    with the cluster); returns the writer's URL of it."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    on_server(stack.owner_dsn, "create_database", name)
    db.migrate(with_database(stack.owner_dsn, name))
    return with_database(stack.dsn, name)


def database_name(dsn: str) -> str:
    return urllib.parse.urlsplit(dsn).path.lstrip("/")


def as_role(stack: local_stack.StackInfo, dsn: str, role: str) -> str:
    """The URL of `dsn`'s database for "owner", "writer", "reader" or "admin" (superuser)."""
    base = stack.admin_dsn if role == "admin" else stack.role_dsn(role)
    assert base is not None, "no superuser: the tests' PostgreSQL is external"
    return with_database(base, database_name(dsn))


@pytest.fixture
def dsn(stack: local_stack.StackInfo, template_dsn: str) -> Iterator[str]:
    """A fresh migrated database (a clone of the template), as the writer role."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.owner_dsn, autocommit=True) as owner:
        owner.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(database_name(template_dsn))
            )
        )
    yield with_database(stack.dsn, name)
    on_server(stack.owner_dsn, "drop_database", name)


@pytest.fixture
def owner_dsn(stack: local_stack.StackInfo, dsn: str) -> str:
    return as_role(stack, dsn, "owner")


@pytest.fixture
def reader_dsn(stack: local_stack.StackInfo, dsn: str) -> str:
    return as_role(stack, dsn, "reader")


@pytest.fixture
def admin_dsn(stack: local_stack.StackInfo, dsn: str) -> str:
    return as_role(stack, dsn, "admin")


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
def writer(dsn: str, base_settings: Settings) -> Iterator[LedgerWriter]:
    """A LedgerWriter on this test's database, with the shipped price book and policy and the
    session's chain key (no Kafka: tests hand it records)."""
    conn = psycopg.connect(dsn)
    fold = LedgerFold(PriceBook.load(), Policy.load())
    keys = chain_keys.load(base_settings)
    yield LedgerWriter(conn, fold, keys=keys, group_id="ledger", deadletter_topic="dlq")
    conn.close()
