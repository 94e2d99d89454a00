"""The `ledger` command line. Parses arguments, builds settings, calls into the package.

This is the only module (with the demo, the benchmark and `python -m ledger.chaos`) that prints
to stdout. Every command connects to PostgreSQL as the role it needs (`COMMAND_ROLES`): the owner
only for `db migrate` (and to migrate a `replay` target), the writer for whatever writes, the
reader for whatever only reads. Nothing it prints carries a password (`ledger.redact`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime

from ledger import gc_tuning
from ledger.errors import ConfigError, LedgerError, StackError
from ledger.log import configure_logging
from ledger.redact import redact
from ledger.settings import Settings

# The PostgreSQL role each command connects as (README: "Database roles").
COMMAND_ROLES = {
    "db migrate": "owner",
    "worker": "writer",
    "scheduler": "writer",
    "replay": "writer (the target; migrated as the owner first)",
    "rejects replay": "writer",
    "rejects resolve": "writer",
    "offsets accept-loss": "writer",
    "books restore": "writer",
    "outbox retry": "writer",
    "projections rebuild": "writer",
    "prune": "writer",
    "config publish": "writer",
    "config list": "reader",
    "rejects list": "reader",
    "rejects show": "reader",
    "offsets show": "reader",
    "offsets audit": "reader",
    "outbox parked": "reader",
    "trial-balance": "reader",
    "account show": "reader",
    "invoices list": "reader",
    "audit": "reader",
    "verify": "reader",
    "console": "reader",
}


def _database(settings: Settings, role: str) -> str:
    """The ledger's database as `role` ("owner", "writer" or "reader"): the local stack's
    unless LEDGER_DATABASE_URL (and LEDGER_OWNER_/READER_DATABASE_URL), schema checked;
    Kafka is not needed."""
    from ledger import db, stack

    return db.require_current_schema(stack.database_url(settings, role))


def _with_progress(label: str, unit: str, work, *, transient: bool = False):
    """Run `work(progress)` under a progress bar with rate and ETA; returns what it returns.
    `progress(done, total)` is what the long-running commands call as they go."""
    from rich.progress import Progress, ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:  # a whole number per second, nothing before known
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} {unit}/s")

    columns = (*Progress.get_default_columns(), Rate())
    with Progress(*columns, transient=transient) as bar:
        task = bar.add_task(label, total=None)
        return work(lambda done, total: bar.update(task, completed=done, total=total))


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import stack

    if args.action == "up":
        info = stack.up(settings)
        from ledger.chain_keys import key_file

        print(f"kafka bootstrap: {info.bootstrap}  ({info.broker})")
        print(f"database url:    {redact(info.dsn)}  (writer: the workers)")
        print(f"owner url:       {redact(info.owner_dsn)}  (ledger db migrate)")
        print(f"reader url:      {redact(info.reader_dsn)}  (audit, verify, reports)")
        print(f"chain keys:      {key_file(settings)}")
        return 0
    if args.action == "down":
        stack.down(settings)
        print("stack stopped")
        return 0
    if args.action == "use-main":
        run = stack.current_run(settings)
        stack.set_current_run(settings, None)
        left = f" (demo run {run['run_id']} is left in {run['database']})" if run else ""
        print(f"commands use the stack's own database and topics{left}")
        return 0
    report = stack.status(settings) | {"current_run": stack.current_run(settings)}
    print(redact(json.dumps(report, indent=2, default=str)))
    return 0 if report.get("running") else 3


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import stack, topics

    info = stack.connect(settings)
    created = topics.create_topics(info.bootstrap, settings)
    for name in created:
        print(f"created {name}")
    print(f"{len(topics.all_topics(settings))} topics present")
    return 0


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import db, stack

    applied = db.migrate(stack.database_url(settings, "owner"), settings.db_roles)
    print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import chain_keys, db, stack
    from ledger.configure import configured_versions, publish
    from ledger.worker import ROLES, run_worker

    roles = tuple(args.role or ROLES)
    if {"ledger", "relay"} & set(roles):
        chain_keys.load(settings)  # no chain key: stop now, not in a restarting role
    info = stack.connect(settings)
    # The writer cannot migrate: the schema must be current (`ledger db migrate`, the owner).
    db.require_current_schema(info.dsn)
    if "ledger" in roles:  # the configured files, published once (a changed one is refused)
        with db.connect(info.dsn) as conn:
            publish(conn, configured_versions(settings.price_book, settings.policy))
    return run_worker(settings, info.bootstrap, info.dsn, roles)


def _config(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import db
    from ledger.configure import configured_versions, publish, published

    dsn = _database(settings, "writer" if args.action == "publish" else "reader")
    if args.action == "publish":
        versions = configured_versions(
            args.prices or settings.price_book,
            args.policy or settings.policy,
            prices=args.only in (None, "prices"),
            rules=args.only in (None, "policy"),
        )
        with db.connect(dsn) as conn:
            for ref, outcome in publish(conn, versions):
                print(f"{ref:<40} {outcome}")
        return 0
    rows = published(db.connect(dsn))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'kind':<11} {'version':<20} {'effective_from':<26} {'sha256':<13} shards")
    for r in rows:
        print(
            f"{r['kind']:<11} {r['version']:<20} {r['effective_from'].isoformat():<26} "
            f"{r['sha256'][:12]:<13} {r['shards']}"
        )
    if not rows:
        print("nothing published yet (`ledger config publish`; the worker publishes at start)")
    return 0


def _scheduler(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import stack
    from ledger.producer import EventProducer
    from ledger.scheduler import send_ticks

    info = stack.connect(settings)
    if args.once:
        with EventProducer(info.bootstrap, settings) as producer:
            print(f"sent {send_ticks(producer, datetime.now(UTC))} ticks")
        return 0
    from ledger.worker import run_worker

    return run_worker(settings, info.bootstrap, info.dsn, ("scheduler",))


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import db, stack
    from ledger.replay import replay

    db.migrate(stack.database_url(settings, "owner"), settings.db_roles)
    target = stack.database_url(settings, "writer")
    count = _with_progress(
        "replaying",
        "events",
        lambda progress: replay(
            settings, args.from_database_url, target, progress=progress, jobs=args.jobs
        ),
    )
    print(f"replayed {count} events into {redact(target)}")
    return 0


def _rejects(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.rejects import dismiss, replay_rejects, summary

    if args.action == "show":
        return _rejects_show(args, settings)
    if args.action == "resolve":
        if args.id is None or not args.note:
            raise LedgerError(
                'rejects resolve: give the id and --note "why", e.g. '
                '`ledger rejects resolve 42 --note "test record"`'
            )
        if not dismiss(_database(settings, "writer"), args.id, args.note):
            print(f"no open rejected event with id {args.id}")
            return 4
        print(f"reject {args.id} resolved (dismissed)")
        return 0
    if args.action == "replay":
        outcome = replay_rejects(settings, _database(settings, "writer"), reason=args.reason)
        print(f"journaled now: {len(outcome.journaled)}")
        print(f"already journaled: {len(outcome.duplicates)}")
        for reason, count in sorted(outcome.still_rejected.items()):
            print(f"still rejected ({reason}): {count}")
    rows = summary(_database(settings, "reader"))
    for reason, still_open, resolved in rows:
        print(f"{reason:<24} open {still_open:>8}   resolved {resolved:>8}")
    if not rows:
        print("no rejected events")
    return 0


def _offsets(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import db, stack
    from ledger.offsets import accept_loss, lost_ranges

    info = stack.connect(settings)
    dsn = db.require_current_schema(
        info.role_dsn("writer" if args.action == "accept-loss" else "reader")
    )
    if args.action == "audit":
        return _offsets_audit(args, settings, info.bootstrap, dsn)
    if args.action == "accept-loss":
        if args.shard is None:
            raise ConfigError("offsets accept-loss: --shard is required")
        accepted = accept_loss(settings, info.bootstrap, dsn, args.shard, args.note or "")
        for r in accepted:
            print(f"accepted loss {r.topic}[{r.partition}] offsets {r.stored}..{r.log_start - 1}")
        if not accepted:
            print(f"shard {args.shard}: nothing lost, nothing to accept")
        return 0
    lost = lost_ranges(settings, info.bootstrap, dsn)
    for r in lost:
        print(f"LOST {r.topic}[{r.partition}] offsets {r.stored}..{r.log_start - 1}")
    if not lost:
        print("no lost offsets: every stored offset is still in Kafka")
    return 1 if lost else 0


def _offsets_audit(args: argparse.Namespace, settings: Settings, bootstrap: str, dsn: str) -> int:
    from ledger.offsets import audit

    shards = None if args.shard is None else [args.shard]
    audits = _with_progress(
        "records",
        "records",
        lambda progress: audit(settings, bootstrap, dsn, shards, progress=progress),
        transient=True,
    )
    missing = 0
    for a in audits:
        if a.stored <= a.first:
            unread = "nothing read yet" if a.stored == a.first else "LOST: see offsets show"
            print(
                f"{a.topic}[{a.partition}] {unread} "
                f"(stored offset {a.stored}, Kafka from {a.first})"
            )
            continue
        print(
            f"{a.topic}[{a.partition}] offsets {a.first}..{a.stored - 1}: {a.records} records, "
            f"{a.journaled} journaled, {a.redelivered} redelivered, {a.quarantined} quarantined, "
            f"{a.pruned} quarantined and pruned, {a.missing} unaccounted"
        )
        for u in a.unaccounted:
            print(
                f"UNACCOUNTED {a.topic}[{a.partition}] offsets {u.first}..{u.last} "
                f"({u.records} records): {u.why}"
            )
        missing += a.missing
    if missing:
        print(f"{missing} records below the stored offsets left no trace in the journal")
        return 1
    print("every record below the stored offsets is journaled, redelivered or quarantined")
    return 0


def _rejects_show(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.rejects import reject_json, reject_lines, show

    if args.id is None:
        raise LedgerError("rejects show: give the reject id, e.g. `ledger rejects show 42`")
    reject = show(_database(settings, "reader"), args.id)
    if reject is None:
        print(f"no rejected event with id {args.id}")
        return 4
    if args.json:
        print(json.dumps(reject_json(reject, limit=args.bytes), indent=2))
    else:
        print("\n".join(reject_lines(reject, limit=args.bytes)))
    return 0


def _outbox(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.rejects import printable
    from ledger.relay import parked_rows, retry_parked

    dsn = _database(settings, "writer" if args.action == "retry" else "reader")
    if args.action == "retry":
        if (args.id is None) == (not args.all):
            raise LedgerError("outbox retry: give either --id N or --all")
        ids = retry_parked(dsn, args.id)
        if not ids:
            print(f"outbox row {args.id} is not parked" if args.id else "no parked outbox rows")
            return 4 if args.id else 0
        print(f"un-parked {len(ids)} outbox row(s): {', '.join(map(str, ids))}")
        return 0
    rows = parked_rows(dsn)
    if not rows:
        print("no parked outbox rows")
        return 0
    if args.json:
        print(
            json.dumps(
                rows, indent=2, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)
            )
        )
        return 0
    print(
        f"{'id':>10}  {'topic':<32} {'bytes':>9}  {'reason':<18} {'parked at':<32} tries  waiting"
    )
    for row in rows:
        print(
            f"{row['id']:>10}  {printable(row['topic']):<32} {row['size']:>9}  "
            f"{row['reason']:<18} {row['parked_at'].isoformat():<32} {row['attempts']:>5}  "
            f"{row['waiting']:>7}"
        )
        print(f"{'':>10}  {printable(row['detail'] or '')}")
    print(f"{len(rows)} parked; `ledger outbox retry --id N | --all` to try them again")
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import stack
    from ledger.errors import StackError
    from ledger.overview import overview, overview_lines

    dsn = _database(settings, "reader")
    try:
        report = overview(settings, stack.kafka_bootstrap(settings), dsn)
    except StackError as exc:  # no Kafka known: the rest is still worth printing
        report = overview(settings, None, dsn, kafka_unknown=str(exc))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(overview_lines(report)))
    return 1 if report["kafka_error"] else 0


def _trial_balance(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import db
    from ledger.money import plain
    from ledger.reports import trial_balance

    with db.connect(_database(settings, "reader")) as conn:
        tb = trial_balance(conn)
    for currency, total in sorted(tb.totals.items()) or [("USD", 0)]:
        state = "balanced" if total == 0 else "UNBALANCED"
        print(f"{currency}  {plain(total):>24}  {state}")
    print(f"{tb.postings} postings")
    return 0 if tb.balanced else 1


def _account(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import db
    from ledger.reports import account_view

    with db.connect(_database(settings, "reader")) as conn:
        view = account_view(conn, args.account_id, last=args.last)
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        from ledger.render import print_account

        print_account(view)
    return 0 if view["known"] else 4


def _books(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import db
    from ledger.audit import restore_book
    from ledger.policy import Policy

    policy = Policy.load(settings.policy)
    with db.connect(_database(settings, "writer")) as conn:
        for account_id in args.account_ids:
            done = restore_book(conn, policy, account_id)
            if done.changed:
                print(f"{account_id}: restored from its journal entries (the book was {done.was})")
            else:
                print(f"{account_id}: unchanged (the book already is what the journal records)")
    return 0


def _invoices(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import db
    from ledger.reports import invoices_of_month

    with db.connect(_database(settings, "reader")) as conn:
        invoices = invoices_of_month(conn, args.month)
    if args.json:
        print(json.dumps(invoices, indent=2))
    else:
        from ledger.render import print_invoices

        print_invoices(invoices, f"invoices for {args.month} ({len(invoices)})")
        if not invoices:
            print(
                f"no invoices for {args.month} yet: a month's invoices are issued at the first "
                "tick after its end plus the grace period (policy month_close.grace_hours)"
            )
    return 0


def _audit(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import db
    from ledger.audit import audit_bill, bill_as_csv
    from ledger.policy import Policy

    with db.connect(_database(settings, "reader")) as conn:
        bill = audit_bill(conn, Policy.load(settings.policy), args.account, args.month, args.as_of)
    if args.format == "json":
        print(json.dumps(bill, indent=2))
    elif args.format == "csv":
        print(bill_as_csv(bill), end="")
    else:
        from ledger.render import print_bill

        print_bill(bill)
    return 0


def _projections(args: argparse.Namespace, settings: Settings) -> int:

    from projections.rebuild import rebuild

    dsn = _database(settings, "writer")
    count = _with_progress(
        f"rebuilding {args.name}",
        "entries",
        lambda progress: rebuild(settings, dsn, progress=progress, jobs=args.jobs),
    )
    print(f"rebuilt {args.name}: {count} accounts, swapped in")
    return 0


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from ledger import chain_keys, checkpoints, stack, topics
    from ledger.verify import Difference, verify

    dsn = _database(settings, "reader")
    notes: list[str] = []
    try:
        keys = chain_keys.load(settings)
    except ConfigError as exc:  # an empty journal needs none; keyed entries are reported
        keys = chain_keys.ChainKeys({}, "no key file")
        notes.append(f"no chain keys ({exc})")
    found: list[checkpoints.Checkpoint] | None = None
    problems: list[str] = []
    source = ""
    if args.checkpoints:
        path = Path(args.checkpoints)
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise LedgerError(f"--checkpoints {path}: cannot read it ({exc.strerror})") from None
        found = checkpoints.parse_digest(text, str(path))
        source = str(path)
    elif not args.no_checkpoints and stack.kafka_configured(settings):
        from kafka.errors import KafkaError

        try:
            bootstrap = stack.connect(settings).bootstrap
            found, problems = checkpoints.read_topic(settings, bootstrap, keys)
        except (KafkaError, StackError) as exc:
            raise LedgerError(
                f"cannot read the checkpoints from Kafka ({exc}); give an auditor's digest "
                "with --checkpoints FILE, or --no-checkpoints"
            ) from None
        source = settings.topic(topics.CHECKPOINTS)
    elif not args.no_checkpoints:
        notes.append(
            "no Kafka here (LEDGER_KAFKA_BOOTSTRAP, or a local stack): the chains were not "
            "checked against checkpoints; give an auditor's digest with --checkpoints FILE"
        )
    differences = [Difference("checkpoint", "forged or unreadable", p) for p in problems]
    differences += _with_progress(
        "recomputing",
        "entries",
        lambda progress: verify(
            settings,
            dsn,
            progress=progress,
            keys=keys,
            checkpoints=found,
            notes=notes,
            jobs=args.jobs,
        ),
        transient=True,
    )
    for difference in differences:
        print(difference)
    for note in notes:
        print(f"note: {note}")
    checked = (
        "no checkpoints"
        if found is None
        else f"{len(found)} checkpoints of {len(checkpoints.latest(found))} shards from {source}"
    )
    if differences:
        print(f"verify FAILED: {len(differences)} differences (checked against {checked})")
        return 1
    print(
        "verify OK: trial balance zero, keyed hash chains intact, checked against "
        f"{checked}; account books, projections and invoices equal their recomputation "
        "from the journal; receivables and revenue:rounding agree with the issued invoices"
    )
    return 0


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.retention import prune

    pruned = prune(settings, _database(settings, "writer"))
    print(
        f"pruned {pruned.outbox_rows} outbox rows published over "
        f"{settings.outbox_retention_days} days ago, {pruned.rejects} rejects resolved over "
        f"{settings.rejects_retention_days} days ago; the journal keeps everything"
    )
    return 0


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import chain_keys

    path = chain_keys.key_file(settings)
    if args.action == "new":
        key_id = chain_keys.add_key(path, args.id)
        print(f"added chain key {key_id} to {path}")
        print("it links new entries once the ledger and relay roles are restarted")
        return 0
    keys = chain_keys.load(settings)
    for key_id in keys.secrets:
        print(f"{key_id}{'  (current)' if key_id == keys.current else ''}")
    print(f"{len(keys.secrets)} keys in {path}")
    return 0


def _checkpoints(args: argparse.Namespace, settings: Settings) -> int:
    from kafka.errors import KafkaError

    from ledger import chain_keys, checkpoints, db, stack, topics

    info = stack.connect(settings)
    keys = chain_keys.load(settings)
    if args.action == "publish":
        from kafka import KafkaProducer

        from ledger.kafka_auth import client_options

        producer = KafkaProducer(
            bootstrap_servers=info.bootstrap,
            client_id="ledger-checkpoints",
            acks="all",
            enable_idempotence=True,
            **client_options(settings),
        )
        try:
            with db.connect(db.require_current_schema(info.dsn), autocommit=True) as conn:
                count = checkpoints.Publisher(settings, keys).publish(conn, producer)
        finally:
            producer.close(timeout=5)
        print(f"published {count} checkpoints to {settings.topic(topics.CHECKPOINTS)}")
        return 0
    try:
        found, problems = checkpoints.read_topic(settings, info.bootstrap, keys)
    except KafkaError as exc:
        raise LedgerError(f"cannot read the checkpoints from Kafka: {exc}") from None
    for problem in problems:
        print(f"ledger: {problem}", file=sys.stderr)
    print(checkpoints.digest(found, settings.topic(topics.CHECKPOINTS)), end="")
    return 1 if problems else 0


def _kafka_acls(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import kafka_acls

    grants = kafka_acls.plan(
        settings,
        ledger=args.ledger_user,
        relay=args.relay_user,
        scheduler=args.scheduler_user,
        producer=args.producer_user,
    )
    for command in kafka_acls.commands(grants, args.bootstrap_server):
        print(command)
    return 0


def _console(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from ledger.console.app import serve

    if args.host is not None or args.port is not None:  # validated like the settings
        settings = dataclasses.replace(
            settings,
            console_host=settings.console_host if args.host is None else args.host,
            console_port=settings.console_port if args.port is None else args.port,
        )
    dsn = _database(settings, "reader")
    print(f"ledger console: {settings.console_url}  (read-only, as the reader role; Ctrl-C stops)")
    return serve(settings, dsn)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.demo import run_demo

    return run_demo(settings, accounts=args.accounts, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ledger",
        description="An event-sourced, double-entry billing ledger: Kafka in, a PostgreSQL "
        "journal, account balances, spend limits and suspensions out.",
        epilog="Each command has its own --help. Settings come from LEDGER_* environment "
        "variables (see the README's Configuration).",
    )
    parser.add_argument("--version", action="version", version=f"ledger {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start/stop/inspect the local Kafka + PostgreSQL")
    p.add_argument(
        "action",
        choices=["up", "down", "status", "use-main"],
        help="use-main: back to the stack's own database and topics after `make demo`",
    )
    p.set_defaults(func=_stack)

    p = sub.add_parser("topics", help="manage the ledger's Kafka topics")
    p.add_argument("action", choices=["create"])
    p.set_defaults(func=_topics)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["migrate"])
    p.set_defaults(func=_db)

    p = sub.add_parser("worker", help="run the ledger consumer, projections and relay")
    p.add_argument(
        "--role",
        action="append",
        choices=["ledger", "projections", "relay", "scheduler"],
        help="run only this role (repeatable); default: all four",
    )
    p.set_defaults(func=_worker)

    p = sub.add_parser(
        "config", help="price-book and policy versions: publish them to the journal, list them"
    )
    p.add_argument("action", choices=["publish", "list"])
    p.add_argument("--prices", type=_existing_file, help="price book file (default: configured)")
    p.add_argument("--policy", type=_existing_file, help="policy file (default: configured)")
    p.add_argument("--only", choices=["prices", "policy"], help="publish one of the two")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(func=_config)
    p = sub.add_parser("scheduler", help="send PeriodTicks (also run by `ledger worker`)")
    p.add_argument("--once", action="store_true", help="send one tick now and exit")
    p.set_defaults(func=_scheduler)

    p = sub.add_parser("replay", help="rebuild the journal from another journal, in its order")
    p.add_argument(
        "--from-database-url",
        required=True,
        help="postgresql:// URL of the source journal; the target is LEDGER_DATABASE_URL",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="processes replaying shards side by side (default: one per core, from 10,000 "
        "events on; 1: none besides this one)",
    )
    p.set_defaults(func=_replay)

    p = sub.add_parser("rejects", help="quarantined events: counts, one in full, feeding again")
    p.add_argument("action", choices=["list", "replay", "show", "resolve"])
    p.add_argument("id", nargs="?", type=_positive_int, help="the reject's id (show, resolve)")
    p.add_argument("--reason", help="only rejects with this reason (replay)")
    p.add_argument("--note", help="why it is resolved without being journaled (resolve)")
    p.add_argument("--json", action="store_true", help="machine-readable output (show)")
    p.add_argument(
        "--bytes",
        type=_non_negative_int,
        default=256,
        help="raw bytes to show (show; default 256, 0 for all)",
    )
    p.set_defaults(func=_rejects)

    p = sub.add_parser(
        "offsets",
        help="stored offsets Kafka deleted before they were journaled; accept a loss; audit "
        "that every record below them is in the journal",
    )
    p.add_argument("action", choices=["show", "accept-loss", "audit"])
    p.add_argument(
        "--shard", type=_shard, help="the shard (partition number) to accept, or to audit"
    )
    p.add_argument("--note", help="why the loss is accepted (kept with the record)")
    p.set_defaults(func=_offsets)
    p = sub.add_parser(
        "books", help="account books: write one back as its journal entries record it"
    )
    p.add_argument("action", choices=["restore"])
    p.add_argument("account_ids", nargs="+", metavar="ACCOUNT", help="account id(s)")
    p.set_defaults(func=_books)
    p = sub.add_parser("outbox", help="outbox rows Kafka refused: list them, try them again")
    p.add_argument("action", choices=["parked", "retry"])
    p.add_argument("--id", type=_positive_int, help="retry this parked row")
    p.add_argument("--all", action="store_true", help="retry every parked row")
    p.add_argument("--json", action="store_true", help="machine-readable output (parked)")
    p.set_defaults(func=_outbox)

    p = sub.add_parser("status", help="lag per shard, lease holders, outbox backlog, open rejects")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)

    p = sub.add_parser("trial-balance", help="sum of all postings per currency; exit 1 unless 0")
    p.set_defaults(func=_trial_balance)

    p = sub.add_parser("account", help="inspect one account")
    p.add_argument("action", choices=["show"])
    p.add_argument("account_id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--last", type=_positive_int, default=10, help="entries to list (default 10)")
    p.set_defaults(func=_account)

    p = sub.add_parser("invoices", help="issued invoices")
    p.add_argument("action", choices=["list"])
    p.add_argument("--month", required=True, type=_month, help="billing month, YYYY-MM")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_invoices)

    p = sub.add_parser("audit", help="an account's bill for a month, from the journal alone")
    p.add_argument("--account", required=True)
    p.add_argument("--month", required=True, type=_month, help="billing month, YYYY-MM")
    p.add_argument(
        "--as-of",
        type=_timestamp,
        default=None,
        help="only what was recorded by then (ISO 8601, e.g. 2026-04-02T00:00Z)",
    )
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=_audit)

    p = sub.add_parser("projections", help="rebuild projections from the journal")
    p.add_argument("action", choices=["rebuild"])
    p.add_argument("--name", choices=["account_status"], default="account_status")
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="processes folding shards from scratch side by side (default: one per core, "
        "from 50,000 entries on; 1: none besides this one)",
    )
    p.set_defaults(func=_projections)

    p = sub.add_parser("verify", help="check the live state against the journal; exit 1 if not")
    p.add_argument(
        "--checkpoints",
        metavar="FILE",
        help="check the chains against this checkpoint digest (`ledger checkpoints digest`) "
        "instead of the checkpoint topic",
    )
    p.add_argument("--no-checkpoints", action="store_true", help="do not read the checkpoint topic")
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="processes checking shards side by side, in one snapshot (default: one per core, "
        "from 50,000 entries on; 1: none besides this one)",
    )
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "prune", help="delete published outbox rows and resolved rejects past their retention"
    )
    p.set_defaults(func=_prune)

    p = sub.add_parser("keys", help="the hash chain's keys: add one (rotation), list them")
    p.add_argument("action", choices=["new", "list"])
    p.add_argument("--id", help="the new key's id (default: k<UTC time>)")
    p.set_defaults(func=_keys)

    p = sub.add_parser(
        "checkpoints", help="chain-head checkpoints: print the digest, or publish one round now"
    )
    p.add_argument("action", choices=["digest", "publish"])
    p.set_defaults(func=_checkpoints)

    p = sub.add_parser(
        "kafka-acls", help="print the kafka-acls.sh commands of a least-privilege deployment"
    )
    p.add_argument("--bootstrap-server", default="BROKER:9092", help="as kafka-acls.sh takes it")
    for role, default in (
        ("ledger", "ledger"),
        ("relay", "relay"),
        ("scheduler", "scheduler"),
        ("producer", "producer"),
    ):
        p.add_argument(f"--{role}-user", default=default, help=f"SASL user of the {role}")
    # A deployment's topics: LEDGER_TOPIC_PREFIX decides, never the local stack's demo run.
    p.set_defaults(func=_kafka_acls, current_run=False)

    p = sub.add_parser(
        "console", help="the read-only web console: accounts, bills, rejects, operations"
    )
    p.add_argument("--host", help="listen on this address (default LEDGER_CONSOLE_HOST)")
    p.add_argument(
        "--port", type=_positive_int, help="listen on this port (default LEDGER_CONSOLE_PORT)"
    )
    p.set_defaults(func=_console)

    p = sub.add_parser("demo", help="local stack + worker + a simulated month of traffic")
    p.add_argument("--accounts", type=_positive_int, default=1000, help="accounts (default 1000)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.set_defaults(func=_demo, current_run=False)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("billing-ledger")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _month(text: str) -> str:
    """Strictly YYYY-MM: `2026-3` would silently name no month's data."""
    if re.fullmatch(r"[0-9]{4}-(0[1-9]|1[0-2])", text) is None:
        raise argparse.ArgumentTypeError(f"not a month (YYYY-MM, e.g. 2026-03): {text!r}")
    return text


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone (e.g. Z): {text!r}")
    return value


def _shard(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shard number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def _existing_file(text: str):
    from pathlib import Path

    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    gc_tuning.tune()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        parser.exit(2, f"ledger: configuration error: {redact(str(exc))}\n")
    configure_logging(settings)
    try:
        if getattr(args, "current_run", True):
            from ledger import stack

            settings = stack.with_current_run(settings)
        return args.func(args, settings)
    except ConfigError as exc:
        parser.exit(2, f"ledger: configuration error: {redact(str(exc))}\n")
    except LedgerError as exc:
        print(f"ledger: {redact(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `ledger audit ... | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
