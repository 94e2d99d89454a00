"""Throughput benchmark: how fast the ledger drains Kafka into PostgreSQL, against raw Kafka.

    python -m ledger.bench [--events N] [--partitions P] [--accounts A] [--keep] [--profile]

1. Brings up the local stack (or uses LEDGER_KAFKA_BOOTSTRAP / LEDGER_DATABASE_URL), creates
   fresh topics (prefix `bench-<ts>.`, P partitions) and a fresh, migrated database.
2. Pre-produces A AccountOpened events, PaymentMethodAdded for a share of the accounts, then N
   UsageRecorded events (skewed over the accounts, several products and priced models).
3. Times (a) raw kafka-python consumption of the input topics, (b) the same plus Avro decoding,
   (c) the ledger role as a real `ledger worker --role ledger` process draining everything into
   the journal, (d) the projection role draining the journal into account_status.
   With --profile, also (e) LedgerWriter.write_batch in-process (no Kafka) on fresh databases:
   once with its steps wrapped in timers, once under cProfile (`<home>/bench-<ts>.prof`).
4. Prints a table and writes it as JSON to `<home>/bench-<ts>.json`. Each phase also reports
   the average cores used by the worker, PostgreSQL, the broker, this script and "other"
   processes: on a shared machine, "other" says how far to trust the rates.
5. Drops the database(s) and deletes the topics (unless --keep). The local stack
   itself is left running (`ledger stack down` stops it).

Rates "after warm-up" count from the first journaled row (or first record), so they leave out
process start-up, connecting and taking the shard leases.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import io
import json
import logging
import os
import platform
import pstats
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from ledger import db, stack, topics
from ledger.codec import Codec
from ledger.db import QUERIES
from ledger.errors import LedgerError
from ledger.log import configure_logging
from ledger.rating import PriceBook
from ledger.settings import Settings


def say(*parts: object, end: str = "\n", file=None, flush: bool = True) -> None:
    """The benchmark's report: it is a command-line program, and this is its output."""
    stream = file or sys.stdout
    stream.write(" ".join(str(p) for p in parts) + end)
    if flush:
        stream.flush()


T0 = datetime(2026, 3, 1, tzinfo=UTC)  # inside the first price version
USAGE_SPAN = timedelta(days=27)
PAYMENT_METHOD_SHARE = 0.4
PRODUCT_WEIGHTS = {"serverless": 85, "image": 8, "on_demand": 5, "fine_tuning": 2}
TIER_WEIGHTS = {"standard": 80, "batch": 15, "priority": 5}
ACCOUNT_SKEW = 0.8  # Zipf exponent of usage over accounts
POLL_S = 0.05
MIB = 1024 * 1024


class BenchError(LedgerError):
    """The benchmark could not complete a phase."""


