"""The `ledger worker` processes of a fault run, and their supervisor: it starts each one,
SIGKILLs, SIGSTOPs/SIGCONTs and restarts them on demand, and restarts one that exits on its
own (as systemd or Kubernetes would), counting those exits. It only ever signals processes it
started itself, by pid.

Layout: three ledger workers competing for every shard, one projection worker, one relay,
one scheduler.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import psycopg
import structlog

from ledger import db
from ledger.db import QUERIES
from ledger.runner import start_worker, stop_worker

log = structlog.get_logger(__name__)

LAYOUT = (
    ("ledger-1", ("ledger",)),
    ("ledger-2", ("ledger",)),
    ("ledger-3", ("ledger",)),
    ("projections-1", ("projections",)),
    ("relay-1", ("relay",)),
    ("scheduler-1", ("scheduler",)),
)
KILLABLE = tuple(name for name, roles in LAYOUT if name != "scheduler-1")


@dataclasses.dataclass
class Worker:
    name: str
    roles: tuple[str, ...]
    proc: subprocess.Popen | None = None
    incarnation: int = 0
    log_path: Path | None = None
    expected_down: bool = False


class Supervisor:
    def __init__(self, env: dict[str, str], logdir: Path, layout=LAYOUT):
        self.env = env
        self.logdir = logdir
        self.workers = {name: Worker(name, roles) for name, roles in layout}
        self.exits: Counter[str] = Counter()  # exits nobody asked for, by worker name
        self.exit_codes: list[tuple[str, int]] = []
        self._lock = threading.RLock()

    def start(self, name: str) -> None:
        with self._lock:
            worker = self.workers[name]
            worker.incarnation += 1
            worker.log_path = self.logdir / f"{name}.{worker.incarnation}.log"
            worker.proc = start_worker(worker.roles, self.env, worker.log_path, own_session=True)
            worker.expected_down = False
            log.info("chaos.worker_started", worker=name, pid=worker.proc.pid)

    def start_all(self) -> None:
        for name in self.workers:
            self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL (no clean shutdown); `start` brings it back."""
        with self._lock:
            worker = self.workers[name]
            worker.expected_down = True
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGKILL)
                worker.proc.wait(timeout=30)

    def pause(self, name: str) -> None:
        self._signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self._signal(name, signal.SIGCONT)

    def _signal(self, name: str, sig: signal.Signals) -> None:
        worker = self.workers[name]
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.send_signal(sig)

    def supervise(self) -> None:
        """Restart every worker that exited without being asked to."""
        with self._lock:
            for name, worker in self.workers.items():
                if worker.expected_down or worker.proc is None:
                    continue
                code = worker.proc.poll()
                if code is not None:
                    self.exits[name] += 1
                    self.exit_codes.append((name, code))
                    log.warning("chaos.worker_exited", worker=name, code=code)
                    self.start(name)

    def stop(self, name: str, timeout: float = 60.0) -> None:
        with self._lock:
            worker = self.workers[name]
            worker.expected_down = True
            if worker.proc is not None:
                self.resume(name)
                stop_worker(worker.proc, timeout)

    def stop_all(self) -> None:
        for name in self.workers:
            self.stop(name)

    def assigned_shards(self) -> set[int]:
        """The shards some live ledger worker has taken (from their logs)."""
        out: set[int] = set()
        for worker in self.workers.values():
            running = worker.proc is not None and worker.proc.poll() is None
            if "ledger" in worker.roles and worker.log_path is not None and running:
                out.update(last_assignment(worker.log_path))
        return out

    def shard_holder(self, dsn: str | None = None, group: str | None = None) -> str | None:
        """The ledger worker holding the most shards: from the live rows of `shard_leases`
        (holder "host:pid:…"), or, where there is no such table, its log's last assignment."""
        if dsn is not None and group is not None:
            by_pid = {w.proc.pid: name for name, w in self.workers.items() if w.proc}
            try:
                with db.connect(dsn) as conn:
                    rows = conn.execute(
                        QUERIES["chaos_lease_holders"],
                        (group,),
                    ).fetchall()
                for holder, _ in rows:
                    parts = holder.split(":")
                    if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) in by_pid:
                        return by_pid[int(parts[1])]
                return None
            except psycopg.errors.UndefinedTable:
                pass
            except psycopg.Error:
                return None
        best, most = None, 0
        for name, worker in self.workers.items():
            if "ledger" not in worker.roles or worker.log_path is None:
                continue
            if worker.proc is None or worker.proc.poll() is not None:
                continue
            shards = last_assignment(worker.log_path)
            if len(shards) > most:
                best, most = name, len(shards)
        return best


def last_assignment(log_path: Path) -> list[int]:
    shards: list[int] = []
    try:
        lines = log_path.read_bytes().splitlines()
    except OSError:
        return shards
    for line in lines:
        if b"partitions_assigned" in line and line.startswith(b"{"):
            try:
                shards = list(json.loads(line).get("shards") or [])
            except ValueError:
                continue
    return shards
