"""The local stack on real processes: idempotent up, status, clean down, external services.

These tests run their own stack in their own home directory (not the session `stack`
fixture's), so stopping it does not disturb other tests. The tests in this module run in
file order and share one stack; the last one stops it (keep it last).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

from ledger import stack
from ledger.errors import StackError
from ledger.settings import Settings
from ledger.stack import tansu


def _cmdlines_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains `text` (read straight from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found[int(entry.name)] = line
    return found


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent has not noticed


def _settings(base: Settings, home: Path, **changes: object) -> Settings:
    fields: dict[str, object] = {"home": home, "kafka_bootstrap": None, "database_url": None}
    fields.update(changes)
    return dataclasses.replace(base, **fields)


@pytest.fixture(scope="module")
def own(base_settings: Settings) -> Iterator[tuple[Settings, stack.StackInfo]]:
    # Outside pytest's rotated temp dirs, like the session stack (see conftest).
    home = Path(tempfile.mkdtemp(prefix="ledger-own-stack-"))
    settings = _settings(base_settings, home)
    info = stack.up(settings)
    yield settings, info
    stack.down(settings)
    shutil.rmtree(home, ignore_errors=True)


def test_up_twice_starts_nothing_the_second_time(own: tuple[Settings, stack.StackInfo]) -> None:
    settings, info = own
    before = stack.status(settings)
    started = time.monotonic()
    again = stack.up(settings)
    assert time.monotonic() - started < 5
    after = stack.status(settings)
    assert again == info
    for service in ("kafka", "postgres"):
        assert after[service]["pid"] == before[service]["pid"] is not None
        assert after[service]["port"] == before[service]["port"] is not None


def test_status_and_connect_describe_the_running_stack(
    own: tuple[Settings, stack.StackInfo],
) -> None:
    settings, info = own
    report = stack.status(settings)
    assert report["running"] is True
    assert report["kafka"]["alive"] and report["postgres"]["alive"]
    assert report["kafka"]["broker"] == info.broker in ("kafka", "tansu")
    assert info.bootstrap == f"127.0.0.1:{report['kafka']['port']}"
    port = report["postgres"]["port"]
    passfile = settings.home.resolve() / "postgres" / "pgpass"
    for url, user in (
        (info.dsn, "ledger_writer"),
        (info.owner_dsn, "ledger_owner"),
        (info.reader_dsn, "ledger_reader"),
        (info.admin_dsn, "postgres"),
    ):
        assert url == f"postgresql://{user}@127.0.0.1:{port}/ledger?passfile={passfile}"
    # The passwords live only in the password file, readable by its owner alone.
    assert passfile.stat().st_mode & 0o777 == 0o600
    assert stack.connect(settings) == info
    # State lives under home.
    assert (settings.home / "stack.json").is_file()
    assert (settings.home / "postgres" / "data" / "PG_VERSION").is_file()
    # Both services actually answer.
    with psycopg.connect(info.dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("ledger",)
    admin = KafkaAdminClient(bootstrap_servers=info.bootstrap)
    try:
        admin.list_topics()
    finally:
        admin.close()


def test_existing_services_start_nothing(
    own: tuple[Settings, stack.StackInfo], tmp_path: Path
) -> None:
    running_settings, running = own
    settings = _settings(
        running_settings,
        tmp_path / "home",
        kafka_bootstrap=running.bootstrap,
        database_url=running.dsn,
    )
    info = stack.up(settings)
    assert info == stack.StackInfo(running.bootstrap, running.dsn, "external")
    assert stack.connect(settings) == info
    assert stack.status(settings)["running"] is True
    assert not (settings.home / "kafka").exists()
    assert not (settings.home / "postgres").exists()
    assert _cmdlines_mentioning(str(settings.home)) == {}
    stack.down(settings)  # leaves the services it did not start alone
    assert stack.status(running_settings)["running"] is True


def test_tansu_broker_serves_a_consumer_group(
    base_settings: Settings, own: tuple[Settings, stack.StackInfo], tmp_path: Path
) -> None:
    # Reuse the module stack's PostgreSQL: this test is about the broker.
    settings = _settings(base_settings, tmp_path / "home", broker="tansu", database_url=own[1].dsn)
    stack.up(settings)
    try:
        info = stack.connect(settings)
        assert info.broker == "tansu"
        pid = stack.status(settings)["kafka"]["pid"]
        assert stack.up(settings) == info and stack.status(settings)["kafka"]["pid"] == pid

        admin = KafkaAdminClient(bootstrap_servers=info.bootstrap)
        admin.create_topics([NewTopic("stack-test", 2, 1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=info.bootstrap, acks="all")
        for i in range(10):
            producer.send("stack-test", key=b"k%d" % i, value=b"v%d" % i)
        producer.flush()
        producer.close()
        consumer = KafkaConsumer(
            "stack-test",
            bootstrap_servers=info.bootstrap,
            group_id="stack-test",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **tansu.CONSUMER_SETTINGS,
        )
        got, deadline = 0, time.monotonic() + 20
        while got < 10 and time.monotonic() < deadline:
            got += sum(len(batch) for batch in consumer.poll(500).values())
        consumer.commit()
        consumer.close()
        assert got == 10
    finally:
        stack.down(settings)
    assert not _pid_alive(pid)
    assert stack.status(settings)["kafka"]["alive"] is False


def test_down_leaves_no_process_and_a_restart_reuses_the_ports(
    own: tuple[Settings, stack.StackInfo],
) -> None:
    settings, info = own
    before = stack.status(settings)
    pids = [before["kafka"]["pid"], before["postgres"]["pid"]]

    stack.down(settings)

    assert not any(_pid_alive(pid) for pid in pids)
    assert _cmdlines_mentioning(str(settings.home)) == {}
    assert not (settings.home / "kafka" / "pid").exists()
    report = stack.status(settings)
    assert report["running"] is False
    assert not report["kafka"]["alive"] and not report["postgres"]["alive"]
    with pytest.raises(StackError, match="not running"):
        stack.connect(settings)
    stack.down(settings)  # idempotent

    assert stack.up(settings) == info  # same ports, data kept
    stack.down(settings)
    assert _cmdlines_mentioning(str(settings.home)) == {}
