"""Shard leases: one writer per shard at a time, standbys take over, LEDGER_SHARDS splits."""

import dataclasses
import threading

import psycopg

from ledger.worker import start_roles
from tests.harness import wait_until


def lease_holders(dsn: str) -> int:
    """Shard leases held right now: advisory locks taken with two int keys (objsubid 2);
    nothing else in the ledger takes that kind."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 2 AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())"
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
        ledger.stop()  # the first worker goes away (its leases end with its sessions)
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
