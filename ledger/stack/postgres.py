"""A throwaway PostgreSQL cluster for development: initdb once, pg_ctl start/stop.

State lives in `<home>/postgres/`:

    data/           the cluster (initdb -A scram-sha-256 -U postgres, UTF8, C locale)
    run/            the Unix socket directory
    pgpass          the roles' generated passwords, a libpq password file (mode 0600); the
                    DSNs name it (`?passfile=`), so no password is ever part of a DSN
    postgres.log    the server log (pg_ctl -l; previous run kept as postgres.log.1)
    pid             the postmaster's pid (a copy of the first line of data/postmaster.pid)

PostgreSQL refuses to run as root. When we are root, initdb, pg_ctl and the server run as
the `postgres` OS user: the directory is chowned to it and every ancestor directory gets
the o+x (search) bit so that user can reach it.

Authentication is SCRAM-SHA-256 for every connection, never `trust`. The bootstrap superuser
(`postgres`) only creates the cluster, the ledger's three roles (owner, writer, reader; names
from the settings) and the `ledger` database, owned by the owner role (which may create
databases: the tests, the demo and the benchmark make their own, and end the sessions in them
when it drops them: pg_signal_backend). Passwords are generated at
init, kept only in `pgpass`, and sent to the server as SCRAM verifiers, never in clear.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog

from ledger.errors import StackError
from ledger.settings import Settings
from ledger.stack import procs

log = structlog.get_logger()

ADMIN = "postgres"  # the bootstrap superuser: cluster, roles and the database only
DATABASE = "ledger"
OS_USER = "postgres"  # who runs the server when we are root
SERVER_OPTIONS = {"max_connections": "200", "shared_buffers": "256MB"}
START_TIMEOUT_S = 60
READY_TIMEOUT_S = 30.0


def state_dir(settings: Settings) -> Path:
    return settings.home.resolve() / "postgres"


def data_dir(settings: Settings) -> Path:
    return state_dir(settings) / "data"


def log_path(settings: Settings) -> Path:
    return state_dir(settings) / "postgres.log"


def pid_path(settings: Settings) -> Path:
    return state_dir(settings) / "pid"


def marker(settings: Settings) -> str:
    """Only this cluster's postmaster has its data directory in its command line."""
    return str(data_dir(settings))


def passfile(settings: Settings) -> Path:
    return state_dir(settings) / "pgpass"


def user(settings: Settings, role: str) -> str:
    """The login name of `role`: "admin" (the bootstrap superuser), "owner", "writer" or
    "reader" (the names from the settings)."""
    if role == "admin":
        return ADMIN
    return getattr(settings.db_roles, role)


def dsn(settings: Settings, port: int, role: str = "writer", database: str = DATABASE) -> str:
    """The URL `role` connects with; its password is in the stack's password file."""
    return (
        f"postgresql://{user(settings, role)}@{procs.HOST}:{port}/{database}"
        f"?passfile={quote(str(passfile(settings)))}"
    )


def _passwords(settings: Settings) -> dict[str, str]:
    """user → password, from the password file (lines `*:*:*:user:password`)."""
    try:
        text = passfile(settings).read_text()
    except FileNotFoundError:
        return {}
    entries = (line.split(":") for line in text.splitlines() if line.strip())
    return {fields[3]: fields[4] for fields in entries if len(fields) == 5}


def _ensure_passwords(settings: Settings) -> dict[str, str]:
    """Generate a password for every role that has none yet; the file stays mode 0600."""
    known = _passwords(settings)
    users = [user(settings, role) for role in ("admin", "owner", "writer", "reader")]
    missing = [name for name in users if name not in known]
    if missing:
        known |= {name: secrets.token_urlsafe(24) for name in missing}
        path = passfile(settings)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.writelines(f"*:*:*:{name}:{password}\n" for name, password in known.items())
        os.replace(tmp, path)
    os.chmod(passfile(settings), 0o600)
    return known