# --- input ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Message:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def make_events(
    accounts: int, events: int, seed: int
) -> tuple[list[tuple[str, dict]], dict[str, int]]:
    """(event_type, event) in production order, and how many of each type."""
    rng = random.Random(seed)
    version = PriceBook.load().version_at(T0)
    if version is None:
        raise BenchError(f"the price book has no version in force at {T0:%Y-%m-%d}")
    ids = [f"bench-acct-{i:06d}" for i in range(accounts)]
    out: list[tuple[str, dict]] = []

    def event(event_type: str, account_id: str, when: datetime, **fields: Any) -> None:
        uid = uuid.UUID(int=rng.getrandbits(128), version=4)
        out.append(
            (
                event_type,
                {"event_id": str(uid), "account_id": account_id, "occurred_at": when, **fields},
            )
        )

    for i, account_id in enumerate(ids):
        when = T0 + timedelta(seconds=i)
        event("AccountOpened", account_id, when, created_at=when)
    for i, account_id in enumerate(ids):
        if rng.random() < PAYMENT_METHOD_SHARE:
            event(
                "PaymentMethodAdded",
                account_id,
                T0 + timedelta(hours=1, seconds=i),
                payment_method_id=f"pm-{rng.getrandbits(48):012x}",
                kind="card",
            )

    # Heavy-tailed usage: a few accounts send most of it.
    ranked = ids[:]
    rng.shuffle(ranked)
    cum_weights = []
    total = 0.0
    for rank in range(1, accounts + 1):
        total += rank**-ACCOUNT_SKEW
        cum_weights.append(total)
    models = {
        "serverless": sorted(version.serverless),
        "image": sorted(version.image),
        "fine_tuning": sorted(version.fine_tuning),
        "on_demand": sorted(version.on_demand),  # GPU types
    }
    products = [p for p in PRODUCT_WEIGHTS if models[p]]
    product_weights = [PRODUCT_WEIGHTS[p] for p in products]
    tiers, tier_weights = list(TIER_WEIGHTS), list(TIER_WEIGHTS.values())
    owners = rng.choices(ranked, cum_weights=cum_weights, k=events)
    step = USAGE_SPAN / max(events, 1)
    start = T0 + timedelta(hours=2)
    for i, account_id in enumerate(owners):
        product = rng.choices(products, product_weights)[0]
        fields: dict[str, Any] = {
            "request_id": f"req-{rng.getrandbits(64):016x}",
            "product": product,
            "service_tier": rng.choices(tiers, tier_weights)[0],
        }
        if product == "serverless":
            fields["model"] = rng.choice(models["serverless"])
            prompt = min(200_000, max(1, int(rng.lognormvariate(7.0, 1.2))))
            cached = int(prompt * rng.uniform(0.2, 0.9)) if rng.random() < 0.3 else 0
            fields["input_tokens"] = prompt - cached
            fields["cached_input_tokens"] = cached
            fields["output_tokens"] = min(32_000, max(1, int(rng.lognormvariate(5.5, 1.0))))
        elif product == "image":
            model = rng.choice(models["image"])
            fields["model"] = model
            if "step" in version.image[model]:
                fields["steps"] = rng.choice((4, 20, 28, 30, 50)) * rng.randint(1, 4)
            else:
                fields["images"] = rng.randint(1, 4)
        elif product == "fine_tuning":
            fields["model"] = rng.choice(models["fine_tuning"])
            fields["training_tokens"] = rng.randint(100_000, 20_000_000)
        else:  # on_demand: GPU time in seconds, millisecond resolution
            fields["model"] = "accounts/bench/deployedModels/custom"
            fields["gpu_type"] = rng.choice(models["on_demand"])
            fields["gpu_seconds"] = Decimal(rng.randint(1_000, 3_600_000)).scaleb(-3)
        event("UsageRecorded", account_id, start + step * i, **fields)

    counts: dict[str, int] = {}
    for event_type, _ in out:
        counts[event_type] = counts.get(event_type, 0) + 1
    return out, counts


def encode_events(
    settings: Settings, codec: Codec, events: list[tuple[str, dict]]
) -> list[Message]:
    headers = {t: codec.headers(t) for t in {t for t, _ in events}}
    names = {t: settings.topic(topics.topic_for(t)) for t in headers}
    return [
        Message(names[t], e["account_id"].encode(), codec.encode(t, e), headers[t])
        for t, e in events
    ]


def produce(bootstrap: str, messages: list[Message]) -> tuple[float, str]:
    """Send everything and wait for the acks; returns (seconds, broker API version)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="ledger-bench",
        acks="all",
        linger_ms=20,
        batch_size=512 * 1024,
        max_request_size=1024 * 1024,
        compression_type=None,
    )
    try:
        api = ".".join(str(v) for v in producer.config.get("api_version") or ())
        started = time.perf_counter()
        futures = [
            producer.send(m.topic, value=m.value, key=m.key, headers=m.headers) for m in messages
        ]
        producer.flush()
        seconds = time.perf_counter() - started
        failed = [f for f in futures if f.failed()]
        if failed:
            raise BenchError(f"{len(failed)} sends failed, first: {failed[0].exception}")
        return seconds, api
    finally:
        producer.close()


# --- raw consumption -----------------------------------------------------------------------


@dataclasses.dataclass
class ConsumeRun:
    records: int
    seconds: float  # consumer created → last record
    warm_seconds: float  # consumer created → first record

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def steady_rate(self) -> float:
        return self.records / max(self.seconds - self.warm_seconds, 1e-9)


def input_consumer(bootstrap: str, settings: Settings, client_id: str):
    """A consumer reading every input partition from the beginning, configured as the ledger's
    own consumer: manual assignment (no group protocol; the ledger owns shards by PostgreSQL
    leases), its batch size, fetch sizes and fetch options."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.batch_max_events,
        fetch_max_wait_ms=min(settings.batch_max_ms, 500),
        max_partition_fetch_bytes=4 * MIB,
        # As ledger.consumer.kafka_consumer_options: kafka-python 3.0 can stop fetching an
        # assigned partition with incremental fetch sessions.
        enable_incremental_fetch_sessions=False,
    )
    parts = [
        TopicPartition(t, p)
        for t in topics.input_topics(settings)
        for p in range(settings.partitions)
    ]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    return consumer


