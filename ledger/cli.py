"""The `ledger` command line. Parses arguments, builds settings, calls into the package.

This is the only module (with the demo and the benchmark) that prints to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from ledger.errors import ConfigError, LedgerError
from ledger.log import configure_logging
from ledger.settings import Settings


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import stack

    if args.action == "up":
        info = stack.up(settings)
        print(f"kafka bootstrap: {info.bootstrap}  ({info.broker})")
        print(f"database url:    {info.dsn}")
        return 0
    if args.action == "down":
        stack.down(settings)
        print("stack stopped")
        return 0
    report = stack.status(settings)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report.get("running") else 3


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import stack, topics

    info = stack.connect(settings)
    created = topics.create_topics(info.bootstrap, settings)
    for name in created:
        print(f"created {name}")
    print(f"{len(topics.all_topics(settings))} topics present")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ledger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start/stop/inspect the local Kafka + PostgreSQL")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=_stack)

    p = sub.add_parser("topics", help="manage the ledger's Kafka topics")
    p.add_argument("action", choices=["create"])
    p.set_defaults(func=_topics)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        parser.exit(2, f"ledger: configuration error: {exc}\n")
    configure_logging(settings)
    try:
        return args.func(args, settings)
    except ConfigError as exc:
        parser.exit(2, f"ledger: configuration error: {exc}\n")
    except LedgerError as exc:
        print(f"ledger: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
