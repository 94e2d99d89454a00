"""`python -m ledger.chaos --events N --seed S [--faults kill,broker,pg,stop]
[--malformed tombstone,nul,...|all|none] ...`: a seeded fault run; exit 0 only if the checker
finds nothing lost, duplicated or different."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

from ledger.chaos.faults import FAULT_KINDS
from ledger.chaos.malformed import KINDS
from ledger.chaos.report import render
from ledger.chaos.run import Options, run
from ledger.log import configure_logging
from ledger.settings import Settings


def kinds(known: tuple[str, ...], what: str):
    def parse(text: str) -> tuple[str, ...]:
        if text == "all":
            return known
        if text in ("none", ""):
            return ()
        chosen = tuple(k.strip() for k in text.split(",") if k.strip())
        unknown = [k for k in chosen if k not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown)} (known: {', '.join(known)}, all, none)"
            )
        return chosen

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ledger.chaos", description=__doc__)
    d = Options()
    p.add_argument("--events", type=int, default=d.events, help="well-formed events to send")
    p.add_argument("--seed", type=int, default=None, help="replays the same run (default: random)")
    p.add_argument(
        "--faults",
        type=kinds(FAULT_KINDS, "fault"),
        default=d.faults,
        help=f"fault kinds: {','.join(FAULT_KINDS)}, all or none",
    )
    p.add_argument(
        "--malformed",
        type=kinds(KINDS, "malformed kind"),
        default=d.malformed,
        help=f"malformed kinds: {','.join(KINDS)}, all or none",
    )
    p.add_argument(
        "--malformed-count",
        type=int,
        default=None,
        help="malformed records (default: 1%% of --events, at least 100)",
    )
    p.add_argument(
        "--kills",
        type=int,
        default=None,
        help="worker SIGKILLs (default: 20 per 1M events, at least 3)",
    )
    p.add_argument("--broker-kills", type=int, default=d.broker_kills)
    p.add_argument("--pg-restarts", type=int, default=d.pg_restarts)
    p.add_argument("--stops", type=int, default=d.stops, help="SIGSTOPs of the shard holder")
    p.add_argument("--stop-seconds", type=float, default=d.stop_s)
    p.add_argument("--brokers", type=int, default=d.brokers)
    p.add_argument("--heap", default=d.heap, help="-Xmx per Kafka node")
    p.add_argument("--partitions", type=int, default=d.partitions)
    p.add_argument("--producers", type=int, default=d.producers)
    p.add_argument(
        "--transactional",
        type=int,
        default=d.transactional,
        help="how many producers use Kafka transactions",
    )
    p.add_argument("--abort-ratio", type=float, default=d.abort_ratio)
    p.add_argument("--rate", type=float, default=d.rate, help="events/s to keep to (0: unpaced)")
    p.add_argument(
        "--max-behind",
        type=int,
        default=d.max_behind,
        help="events the producers may be ahead of the ledger (0: no limit)",
    )
    p.add_argument(
        "--max-stall",
        type=float,
        default=d.max_stall_s,
        help="seconds a shard may go without progress (0: not checked)",
    )
    p.add_argument("--settle", type=float, default=d.settle_s)
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s)
    p.add_argument("--home", type=Path, default=None, help="state dir (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="leave Kafka and PostgreSQL running")
    return p


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        events=args.events,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6),
        faults=args.faults,
        malformed=args.malformed,
        malformed_count=args.malformed_count,
        kills=args.kills,
        broker_kills=args.broker_kills,
        pg_restarts=args.pg_restarts,
        stops=args.stops,
        stop_s=args.stop_seconds,
        brokers=args.brokers,
        heap=args.heap,
        partitions=args.partitions,
        producers=args.producers,
        transactional=args.transactional,
        abort_ratio=args.abort_ratio,
        rate=args.rate or None,
        max_behind=args.max_behind or None,
        max_stall_s=args.max_stall or None,
        settle_s=args.settle,
        drain_timeout_s=args.drain_timeout,
        home=args.home,
        keep=args.keep,
    )


def replay_command(argv: list[str] | None, seed: int) -> str:
    """The command line that replays this run: the same options, this seed (a new home)."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--seed", "--home"):  # a new home: every run starts from fresh services
            skip = True
            continue
        if arg.startswith(("--seed=", "--home=")):
            continue
        kept.append(arg)
    return " ".join(["python -m ledger.chaos", *kept, "--seed", str(seed)])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(Settings.from_env())
    # kafka-python warns on every retried request while a broker is down: that is the point.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    options = options_from(args)
    print(
        f"fault run: seed {options.seed}; replay: {replay_command(argv, options.seed)}", flush=True
    )
    outcome = run(options)
    print(render(outcome), flush=True)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
