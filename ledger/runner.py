"""What `ledger demo` and the benchmark both do to run the ledger for a while: a database of
their own on the PostgreSQL server, and `ledger worker` as a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import structlog
from psycopg import sql

from ledger import db
from ledger.db import QUERIES
from ledger.settings import Settings

log = structlog.get_logger(__name__)


def worker_env(settings: Settings, bootstrap: str, dsn: str) -> dict[str, str]:
    """The environment of a `ledger worker` child: every setting as a LEDGER_* variable (none
    inherited), on these services, logging JSON lines to its log file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    # The worker is the writer: it gets neither the owner's URL nor the reader's.
    own = {
        k: v
        for k, v in settings.to_env().items()
        if k not in ("LEDGER_OWNER_DATABASE_URL", "LEDGER_READER_DATABASE_URL")
    }
    return (
        env
        | own
        | {
            "LEDGER_KAFKA_BOOTSTRAP": bootstrap,
            "LEDGER_DATABASE_URL": dsn,
            "LEDGER_LOG_FORMAT": "json",
        }
    )


def with_database(dsn: str, name: str) -> str:
    """`dsn` with its database replaced by `name`."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


def on_server(admin_dsn: str, query: str, database: str) -> None:
    """Run the named statement about a whole database (`CREATE DATABASE {}`, `DROP DATABASE
    {}`), with `database` as its identifier, on the server of `admin_dsn`."""
    with db.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL(QUERIES[query]).format(sql.Identifier(database)))  # type: ignore[arg-type]


def ledger_command(*args: str) -> list[str]:
    """`ledger <args>`, run by this Python."""
    return [sys.executable, "-m", "ledger.cli", *args]


def worker_command(roles: Iterable[str]) -> list[str]:
    """`ledger worker --role ...`, run by this Python."""
    return ledger_command("worker", *(arg for role in roles for arg in ("--role", role)))


def start_worker(
    roles: Iterable[str], env: dict[str, str], log_path: Path, *, own_session: bool = False
) -> subprocess.Popen:
    """The worker with these roles and this environment, its output (both streams) in
    `log_path`. In its own session, Ctrl-C in the terminal does not reach it: the parent
    stops it itself."""
    with open(log_path, "wb") as logfile:
        return subprocess.Popen(
            worker_command(roles),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=own_session,
        )


def stop_worker(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds: its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("worker_kill", pid=proc.pid)
            proc.kill()
            proc.wait()
    return proc.returncode
