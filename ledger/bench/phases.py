"""The benchmark's steps in order (see `ledger.bench`), each adding to the results: set-up,
the input, raw consumption (a, b), the ledger and projection roles (c, d) and, with
--profile, write_batch in-process (e)."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import os
import pstats
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from ledger import db, stack, topics
from ledger.bench import BenchError
from ledger.bench.environment import broker_description
from ledger.bench.in_process import (
    SectionTimer,
    profile_sections,
    read_batches,
    timed_sections,
    write_in_process,
)
from ledger.bench.latency import measure_suspension_latency
from ledger.bench.proc_readings import CpuMeter, proc_status_kib
from ledger.bench.raw_consume import consume_raw
from ledger.bench.report import say
from ledger.bench.worker_roles import run_role
from ledger.bench.workload import add_noise, encode_events, make_events, produce
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.runner import on_server, with_database
from ledger.settings import Settings


@dataclasses.dataclass
class BenchRun:
    """One run of the benchmark: its options, where it runs, and the results so far."""

    args: argparse.Namespace
    settings: Settings
    info: stack.StackInfo
    meter: CpuMeter
    home: Path
    stamp: str
    results: dict[str, Any]
    # To drop at the end (unless --keep): this run's database, and the in-process ones.
    databases: list[str] = dataclasses.field(init=False)
    duplicates: int = 0  # records in the input the ledger must drop as redeliveries

    def __post_init__(self) -> None:
        self.databases = [self.db_name]

    def samples_path(self, role: str) -> Path | None:
        """Where py-spy writes `role`'s samples (with --py-spy), else None."""
        if not self.args.py_spy:
            return None
        return self.home / f"bench-{self.stamp}-{role}.pyspy.txt"

    @property
    def db_name(self) -> str:
        return f"ledger_bench_{self.stamp}"

    @property
    def dsn(self) -> str:
        return with_database(self.info.dsn, self.db_name)


def set_up(run: BenchRun) -> None:
    """(1) The topics and the migrated database of this run."""
    info, settings, results = run.info, run.settings, run.results
    topics.create_topics(info.bootstrap, settings)
    on_server(info.owner_dsn, "create_database", run.db_name)
    db.migrate(with_database(info.owner_dsn, run.db_name), run.settings.db_roles)
    with psycopg.connect(run.dsn, autocommit=True) as conn:
        row = conn.execute(QUERIES["bench_server_version"]).fetchone()
        results["postgres_version"] = row[0] if row else "?"
    say(
        f"kafka {info.bootstrap} ({info.broker}), database {run.db_name}, "
        f"topics {settings.topic_prefix}* with {run.args.partitions} partitions",
        flush=True,
    )


def produce_input(run: BenchRun) -> int:
    """(2) Generate, encode and produce the events; returns how many."""
    args, info, meter, results = run.args, run.info, run.meter, run.results
    codec = Codec.default()
    started = time.perf_counter()
    events, counts = make_events(args.accounts, args.events, args.seed)
    generated = time.perf_counter() - started
    started = time.perf_counter()
    messages = encode_events(run.settings, codec, events)
    encoded = time.perf_counter() - started
    del events
    messages, duplicates, malformed = add_noise(
        messages, args.duplicates, args.malformed, args.seed
    )
    total = len(messages)
    run.duplicates = duplicates
    results.update(
        events_total=total,
        duplicates=duplicates,
        malformed=malformed,
        payment_methods=counts.get("PaymentMethodAdded", 0),
        generate_seconds=round(generated, 2),
        encode_rate=total / encoded,
        avg_value_bytes=round(sum(len(m.value) for m in messages) / total, 1),
    )
    say(
        f"input: {total:,} events generated in {generated:.1f}s, encoded in "
        f"{encoded:.1f}s ({total / encoded:,.0f}/s, {results['avg_value_bytes']} bytes "
        "each on average)",
        flush=True,
    )
    meter.start()
    seconds, api = produce(info.bootstrap, messages, run.settings)
    results["produce"] = {
        "seconds": round(seconds, 3),
        "rate": total / seconds,
        "cpu_cores": meter.stop(),
    }
    del messages
    results["broker"] = broker_description(info, api)
    say(f"produce: {total:,} in {seconds:.1f}s ({total / seconds:,.0f}/s)", flush=True)
    return total


