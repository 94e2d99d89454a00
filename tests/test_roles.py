"""Least privilege, on the real PostgreSQL: as the writer role (every worker's), no statement
changes or removes a journal row or disables a guard; the reader writes nothing; every table
is classified, and the privileges match the class. The rest of the suite runs the workers as
the writer (the `dsn` fixture), which proves that they need no more."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors

from ledger.replay import StoredRecord
from ledger.settings import DbRoles
from tests.test_journal import opened

ROLES = DbRoles()

# Records of what happened: the writer appends, never changes or removes.
JOURNAL = (
    "raw_events",
    "journal_entries",
    "postings",
    "invoices",
    "rejected_events",
    "accepted_offset_losses",
    "config_publications",
)
# The writer's own working state: it rewrites these.
WORKING_STATE = (
    "consumer_offsets",
    "shard_heads",
    "account_books",
    "shard_leases",
    "projection_positions",
    "account_status",
    "outbox",
)
OTHER = (
    "schema_migrations",  # the migrator's record: read by everyone, written by the owner
    "pruned_rejects",  # where each pruned reject came from: written only by ledger_prune()
)

# Every way we know to change a journal row or get past its guards, as the writer.
ATTACKS = [
    "UPDATE {t} SET {c} = 'x'",
    "DELETE FROM {t}",
    "TRUNCATE {t} CASCADE",
    "ALTER TABLE {t} DISABLE TRIGGER ALL",
    "ALTER TABLE {t} DISABLE TRIGGER USER",
    "ALTER TABLE {t} ENABLE REPLICA TRIGGER {t}_append_only",
    "DROP TRIGGER {t}_append_only ON {t}",
    "DROP TABLE {t} CASCADE",
    "ALTER TABLE {t} OWNER TO ledger_writer",
    "ALTER TABLE {t} RENAME TO {t}_old",
    "ALTER TABLE {t} ADD COLUMN note text",
    "CREATE RULE no_update AS ON UPDATE TO {t} DO INSTEAD NOTHING",
    "CREATE TRIGGER evil BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION pg_temp.evil()",
]
EVIL = (
    "CREATE FUNCTION pg_temp.evil() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RETURN NULL; END $$"
)


def attacker(dsn: str) -> psycopg.Connection:
    """A session that fails rather than waits for a lock (a refusal must not hang)."""
    return psycopg.connect(dsn, autocommit=True, options="-c lock_timeout=5s")


# A text column of each journal table, to write to.
TEXT_COLUMN = {
    "raw_events": "account_id",
    "journal_entries": "account_id",
    "postings": "account_id",
    "invoices": "account_id",
    "rejected_events": "reason",
    "accepted_offset_losses": "note",
    "config_publications": "document",
}


def journal_state(conn: psycopg.Connection, tables: tuple[str, ...] = JOURNAL) -> dict[str, tuple]:
    """Each journal table's row count and a digest of every row."""
    return {
        t: conn.execute(
            "SELECT count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) "
            f"FROM {t} x"
        ).fetchone()
        for t in tables
    }


@pytest.fixture
def journal(writer, dsn, owner_dsn):
    """A journal with a row in every journal table, written by the writer role; yields the
    owner's view of it."""
    bad = StoredRecord("billing.usage.v1", 0, 7, b"acct-r", b"not avro")
    writer.write_batch([opened("acct-1", 0), bad])
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO invoices (invoice_id, account_id, month, issued_at, exact_total, "
            "amount_due, lines) VALUES ('INV-1', 'acct-1', '2026-03', now(), 1.5, 1.5, '[]')"
        )
        conn.execute(
            "INSERT INTO accepted_offset_losses (group_id, topic, kafka_partition, "
            "from_offset, to_offset, note) VALUES ('ledger', 't', 0, 0, 9, 'test')"
        )
        conn.execute(
            "INSERT INTO config_publications (kind, version, effective_from, document, sha256) "
            "VALUES ('policy', 'test-1', now(), 'x = 1', 'abc')"
        )
    with psycopg.connect(owner_dsn) as owner:
        before = journal_state(owner)
        owner.commit()  # hold no lock: an attack that waited for it would never be refused
        assert all(count >= 1 for count, _ in before.values()), before
        yield owner, before
        owner.rollback()
        assert journal_state(owner) == before, "a journal row changed"


def test_the_writer_is_an_ordinary_role_and_the_owner_owns_everything(dsn, owner_dsn):
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT current_user, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, "
            "rolreplication FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (ROLES.writer, False, False, False, False, False)
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
        ).fetchall()
        assert owners == [(ROLES.owner,)]
        functions = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
        ).fetchall()
        assert functions == [(ROLES.owner,)]
        assert not conn.execute("SELECT pg_has_role(%s, 'MEMBER')", (ROLES.owner,)).fetchone()[0]


# Tables with append-only triggers get every attack; the others every one but those naming
# a trigger they do not have.
GUARDED = ("raw_events", "journal_entries", "postings", "invoices")


