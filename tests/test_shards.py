"""Shard leases: one writer per shard at a time, standbys take over, LEDGER_SHARDS splits."""

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from kafka import KafkaConsumer, KafkaProducer

from ledger import chain_keys, topics
from ledger.consumer import ShardConsumer, _writer_connection, kafka_consumer_options
from ledger.journal import LedgerWriter
from ledger.leases import ShardLeases
from ledger.worker import start_roles
from tests.harness import wait_until
from tests.test_journal import opened


def lease_holders(dsn: str) -> int:
    """Shard leases held right now (not expired, not released)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM shard_leases WHERE expires_at > clock_timestamp()"
        ).fetchone()[0]


def test_a_standby_takes_over_the_shards_of_a_stopped_worker(ledger):
    standby_stop = threading.Event()
    standby = start_roles(ledger.settings, ledger.bootstrap, ledger.dsn, ("ledger",), standby_stop)
    try:
        for n in range(8):
            ledger.open_account(f"sh-{n}")
        ledger.settle(8)
        # Every shard is leased once: the first worker has them, the standby waits.
        assert lease_holders(ledger.dsn) == ledger.settings.partitions
        ledger.stop()  # the first worker goes away (it releases its leases)
        for n in range(8, 16):
            ledger.open_account(f"sh-{n}")
        wait_until(lambda: ledger.journaled() == 16, 30, "the standby journals new events")
        assert lease_holders(ledger.dsn) == ledger.settings.partitions
    finally:
        standby_stop.set()
        for thread in standby:
            thread.join(timeout=30)
    ledger.start()
    ledger.settle(16)
    assert ledger.journaled() == 16


def test_workers_given_shard_ranges_split_the_work(ledger):
    ledger.stop()
    halves = [
        dataclasses.replace(ledger.settings, shards=[0, 1]),
        dataclasses.replace(ledger.settings, shards=[2, 3]),
    ]
    stops = [threading.Event(), threading.Event()]
    workers = [
        start_roles(s, ledger.bootstrap, ledger.dsn, ("ledger",), stop)
        for s, stop in zip(halves, stops, strict=True)
    ]

    def journaled(where: str) -> int:
        return ledger.db.execute(f"SELECT count(*) FROM journal_entries WHERE {where}").fetchone()[
            0
        ]

    try:
        for n in range(40):
            ledger.open_account(f"split-{n}")
        wait_until(lambda: ledger.journaled() == 40, 30, "both halves journal")
        assert journaled("shard < 2") > 0 and journaled("shard >= 2") > 0
        assert lease_holders(ledger.dsn) == 4
        # The worker of shards 0-1 stops: nobody else may take them.
        stops[0].set()
        for thread in workers[0]:
            thread.join(timeout=30)
        low, high = journaled("shard < 2"), journaled("shard >= 2")
        for n in range(40, 80):
            ledger.open_account(f"split-{n}")
        wait_until(lambda: journaled("shard >= 2") > high + 5, 30, "shards 2-3 go on")
        assert journaled("shard < 2") == low
        assert lease_holders(ledger.dsn) == 2
    finally:
        for stop in stops:
            stop.set()
        for thread in workers[0] + workers[1]:
            thread.join(timeout=30)
    ledger.start()  # owns every shard again and catches up
    ledger.settle(80)
    assert ledger.journaled() == 80


def worker_process(ledger, log_path, *, lease_timeout_s: int) -> subprocess.Popen:
    """A real `ledger worker --role ledger` on the test's topics and database."""
    env = os.environ | {
        "LEDGER_KAFKA_BOOTSTRAP": ledger.bootstrap,
        "LEDGER_DATABASE_URL": ledger.dsn,
        "LEDGER_HOME": str(ledger.settings.home),  # the session's chain key
        "LEDGER_TOPIC_PREFIX": ledger.settings.topic_prefix,
        "LEDGER_CONSUMER_GROUP": ledger.settings.consumer_group,
        "LEDGER_LEASE_TIMEOUT_S": str(lease_timeout_s),
        "LEDGER_LOG_FORMAT": "json",
    }
    with log_path.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ledger.cli", "worker", "--role", "ledger"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def holders(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT DISTINCT holder FROM shard_leases WHERE expires_at > clock_timestamp()"
        ).fetchall()
    return {holder for (holder,) in rows}