def consume_input_raw(run: BenchRun, total: int) -> None:
    """(3a, 3b) Raw consumption of the input, without and with Avro decoding."""
    meter, results = run.meter, run.results
    for key, decode in (("raw", None), ("decode", Codec.default().decode)):
        meter.start()
        raw = consume_raw(
            run.info.bootstrap,
            run.settings,
            total,
            decode=decode,
            label=key,
            timeout=run.args.timeout,
        )
        results[key] = {
            "records": raw.records,
            "seconds": round(raw.seconds, 3),
            "warm_seconds": round(raw.warm_seconds, 3),
            "rate": raw.rate,
            "steady_rate": raw.steady_rate,
            "cpu_cores": meter.stop(),
        }
        say(
            f"{key}: {raw.records:,} in {raw.seconds:.1f}s ({raw.steady_rate:,.0f}/s "
            f"after {raw.warm_seconds:.1f}s start-up)",
            flush=True,
        )


def worker_env(run: BenchRun) -> dict[str, str]:
    """The environment of a `ledger worker` on this run's topics and database."""
    settings = run.settings
    return {
        **{k: v for k, v in os.environ.items() if k != "LEDGER_SHARDS"},  # all shards
        "LEDGER_KAFKA_BOOTSTRAP": run.info.bootstrap,
        "LEDGER_DATABASE_URL": run.dsn,
        "LEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "LEDGER_CONSUMER_GROUP": settings.consumer_group,
        "LEDGER_PARTITIONS": str(settings.partitions),
        "LEDGER_LOG_LEVEL": run.args.worker_log_level,
    }


def consumed(conn: psycopg.Connection) -> int:
    """Input records the ledger is done with: its stored next offsets, summed (the input
    topics are new, without transactions: offsets count records from 0)."""
    row = conn.execute(QUERIES["bench_ledger_consumed"]).fetchone()
    return int(row[0]) if row else 0


def suspension_latency(run: BenchRun) -> None:
    """(3f) A whole worker on the drained topics: time from a usage event that uses up an
    account's credit to its AccountSuspended arriving downstream."""
    accounts = run.args.latency_accounts
    interval_s = 0.05
    # Under load: usage of the benchmark's accounts at half the ledger's measured capacity (or
    # at --latency-rate, to compare two commits at one load), for as long as the timed sends
    # last and some more.
    if run.args.latency_rate is not None:
        rate = run.args.latency_rate  # an int of usage per second
    else:
        rate = run.results["ledger"]["steady_rate"] / 2 if "ledger" in run.results else 0.0
    count = min(200_000, int(rate * (accounts * interval_s + 10)))
    background: list = []
    if count > 0:
        events, _ = make_events(run.args.accounts, count, run.args.seed + 7)
        usage = [e for e in events if e[0] == "UsageRecorded"]
        background = encode_events(run.settings, Codec.default(), usage)

    def measure(name: str, **load: Any) -> dict[str, Any]:
        return measure_suspension_latency(
            run.info.bootstrap,
            run.settings,
            run.dsn,
            worker_env(run),
            run.home / f"bench-{run.stamp}-{name}.log",
            accounts=accounts,
            interval_s=interval_s,
            meter=run.meter,
            **load,
        )

    # First with nothing else to do: the path's own latency, batching included.
    say(f"latency: {accounts} suspensions, nothing else ingested ...", flush=True)
    run.results["latency_idle"] = measure("latency-idle")
    say(
        f"latency: {accounts} suspensions, ingesting {rate:,.0f} usage/s meanwhile ...",
        flush=True,
    )
    run.results["latency"] = measure("latency", background=background, background_rate=rate)
    run.results["latency"]["background_rate_given"] = run.args.latency_rate is not None