def bindir() -> Path:
    """PostgreSQL's server binaries: `pg_config --bindir`, else the newest Debian-style dir."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise StackError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found via pg_config --bindir or in "
        "/usr/lib/postgresql/*/bin; install PostgreSQL or set LEDGER_DATABASE_URL"
    )


def _as_server_user() -> dict[str, Any]:
    """subprocess keyword arguments that run a command as the user who owns the cluster."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(OS_USER)
    except KeyError:
        raise StackError(
            f"running as root, and PostgreSQL refuses to; no {OS_USER!r} OS user to run it as "
            "(create one, run as another user, or set LEDGER_DATABASE_URL)"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _run(cmd: list[str], settings: Settings, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    env.pop("PGDATA", None)
    try:
        return subprocess.run(
            cmd,
            cwd=state_dir(settings),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **_as_server_user(),
        )
    except subprocess.TimeoutExpired as exc:
        raise procs.failure(
            f"{Path(cmd[0]).name} did not finish in {timeout:.0f}s", log_path(settings)
        ) from exc


def _prepare_dirs(settings: Settings) -> Path:
    """Create the state and socket dirs, owned by whoever runs the server; return sockdir."""
    directory = state_dir(settings)
    sockdir = directory / "run"
    sockdir.mkdir(parents=True, exist_ok=True)
    as_user = _as_server_user()
    if as_user:
        for path in (directory, sockdir, *directory.glob("postgres.log*")):
            os.chown(path, as_user["user"], as_user["group"])
        procs.ensure_traversable(directory)
    return sockdir


def running_pid(settings: Settings) -> int | None:
    pid = procs.read_pid(data_dir(settings) / "postmaster.pid")
    return pid if procs.is_alive(pid, marker(settings)) else None


def running_port(settings: Settings) -> int | None:
    """The running postmaster's port (4th line of postmaster.pid)."""
    if running_pid(settings) is None:
        return None
    try:
        lines = (data_dir(settings) / "postmaster.pid").read_text().splitlines()
        return int(lines[3])
    except (OSError, IndexError, ValueError):
        return None


def start(settings: Settings, state: dict, options: dict[str, str] | None = None) -> dict:
    """initdb (first time), start the server, create the `ledger` database; return state.
    `options` are server settings added to (or overriding) SERVER_OPTIONS for this start."""
    bins = bindir()
    sockdir = _prepare_dirs(settings)
    data = data_dir(settings)
    if (data / "PG_VERSION").is_file() and ADMIN not in _passwords(settings):
        raise StackError(
            f"the PostgreSQL cluster in {data} was made without passwords (trust "
            "authentication) by an older ledger; stop it (`ledger stack down`) and delete "
            "that directory to make a new one"
        )
    if not (data / "PG_VERSION").is_file():
        if data.exists():
            log.warning("postgres.reinit", data=str(data), reason="incomplete data directory")
            shutil.rmtree(data)
        _initdb(settings, bins, data)

    port = procs.pick_port(state.get("port"))
    # Unix socket paths are limited to ~107 bytes; past that, TCP only.
    socket_dirs = str(sockdir) if len(str(sockdir)) < 90 else ""
    server = {**SERVER_OPTIONS, **(options or {})}
    options_line = [f"-p {port}", f"-k {shlex.quote(socket_dirs)}"]
    options_line += [f"-c listen_addresses={procs.HOST}"]
    options_line += [f"-c {name}={value}" for name, value in server.items()]
    logfile = log_path(settings)
    procs.rotate(logfile)
    log.info("postgres.starting", port=port, data=str(data), log=str(logfile))
    started = time.monotonic()
    out = _run(
        [
            str(bins / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(logfile),
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "-o",
            " ".join(options_line),
            "start",
        ],
        settings,
        timeout=START_TIMEOUT_S + 10,
    )
    if out.returncode != 0:
        stop(settings)
        raise procs.failure(
            f"PostgreSQL did not start (pg_ctl exit code {out.returncode}: "
            f"{(out.stdout + out.stderr).strip()[-500:]})",
            logfile,
        )
    pid = running_pid(settings)
    if pid is None:
        raise procs.failure("PostgreSQL reported started but its postmaster is gone", logfile)
    procs.write_text_atomic(pid_path(settings), f"{pid}\n")
    wait_ready(dsn(settings, port, "admin", "postgres"), pid=pid, logfile=logfile)
    _create_roles_and_database(settings, port)
    log.info(
        "postgres.ready", dsn=dsn(settings, port), seconds=round(time.monotonic() - started, 1)
    )
    return {"port": port}


def _initdb(settings: Settings, bins: Path, data: Path) -> None:
    """A new cluster with SCRAM authentication; the bootstrap superuser's password comes from
    a file readable only by the server's user, deleted right after."""
    password = _ensure_passwords(settings)[ADMIN]
    pwfile = state_dir(settings) / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    as_user = _as_server_user()
    if as_user:
        os.chown(pwfile, as_user["user"], as_user["group"])
    log.info("postgres.initdb", data=str(data), auth="scram-sha-256")
    try:
        out = _run(
            [
                str(bins / "initdb"),
                "-D",
                str(data),
                "-A",
                "scram-sha-256",
                "-U",
                ADMIN,
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            settings,
            timeout=120,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if out.returncode != 0:
        output = (out.stdout + out.stderr).strip()
        raise StackError(f"initdb failed (exit code {out.returncode}):\n{output}")


def _create_roles_and_database(settings: Settings, port: int) -> None:
    """As the bootstrap superuser: the owner, writer and reader login roles with their
    passwords (as SCRAM verifiers), and the `ledger` database owned by the owner. Idempotent:
    run at every start, so renamed roles (LEDGER_DB_*_ROLE) are made too."""
    import psycopg
    from psycopg import sql

    passwords = _ensure_passwords(settings)
    attributes = {
        "owner": "LOGIN CREATEDB NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS",
        "writer": "LOGIN NOCREATEDB NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS",
        "reader": "LOGIN NOCREATEDB NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS",
    }
    admin = dsn(settings, port, "admin", "postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        for role, attrs in attributes.items():
            name = user(settings, role)
            verifier = conn.pgconn.encrypt_password(
                passwords[name].encode(), name.encode(), b"scram-sha-256"
            ).decode()
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            verb = "ALTER" if exists.fetchone() else "CREATE"
            conn.execute(
                sql.SQL(f"{verb} ROLE {{}} {attrs} PASSWORD {{}}").format(
                    sql.Identifier(name), sql.Literal(verifier)
                )
            )
        owner = user(settings, "owner")
        # The owner drops the databases it made (tests, demo, benchmark) WITH (FORCE), which
        # ends the writer's and reader's sessions in them.
        conn.execute(sql.SQL("GRANT pg_signal_backend TO {}").format(sql.Identifier(owner)))
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if exists.fetchone() is None:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(DATABASE), sql.Identifier(owner)
                )
            )
            log.info("postgres.created_database", database=DATABASE, owner=owner)


def answers(url: str, timeout_s: int = 3) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=timeout_s) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def wait_ready(url: str, *, pid: int, logfile: Path, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.is_alive(pid):
            raise procs.failure(f"PostgreSQL (pid {pid}) exited during start-up", logfile)
        if answers(url):
            return
        time.sleep(0.2)
    raise procs.failure(f"PostgreSQL did not accept connections within {timeout:.0f}s", logfile)


def stop(settings: Settings) -> None:
    """pg_ctl stop -m fast; if that fails, signal the postmaster; verify its backends exit."""
    pids = {running_pid(settings)}
    # Also a postmaster of ours whose postmaster.pid was lost.
    pids.update(procs.pids_matching("postgres", f"-D {marker(settings)} "))
    for pid in pids:
        if pid is None or not procs.is_alive(pid, marker(settings)):
            continue
        log.info("postgres.stopping", pid=pid)
        tree = procs.process_tree(pid)  # the postmaster and its backends
        out = _run(
            [str(bindir() / "pg_ctl"), "-D", str(data_dir(settings)), "-m", "fast", "-w", "stop"],
            settings,
            timeout=70,
        )
        if out.returncode != 0:
            log.warning("postgres.pg_ctl_stop_failed", output=(out.stdout + out.stderr).strip())
            # SIGINT is PostgreSQL's fast shutdown; SIGKILL for the whole tree after 30 s.
            procs.terminate(
                pid, name="PostgreSQL", marker=marker(settings), timeout=30.0, sig=signal.SIGINT
            )
        procs.ensure_gone(tree, name="PostgreSQL")
    pid_path(settings).unlink(missing_ok=True)


def stop_immediate(settings: Settings) -> None:
    """`pg_ctl stop -m immediate`: the postmaster and its backends quit without a checkpoint,
    as in a power cut (the next start replays the WAL). For fault injection."""
    pid = running_pid(settings)
    if pid is None:
        return
    tree = procs.process_tree(pid)
    log.info("postgres.stopping_immediate", pid=pid)
    out = _run(
        [str(bindir() / "pg_ctl"), "-D", str(data_dir(settings)), "-m", "immediate", "-w", "stop"],
        settings,
        timeout=70,
    )
    if out.returncode != 0:
        raise StackError(f"pg_ctl stop -m immediate failed: {(out.stdout + out.stderr).strip()}")
    procs.ensure_gone(tree, name="PostgreSQL")
