"""The demo run, step by step (see `ledger.demo`): services, this run's topics and database,
the worker, the downstream reader, the simulated month sent in time order with the clock's
ticks, the wait until everything has caught up, then the summary. `run` always stops the
worker and the reader, however the run ends."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ledger import db, topics
from ledger.db import QUERIES
from ledger.demo.render import print_next_steps, print_summary
from ledger.demo.simulation import simulate
from ledger.demo.status_reader import StatusReader
from ledger.demo.summary import DemoResult, summarise
from ledger.demo.worker_process import (
    WORKER_ROLES,
    start_demo_worker,
    tail,
    wait_for_assignment,
)
from ledger.errors import LedgerError
from ledger.policy import Policy
from ledger.rating import PriceBook
from ledger.redact import redact
from ledger.runner import on_server, stop_worker, with_database
from ledger.settings import Settings

log = structlog.get_logger(__name__)


def run_demo(settings: Settings, *, accounts: int = 1000, seed: int = 7) -> int:
    """`ledger demo`: see the `ledger.demo` docstring. Returns the process exit code."""
    return run(settings, accounts=accounts, seed=seed).exit_code


def run(
    settings: Settings,
    *,
    accounts: int = 1000,
    seed: int = 7,
    console: Console | None = None,
) -> DemoResult:
    console = console or Console()
    result = DemoResult(exit_code=1)
    handles = _Handles()
    restore = _sigterm_as_interrupt()
    try:
        result.exit_code = _run(settings, accounts, seed, console, result, handles)
    except KeyboardInterrupt:
        console.print("\n[bold yellow]interrupted[/]: stopping the worker …")
        result.exit_code = 130
    except LedgerError as exc:
        result.error = str(exc)
        console.print(f"[bold red]demo failed:[/] {exc}")
        result.exit_code = 1
    except Exception as exc:  # a bug or a service that went away: still stop the worker
        log.exception("demo.failed")
        result.error = repr(exc)
        console.print(f"[bold red]demo failed:[/] {exc!r}")
        result.exit_code = 1
    finally:
        worker, reader = handles.worker, handles.reader
        if handles.producer is not None:
            handles.producer.close(timeout=10)
        if worker is not None and worker.poll() is None:
            code = stop_worker(worker, timeout=60)
            console.print(f"worker stopped (exit {code})")
            if result.worker_exit is None:
                result.worker_exit = code
        if reader is not None:
            reader.stop.set()
            reader.join(timeout=10)
        if handles.monitor is not None:
            handles.monitor.close()
        restore()
    return result


@dataclasses.dataclass
class _Handles:
    """What `run` must clean up however `_run` ends."""

    worker: subprocess.Popen | None = None
    reader: StatusReader | None = None
    producer: Any = None
    monitor: psycopg.Connection | None = None


def _run(
    settings: Settings,
    accounts: int,
    seed: int,
    console: Console,
    result: DemoResult,
    handles: _Handles,
) -> int:
    from ledger import stack
    from ledger.producer import EventProducer
    from ledger.scheduler import send_ticks

    # 1. Services, and this run's own topics, consumer group and database (older runs' go).
    local = not settings.database_url
    if local:  # the stack's own database while the old runs are dropped
        stack.set_current_run(settings, None)
    with console.status("starting Kafka and PostgreSQL …"):
        info = stack.up(settings)
    _drop_old_runs(info, settings, console)
    run_id = datetime.now(UTC).strftime("%Y%m%d_%H%M%S") + f"_{os.getpid() % 10000:04d}"
    prefix = f"{settings.topic_prefix}demo-{run_id.replace('_', '-')}."
    demo_settings = dataclasses.replace(
        settings,
        kafka_bootstrap=info.bootstrap,
        topic_prefix=prefix,
        consumer_group=f"{prefix}ledger",
    )
    # The owner creates and migrates the database; the worker and the demo's monitor are the
    # writer; the commands printed at the end read as the reader.
    name = f"demo_{run_id}"
    on_server(info.owner_dsn, "create_database", name)
    db.migrate(with_database(info.owner_dsn, name), settings.db_roles)
    dsn = with_database(info.dsn, name)
    demo_settings = dataclasses.replace(
        demo_settings,
        database_url=dsn,
        owner_database_url=with_database(info.owner_dsn, name),
        reader_database_url=with_database(info.reader_dsn, name),
    )
    result.run_id, result.dsn, result.settings = run_id, dsn, demo_settings
    result.external_services = settings.uses_existing_services
    created = topics.create_topics(info.bootstrap, demo_settings)
    if local:  # from now on the plain commands on the local stack see this run
        result.current_run = True
        stack.set_current_run(
            settings,
            {
                "run_id": run_id,
                "database": name,
                "topic_prefix": prefix,
                "consumer_group": demo_settings.consumer_group,
            },
        )
    console.print(
        f"[bold]ledger demo[/] run {run_id}: {accounts:,} accounts, seed {seed}, "
        f"broker {info.broker} at {info.bootstrap}"
    )
    console.print(f"  database  {redact(dsn)}")
    console.print(
        f"  topics    {prefix}* ({len(created)} created, {settings.partitions} partitions)"
    )

    # 2. The worker, as a real process, without the scheduler: the demo is the clock.
    log_path = settings.home.resolve() / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handles.worker = start_demo_worker(demo_settings, info.bootstrap, dsn, log_path)
    console.print(
        f"  worker    pid {handles.worker.pid} (roles {', '.join(WORKER_ROLES)}), log {log_path}"
    )

    # 3. The downstream reader of the status topic.
    handles.reader = reader = StatusReader(demo_settings, info.bootstrap, console)
    reader.start()
    reader.ready.wait(30)
    if reader.error is not None:
        raise LedgerError(f"status reader could not start: {reader.error}")

    # 4. The simulated month.
    with console.status("simulating a month of traffic …"):
        sim = simulate(
            accounts,
            seed,
            pricebook=PriceBook.load(settings.price_book),
            policy=Policy.load(settings.policy),
        )
    counts = sim.counts()
    console.print(
        f"  simulated {len(sim.events):,} events: "
        + ", ".join(f"{t} {n:,}" for t, n in counts.most_common())
    )
    console.print(
        f"  clock     {len(sim.ticks)} PeriodTicks on every partition: each midnight of March, "
        f"{sim.ticks[-2]:%m-%d %H:%M} (the month turns), {sim.ticks[-1]:%m-%d %H:%M} "
        f"(March closes)"
    )
    wait_for_assignment(handles.worker, log_path, timeout=60)

    handles.monitor = monitor = db.connect(dsn, autocommit=True)
    status_topic = demo_settings.topic(topics.STATUS)
    handles.producer = producer = EventProducer(info.bootstrap, demo_settings)
    partitions = len(producer.partitions("PeriodTick")) or demo_settings.partitions
    produced = len(sim.events) + len(sim.ticks) * partitions
    progress = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(bar_width=36),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        t_produce = progress.add_task("produced to Kafka", total=produced, note="")
        t_journal = progress.add_task("journaled + rejected", total=produced, note="")
        t_project = progress.add_task("projected", total=None, note="")
        t_relay = progress.add_task("status events out", total=None, note="")
        started_wall = datetime.now(UTC)
        last_poll = 0.0
        derived = 0  # GrantExpired and ConfigPublished entries known so far (they only grow)

        def poll() -> tuple[int, int, int, int, int, int]:
            """Progress (cheap): journal entries (derived ones included), rejected, ..."""
            row = monitor.execute(QUERIES["demo_progress"], (status_topic,)).fetchone()
            journaled, rejected, projected, heads, unpublished, published = row
            progress.update(
                t_journal,
                completed=journaled - derived + rejected,
                note=f"rejected {rejected:,}, expired grants {derived:,}",
            )
            progress.update(t_project, completed=projected, total=max(heads, 1), note="")
            progress.update(
                t_relay,
                completed=reader.unique,
                total=max(published + unpublished, 1),
                note=f"outbox unpublished {unpublished:,}",
            )
            if reader.error is not None:
                raise LedgerError(f"the status reader failed: {reader.error!r}")
            if handles.worker is not None and handles.worker.poll() is not None:
                raise LedgerError(
                    f"the worker exited early (code {handles.worker.returncode}); "
                    f"see {log_path}:\n{tail(log_path)}"
                )
            return journaled, rejected, projected, heads, unpublished, published

        def sources_done(journaled: int, rejected: int, target: int) -> bool:
            """Whether `target` sent events (and ticks) are all journaled or rejected. The
            cheap count includes derived entries, so it is checked exactly when it could be."""
            nonlocal derived
            if journaled - derived + rejected < target:
                return False
            sources, derived = monitor.execute(QUERIES["demo_journal_sources"]).fetchone()
            return sources + rejected >= target

        def wait_journaled(target: int) -> None:
            last_change, last_state = time.monotonic(), None
            while True:
                state = poll()
                if sources_done(state[0], state[1], target):
                    return
                if state != last_state:
                    last_change, last_state = time.monotonic(), state
                elif time.monotonic() - last_change > 120:
                    raise LedgerError(f"no progress for 120 s: {state}; see {log_path}")
                time.sleep(0.03)

        futures: list = []
        sent = checked = ticks_sent = 0

        def check_sends() -> None:
            nonlocal checked
            producer.flush(timeout=120)
            failed = [f for f in futures[checked:] if f.failed()]
            if failed:
                raise LedgerError(f"{len(failed)} sends failed, e.g. {failed[0].exception!r}")
            checked = len(futures)

        def tick(at: datetime) -> None:
            """A PeriodTick on every partition at `at`, once everything sent before it is
            journaled: the demo's clock moves only when the ledger has caught up with it."""
            nonlocal sent, ticks_sent
            check_sends()
            wait_journaled(sent)
            n = send_ticks(producer, at)
            sent += n
            ticks_sent += n
            progress.update(t_produce, completed=sent, note=f"clock {at:%m-%d %H:%M}")

        pending_ticks = list(sim.ticks)
        for event_type, event in sim.events:
            while pending_ticks and pending_ticks[0] <= event["occurred_at"]:
                tick(pending_ticks.pop(0))
            futures.append(producer.send(event_type, event))
            sent += 1
            if sent % 500 == 0:
                progress.update(t_produce, completed=sent)
                now = time.monotonic()
                if now - last_poll > 0.5:
                    last_poll = now
                    poll()
        for at in pending_ticks:  # the month turns, then March closes
            tick(at)
        check_sends()
        progress.update(t_produce, completed=sent)
        producer.close(timeout=10)
        handles.producer = None

        # 5. Until the journal, the projection, the outbox and the reader have caught up.
        last_change, last_state = time.monotonic(), None
        while True:
            state = (*poll(), reader.unique)
            journaled, rejected, projected, heads, unpublished, published, downstream = state
            if (
                sources_done(journaled, rejected, produced)
                and projected >= heads
                and unpublished == 0
                and downstream >= published
            ):
                break
            if state != last_state:
                last_change, last_state = time.monotonic(), state
            elif time.monotonic() - last_change > 120:
                raise LedgerError(f"no progress for 120 s: {state}; see {log_path}")
            time.sleep(0.2)
    last_at = monitor.execute(QUERIES["demo_last_recorded"]).fetchone()[0]
    ledger_seconds = (last_at - started_wall).total_seconds() if last_at else 0.0

    # 6. Stop the worker; it must exit 0.
    console.print("stopping the worker (SIGTERM) …")
    result.worker_exit = stop_worker(handles.worker, timeout=60)
    handles.worker = None
    reader.stop.set()
    reader.join(timeout=10)
    handles.reader = None
    with db.connect(dsn) as conn:
        summary = summarise(
            conn,
            sim,
            produced=produced,
            ledger_seconds=ledger_seconds,
            downstream=reader,
            ticks_sent=ticks_sent,
        )
    result.summary = summary
    limited = reader.reasons_ever.get("SPEND_LIMIT_REACHED", set())
    result.limit_account = min(limited) if limited else None
    print_summary(console, summary, result.worker_exit)
    print_next_steps(console, result, conn_dsn=dsn)
    ok = summary.ok and result.worker_exit == 0
    if result.worker_exit != 0:
        console.print(f"[bold red]worker exited {result.worker_exit}[/]; see {log_path}")
    console.print("[bold green]demo OK[/]" if ok else "[bold red]demo FAILED[/]")
    console.print(
        f"web console over this demo's data: {demo_settings.console_url} "
        "(run the `ledger console` line above; it serves until Ctrl-C)",
        highlight=False,
        soft_wrap=True,
    )
    return 0 if ok else 1