def drain_with_workers(run: BenchRun, total: int) -> None:
    """(3c) The ledger role draining the input into the journal, then (3d, unless
    --no-projections) the projection role draining the journal into account_status."""
    args, results = run.args, run.results
    env = worker_env(run)
    with psycopg.connect(run.dsn, autocommit=True) as watch:

        def journaled() -> int:
            # The stored offsets move in the batch's transaction: a cheap, exact count of the
            # records the ledger is done with (journaled, rejected or dropped as duplicates).
            return consumed(watch)

        say("ledger: draining ...", flush=True)
        ledger_run = run_role(
            "ledger",
            env,
            run.home / f"bench-{run.stamp}-ledger.log",
            journaled,
            total,
            args.timeout,
            run.meter,
            args.stall,
            samples_to=run.samples_path("ledger"),
        )
        entries, rejected, postings = watch.execute(QUERIES["bench_journal_counts"]).fetchone() or (
            0,
            0,
            0,
        )
        if entries + rejected + run.duplicates != total:
            raise BenchError(
                f"journal has {entries} entries + {rejected} rejected, expected "
                f"{total - run.duplicates} ({total} records less {run.duplicates} duplicates)"
            )
        balance = watch.execute(QUERIES["trial_balance"]).fetchall()
        reasons = watch.execute(QUERIES["bench_rejects_by_reason"]).fetchall()
        results["ledger"] = dataclasses.asdict(ledger_run) | {
            "rate": ledger_run.rate,
            "steady_rate": ledger_run.steady_rate,
            "steady_cpu_us": ledger_run.steady_cpu_us,
        }
        results["journal"] = {
            "entries": entries,
            "rejected": rejected,
            "rejected_by_reason": dict(reasons),
            "postings": postings,
            "balanced": all(Decimal(row[1]) == 0 for row in balance),
        }
        say(
            f"ledger: {total:,} in {ledger_run.seconds:.1f}s "
            f"({ledger_run.steady_rate:,.0f}/s after warm-up)",
            flush=True,
        )

        if not args.no_projections:

            def projected() -> int:
                row = watch.execute(
                    QUERIES["bench_projection_progress"], ("account_status",)
                ).fetchone()
                return row[0] if row else 0

            say("projections: draining ...", flush=True)
            proj_run = run_role(
                "projections",
                env,
                run.home / f"bench-{run.stamp}-projections.log",
                projected,
                entries,
                args.timeout,
                run.meter,
                args.stall,
                samples_to=run.samples_path("projections"),
            )
            results["projections"] = dataclasses.asdict(proj_run) | {
                "rate": proj_run.rate,
                "steady_rate": proj_run.steady_rate,
                "steady_cpu_us": proj_run.steady_cpu_us,
            }
            say(f"projections: {entries:,} in {proj_run.seconds:.1f}s", flush=True)


def write_batch_in_process(run: BenchRun, total: int) -> pstats.Stats:
    """(3e) write_batch in-process: timed steps, then under cProfile (fresh databases)."""
    settings, info = run.settings, run.info
    say("in-process write_batch: reading the records ...", flush=True)
    batches = read_batches(info.bootstrap, settings, total)
    gc.freeze()  # the records held here are not the worker's garbage to scan
    names = [f"{run.db_name}_timed", f"{run.db_name}_prof"]
    for name in names:
        run.databases.append(name)
        on_server(info.owner_dsn, "create_database", name)
        db.migrate(with_database(info.owner_dsn, name), settings.db_roles)
    timer = SectionTimer()
    spent = write_in_process(settings, with_database(info.dsn, names[0]), batches, timer=timer)
    profiler = cProfile.Profile()
    profiled = write_in_process(
        settings, with_database(info.dsn, names[1]), batches, profiler=profiler
    )
    prof_path = run.home / f"bench-{run.stamp}.prof"
    profiler.dump_stats(prof_path)
    profile_stats = pstats.Stats(profiler)
    run.results["in_process"] = {
        "events": total,
        "batches": len(batches),
        "seconds": round(spent, 3),
        "rate": total / spent,
        "sections": {k: round(v, 3) for k, v in timed_sections(timer, spent)},
        "profile": {
            "file": str(prof_path),
            "seconds": round(profiled, 3),
            "rate": total / profiled,
            "functions": {k: round(v, 3) for k, v in profile_sections(profile_stats)},
        },
    }
    del batches
    gc.unfreeze()
    return profile_stats