def consume_raw(
    bootstrap: str,
    settings: Settings,
    expected: int,
    *,
    decode: Callable[[bytes], Any] | None,
    label: str,
    timeout: float,
) -> ConsumeRun:
    """Read (and optionally decode) every input record; nothing else."""
    started = time.perf_counter()
    consumer = input_consumer(bootstrap, settings, f"ledger-bench-{label}")
    try:
        first = None
        count = 0
        while count < expected:
            if time.perf_counter() - started > timeout:
                raise BenchError(f"{label}: read {count} of {expected} records in {timeout}s")
            polled = consumer.poll(timeout_ms=500, max_records=settings.batch_max_events)
            for records in polled.values():
                if first is None:
                    first = time.perf_counter()
                if decode is not None:
                    for record in records:
                        decode(record.value)
                count += len(records)
        done = time.perf_counter()
    finally:
        consumer.close(autocommit=False)
    assert first is not None
    return ConsumeRun(count, done - started, first - started)


# --- worker roles as real processes --------------------------------------------------------


@dataclasses.dataclass
class RoleRun:
    role: str
    items: int
    seconds: float  # process start → done
    warm_seconds: float  # process start → first progress seen
    warm_items: int  # progress already made when first seen
    peak_rss_mib: float
    cpu_seconds: float
    cpu_cores: dict[str, float]  # average cores per process group while the role ran
    exit_code: int

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    @property
    def steady_rate(self) -> float:
        return (self.items - self.warm_items) / max(self.seconds - self.warm_seconds, 1e-9)


def run_role(
    role: str,
    env: dict[str, str],
    log_path: Path,
    progress: Callable[[], int],
    target: int,
    timeout: float,
    meter: CpuMeter,
    stall: float,
) -> RoleRun:
    """Start `ledger worker --role <role>`, wait until `progress()` reaches `target`, read its
    peak RSS and CPU time, SIGTERM it and check it exits 0. Gives up when there is no progress
    for `stall` seconds (a worker that keeps failing its batch retries forever)."""
    cmd = [sys.executable, "-m", "ledger.cli", "worker", "--role", role]
    meter.start()
    with open(log_path, "ab") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        first: tuple[float, int] | None = None
        last = (started, -1)
        while True:
            count = progress()
            now = time.perf_counter()
            if count > 0 and first is None:
                first = (now, count)
            if count >= target:
                break
            if count != last[1]:
                last = (now, count)
            elif now - last[0] > stall:
                raise BenchError(
                    f"{role}: no progress for {stall:.0f}s at {count} of {target}; see {log_path}"
                )
            if proc.poll() is not None:
                raise BenchError(
                    f"{role} worker exited with {proc.returncode} after {count} of {target}; "
                    f"see {log_path}"
                )
            if now - started > timeout:
                raise BenchError(f"{role}: {count} of {target} after {timeout}s; see {log_path}")
            time.sleep(POLL_S)
        done = now
        cores = meter.stop({"worker": proc.pid})
        peak_rss = _proc_status_kib(proc.pid, "VmHWM") / 1024
        cpu_seconds = _proc_cpu_seconds(proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        raise BenchError(f"{role} worker exited with {code} after SIGTERM; see {log_path}")
    assert first is not None
    return RoleRun(
        role, target, done - started, first[0] - started, first[1], peak_rss, cpu_seconds, cores, 0
    )


def _proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


def _proc_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all cores; steal counts as busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) of every process on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


