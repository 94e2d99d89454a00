"""`python -m ledger.bench [--events N] [--partitions P] [--accounts A] [--keep] [--profile]`:
its flags, and the run from start to report (the phases are in `ledger.bench.phases`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from datetime import UTC, datetime
from typing import Any

import ledger.bench
from ledger import gc_tuning, stack
from ledger.bench.chart import write_chart
from ledger.bench.environment import cleanup, code_version, machine_info, stack_pids
from ledger.bench.phases import (
    BenchRun,
    consume_input_raw,
    drain_with_workers,
    produce_input,
    rebuild_and_replay,
    scale_out,
    set_up,
    storage,
    suspension_latency,
    verify_journal,
    write_batch_in_process,
)
from ledger.bench.proc_readings import CpuMeter
from ledger.bench.report import print_in_process, print_table, say
from ledger.bench.samples import summary as samples_summary
from ledger.log import configure_logging
from ledger.redact import redact
from ledger.settings import Settings


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"must be between 0 and 0.5: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ledger.bench", description=ledger.bench.__doc__.split("\n")[0]
    )
    p.add_argument("--events", type=_positive, default=200_000, help="usage events (200000)")
    p.add_argument("--partitions", type=_positive, default=8, help="partitions per topic (8)")
    p.add_argument("--accounts", type=_positive, default=2_000, help="accounts (2000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (1)")
    p.add_argument(
        "--duplicates", type=_share, default=0.01, help="share of usage sent twice (0.01)"
    )
    p.add_argument(
        "--malformed", type=_share, default=0.01, help="share of malformed records (0.01)"
    )
    p.add_argument("--no-projections", action="store_true", help="skip phase (d)")
    p.add_argument("--no-rebuild", action="store_true", help="skip phases (g) and (h)")
    p.add_argument(
        "--scale-out",
        type=_positive,
        nargs="*",
        default=[1, 2, 4],
        help="phase (i): ledger process counts splitting the shards (1 2 4; with no count: skip)",
    )
    p.add_argument(
        "--latency-accounts",
        type=int,
        default=200,
        help="suspensions timed end to end in phase (f); 0 skips it (200)",
    )
    p.add_argument(
        "--latency-rate",
        type=_positive,
        default=None,
        help="usage/s in the background of phase (f) under load (default: half of (c))",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run write_batch in-process: timed steps, and under cProfile",
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the (c) and (d) workers with py-spy; print where their Python time goes",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per phase (3600)")
    p.add_argument(
        "--stall", type=float, default=120, help="give up after this long without progress (120)"
    )
    p.add_argument("--keep", action="store_true", help="keep the database and topics")
    p.add_argument(
        "--worker-log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default="WARNING",
        help="LEDGER_LOG_LEVEL of the workers it starts; INFO keeps the ledger's line per batch "
        "(records, ms) in <home>/bench-<stamp>-<phase>.log (WARNING)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The collector's thresholds of every ledger process, for the phases run in this one
    # (raw consumption, rebuild, replay), as `ledger` itself sets them.
    gc_tuning.tune()
    # WARNING for the processes the benchmark spawns too (replay's, rebuild's): a line per
    # batch would bury the table.
    base = dataclasses.replace(Settings.from_env(), log_level="WARNING")
    configure_logging(base)
    # kafka-python's own chatter (slow event-loop tasks while we encode/decode) is not news here.
    logging.getLogger("kafka").setLevel(logging.ERROR)
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    settings = dataclasses.replace(
        base,
        topic_prefix=f"bench-{stamp}.",
        partitions=args.partitions,
        consumer_group=f"bench-{stamp}-ledger",
    )
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "topic_prefix": settings.topic_prefix,
        "partitions": args.partitions,
        "accounts": args.accounts,
        "usage_events": args.events,
        "seed": args.seed,
        "batch_max_events": settings.batch_max_events,
        "batch_max_ms": settings.batch_max_ms,
        "machine": machine_info(),
        "code": code_version(),
    }

    say(f"stack: up (home {home}) ...", flush=True)
    info = stack.up(settings)
    meter = CpuMeter(stack_pids(settings))
    run = BenchRun(args, settings, info, meter, home, stamp, results)
    profile_stats = None
    try:
        set_up(run)
        total = produce_input(run)
        consume_input_raw(run, total)
        drain_with_workers(run, total)
        storage(run)
        if not args.no_projections:
            verify_journal(run)
        if not args.no_rebuild:
            rebuild_and_replay(run)
        if args.scale_out:
            scale_out(run, total, tuple(args.scale_out))
        if args.profile:  # before (f), which adds its own events to the topics
            profile_stats = write_batch_in_process(run, total)
        if args.latency_accounts > 0:
            suspension_latency(run)
    finally:
        if not args.keep:
            cleanup(info, settings, run.databases)

    path = home / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    chart = write_chart(results, home / f"bench-{stamp}.png")
    if profile_stats is not None:
        print_in_process(results["in_process"], profile_stats)
    for role, items in (("ledger", total), ("projections", None)):
        samples = run.samples_path(role)
        if samples is not None and samples.exists() and role in results:
            count = items if items is not None else results["journal"]["entries"]
            for line in samples_summary(samples, results[role]["cpu_seconds"], count):
                say(line)
    print_table(results)
    say(f"results: {path}")
    say(f"chart: {chart}" if chart else "chart: skipped (matplotlib is not installed)")
    if args.keep:
        say(f"kept: database {run.db_name} ({redact(run.dsn)}), topics {settings.topic_prefix}*")
    return 0
