"""Secrets never printed: every command that can print a DSN, the worker's start-up logs and
the errors that name a database are run with URLs carrying real passwords (the stack's own,
from its password file), and their stdout and stderr are searched for them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ledger.redact import redact
from ledger.runner import with_database
from tests.conftest import database_name, new_database
from tests.test_cli import ledger_cli


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://ledger:s3cr/t@db:5432/x", "postgresql://ledger:***@db:5432/x"),
        ("at mysql://u:pw@h/db: no", "at mysql://u:***@h/db: no"),
        ("host=h password=abc user=u", "host=h password=*** user=u"),
        ("host=h password = 'a b\\' c' user=u", "host=h password = *** user=u"),
        (
            "postgresql://u@h/d?password=abc&sslmode=require",
            "postgresql://u@h/d?password=***&sslmode=require",
        ),
        ('{"dsn": "postgresql://w:pp@h:1/d"}', '{"dsn": "postgresql://w:***@h:1/d"}'),
        ("postgresql://w@h:1/d?passfile=/a/pgpass", "postgresql://w@h:1/d?passfile=/a/pgpass"),
    ],
)
def test_redact_hides_every_password_and_nothing_else(text, shown):
    assert redact(text) == shown


def stack_passwords(home: Path) -> dict[str, str]:
    lines = (home / "postgres" / "pgpass").read_text().splitlines()
    return {line.split(":")[3]: line.split(":")[4] for line in lines}


def inline(url: str, password: str) -> str:
    """`url` (a stack URL naming the password file) with the password written in instead."""
    parts = urlsplit(url)
    return f"postgresql://{parts.username}:{password}@{parts.hostname}:{parts.port}{parts.path}"


def assert_no_secret(outputs: dict[str, str], secrets: list[str]) -> None:
    for what, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"{what} printed a password:\n{text}"


def test_no_command_prints_a_password(stack, dsn, base_settings):
    passwords = stack_passwords(base_settings.home.resolve())
    secrets = list(passwords.values())
    assert len(secrets) == 4 and all(len(s) >= 20 for s in secrets)
    writer = inline(dsn, passwords["ledger_writer"])
    owner = inline(with_database(stack.owner_dsn, database_name(dsn)), passwords["ledger_owner"])
    reader = inline(with_database(stack.reader_dsn, database_name(dsn)), passwords["ledger_reader"])
    env = {
        "LEDGER_KAFKA_BOOTSTRAP": stack.bootstrap,
        "LEDGER_DATABASE_URL": writer,
        "LEDGER_OWNER_DATABASE_URL": owner,
        "LEDGER_READER_DATABASE_URL": reader,
        "LEDGER_LOG_LEVEL": "DEBUG",
        "LEDGER_LOG_FORMAT": "json",
        "LEDGER_HOME": str(base_settings.home),
    }
    empty = new_database(stack)
    commands = [
        ("stack", "up"),
        ("stack", "status"),
        ("db", "migrate"),
        ("trial-balance",),
        ("verify",),
        ("rejects", "list"),
        ("rejects", "show", "1"),
        ("outbox", "parked"),
        ("offsets", "show"),
        ("account", "show", "nobody"),
        ("invoices", "list", "--month", "2026-03"),
        ("audit", "--account", "nobody", "--month", "2026-03"),
        ("projections", "rebuild"),
        ("prune",),
    ]
    outputs = {}
    for args in commands:
        result = ledger_cli(*args, env=env)
        assert result.returncode in (0, 1, 4), (args, result.stderr)  # 1: audit of nobody
        assert "Traceback" not in result.stderr and "cannot connect" not in result.stderr
        outputs[" ".join(args)] = result.stdout + result.stderr
    assert "database url:    postgresql://ledger_writer:***@" in outputs["stack up"]
    assert "owner url:       postgresql://ledger_owner:***@" in outputs["stack up"]

    target = inline(empty, passwords["ledger_writer"])
    replayed = ledger_cli(
        "replay",
        "--from-database-url",
        reader,
        env=env
        | {
            "LEDGER_DATABASE_URL": target,
            "LEDGER_OWNER_DATABASE_URL": inline(
                with_database(stack.owner_dsn, database_name(empty)), passwords["ledger_owner"]
            ),
        },
    )
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 0 events into postgresql://ledger_writer:***@" in replayed.stdout
    outputs["replay"] = replayed.stdout + replayed.stderr

    # Errors that name the database: unreachable, not migrated, a bad scheme.
    unreachable = writer.replace(f":{urlsplit(writer).port}/", ":1/")
    for what, changes in {
        "unreachable": {
            "LEDGER_DATABASE_URL": unreachable,
            "LEDGER_READER_DATABASE_URL": unreachable,
        },
        "unmigrated": {"LEDGER_READER_DATABASE_URL": with_database(reader, "postgres")},
        "bad scheme": {"LEDGER_DATABASE_URL": "mysql://ledger:" + secrets[0] + "@db/ledger"},
    }.items():
        failed = ledger_cli("trial-balance", env=env | changes)
        assert failed.returncode in (1, 2), (what, failed.stdout, failed.stderr)
        assert ":***@" in failed.stderr, (what, failed.stderr)
        outputs[what] = failed.stdout + failed.stderr

    outputs["worker"] = worker_start_up(env)
    assert_no_secret(outputs, secrets)


def worker_start_up(env: dict[str, str]) -> str:
    """`ledger worker` until it has logged its start (DEBUG: every library record too), then
    SIGTERM; everything it printed."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ledger.cli",
                "worker",
                "--role",
                "projections",
                "--role",
                "relay",
            ],
            env=os.environ | env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                out.seek(0)
                printed = out.read()
                if b"relay_started" in printed and b"projection_worker_started" in printed:
                    break
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        out.seek(0)
        text = out.read().decode()
    assert "relay_started" in text and "projection_worker_started" in text, text
    return text


