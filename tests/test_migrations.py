"""Migrations: applied in order, recorded, idempotent, and equal to the declared schema."""

from importlib import resources

import psycopg

from ledger import db


def test_migrations_produce_exactly_the_declared_schema(dsn, stack):
    declared = resources.files("ledger.sql").joinpath("schema.sql").read_text("utf-8")
    name = "declared_" + dsn.rsplit("ledger_test_", 1)[1].split()[0]
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        other = psycopg.conninfo.make_conninfo(dsn, dbname=name)
        with psycopg.connect(other) as conn:
            conn.execute(declared)
            conn.commit()
            from_declaration = db.describe_schema(conn)
        with psycopg.connect(dsn) as conn:
            from_migrations = db.describe_schema(conn)
        assert from_migrations["columns"], "the description must not be empty"
        assert from_migrations == from_declaration
    finally:
        with psycopg.connect(stack.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_migrate_records_versions_and_is_idempotent(dsn):
    assert db.migrate(dsn) == []  # the template already has them all
    with psycopg.connect(dsn) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [v for v, _, _ in db.migrations()]