def rebuild_and_replay(run: BenchRun) -> None:
    """(g) `ledger projections rebuild` of the drained journal, from scratch; (h) `ledger
    replay` of it into a new database (every event through the writer again, in journal
    order, then its projections). In this process, timed; entries per second."""
    results = run.results
    entries = results["journal"]["entries"]
    if "projections" in results:  # a rebuild folds up to the live projection's positions
        rebuild_projections(run, entries)
    else:
        say("rebuild: skipped (it needs phase (d), the live projection, to rebuild)", flush=True)
    replay_journal(run)


def rebuild_projections(run: BenchRun, entries: int) -> None:
    """(g), after (d) drained the whole journal into the live projection."""
    from projections.rebuild import rebuild

    settings, results = run.settings, run.results
    say("rebuild: projections from scratch ...", flush=True)
    run.meter.start()
    started = time.perf_counter()
    accounts = rebuild(settings, run.dsn)
    seconds = time.perf_counter() - started
    results["rebuild"] = {
        "entries": entries,
        "accounts": accounts,
        "seconds": round(seconds, 3),
        "rate": entries / seconds,
        "cpu_cores": run.meter.stop(),
    }
    say(f"rebuild: {entries:,} entries in {seconds:.1f}s", flush=True)


def replay_journal(run: BenchRun) -> None:
    """(h) `ledger replay` of the drained journal into a new database."""
    from ledger.replay import replay

    settings, info, results = run.settings, run.info, run.results
    target = f"{run.db_name}_replay"
    run.databases.append(target)
    on_server(info.owner_dsn, "create_database", target)
    db.migrate(with_database(info.owner_dsn, target), settings.db_roles)
    say("replay: the journal into a new database ...", flush=True)
    run.meter.start()
    started = time.perf_counter()
    events = replay(settings, run.dsn, with_database(info.dsn, target))
    seconds = time.perf_counter() - started
    results["replay"] = {
        "entries": events,
        "seconds": round(seconds, 3),
        "rate": events / seconds,
        "cpu_cores": run.meter.stop(),
    }
    say(f"replay: {events:,} events in {seconds:.1f}s", flush=True)


def verify_journal(run: BenchRun) -> None:
    """(j) `ledger verify` of the drained journal (after (d), so the projection it recomputes
    is the whole journal's), as its own process: entries per second and its peak RSS (the
    verify streams the journal, so the peak grows with the accounts, not the entries)."""
    from ledger.runner import ledger_command

    results = run.results
    entries = results["journal"]["entries"]
    command = ledger_command("verify", "--no-checkpoints")
    say("verify: the journal, the books and the projection ...", flush=True)
    run.meter.start()
    started = time.perf_counter()
    peak_kib = 0
    with open(run.home / f"bench-{run.stamp}-verify.log", "wb") as out:
        proc = subprocess.Popen(command, env=worker_env(run), stdout=out, stderr=out)
        # Its peak RSS from its own VmHWM while it runs: the rusage's ru_maxrss of a child
        # counts the RSS of the benchmark's process it was forked from, before the exec.
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(OSError, BenchError):  # exiting: its last reading stands
                peak_kib = max(peak_kib, proc_status_kib(proc.pid, "VmHWM"))
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"ledger verify exited {proc.returncode}; see {out.name}")
    results["verify"] = {
        "entries": entries,
        "seconds": round(seconds, 3),
        "rate": entries / seconds,
        "peak_rss_mib": peak_kib / 1024,
        # From its rusage: a process already reaped is gone from the meter's process table.
        "cpu_us_per_entry": (usage.ru_utime + usage.ru_stime) * 1e6 / max(entries, 1),
        "cpu_cores": run.meter.stop(),
    }
    say(f"verify: {entries:,} entries in {seconds:.1f}s, clean", flush=True)


