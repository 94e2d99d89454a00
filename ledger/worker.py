"""`ledger worker`: the ledger consumer, the projection worker, the outbox relay and the
scheduler together, each in its own thread, or any of them alone (so each role scales on its
own; run one scheduler per deployment, more only send duplicate ticks that are dropped).

SIGTERM/SIGINT set one stop event: the consumer finishes and commits its batch and leaves the
group, the projection commits its step, the relay its publish; then the process exits 0.
"""

from __future__ import annotations

import signal
import threading

import structlog

from ledger.consumer import run_ledger_consumer
from ledger.relay import OutboxRelay
from ledger.scheduler import run_scheduler
from ledger.settings import Settings
from projections.worker import ProjectionWorker

log = structlog.get_logger(__name__)

ROLES = ("ledger", "projections", "relay", "scheduler")


def start_roles(
    settings: Settings,
    bootstrap: str,
    dsn: str,
    roles: tuple[str, ...],
    stop: threading.Event,
    failures: list[str] | None = None,
) -> list[threading.Thread]:
    targets = {
        "ledger": lambda: run_ledger_consumer(settings, bootstrap, dsn, stop),
        "projections": lambda: ProjectionWorker(settings, dsn).run(stop),
        "relay": lambda: OutboxRelay(settings, bootstrap, dsn).run(stop),
        "scheduler": lambda: run_scheduler(settings, bootstrap, stop),
    }
    threads = []
    for role in roles:
        thread = threading.Thread(target=_guard(role, targets[role], stop, failures), name=role)
        thread.start()
        threads.append(thread)
    return threads


def _guard(role, target, stop: threading.Event, failures: list[str] | None):
    def run() -> None:
        try:
            target()
        except Exception:
            log.exception("role_crashed", role=role)
            if failures is not None:
                failures.append(role)
            stop.set()  # one role down takes the process down; the supervisor restarts it

    return run


def run_worker(settings: Settings, bootstrap: str, dsn: str, roles: tuple[str, ...]) -> int:
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    failures: list[str] = []
    threads = start_roles(settings, bootstrap, dsn, roles, stop, failures)
    log.info("worker_started", roles=list(roles))
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.5)
    return 1 if failures else 0
