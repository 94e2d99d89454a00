"""What the benchmark runs on and leaves behind: the machine, the code and the broker it
reports, the PIDs of the local services it meters, and the clean-up of its databases and
topics."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from ledger import stack, topics
from ledger.bench.report import say
from ledger.errors import LedgerError
from ledger.kafka_auth import client_options
from ledger.runner import on_server
from ledger.settings import Settings


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


def stack_pids(settings: Settings) -> dict[str, int]:
    from ledger.stack import kafka, postgres, tansu

    pids = {"bench": os.getpid()}
    for label, module in (("postgres", postgres), ("kafka", kafka), ("tansu", tansu)):
        pid = None
        with contextlib.suppress(Exception):
            pid = module.running_pid(settings)
        if pid is not None:
            pids[label] = pid
    return pids


def cleanup(info: stack.StackInfo, settings: Settings, databases: list[str]) -> None:
    from kafka import KafkaAdminClient

    for name in databases:
        try:
            on_server(info.owner_dsn, "drop_database", name)
        except (psycopg.Error, LedgerError) as exc:
            say(f"warning: could not drop database {name}: {exc}", file=sys.stderr)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=info.bootstrap, client_id="ledger-bench", **client_options(settings)
        )
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