def test_a_local_stack_never_prints_its_passwords(stack, base_settings):
    """`ledger stack up` on a new PostgreSQL (Kafka is the session's): initdb, roles, DSNs."""
    home = Path(tempfile.mkdtemp(prefix="ledger-redaction-"))
    env = {
        "LEDGER_HOME": str(home),
        "LEDGER_KAFKA_BOOTSTRAP": stack.bootstrap,
        "LEDGER_LOG_LEVEL": "DEBUG",
        "LEDGER_LOG_FORMAT": "json",
    }
    try:
        up = ledger_cli("stack", "up", env=env)
        assert up.returncode == 0, up.stderr
        status = ledger_cli("stack", "status", env=env)
        again = ledger_cli("stack", "up", env=env)
        migrate = ledger_cli("db", "migrate", env=env)
        assert migrate.returncode == 0, migrate.stderr
        passwords = stack_passwords(home)
        assert set(passwords) == {"postgres", "ledger_owner", "ledger_writer", "ledger_reader"}
        assert (home / "postgres" / "pgpass").stat().st_mode & 0o777 == 0o600
        assert json.loads(status.stdout)["postgres"]["alive"] is True
        outputs = {
            "stack up": up.stdout + up.stderr,
            "stack status": status.stdout + status.stderr,
            "stack up again": again.stdout + again.stderr,
            "db migrate": migrate.stdout + migrate.stderr,
        }
        for what, text in outputs.items():
            assert "PASSWORD" not in text.upper().replace("PASSFILE", ""), (what, text)
        assert_no_secret(outputs, list(passwords.values()))
        # What reached the server's own log file is not ours to print, but it holds no
        # password either: they are sent as SCRAM verifiers.
        server_log = (home / "postgres" / "postgres.log").read_text()
        assert_no_secret({"postgres.log": server_log}, list(passwords.values()))
    finally:
        ledger_cli("stack", "down", env=env)
        shutil.rmtree(home, ignore_errors=True)