def holder_and_standby(
    ledger, first_log, standby_log, prefix: str, *, lease_timeout_s: int
) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    """A worker that has journaled 8 accounts and holds every lease, and a standby that is up
    and waiting beside it: (first, standby, the first's holder id)."""
    first = worker_process(ledger, first_log, lease_timeout_s=lease_timeout_s)
    standby = None
    try:
        for n in range(8):
            ledger.open_account(f"{prefix}-{n}")
        wait_until(lambda: ledger.journaled() == 8, 60, "the first worker journals")
        (first_holder,) = wait_until(lambda: holders(ledger.dsn), 10, "leases held")
        standby = worker_process(ledger, standby_log, lease_timeout_s=lease_timeout_s)
        time.sleep(3)  # the standby is up and waiting: every lease is still the first's
        assert holders(ledger.dsn) == {first_holder}
    except BaseException:
        for proc in (first, standby):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=30)
        raise
    return first, standby, first_holder


def test_a_frozen_holder_loses_its_shards_and_stops_writing_when_it_thaws(ledger, tmp_path):
    """SIGSTOP the shard holder: a standby takes every shard once the lease times out; after
    SIGCONT the old holder finds its leases gone and writes nothing more."""
    ledger.stop()  # the test's own ledger role would compete; projections are not needed
    frozen_log = tmp_path / "frozen.log"
    first, standby, first_holder = holder_and_standby(
        ledger, frozen_log, tmp_path / "standby.log", "frz", lease_timeout_s=4
    )
    try:
        first.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        for n in range(8, 16):
            ledger.open_account(f"frz-{n}")
        wait_until(lambda: ledger.journaled() == 16, 60, "the standby journals new events")
        took_over_s = time.monotonic() - frozen_at
        (standby_holder,) = holders(ledger.dsn)
        assert standby_holder != first_holder
        # Timeout 4 s + a lease refresh (2 s) + a batch; generous for a loaded machine.
        assert took_over_s < 30, f"takeover took {took_over_s:.1f}s"

        first.send_signal(signal.SIGCONT)
        wait_until(
            lambda: any(
                event in frozen_log.read_text()
                for event in ('"shard_leases_lost"', '"shard_lease_fenced"')
            ),
            30,
            "the thawed worker notices",
        )
        for n in range(16, 24):
            ledger.open_account(f"frz-{n}")
        wait_until(lambda: ledger.journaled() == 24, 60, "journaling goes on")
        assert holders(ledger.dsn) == {standby_holder}
        with psycopg.connect(ledger.dsn) as conn:
            ids = conn.execute(
                "SELECT count(DISTINCT event_id), count(*) FROM raw_events"
                " WHERE event_type <> 'ConfigPublished'"  # the workers' price/policy versions
            )
            assert ids.fetchone() == (24, 24)
    finally:
        for proc in (first, standby):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                proc.wait(timeout=30)
    ledger.start()


def test_a_crashed_holder_loses_its_shards_at_once_not_after_the_lease_timeout(ledger, tmp_path):
    """SIGKILL the shard holder: its connections close with it, so a standby takes every shard
    at its next lease refresh, long before the (here 60 s) lease would have expired."""
    ledger.stop()
    first, standby, first_holder = holder_and_standby(
        ledger, tmp_path / "killed.log", tmp_path / "standby.log", "kil", lease_timeout_s=60
    )
    try:
        first.kill()
        first.wait(timeout=30)
        killed_at = time.monotonic()
        for n in range(8, 16):
            ledger.open_account(f"kil-{n}")
        wait_until(lambda: ledger.journaled() == 16, 30, "the standby journals new events")
        took_over_s = time.monotonic() - killed_at
        print(f"\nthe standby journaled {took_over_s:.1f} s after the holder was killed")
        (standby_holder,) = holders(ledger.dsn)
        assert standby_holder != first_holder
        assert took_over_s < 20  # a lease refresh (2 s) and a batch, against a 60 s lease
    finally:
        for proc in (first, standby):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    ledger.start()


def test_a_lease_whose_holder_session_is_gone_is_taken_unless_the_server_restarted_since(dsn):
    """The fast path of a crash, and its guard: after a server restart every session is gone,
    and the holders' leases then wait for their expiry (the holders renew them as they come
    back), so that the first worker to reconnect does not take every shard."""
    first = ShardLeases(dsn, "g", [0, 1], timeout_s=60)
    standby = ShardLeases(dsn, "g", [0, 1], timeout_s=60)
    try:
        assert first.refresh() == {0, 1}
        assert standby.refresh() == set()  # the holder's session is alive
        with psycopg.connect(dsn, autocommit=True) as conn:
            # A holder whose session is gone (pid 0 is never a backend's), renewed before
            # the server last started: it waits for its expiry.
            conn.execute(
                "UPDATE shard_leases SET holder_pid = 0,"
                " renewed_at = pg_postmaster_start_time() - interval '1 second'"
            )
            assert standby.refresh() == set()
            # The same, renewed since the server started: a crash; taken at once.
            conn.execute("UPDATE shard_leases SET renewed_at = clock_timestamp()")
            assert standby.refresh() == {0, 1}
        # A real crash: the standby's session ends without releasing; the other side takes
        # the leases once the server has seen the connection close.
        assert standby.conn is not None
        standby.conn.close()
        standby.conn = None
        wait_until(lambda: first.refresh() == {0, 1}, 10, "the leases of a closed session")
    finally:
        first.close()
        standby.close()


