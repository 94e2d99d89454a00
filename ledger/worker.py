"""`ledger worker`: the ledger consumer, the projection worker, the outbox relay and the
scheduler together, each in its own thread, or any of them alone (so each role scales on its
own; run one scheduler per deployment, more only send duplicate ticks that are dropped).

Each role runs under a supervisor in its thread: a role that raises (or returns before it
was asked to stop) is logged on one line (`role_crashed`: error class and message; the
traceback only at DEBUG) and started again after a capped exponential backoff (0.5 s doubling
to 10 s, back to 0.5 s once a run has lasted `HEALTHY_AFTER_S`); the process keeps running.
The roles also ride out a dependency's outage on their own (they reconnect with backoff and
log `dependency_down` every few seconds); the supervisor is the last resort.

SIGTERM/SIGINT set one stop event: every role, and every supervisor waiting in backoff,
stops; the consumer finishes and commits its batch, the projection commits its step, the
relay its publish; then the process exits 0. A role stuck in a client call (a dependency
that does not answer) is not waited for beyond `SHUTDOWN_GRACE_S`: its thread is a daemon,
and whatever it had not committed is redone from the stored offsets and positions.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping

import structlog

from ledger import db, gc_tuning, health
from ledger.backoff import Backoff, Outage
from ledger.consumer import run_ledger_consumer
from ledger.db import DatabaseError
from ledger.log import describe_error
from ledger.relay import OutboxRelay
from ledger.scheduler import run_scheduler
from ledger.settings import Settings
from projections.worker import ProjectionWorker

log = structlog.get_logger(__name__)

ROLES = ("ledger", "projections", "relay", "scheduler")

RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 10.0
# A run that lasted this long was healthy: the next restart waits RESTART_INITIAL_S again.
HEALTHY_AFTER_S = 30.0
# After SIGTERM, how long the process waits for its roles to finish before it exits anyway.
SHUTDOWN_GRACE_S = 4.0
# After this long the roles have imported their code and made their clients and connections:
# what the process holds then is frozen out of the collector's scans (`gc_tuning.settle`).
SETTLE_AFTER_S = 5.0


def start_roles(
    settings: Settings,
    bootstrap: str,
    dsn: str,
    roles: tuple[str, ...],
    stop: threading.Event,
    failures: list[str] | None = None,
    *,
    targets: Mapping[str, Callable[[], None]] | None = None,
) -> list[threading.Thread]:
    """Start each role in its own supervised thread; they run until `stop` is set. Every
    crash appends the role's name to `failures` (when given). `targets` adds or replaces
    role targets (a callable that runs the role until `stop` is set)."""
    known: dict[str, Callable[[], None]] = {
        "ledger": behind_postgresql(
            "ledger", dsn, stop, lambda: run_ledger_consumer(settings, bootstrap, dsn, stop)
        ),
        "projections": behind_postgresql(
            "projections", dsn, stop, lambda: ProjectionWorker(settings, dsn).run(stop)
        ),
        "relay": behind_postgresql(
            "relay", dsn, stop, lambda: OutboxRelay(settings, bootstrap, dsn).run(stop)
        ),
        "scheduler": lambda: run_scheduler(settings, bootstrap, stop),
    }
    known.update(targets or {})
    threads = []
    for role in roles:
        thread = threading.Thread(
            target=supervise(role, known[role], stop, failures=failures),
            name=role,
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    return threads


def postgresql_answers(role: str, dsn: str, stop: threading.Event) -> bool:
    """Wait until PostgreSQL accepts a connection (retrying 0.2 s doubling to 2 s, one
    `dependency_down` line every few seconds); False if `stop` was set first. Roles that
    need the database start behind it, so a role restarted during an outage waits here
    instead of crashing again and again (and pushing its restart backoff to the cap)."""
    outage = Outage(role, "postgresql")
    while not stop.is_set():
        try:
            db.connect(dsn).close()
        except DatabaseError as exc:
            stop.wait(outage.failed(exc))
            continue
        outage.ok()
        return True
    return False


def behind_postgresql(
    role: str, dsn: str, stop: threading.Event, run: Callable[[], None]
) -> Callable[[], None]:
    """A role target that starts `run` once PostgreSQL answers."""

    def target() -> None:
        if postgresql_answers(role, dsn, stop):
            run()

    return target


def supervise(
    role: str,
    target: Callable[[], None],
    stop: threading.Event,
    *,
    failures: list[str] | None = None,
    backoff: Backoff | None = None,
    healthy_after_s: float = HEALTHY_AFTER_S,
) -> Callable[[], None]:
    """A thread body that runs `target` until `stop` is set, restarting it after each crash
    (or early return) with capped exponential backoff."""
    backoff = backoff or Backoff(RESTART_INITIAL_S, RESTART_MAX_S)

    def run() -> None:
        restarts = 0
        while not stop.is_set():
            started = time.monotonic()
            error: Exception | None = None
            try:
                target()
            except Exception as exc:
                error = exc
            if stop.is_set():
                if error is not None:
                    log.error("role_crashed_while_stopping", role=role, error=describe_error(error))
                    log.debug("role_crash_traceback", role=role, exc_info=error)
                break
            if time.monotonic() - started >= healthy_after_s:
                backoff.reset()
            delay = backoff.next()
            if failures is not None:
                failures.append(role)
            if error is None:
                log.error("role_exited", role=role, restart_in_s=delay, restarts=restarts)
            else:
                log.error(
                    "role_crashed",
                    role=role,
                    error=describe_error(error),
                    restart_in_s=delay,
                    restarts=restarts,
                )
                log.debug("role_crash_traceback", role=role, exc_info=error)
            if stop.wait(delay):
                break
            restarts += 1
            log.info("role_restarting", role=role, restarts=restarts)

    return run


def run_worker(settings: Settings, bootstrap: str, dsn: str, roles: tuple[str, ...]) -> int:
    """Run the roles until SIGTERM/SIGINT; 0 once they have stopped (or the grace is over)."""
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gc_tuning.tune(gc_tuning.LIVE)
    server = health.serve(settings, bootstrap, dsn, roles)  # LEDGER_METRICS_PORT (0: none)
    threads = start_roles(settings, bootstrap, dsn, roles, stop)
    log.info("worker_started", roles=list(roles))
    settle_at = time.monotonic() + SETTLE_AFTER_S
    while not stop.wait(0.5):
        if settle_at and time.monotonic() >= settle_at:
            gc_tuning.settle()  # the roles have imported, connected and made their clients
            settle_at = 0.0
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        log.warning("roles_not_stopped", roles=stuck, grace_s=SHUTDOWN_GRACE_S)
    if server is not None:
        server.close()
    log.info("worker_stopped")
    return 0