class CpuMeter:
    """Average cores used during a phase by each of our process trees (the bench, the worker,
    the local PostgreSQL and broker) and by everything else on the machine ("other": e.g. a
    test suite running beside the benchmark, which makes the numbers less trustworthy)."""

    def __init__(self, roots: dict[str, int]):
        self.roots = roots
        self._started = 0.0
        self._procs: dict[int, tuple[int, float]] = {}
        self._machine = (0, 0)

    def start(self) -> None:
        self._started = time.perf_counter()
        self._procs = _process_table()
        self._machine = _machine_cpu()

    def stop(self, extra_roots: dict[str, int] | None = None) -> dict[str, float]:
        wall = time.perf_counter() - self._started
        procs = _process_table()
        busy, total = _machine_cpu()
        tick = os.sysconf("SC_CLK_TCK")
        label_of = {pid: label for label, pid in self.roots.items()}
        label_of.update({pid: label for label, pid in (extra_roots or {}).items()})
        used: dict[str, float] = defaultdict(float)
        for pid, (_, cpu) in procs.items():
            label, walk, hops = None, pid, 0
            while walk > 1 and hops < 64:
                label = label_of.get(walk)
                if label is not None:
                    break
                walk, hops = procs.get(walk, (0, 0.0))[0], hops + 1
            if label is not None:
                used[label] += cpu - self._procs.get(pid, (0, 0.0))[1]
        machine = (busy - self._machine[0]) / tick
        cores = {label: round(seconds / wall, 2) for label, seconds in sorted(used.items())}
        cores["other"] = round(max(0.0, machine - sum(used.values())) / wall, 2)
        cores["machine"] = round(machine / wall, 2)
        cores["machine_capacity"] = round((total - self._machine[1]) / tick / wall, 2)
        return cores


def _cores(cores: dict[str, float]) -> str:
    parts = [f"{k} {v:.2f}" for k, v in cores.items() if not k.startswith("machine")]
    return (
        " · ".join(parts)
        + f" · machine {cores['machine']:.2f} of {cores['machine_capacity']:.0f} cores"
    )


# --- in-process profile of LedgerWriter.write_batch ------------------------------------------


def read_batches(bootstrap: str, settings: Settings, expected: int) -> list[list]:
    """Every input record, in batches as the ledger consumer polls them."""
    consumer = input_consumer(bootstrap, settings, "ledger-bench-profile")
    try:
        batches: list[list] = []
        count = 0
        deadline = time.monotonic() + 300
        while count < expected and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500, max_records=settings.batch_max_events)
            batch = [r for rs in polled.values() for r in rs]
            if batch:
                batches.append(batch)
                count += len(batch)
    finally:
        consumer.close(autocommit=False)
    if count != expected:
        raise BenchError(f"read {count} of {expected} records for the profile")
    return batches


