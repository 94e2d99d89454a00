"""One fault run: services up, workers started, traffic and malformed records sent while the
seeded faults are injected, the ledger drained, then the checker. `run(options)` returns the
Outcome; `python -m ledger.chaos` prints it as a table."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import time
from pathlib import Path

import structlog

from ledger import chain_keys, db, topics
from ledger.chaos import faults as fault_plan
from ledger.chaos.checker import Difference, Result, check
from ledger.chaos.malformed import KINDS, run_malformed
from ledger.chaos.model import Model
from ledger.chaos.observe import (
    commit_times,
    max_stalls,
    observe,
    recovery,
    shards_with_traffic,
)
from ledger.chaos.processes import Supervisor
from ledger.chaos.traffic import Progress, plan, run_plain, run_transactional
from ledger.db import QUERIES
from ledger.errors import StackError
from ledger.runner import worker_env
from ledger.settings import Settings
from ledger.stack import postgres, procs
from ledger.stack.cluster import KafkaCluster

log = structlog.get_logger(__name__)


# The default offered rate: what the ledger drained on the 2-core development machine with the
# three brokers, the producers and the other workers beside it (README, "Latest full run").
RATE = 750.0

# Crash recovery of the fault run's PostgreSQL is bounded: a checkpoint at least every 30 s
# (default 5 min) keeps the WAL that a restart after `-m immediate` replays to half a minute of
# writes, so the stall limit measures the ledger, not a long WAL replay.
PG_OPTIONS = {"checkpoint_timeout": "30s"}


@dataclasses.dataclass(frozen=True)
class Options:
    events: int = 1_000_000
    seed: int = 1
    faults: tuple[str, ...] = fault_plan.FAULT_KINDS
    malformed: tuple[str, ...] = KINDS
    malformed_count: int | None = None  # default: 1 % of the events, at least 100
    kills: int | None = None  # default: 20 per million events, at least 3
    broker_kills: int = 3
    pg_restarts: int = 2
    stops: int = 1
    stop_s: float = 30.0
    brokers: int = 3
    heap: str = "384m"
    partitions: int = 8
    producers: int = 4
    transactional: int = 2  # how many of the producers use Kafka transactions
    abort_ratio: float = 0.1
    # events/s the producers keep to (None: as fast as they can); see the README for how it
    # was measured
    rate: float | None = RATE
    # events the producers may be ahead of the ledger (None: no limit)
    max_behind: int | None = 20_000
    accounts: int | None = None  # default: one per 500 events, at least 20
    tick_interval_s: int = 5
    max_stall_s: float | None = 20.0
    settle_s: float = 30.0
    drain_timeout_s: float = 900.0
    home: Path | None = None
    keep: bool = False

    @property
    def n_malformed(self) -> int:
        if not self.malformed:
            return 0
        return (
            self.malformed_count
            if self.malformed_count is not None
            else max(100, self.events // 100)
        )

    @property
    def n_accounts(self) -> int:
        return self.accounts or max(20, self.events // 500)

    def fault_counts(self) -> dict[str, int]:
        kills = self.kills if self.kills is not None else max(3, round(20 * self.events / 1e6))
        counts = {
            "kill": kills,
            "broker": self.broker_kills,
            "pg": self.pg_restarts,
            "stop": self.stops,
        }
        return {k: (n if k in self.faults else 0) for k, n in counts.items()}


@dataclasses.dataclass
class Outcome:
    options: Options
    model: Model
    result: Result
    injected: list[fault_plan.Injected]
    worker_exits: dict[str, int]
    stalls: dict[int, float]
    recoveries: list[tuple[float | None, list[int]]]
    seconds: dict[str, float]
    home: Path

    @property
    def ok(self) -> bool:
        return self.result.ok


def run(options: Options) -> Outcome:
    home = (options.home or Path(tempfile.mkdtemp(prefix="ledger-chaos-"))).resolve()
    if home.is_dir() and any(home.iterdir()):
        raise StackError(f"{home} is not empty: a fault run starts from fresh services")
    home.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(
        Settings.from_env(),
        home=home,
        kafka_bootstrap=None,
        database_url=None,
        topic_prefix=f"chaos{options.seed}.",
        consumer_group=f"chaos{options.seed}",
        partitions=options.partitions,
        tick_interval_s=options.tick_interval_s,
        shards=None,
        price_book=None,  # the packaged price book and policy: the model's table follows them
        policy=None,
        chain_key_file=None,  # a key of its own, in its home
        # Its own cluster listens in plain text (LEDGER_KAFKA_* security is for a real one).
        kafka_security_protocol="PLAINTEXT",
        kafka_sasl_mechanism=None,
        kafka_username=None,
        kafka_password=None,
        kafka_password_file=None,
        kafka_ssl_cafile=None,
        kafka_ssl_certfile=None,
        kafka_ssl_keyfile=None,
    )
    chain_keys.ensure_local(settings)
    log.info("chaos.start", seed=options.seed, events=options.events, home=str(home))
    timings: dict[str, float] = {}
    started = time.monotonic()
    cluster = KafkaCluster(
        settings, home / "kafka-cluster", size=options.brokers, heap=options.heap
    )
    pg_state: dict = {}
    supervisor: Supervisor | None = None
    outcome: Outcome | None = None
    try:
        pg_state = postgres.start(settings, {}, PG_OPTIONS)
        # Least privilege here too: the owner migrates, the workers and the checker are the
        # writer.
        db.migrate(postgres.dsn(settings, pg_state["port"], "owner"), settings.db_roles)
        dsn = postgres.dsn(settings, pg_state["port"], "writer")
        cluster.start()
        bootstrap = cluster.bootstrap
        topics.create_topics(
            bootstrap,
            settings,
            replication_factor=options.brokers,
            configs={
                "min.insync.replicas": str(cluster.min_insync),
                "max.message.bytes": "2097152",
            },
        )
        timings["services up"] = time.monotonic() - started
        supervisor = Supervisor(worker_env(settings, bootstrap, dsn), home)
        supervisor.start_all()
        # Traffic starts once every shard has a writer, so start-up is not counted as a stall.
        shards = set(range(options.partitions))
        if not procs.wait_for(lambda: supervisor.assigned_shards() >= shards, 180, 0.5):
            raise StackError(f"the ledger workers did not take every shard (see {home})")
        outcome = _traffic_and_faults(
            options, settings, cluster, supervisor, pg_state, dsn, timings
        )
        return outcome
    finally:
        if supervisor is not None:
            supervisor.stop_all()
        if not options.keep:
            cluster.stop()
            postgres.stop(settings)
            if outcome is not None and outcome.ok and options.home is None:
                shutil.rmtree(home, ignore_errors=True)  # a failed run's logs and data stay
        log.info("chaos.done", home=str(home), kept=options.keep)


def _traffic_and_faults(options, settings, cluster, supervisor, pg_state, dsn, timings) -> Outcome:
    model = Model()
    stop = threading.Event()
    progress = Progress(options.rate, options.max_behind)
    planned = options.events + options.n_malformed
    producing: list[threading.Thread] = []
    per_producer = options.events // options.producers
    bootstrap = cluster.bootstrap
    errors: list[str] = []

    def guarded(name, target, *args, **kwargs):
        def body():
            try:
                target(*args, **kwargs)
            except Exception as exc:
                log.exception("chaos.thread_failed", thread=name)
                errors.append(f"{name}: {exc}")

        return threading.Thread(target=body, name=name, daemon=True)

    for p in range(options.producers):
        n = per_producer + (options.events % options.producers if p == 0 else 0)
        events = plan(options.seed, p, options.producers, options.n_accounts, n)
        name = f"producer-{p}"
        if p < options.transactional:
            thread = guarded(
                name, run_transactional, name, events, bootstrap, settings, model, progress, stop,
                seed=options.seed, abort_ratio=options.abort_ratio,
            )  # fmt: skip
        else:
            thread = guarded(
                name, run_plain, name, events, bootstrap, settings, model, progress, stop
            )
        producing.append(thread)

    def producers_done() -> bool:
        return not any(t.is_alive() for t in producing)

    malformed = guarded(
        "malformed", run_malformed, list(options.malformed), options.n_malformed, options.events,
        seed=options.seed, accounts=options.n_accounts, bootstrap=bootstrap, settings=settings,
        model=model, progress=progress, stop=stop, producers_done=producers_done,
    )  # fmt: skip

    def journal_progress() -> float | None:
        try:
            with db.connect(dsn) as conn:
                (done,) = conn.execute(
                    QUERIES["chaos_offsets_done"],
                    (settings.consumer_group,),
                ).fetchone()
            return float(done) / planned
        except Exception:
            return None

    def consumed() -> float | None:
        done = journal_progress()
        return None if done is None else done * planned

    progress.consumed = consumed

    def start_postgres() -> None:
        port = pg_state["port"]
        if not procs.wait_for(lambda: procs.port_is_free(port), 60, 0.5):
            raise RuntimeError(f"PostgreSQL's port {port} is still taken")
        postgres.start(settings, {"port": port}, PG_OPTIONS)

    schedule = fault_plan.plan(
        options.seed, options.fault_counts(), brokers=options.brokers, stop_s=options.stop_s
    )
    log.info("chaos.schedule", seed=options.seed, faults=[str(f) for f in schedule])
    injector = fault_plan.Injector(
        schedule,
        supervisor=supervisor,
        kill_broker=cluster.kill,
        start_broker=cluster.start_node,
        stop_postgres=lambda: postgres.stop_immediate(settings),
        start_postgres=start_postgres,
        progress=journal_progress,
        traffic_done=producers_done,
        stop=stop,
        holder=lambda: supervisor.shard_holder(dsn, settings.consumer_group),
    )
    injecting = threading.Thread(target=injector.run, name="faults", daemon=True)

    supervising = threading.Event()

    def supervise_loop() -> None:
        while not supervising.is_set():
            if not injector.pg_down.is_set():
                supervisor.supervise()
            supervising.wait(1.0)

    watcher = threading.Thread(target=supervise_loop, name="supervisor", daemon=True)
    watcher.start()
    traffic_start = time.time()
    t0 = time.monotonic()
    for thread in (*producing, malformed, injecting):
        thread.start()
    try:
        for thread in (*producing, malformed):
            thread.join()
    except BaseException:  # Ctrl-C: the producers stop before the services go
        stop.set()
        supervising.set()
        raise
    traffic_end = time.time()
    timings["traffic"] = time.monotonic() - t0
    timings["producers held back (summed)"] = progress.held_s
    log.info("chaos.traffic_sent", seconds=round(timings["traffic"], 1), errors=errors)
    injecting.join()  # the rest of the schedule (it does not wait long once traffic is done)
    supervisor.stop("scheduler-1")
    t1 = time.monotonic()
    _drain(options, settings, dsn, model)
    timings["drain"] = time.monotonic() - t1
    supervising.set()
    watcher.join()
    supervisor.stop_all()
    times = commit_times(dsn)
    stalls = max_stalls(times, shards_with_traffic(settings, bootstrap), traffic_start, traffic_end)
    recoveries = [recovery(times, i.started) for i in injector.injected]
    seen = observe(settings, bootstrap, dsn)
    seen.stalls = stalls
    result = check(model, seen, max_stall_s=options.max_stall_s)
    for problem in errors:
        result.differences.insert(0, _difference("run", "traffic", problem))
    return Outcome(
        options=options,
        model=model,
        result=result,
        injected=injector.injected,
        worker_exits=dict(supervisor.exits),
        stalls=stalls,
        recoveries=recoveries,
        seconds=timings,
        home=settings.home,
    )


def _difference(check_name: str, subject: str, detail: str) -> Difference:
    return Difference(check_name, subject, detail)


def _drain(options: Options, settings: Settings, dsn: str, model: Model) -> None:
    """Until the ledger has everything (journaled or quarantined, projected, published), or
    nothing has moved for `settle_s`, or `drain_timeout_s` passed."""
    deadline = time.monotonic() + options.drain_timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            with db.connect(dsn) as conn:
                snapshot = conn.execute(QUERIES["chaos_drain_snapshot"]).fetchone()
        except Exception:
            time.sleep(1)
            continue
        journaled, rejected, unpublished, behind = snapshot
        if (
            journaled >= len(model.accepted)
            and rejected >= model.expected_quarantined
            and unpublished == 0
            and behind == 0
        ):
            return
        if snapshot != last:
            last, since = snapshot, time.monotonic()
        elif time.monotonic() - since > options.settle_s:
            log.warning("chaos.drain_stuck", snapshot=snapshot, seconds=options.settle_s)
            return
        time.sleep(1)
    log.warning("chaos.drain_timeout", seconds=options.drain_timeout_s)
