"""The benchmark's steps in order (see `ledger.bench`), each adding to the results: set-up,
the input, raw consumption (a, b), the ledger and projection roles (c, d) and, with
--profile, write_batch in-process (e)."""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import os
import pstats
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
from ledger.bench.proc_readings import CpuMeter
from ledger.bench.raw_consume import consume_raw
from ledger.bench.report import say
from ledger.bench.worker_roles import run_role
from ledger.bench.workload import encode_events, make_events, produce
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

    def __post_init__(self) -> None:
        self.databases = [self.db_name]

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
    total = len(messages)
    results.update(
        events_total=total,
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
        "LEDGER_LOG_LEVEL": "WARNING",
    }


def suspension_latency(run: BenchRun) -> None:
    """(3f) A whole worker on the drained topics: time from a usage event that uses up an
    account's credit to its AccountSuspended arriving downstream."""
    say(f"latency: {run.args.latency_accounts} suspensions ...", flush=True)
    run.results["latency"] = measure_suspension_latency(
        run.info.bootstrap,
        run.settings,
        run.dsn,
        worker_env(run),
        run.home / f"bench-{run.stamp}-latency-worker.log",
        accounts=run.args.latency_accounts,
    )


def drain_with_workers(run: BenchRun, total: int) -> None:
    """(3c) The ledger role draining the input into the journal, then (3d, unless
    --no-projections) the projection role draining the journal into account_status."""
    args, results = run.args, run.results
    env = worker_env(run)
    with psycopg.connect(run.dsn, autocommit=True) as watch:

        def journaled() -> int:
            # shard_heads moves in the batch's transaction: a cheap, exact count of the
            # committed entries (count(*) on the journal would scan it 20 times a second).
            row = watch.execute(QUERIES["bench_ledger_progress"]).fetchone()
            return row[0] + row[1] if row else 0

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
        )
        entries, rejected, postings = watch.execute(QUERIES["bench_journal_counts"]).fetchone() or (
            0,
            0,
            0,
        )
        if entries + rejected != total:
            raise BenchError(
                f"journal has {entries} entries + {rejected} rejected, expected {total}"
            )
        balance = watch.execute(QUERIES["trial_balance"]).fetchall()
        reasons = watch.execute(QUERIES["bench_rejects_by_reason"]).fetchall()
        results["ledger"] = dataclasses.asdict(ledger_run) | {
            "rate": ledger_run.rate,
            "steady_rate": ledger_run.steady_rate,
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
            )
            results["projections"] = dataclasses.asdict(proj_run) | {
                "rate": proj_run.rate,
                "steady_rate": proj_run.steady_rate,
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