class SectionTimer:
    """Wall time spent inside wrapped functions, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started

        return timed


def write_in_process(
    settings: Settings,
    dsn: str,
    batches: list[list],
    *,
    timer: SectionTimer | None = None,
    profiler: cProfile.Profile | None = None,
) -> float:
    """Seconds spent in LedgerWriter.write_batch over all batches, on a fresh database. With a
    timer, the writer's steps are timed (wrapped on this writer, its codec and its fold only,
    and on the names ledger.journal calls, restored afterwards)."""
    from unittest import mock

    from ledger import journal
    from ledger.book import LedgerFold
    from ledger.policy import Policy

    fold = LedgerFold(PriceBook.load(settings.price_book), Policy.load(settings.policy))
    codec = Codec.load()  # a private instance, so wrapping it leaves Codec.default() alone
    with db.connect(dsn) as conn, contextlib.ExitStack() as patches:
        writer = journal.LedgerWriter(
            conn,
            fold,
            group_id=settings.consumer_group,
            deadletter_topic=settings.topic(topics.DEADLETTER),
            codec=codec,
        )
        if timer is not None:
            codec.decode = timer.wrap("decode", codec.decode)  # type: ignore[method-assign]
            fold.post = timer.wrap("post", fold.post)  # type: ignore[method-assign]
            for name in ("_write", "_fresh_records", "_load_books", "_copy_journal"):
                setattr(writer, name, timer.wrap(name, getattr(writer, name)))
            for name in ("content_hash", "chain_hash", "canonical_json"):
                wrapped = timer.wrap(name, getattr(journal, name))
                patches.enter_context(mock.patch.object(journal, name, wrapped))
        spent = 0.0
        for batch in batches:
            started = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            writer.write_batch(batch)
            if profiler is not None:
                profiler.disable()
            spent += time.perf_counter() - started
    return spent


def timed_sections(timer: SectionTimer, total: float) -> list[tuple[str, float]]:
    """(label, seconds) of write_batch's steps; the nested ones are indented."""
    t = timer.seconds
    inside_write = sum(
        t[k]
        for k in (
            "_fresh_records",
            "decode",
            "content_hash",
            "_load_books",
            "post",
            "chain_hash",
            "_copy_journal",
        )
    )
    return [
        ("write_batch (total)", total),
        ("  lock offsets, order check", t["_fresh_records"]),
        ("  Avro decode", t["decode"]),
        ("  content_hash (canonical JSON + sha256)", t["content_hash"]),
        ("  lock + load account books", t["_load_books"]),
        ("  fold.post (rating, burn, entry)", t["post"]),
        ("  chain_hash", t["chain_hash"]),
        ("  COPY raw_events/entries/postings", t["_copy_journal"]),
        ("    canonical_json of payload + detail", t["canonical_json"]),
        ("    rows + PostgreSQL", t["_copy_journal"] - t["canonical_json"]),
        ("  rest: known_events, sort, save books/offsets", t["_write"] - inside_write),
        ("  COMMIT (deferred balance trigger)", total - t["_write"]),
    ]


# Functions whose cumulative time (under cProfile) says where it goes: (file suffix, name).
PROFILED = (
    ("ledger/journal.py", "write_batch", "write_batch (total)"),
    ("ledger/book.py", "canonical_json", "canonical_json (all callers)"),
    ("ledger/book.py", "_jsonable", "  of which _jsonable (recursive, pure Python)"),
    ("ledger/book.py", "post", "fold.post"),
    ("ledger/rating.py", "rate", "  of which PriceBook.rate"),
    ("ledger/rating.py", "to_json", "  of which ChargeLine.to_json (dataclasses.asdict)"),
    ("ledger/book.py", "copy", "  of which AccountBook.copy (rollback snapshot)"),
    ("ledger/codec.py", "decode", "Codec.decode"),
    ("psycopg/connection.py", "wait", "waiting on PostgreSQL (all statements)"),
    ("psycopg/_copy.py", "finish", "  of which end of COPY (server inserts rows)"),
    ("psycopg/transaction.py", "__exit__", "  of which COMMIT"),
)


def profile_sections(stats: pstats.Stats) -> list[tuple[str, float]]:
    """(label, cumulative seconds) of PROFILED, for the functions found in the profile.
    (cProfile counts a recursive function's cumulative time once, at its outermost call.)"""
    raw = stats.stats  # type: ignore[attr-defined]
    rows = []
    for suffix, name, label in PROFILED:
        ct = sum(v[3] for (f, _, fn), v in raw.items() if fn == name and f.endswith(suffix))
        if ct:
            rows.append((label, ct))
    return rows


# --- machine and services ------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
    }


