"""The seeded fault schedule and the thread that injects it.

A schedule is a list of faults, each due at a fraction of the run's journaling progress (so the
same seed replays the same schedule whatever the machine's speed):

    kill    SIGKILL one `ledger worker` process (ledger, projections or relay), restart it
    broker  SIGKILL one Kafka node, restart it after a while (one node at a time)
    pg      `pg_ctl stop -m immediate`, then start PostgreSQL again on the same port
    stop    SIGSTOP the ledger worker holding the most shards, SIGCONT it after `stop_s`
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable

import structlog

from ledger.chaos.processes import KILLABLE, Supervisor

log = structlog.get_logger(__name__)

FAULT_KINDS = ("kill", "broker", "pg", "stop")


@dataclasses.dataclass(frozen=True)
class Fault:
    at: float  # fraction of the run's progress (0..1) at which it is due
    kind: str
    target: str  # worker name, broker node id, "postgres"
    hold_s: float  # how long it stays down (stopped) before the restart (SIGCONT)

    def __str__(self) -> str:
        return f"{self.at:.3f} {self.kind} {self.target} {self.hold_s:.1f}s"


@dataclasses.dataclass
class Injected:
    fault: Fault
    started: float  # wall clock (time.time()) of the injection
    restored: float | None = None  # when the restart (SIGCONT) was done
    error: str | None = None


def plan(
    seed: int,
    counts: dict[str, int],
    *,
    brokers: int,
    stop_s: float,
    workers: tuple[str, ...] = KILLABLE,
) -> list[Fault]:
    """The faults of a run: `counts[kind]` of each kind at seeded moments in 5–90 % of it."""
    rng = random.Random(f"{seed}:faults")
    faults = []
    for kind in FAULT_KINDS:
        for _ in range(counts.get(kind, 0)):
            at = rng.uniform(0.05, 0.9)
            if kind == "kill":
                faults.append(Fault(at, kind, rng.choice(workers), rng.uniform(0.2, 3.0)))
            elif kind == "broker" and brokers > 0:
                node = rng.randrange(1, brokers + 1)
                faults.append(Fault(at, kind, str(node), rng.uniform(3.0, 15.0)))
            elif kind == "pg":
                faults.append(Fault(at, kind, "postgres", rng.uniform(0.5, 4.0)))
            elif kind == "stop":
                faults.append(Fault(at, kind, "shard-holder", stop_s))
    return sorted(faults, key=lambda f: f.at)


class Injector:
    def __init__(
        self,
        faults: list[Fault],
        *,
        supervisor: Supervisor,
        kill_broker: Callable[[int], None],
        start_broker: Callable[[int], None],
        stop_postgres: Callable[[], None],
        start_postgres: Callable[[], None],
        progress: Callable[[], float | None],
        traffic_done: Callable[[], bool],
        stop: threading.Event,
        holder: Callable[[], str | None] | None = None,
    ):
        self.faults = faults
        self.holder = holder or supervisor.shard_holder
        self.supervisor = supervisor
        self.kill_broker, self.start_broker = kill_broker, start_broker
        self.stop_postgres, self.start_postgres = stop_postgres, start_postgres
        self.progress = progress
        self.traffic_done = traffic_done
        self.stop = stop
        self.injected: list[Injected] = []
        self.pg_down = threading.Event()

    def run(self) -> None:
        last, last_change = -1.0, time.monotonic()
        for fault in self.faults:
            while not self.stop.is_set():
                done = self.progress()
                if done is not None and done != last:
                    last, last_change = done, time.monotonic()
                if done is not None and done >= fault.at:
                    break
                # Progress stuck after the traffic ended (a stalled shard): inject the rest
                # anyway, so every scheduled fault happens.
                if self.traffic_done() and time.monotonic() - last_change > 20:
                    break
                self.stop.wait(0.5)
            if self.stop.is_set():
                return
            self.inject(fault)
            self._settle()

    def _settle(self, timeout: float = 30.0) -> None:
        """One fault at a time: after a restart, wait until the journal moves again (or
        `timeout`), so the next fault hits a running system and recoveries can be told apart."""
        before = self.progress()
        deadline = time.monotonic() + timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            now = self.progress()
            if now is not None and before is not None and now > before:
                return
            if before is None:
                before = now
            if self.traffic_done():
                return
            self.stop.wait(0.5)

    def _steady_holder(self, timeout: float = 60.0) -> str:
        """A ledger worker that holds shards and still does a couple of seconds later (not one
        about to exit after a PostgreSQL restart)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            holder = self.holder()
            if holder is not None:
                self.stop.wait(2.0)
                if self.holder() == holder:
                    return holder
            self.stop.wait(0.5)
        return self.holder() or "ledger-1"

    def inject(self, fault: Fault) -> None:
        record = Injected(fault, time.time())
        self.injected.append(record)
        log.info("chaos.fault", fault=str(fault))
        try:
            if fault.kind == "kill":
                self.supervisor.kill(fault.target)
                self.stop.wait(fault.hold_s)
                self.supervisor.start(fault.target)
            elif fault.kind == "broker":
                self.kill_broker(int(fault.target))
                self.stop.wait(fault.hold_s)
                self.start_broker(int(fault.target))
            elif fault.kind == "pg":
                self.pg_down.set()
                try:
                    self.stop_postgres()
                    self.stop.wait(fault.hold_s)
                    self.start_postgres()
                finally:
                    self.pg_down.clear()
            elif fault.kind == "stop":
                holder = self._steady_holder()
                record.fault = dataclasses.replace(fault, target=holder)
                self.supervisor.pause(holder)
                try:
                    self.stop.wait(fault.hold_s)
                finally:
                    self.supervisor.resume(holder)
            record.restored = time.time()
        except Exception as exc:
            record.error = str(exc)
            log.error("chaos.fault_failed", fault=str(fault), error=str(exc))