# A demo run's database and topics: `demo_20260301_120000_0042`, `demo-20260301-120000-0042.`
_RUN_DATABASE = re.compile(r"demo_\d{8}_\d{6}_\d{4}")
_RUN_TOPIC = re.compile(r"demo-\d{8}-\d{6}-\d{4}\.")


def _drop_old_runs(info: Any, settings: Settings, console: Console) -> None:
    """Drop the databases and topics of earlier demo runs: a run is kept until the next one,
    so the commands the demo prints keep working, and old runs do not pile up. One that cannot
    be dropped (a worker of it still connected) is left, with a warning."""
    with db.connect(info.owner_dsn, autocommit=True) as conn:
        names = [r[0] for r in conn.execute(QUERIES["demo_databases"]).fetchall()]
    dropped = 0
    for name in names:
        if not _RUN_DATABASE.fullmatch(name):
            continue
        try:
            on_server(info.owner_dsn, "drop_database", name)
            dropped += 1
        except psycopg.Error as exc:
            console.print(f"[yellow]could not drop the old demo database {name}:[/] {exc}")
    base = settings.topic_prefix
    old_topics = [
        t
        for t in topics.list_topics(info.bootstrap, settings)
        if t.startswith(base) and _RUN_TOPIC.match(t[len(base) :])
    ]
    deleted = topics.delete_topics(info.bootstrap, settings, old_topics)
    if dropped or deleted:
        console.print(f"  cleaned   {dropped} old demo database(s), {len(deleted)} old topic(s)")


def _sigterm_as_interrupt():
    """SIGTERM to the demo is handled like Ctrl-C (the worker is stopped cleanly)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, previous)