def code_version() -> str:
    """`git describe` of the checkout this module runs from, if it is one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() or "?"


def broker_description(info: stack.StackInfo, api: str) -> str:
    version = ""
    if info.broker == "kafka":
        try:
            from ledger.stack import kafka

            version = " " + kafka.version(kafka.pom_path())
        except Exception:
            version = ""
    return f"{info.broker}{version} (API {api})" if api else f"{info.broker}{version}"


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


def _db_admin(dsn: str, query: str, name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL(QUERIES[query]).format(sql.Identifier(name)))  # type: ignore[arg-type]


def cleanup(info: stack.StackInfo, settings: Settings, databases: list[str]) -> None:
    from kafka import KafkaAdminClient

    for name in databases:
        try:
            _db_admin(info.dsn, "bench_drop_database", name)
        except psycopg.Error as exc:
            say(f"warning: could not drop database {name}: {exc}", file=sys.stderr)
    try:
        admin = KafkaAdminClient(bootstrap_servers=info.bootstrap, client_id="ledger-bench")
    except Exception as exc:
        say(f"warning: could not reach Kafka to delete topics: {exc}", file=sys.stderr)
        return
    try:
        existing = set(admin.list_topics())
        ours = [t for t in topics.all_topics(settings) if t in existing]
        if ours:
            admin.delete_topics(ours, timeout_ms=30_000, raise_errors=False)
    except Exception as exc:
        say(f"warning: could not delete topics: {exc}", file=sys.stderr)
    finally:
        admin.close()


# --- report --------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}/s"


def print_table(results: dict[str, Any]) -> None:
    r = results
    m = r["machine"]
    ledger = r["ledger"]
    raw = r["raw"]
    proj = r.get("projections")
    journal = r["journal"]
    rows: list[tuple[str, str]] = [
        (
            "events",
            f"{r['events_total']:,} ({r['usage_events']:,} UsageRecorded + {r['accounts']:,} "
            f"AccountOpened + {r['payment_methods']:,} PaymentMethodAdded)",
        ),
        ("accounts / partitions", f"{r['accounts']:,} / {r['partitions']}"),
        ("encode (codec.encode)", _rate(r["encode_rate"])),
        ("produce (send + acks)", _rate(r["produce"]["rate"])),
        ("    cpu cores", _cores(r["produce"]["cpu_cores"])),
        (
            "(a) raw consume",
            f"{_rate(raw['steady_rate'])}  (incl. start-up: {_rate(raw['rate'])})",
        ),
        ("    cpu cores", _cores(raw["cpu_cores"])),
        (
            "(b) raw consume + decode",
            f"{_rate(r['decode']['steady_rate'])}  (incl. start-up: {_rate(r['decode']['rate'])})",
        ),
        (
            "(c) ledger -> PostgreSQL",
            f"{_rate(ledger['rate'])}  ({ledger['items']:,} in {ledger['seconds']:.1f}s "
            "from process start)",
        ),
        (
            "    after warm-up",
            f"{_rate(ledger['steady_rate'])}  (first row after {ledger['warm_seconds']:.1f}s)",
        ),
        (
            "    ledger / raw",
            f"{ledger['steady_rate'] / raw['steady_rate']:.1%}  (after warm-up, both)",
        ),
        ("    worker peak RSS", f"{ledger['peak_rss_mib']:.0f} MiB (VmHWM)"),
        ("    cpu cores", _cores(ledger["cpu_cores"])),
        (
            "    journal",
            f"{journal['entries']:,} entries, {journal['postings']:,} postings, "
            f"{journal['rejected']:,} rejected; trial balance "
            f"{'0 (balanced)' if journal['balanced'] else 'UNBALANCED'}",
        ),
    ]
    if proj:
        rows += [
            (
                "(d) projections",
                f"{_rate(proj['rate'])} entries  ({proj['seconds']:.1f}s from process start)",
            ),
            ("    after warm-up", _rate(proj["steady_rate"])),
            ("    worker peak RSS", f"{proj['peak_rss_mib']:.0f} MiB (VmHWM)"),
            ("    cpu cores", _cores(proj["cpu_cores"])),
        ]
    else:
        rows.append(("(d) projections", "skipped"))
    if "in_process" in r:
        ip = r["in_process"]
        rows.append(
            (
                "(e) write_batch in-process",
                f"{_rate(ip['rate'])}  ({ip['batches']} batches, "
                f"{1000 * ip['seconds'] / ip['batches']:.0f} ms/batch; no Kafka)",
            )
        )
    rows += [
        (
            "machine",
            f"{m['cpu']}, {m['cores_usable']}/{m['cores']} cores, "
            f"{m['ram_gib']} GiB RAM, {m['os']}",
        ),
        ("python / code", f"{m['python']} / {r['code']}"),
        ("kafka broker", r["broker"]),
        ("postgresql", r["postgres_version"]),
    ]
    others = [
        r[k]["cpu_cores"]["other"]
        for k in ("produce", "raw", "decode", "ledger", "projections")
        if k in r
    ]
    width = max(len(k) for k, _ in rows)
    say()
    say(f"ledger benchmark, {r['started_at']}")
    say("-" * (width + 70))
    for key, value in rows:
        say(f"{key:<{width}}  {value}")
    say("-" * (width + 70))
    if others and max(others) >= 0.25:
        say(
            f"note: other processes used up to {max(others):.2f} cores during the phases "
            "('other' above); the rates are pessimistic for this machine."
        )


def print_in_process(ip: dict[str, Any], stats: pstats.Stats) -> None:
    total = ip["seconds"]
    say(
        f"\n(e) LedgerWriter.write_batch in-process, {ip['batches']} batches: "
        f"{ip['rate']:,.0f} events/s (timed), {ip['profile']['rate']:,.0f}/s under cProfile"
    )
    say("where the time goes (wall time of each step, wrapped with timers):")
    for label, seconds in ip["sections"].items():
        say(
            f"  {label:<52} {seconds:7.2f}s {100 * seconds / total:5.1f}% "
            f"{1e6 * seconds / ip['events']:7.1f} us/event"
        )
    ptotal = ip["profile"]["seconds"]
    say(f"under cProfile (cumulative; Python parts inflated), {ip['profile']['file']}:")
    for label, seconds in ip["profile"]["functions"].items():
        say(f"  {label:<52} {seconds:7.2f}s {100 * seconds / ptotal:5.1f}%")
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(15)
    say(out.getvalue().rstrip())


# --- main ----------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ledger.bench", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=_positive, default=200_000, help="usage events (200000)")
    p.add_argument("--partitions", type=_positive, default=8, help="partitions per topic (8)")
    p.add_argument("--accounts", type=_positive, default=2_000, help="accounts (2000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (1)")
    p.add_argument("--no-projections", action="store_true", help="skip phase (d)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run write_batch in-process: timed steps, and under cProfile",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per phase (3600)")
    p.add_argument(
        "--stall", type=float, default=120, help="give up after this long without progress (120)"
    )
    p.add_argument("--keep", action="store_true", help="keep the database and topics")
    return p


def _stack_pids(settings: Settings) -> dict[str, int]:
    from ledger.stack import kafka, postgres, tansu

    pids = {"bench": os.getpid()}
    for label, module in (("postgres", postgres), ("kafka", kafka), ("tansu", tansu)):
        pid = None
        with contextlib.suppress(Exception):
            pid = module.running_pid(settings)
        if pid is not None:
            pids[label] = pid
    return pids


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base = Settings.from_env()
    configure_logging(dataclasses.replace(base, log_level="WARNING"))
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
    meter = CpuMeter(_stack_pids(settings))
    db_name = f"ledger_bench_{stamp}"
    dsn = with_database(info.dsn, db_name)
    databases = [db_name]
    profile_stats = None
    try:
        topics.create_topics(info.bootstrap, settings)
        _db_admin(info.dsn, "bench_create_database", db_name)
        db.migrate(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(QUERIES["bench_server_version"]).fetchone()
            results["postgres_version"] = row[0] if row else "?"
        say(
            f"kafka {info.bootstrap} ({info.broker}), database {db_name}, "
            f"topics {settings.topic_prefix}* with {args.partitions} partitions",
            flush=True,
        )

        # 2. input
        codec = Codec.default()
        started = time.perf_counter()
        events, counts = make_events(args.accounts, args.events, args.seed)
        generated = time.perf_counter() - started
        started = time.perf_counter()
        messages = encode_events(settings, codec, events)
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
        seconds, api = produce(info.bootstrap, messages)
        results["produce"] = {
            "seconds": round(seconds, 3),
            "rate": total / seconds,
            "cpu_cores": meter.stop(),
        }
        del messages
        results["broker"] = broker_description(info, api)
        say(f"produce: {total:,} in {seconds:.1f}s ({total / seconds:,.0f}/s)", flush=True)

        # 3a/3b. raw consumption
        for key, decode in (("raw", None), ("decode", codec.decode)):
            meter.start()
            run = consume_raw(
                info.bootstrap, settings, total, decode=decode, label=key, timeout=args.timeout
            )
            results[key] = {
                "records": run.records,
                "seconds": round(run.seconds, 3),
                "warm_seconds": round(run.warm_seconds, 3),
                "rate": run.rate,
                "steady_rate": run.steady_rate,
                "cpu_cores": meter.stop(),
            }
            say(
                f"{key}: {run.records:,} in {run.seconds:.1f}s ({run.steady_rate:,.0f}/s "
                f"after {run.warm_seconds:.1f}s start-up)",
                flush=True,
            )

        # 3c. the ledger role
        env = {
            **{k: v for k, v in os.environ.items() if k != "LEDGER_SHARDS"},  # all shards
            "LEDGER_KAFKA_BOOTSTRAP": info.bootstrap,
            "LEDGER_DATABASE_URL": dsn,
            "LEDGER_TOPIC_PREFIX": settings.topic_prefix,
            "LEDGER_CONSUMER_GROUP": settings.consumer_group,
            "LEDGER_PARTITIONS": str(settings.partitions),
            "LEDGER_LOG_LEVEL": "WARNING",
        }
        with psycopg.connect(dsn, autocommit=True) as watch:

            def journaled() -> int:
                # shard_heads moves in the batch's transaction: a cheap, exact count of the
                # committed entries (count(*) on the journal would scan it 20 times a second).
                row = watch.execute(QUERIES["bench_ledger_progress"]).fetchone()
                return row[0] + row[1] if row else 0

            say("ledger: draining ...", flush=True)
            ledger_run = run_role(
                "ledger",
                env,
                home / f"bench-{stamp}-ledger.log",
                journaled,
                total,
                args.timeout,
                meter,
                args.stall,
            )
            entries, rejected, postings = watch.execute(
                QUERIES["bench_journal_counts"]
            ).fetchone() or (0, 0, 0)
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

            # 3d. the projection role
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
                    home / f"bench-{stamp}-projections.log",
                    projected,
                    entries,
                    args.timeout,
                    meter,
                    args.stall,
                )
                results["projections"] = dataclasses.asdict(proj_run) | {
                    "rate": proj_run.rate,
                    "steady_rate": proj_run.steady_rate,
                }
                say(f"projections: {entries:,} in {proj_run.seconds:.1f}s", flush=True)

        # 3e. write_batch in-process: timed steps, then under cProfile (fresh databases)
        if args.profile:
            say("in-process write_batch: reading the records ...", flush=True)
            batches = read_batches(info.bootstrap, settings, total)
            gc.freeze()  # the records held here are not the worker's garbage to scan
            names = [f"{db_name}_timed", f"{db_name}_prof"]
            for name in names:
                databases.append(name)
                _db_admin(info.dsn, "bench_create_database", name)
                db.migrate(with_database(info.dsn, name))
            timer = SectionTimer()
            spent = write_in_process(
                settings, with_database(info.dsn, names[0]), batches, timer=timer
            )
            profiler = cProfile.Profile()
            profiled = write_in_process(
                settings, with_database(info.dsn, names[1]), batches, profiler=profiler
            )
            prof_path = home / f"bench-{stamp}.prof"
            profiler.dump_stats(prof_path)
            profile_stats = pstats.Stats(profiler)
            results["in_process"] = {
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
    finally:
        if not args.keep:
            cleanup(info, settings, databases)

    path = home / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if profile_stats is not None:
        print_in_process(results["in_process"], profile_stats)
    print_table(results)
    say(f"results: {path}")
    if args.keep:
        say(f"kept: database {db_name} ({dsn}), topics {settings.topic_prefix}*")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LedgerError as exc:
        say(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
