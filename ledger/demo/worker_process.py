"""The demo's worker: `ledger worker --role ledger --role projections --role relay` as a
real process, configured with the demo's settings, and how the demo knows it is ready."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import structlog

from ledger.errors import LedgerError
from ledger.runner import start_worker, worker_env
from ledger.settings import Settings

log = structlog.get_logger(__name__)

WORKER_ROLES = ("ledger", "projections", "relay")  # no scheduler: the demo sends the ticks


def start_demo_worker(
    settings: Settings, bootstrap: str, dsn: str, log_path: Path
) -> subprocess.Popen:
    """The worker on the demo's topics and database, in its own session: Ctrl-C reaches the
    demo, which stops the worker itself."""
    return start_worker(
        WORKER_ROLES, worker_env(settings, bootstrap, dsn), log_path, own_session=True
    )


def wait_for_assignment(proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Until the worker's ledger consumer has its partitions (so the clock measures the
    ledger, not the consumer group's start-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LedgerError(
                f"the worker exited at start-up (code {proc.returncode}):\n{tail(log_path)}"
            )
        if _partitions_assigned(log_path):
            return
        time.sleep(0.2)
    log.warning("demo.worker_not_assigned", waited_s=timeout)


def _partitions_assigned(log_path: Path) -> bool:
    """Whether the worker's log (JSON lines) shows a non-empty partition assignment."""
    for line in log_path.read_bytes().splitlines():
        if b"partitions_assigned" not in line or not line.startswith(b"{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "partitions_assigned" and entry.get("partitions"):
            return True
    return False


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of the worker's log, for an error message ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
