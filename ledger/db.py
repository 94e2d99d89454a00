"""PostgreSQL at the edge: connections, named queries, migrations.

Every SQL statement of the package lives in `ledger/sql/queries.sql` under a `-- name: x`
header and is loaded once into `QUERIES`; migrations are the numbered files in
`ledger/sql/migrations/`, applied in order and recorded in `schema_migrations`.
"""

from __future__ import annotations

import re
from importlib import resources

import psycopg
import structlog
from psycopg import sql as pgsql

from ledger.errors import LedgerError
from ledger.redact import redact
from ledger.settings import DbRoles

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


class DatabaseError(LedgerError):
    """The database refused or failed an operation the ledger needs."""


def _load_queries() -> dict[str, str]:
    text = resources.files("ledger.sql").joinpath("queries.sql").read_text("utf-8")
    parts = _NAME.split(text)
    queries = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise DatabaseError(f"queries.sql: query {name!r} defined twice")
        queries[name] = body.strip().rstrip(";")
    return queries


QUERIES: dict[str, str] = _load_queries()
DEFAULT_ROLES = DbRoles()


# A peer that vanished without closing the connection (its host lost power, a network cut,
# a failover that moved the address) is noticed after ~25 s of silence (10 s, then 3 probes
# 5 s apart) instead of the kernel's default of over two hours. Both ends probe: the client,
# so a worker waiting on a dead server gets an error and reconnects; the server (per session,
# `tcp_keepalives_*`), so a dead worker's session ends and frees what it held, above all the
# relay's session-level lock, which no timeout of PostgreSQL's would otherwise release.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
_CLIENT_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": KEEPALIVE_IDLE_S,
    "keepalives_interval": KEEPALIVE_INTERVAL_S,
    "keepalives_count": KEEPALIVE_COUNT,
}
_SERVER_KEEPALIVES = (
    f" -c tcp_keepalives_idle={KEEPALIVE_IDLE_S}"
    f" -c tcp_keepalives_interval={KEEPALIVE_INTERVAL_S}"
    f" -c tcp_keepalives_count={KEEPALIVE_COUNT}"
)


def connect(
    dsn: str,
    *,
    autocommit: bool = False,
    timeout_s: int | None = None,
    idle_in_transaction_timeout_s: int | None = None,
) -> psycopg.Connection:
    """A connection; with `timeout_s`, connecting and every statement give up after that many
    seconds (for probes and scrapes, which must answer even when the server does not); with
    `idle_in_transaction_timeout_s`, the server ends the session when a transaction waits that
    long for its next statement (its worker frozen), which frees the rows it locked.
    Keepalives as above, unless the URL sets its own."""
    options = "-c TimeZone=UTC" + _SERVER_KEEPALIVES
    try:
        given = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise DatabaseError(f"not a PostgreSQL URL: {redact(dsn)}: {redact(str(exc))}") from exc
    extra: dict[str, object] = {k: v for k, v in _CLIENT_KEEPALIVES.items() if k not in given}
    if timeout_s is not None:
        options += f" -c statement_timeout={timeout_s * 1000}"
        extra["connect_timeout"] = timeout_s
    if idle_in_transaction_timeout_s is not None:
        options += f" -c idle_in_transaction_session_timeout={idle_in_transaction_timeout_s * 1000}"
    try:
        # The session time zone is pinned to UTC: timestamps the ledger reads back (audit,
        # reports, verify) never depend on the server's or the client's local zone.
        return psycopg.connect(
            dsn, autocommit=autocommit, application_name="ledger", options=options, **extra
        )
    except psycopg.OperationalError as exc:
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {redact(dsn)}: {redact(str(exc))}"
        ) from exc


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration file, in order."""
    folder = resources.files("ledger.sql").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    # Numbers may skip (a number reserved for a change on another branch), never repeat.
    if len(set(versions)) != len(versions) or versions[:1] not in ([], [1]):
        raise DatabaseError(f"migrations must be numbered 0001.. without duplicates: {versions}")
    return found


def migrate(dsn: str, roles: DbRoles = DEFAULT_ROLES) -> list[int]:
    """Apply the migrations not yet recorded; returns the versions applied. Idempotent.

    Runs as `roles.owner`, so it owns everything it creates: `dsn` is the owner's, or a role
    that may SET ROLE to it (a member, e.g. a managed database's admin)."""
    applied_now = []
    with connect(dsn) as conn:
        (current,) = conn.execute(QUERIES["current_role"]).fetchone()
        if current != roles.owner:
            try:
                conn.execute(pgsql.SQL(QUERIES["set_role"]).format(pgsql.Identifier(roles.owner)))
            except psycopg.Error as exc:
                raise DatabaseError(
                    f"`ledger db migrate` runs as the owner role {roles.owner!r}; {current!r} "
                    f"cannot become it ({exc.diag.message_primary}): connect as the owner "
                    "(LEDGER_OWNER_DATABASE_URL) or grant it membership of that role"
                ) from exc
        conn.execute(QUERIES["set_migration_roles"], tuple(roles))
        conn.execute(QUERIES["create_migrations_table"])
        # One migrator at a time, even when several workers start together.
        conn.execute(QUERIES["lock_migrations"])
        done = {row[0] for row in conn.execute(QUERIES["applied_migrations"])}
        for version, name, sql in migrations():
            if version in done:
                continue
            conn.execute(sql)
            conn.execute(QUERIES["record_migration"], (version, name))
            applied_now.append(version)
            log.info("migration_applied", version=version, name=name)
        conn.commit()
    return applied_now


def require_current_schema(dsn: str) -> str:
    """`dsn`, after checking its database has every migration this ledger knows; a database
    behind (or one never migrated) is refused with the command that fixes it."""
    latest = migrations()[-1][0]
    with connect(dsn) as conn:
        try:
            (applied,) = conn.execute(QUERIES["latest_migration"]).fetchone()
            found = f"schema version {applied}"
        except psycopg.errors.UndefinedTable:
            applied, found = None, "no ledger schema"
        except psycopg.errors.InsufficientPrivilege:  # this role was granted nothing yet
            applied, found = None, "a schema older than its roles (0007)"
    if applied != latest:
        raise DatabaseError(
            f"the database at {redact(dsn)} has {found}; this ledger needs version {latest}: "
            "run `ledger db migrate` (as the owner role)"
        )
    return dsn


def describe_schema(conn: psycopg.Connection) -> dict[str, list[tuple]]:
    """A comparable description of the public schema: tables, columns, constraints, indexes,
    triggers and functions. Two databases with equal descriptions have the same schema."""
    return {
        key: [tuple(row) for row in conn.execute(QUERIES[f"describe_{key}"])]
        for key in ("columns", "constraints", "indexes", "triggers", "functions")
    }