def storage(run: BenchRun) -> None:
    """What the drained journal takes on disk (tables with their indexes and TOAST), in all and
    per input record."""
    with psycopg.connect(run.dsn, autocommit=True) as conn:
        tables = conn.execute(QUERIES["bench_table_sizes"]).fetchall()
    records = run.results["events_total"] - run.duplicates
    total = sum(size for _, size in tables)
    run.results["storage"] = {
        "bytes": total,
        "records": records,
        "bytes_per_record": total / records,
        "tables": dict(tables),
    }


def scale_out(run: BenchRun, total: int, counts: tuple[int, ...]) -> None:
    """(i) The same input drained again by 1, 2, 4 ... `ledger worker --role ledger`
    processes splitting the shards (`LEDGER_SHARDS`), each count on a fresh database: total
    events/s, the summed peak RSS and the cores used by the workers and by PostgreSQL."""
    from ledger.bench.proc_readings import proc_status_kib
    from ledger.runner import start_worker, stop_worker

    settings, info, args = run.settings, run.info, run.args
    rows = []
    for n in counts:
        if n > settings.partitions:
            continue
        name = f"{run.db_name}_x{n}"
        run.databases.append(name)
        on_server(info.owner_dsn, "create_database", name)
        db.migrate(with_database(info.owner_dsn, name), settings.db_roles)
        dsn = with_database(info.dsn, name)
        env = worker_env(run) | {
            "LEDGER_DATABASE_URL": dsn,
            "LEDGER_CONSUMER_GROUP": f"{settings.consumer_group}-x{n}",
        }
        shards = list(range(settings.partitions))
        parts = [shards[i::n] for i in range(n)]
        say(f"scale-out: {n} ledger process(es) ...", flush=True)
        run.meter.start()
        started = time.perf_counter()
        procs = [
            start_worker(
                ("ledger",),
                env | {"LEDGER_SHARDS": ",".join(map(str, part))},
                run.home / f"bench-{run.stamp}-x{n}-{i}.log",
            )
            for i, part in enumerate(parts)
        ]
        try:
            with psycopg.connect(dsn, autocommit=True) as watch:
                last, last_at = -1, time.perf_counter()
                while True:
                    done = consumed(watch)
                    now = time.perf_counter()
                    if done >= total:
                        break
                    if done != last:
                        last, last_at = done, now
                    elif now - last_at > args.stall:
                        raise BenchError(f"scale-out x{n}: no progress at {done} of {total}")
                    if any(p.poll() is not None for p in procs):
                        raise BenchError(f"scale-out x{n}: a worker exited; see its log")
                    time.sleep(0.05)
            seconds = time.perf_counter() - started
            cores = run.meter.stop({f"worker{i}": p.pid for i, p in enumerate(procs)})
            rss = sum(proc_status_kib(p.pid, "VmHWM") for p in procs) / 1024
        finally:
            for p in procs:
                stop_worker(p, timeout=60)
        workers = sum(v for k, v in cores.items() if k.startswith("worker"))
        rows.append(
            {
                "processes": n,
                "seconds": round(seconds, 3),
                "rate": total / seconds,
                "peak_rss_mib_sum": round(rss, 1),
                "worker_cores": round(workers, 2),
                "cpu_cores": cores,
            }
        )
        say(f"scale-out: x{n} {total:,} in {seconds:.1f}s ({total / seconds:,.0f}/s)", flush=True)
    run.results["scale_out"] = rows