@pytest.mark.parametrize(
    ("table", "attack"),
    [
        (table, attack)
        for table in JOURNAL
        for attack in ATTACKS
        if table in GUARDED or "_append_only" not in attack
    ],
)
def test_the_writer_cannot_change_a_journal_row_or_its_guards(journal, dsn, table, attack):
    with attacker(dsn) as conn:
        conn.execute(EVIL)  # a temporary function: allowed, and useless without a trigger
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(attack.format(t=table, c=TEXT_COLUMN[table]))


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE accepted_offset_losses SET note = 'x'",
        "DELETE FROM accepted_offset_losses",
        "UPDATE rejected_events SET raw = 'forged', reason = 'x', detail = 'x'",
        "UPDATE rejected_events SET event_id = 'x'",
        "DELETE FROM rejected_events",
        "DELETE FROM outbox",  # retention is `ledger prune`'s, through ledger_prune()
        "TRUNCATE outbox",
        "TRUNCATE account_books",
        "DROP FUNCTION journal_refuse_change() CASCADE",
        "CREATE OR REPLACE FUNCTION journal_refuse_change() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN RETURN NEW; END $$",
        "ALTER FUNCTION ledger_prune(interval, interval) SECURITY INVOKER",
        "CREATE TABLE public.mine (x int)",
        "CREATE FUNCTION public.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "SET session_replication_role = replica",
        "SET SESSION AUTHORIZATION ledger_owner",
        "SET ROLE ledger_owner",
        "ALTER ROLE ledger_writer SUPERUSER",
        "ALTER ROLE ledger_writer SET session_replication_role = replica",
        "ALTER ROLE ledger_writer BYPASSRLS",
        "GRANT ledger_owner TO ledger_writer",
        "CREATE ROLE intruder SUPERUSER",
        "ALTER DATABASE {db} SET session_replication_role = replica",
        "ALTER DATABASE {db} OWNER TO ledger_writer",
        "DROP DATABASE {db}",
        "COPY postings FROM PROGRAM 'true'",
        "SELECT pg_read_file('postgresql.auto.conf')",
        "ALTER SYSTEM SET session_replication_role = replica",
    ],
)
def test_the_writer_cannot_get_past_the_guards_another_way(journal, dsn, statement):
    with attacker(dsn) as conn:
        database = conn.execute("SELECT current_database()").fetchone()[0]
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(statement.format(db=f'"{database}"'))


def test_session_replication_role_then_update_changes_nothing(journal, dsn):
    """The attack that worked against the old superuser `ledger`."""
    with attacker(dsn) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="set parameter"):
            conn.execute("SET session_replication_role = replica")
        assert conn.execute("SHOW session_replication_role").fetchone() == ("origin",)
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied for table"):
            conn.execute("UPDATE postings SET amount = amount + 5")


def test_granting_itself_more_grants_nothing(journal, dsn):
    with attacker(dsn) as conn:
        for table in JOURNAL:
            # Not an error (a WARNING: "no privileges were granted"), and nothing granted.
            conn.execute(f"GRANT UPDATE, DELETE, TRUNCATE, TRIGGER ON {table} TO {ROLES.writer}")
            for privilege in ("UPDATE", "DELETE", "TRUNCATE", "TRIGGER"):
                granted = conn.execute(
                    "SELECT has_table_privilege(current_user, %s, %s)", (table, privilege)
                ).fetchone()[0]
                assert not granted, (table, privilege)
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("UPDATE journal_entries SET status = 'noop'")


def test_every_table_is_classified_and_privileges_match_the_class(dsn):
    """A new table fails this test until it is put in JOURNAL or WORKING_STATE here and
    granted to the writer in its migration."""
    query = (
        "SELECT c.relname, "
        + ", ".join(
            f"has_table_privilege(%(role)s, c.oid, '{p}')"
            for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
        )
        + " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1"
    )
    with psycopg.connect(dsn) as conn:
        writer = {row[0]: row[1:] for row in conn.execute(query, {"role": ROLES.writer})}
        reader = {row[0]: row[1:] for row in conn.execute(query, {"role": ROLES.reader})}
        # Column-level: a reject's resolution is all the writer may change of it.
        columns = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'rejected_events'::regclass "
            "AND attnum > 0 AND has_column_privilege(%s, attrelid, attnum, 'UPDATE') "
            "ORDER BY 1",
            (ROLES.writer,),
        ).fetchall()
    assert sorted(writer) == sorted(JOURNAL + WORKING_STATE + OTHER)
    for table, privileges in writer.items():
        select, insert, update, delete, truncate, references, trigger = privileges
        assert select and not (truncate or references or trigger), table
        if table in JOURNAL:
            assert insert and not update and not delete, table
        elif table in WORKING_STATE:
            assert insert and update, table
            assert delete == (table in ("shard_leases", "account_status")), table
        else:
            assert not (insert or update or delete), table
    for table, privileges in reader.items():
        assert privileges == (True, False, False, False, False, False, False), table
    assert columns == [("resolution",), ("resolved_at",)]


def test_the_reader_writes_nothing(journal, reader_dsn):
    with attacker(reader_dsn) as conn:
        tables = [
            t
            for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        assert sorted(tables) == sorted(JOURNAL + WORKING_STATE + OTHER)
        for table in tables:
            (column,) = conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                "AND attidentity = '' AND NOT attisdropped ORDER BY attnum LIMIT 1",
                (table,),
            ).fetchone()
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= 0
            for statement in (
                f"INSERT INTO {table} DEFAULT VALUES",
                f"UPDATE {table} SET {column} = {column}",
                f"DELETE FROM {table}",
                f"TRUNCATE {table}",
            ):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM ledger_prune('30 days', '30 days')")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SET session_replication_role = replica")


def test_the_workers_connect_as_the_writer(ledger):
    """The harness (consumer, projections, relay) runs on the writer's URL, end to end."""
    ledger.open_account("w-1")
    ledger.use("w-1", output_tokens=100_000)
    ledger.settle(2)
    user = ledger.db.execute("SELECT current_user").fetchone()[0]
    assert user == ROLES.writer
    sessions = ledger.db.execute(
        "SELECT DISTINCT usename FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'ledger'"
    ).fetchall()
    assert sessions == [(ROLES.writer,)]