def test_a_holder_frozen_inside_its_batch_frees_the_shard_after_the_lease_timeout(
    writer, dsn, base_settings
):
    """A holder that stops between two statements of its batch transaction (SIGSTOP, a long
    GC pause) holds its offset and head row locks only until the server aborts the idle
    transaction, after the lease timeout; the standby that took the shard over then writes.
    A batch sent as a pipeline without a Sync would not count as idle in transaction, and
    would hold the standby up for as long as the holder stays frozen (it did once: `make
    chaos`, every shard stalled for the 30 s SIGSTOP)."""
    settings = dataclasses.replace(base_settings, lease_timeout_s=3)
    frozen = LedgerWriter(
        _writer_connection(dsn, settings),
        writer.fold,
        keys=chain_keys.load(settings),
        group_id="ledger",
        deadletter_topic="dlq",
    )
    inside, thaw = threading.Event(), threading.Event()

    def freeze(cur: psycopg.Cursor, shards: set[int]) -> None:
        inside.set()  # after the batch locked its offsets: frozen between two statements
        thaw.wait(120)

    frozen.fence = freeze
    records = [opened(f"frozen-{n}", n) for n in range(3)]
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(frozen.write_batch, records)
        try:
            assert inside.wait(30), "the frozen writer never reached its batch"
            # A lock held past this fails the standby instead of hanging the test.
            writer.conn.execute("SET lock_timeout = '30s'")
            writer.conn.commit()
            started = time.monotonic()
            result = writer.write_batch(records)
            waited_s = time.monotonic() - started
        finally:
            thaw.set()
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            holder.result(timeout=60)  # the server ended its session under it
    assert result.journaled == 3
    # It waited for the frozen holder's locks (they were held), and not much past the timeout.
    assert 2.0 < waited_s < 3 + 12, f"the standby waited {waited_s:.1f}s"
    with psycopg.connect(dsn) as conn:
        (entries,) = conn.execute(
            "SELECT count(*) FROM journal_entries WHERE account_id LIKE 'frozen-%'"
        ).fetchone()
    assert entries == 3


def test_a_backlog_on_one_partition_does_not_starve_the_others(settings, stack, writer):
    """kafka-python hands out one partition's buffered records before the next; the shard
    consumer takes an equal share of every partition with records into each batch, and the
    fetched ranges it reports still cover every record exactly once, in order."""
    usage = settings.topic(topics.USAGE)
    backlog = {0: 3000, 1: 300, 2: 3000}
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=20)
    for partition, count in backlog.items():
        for n in range(count):
            producer.send(usage, value=f"{partition}:{n}".encode(), partition=partition)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=stack.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=1024 * 1024,  # so one fetch buffers a partition's backlog
        **kafka_consumer_options(settings),
    )
    small = dataclasses.replace(settings, batch_max_events=300)
    shards = ShardConsumer(consumer, writer, [usage])
    stop = threading.Event()
    try:
        shards.assign({0, 1, 2, 3})
        seen: dict[int, list[int]] = {p: [] for p in backlog}
        batches = []
        while sum(map(len, seen.values())) < sum(backlog.values()):
            assert len(batches) < 200, "the backlog was not consumed"
            batch, fetched = shards.poll(small, stop)
            for (_, partition), (start, end) in fetched.items():
                offsets = [r.offset for r in batch if r.partition == partition]
                # each range starts where the last one ended and covers exactly its records
                assert start == len(seen[partition]) and offsets == list(range(start, end))
                seen[partition] += offsets
            shards.committed(fetched)
            if batch:
                batches.append(Counter(r.partition for r in batch))
    finally:
        consumer.close()
    assert seen == {p: list(range(n)) for p, n in backlog.items()}
    assert all(sum(b.values()) <= 300 for b in batches)
    # Partition 1's 300 records come in the first batches that see it, beside the backlogs,
    # a third of each batch: not after 3,000 records of partition 0 or 2.
    first = next((i for i, b in enumerate(batches) if len(b) == 3), None)
    assert first is not None, f"no batch holds records of every partition: {batches[:12]}"
    assert sum(b[1] for b in batches[: first + 3]) == 300, batches[: first + 3]
    assert all(b[1] == 100 for b in batches[first : first + 3]), batches[: first + 3]
