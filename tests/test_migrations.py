"""Migrations: applied in order, recorded, idempotent, and equal to the declared schema."""

from importlib import resources

import psycopg

from ledger import db
from ledger.runner import with_database
from tests.conftest import database_name


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
