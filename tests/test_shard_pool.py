"""Shards side by side (`--jobs` of rebuild, replay and verify): how many processes start,
what a failing shard does to the others, and how verify merges the walks of its shards. No
services."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest

from ledger import gc_tuning
from ledger.book import AccountBook
from ledger.shard_pool import each_shard, process_count
from ledger.verify import _Walked


def test_by_default_one_process_per_core_only_when_there_is_enough_work():
    cores = os.cpu_count() or 1
    assert process_count(None, 49_999, 50_000, 8) == 1
    assert process_count(None, 50_000, 50_000, 8) == min(cores, 8)


def test_jobs_as_given_but_never_more_than_there_are_shards():
    assert process_count(3, 0, 50_000, 8) == 3
    assert process_count(16, 10**6, 50_000, 4) == 4
    assert process_count(1, 10**6, 50_000, 8) == 1
    assert process_count(None, 10**6, 50_000, 0) == 1  # an empty journal: this process


def test_fewer_than_one_job_is_refused_naming_it():
    with pytest.raises(ValueError, match="jobs must be at least 1, not 0"):
        process_count(0, 10, 50_000, 8)


def _mark(marks: Path, shard: int) -> int:
    """A shard's work in a spawned process: leaves a mark; shard 0 fails."""
    if shard == 0:
        raise ValueError("shard 0 diverges")
    time.sleep(0.5)
    (marks / str(shard)).touch()
    return shard * 10


def _whose(shard: int) -> tuple[int, int]:
    """A shard's work: which process did it (a spawned one has run its `setup` first)."""
    time.sleep(0.3)
    return os.getpid(), int(os.environ.get("SHARD_POOL_TEST_SETUP", "0"))


def _setup() -> None:
    os.environ["SHARD_POOL_TEST_SETUP"] = "1"


def test_each_shard_yields_every_result_once_with_its_shard(tmp_path):
    calls = {shard: (tmp_path, shard) for shard in (3, 1, 2, 4, 5)}
    results = list(each_shard(2, _mark, calls))
    assert sorted(results) == [(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)]


def test_this_process_takes_shards_too_and_only_spawned_ones_run_the_setup():
    calls = {shard: (shard,) for shard in range(8)}
    by = dict(each_shard(2, _whose, calls, setup=(_setup, ())))
    assert sorted(by) == list(range(8))
    mine = {shard for shard, (pid, _) in by.items() if pid == os.getpid()}
    spawned = {shard for shard, (pid, _) in by.items() if pid != os.getpid()}
    # This process starts on a shard at once, while the spawned one imports the code.
    assert mine and spawned, by
    assert {setup for pid, setup in by.values() if pid == os.getpid()} == {0}
    assert {setup for pid, setup in by.values() if pid != os.getpid()} == {1}
    assert "SHARD_POOL_TEST_SETUP" not in os.environ


def _thresholds(shard: int) -> tuple[int, tuple[int, ...]]:
    time.sleep(0.3)
    return os.getpid(), gc.get_threshold()


def test_spawned_processes_collect_garbage_with_the_ledgers_thresholds():
    by = dict(each_shard(2, _thresholds, {shard: (shard,) for shard in range(6)}))
    spawned = {thresholds for pid, thresholds in by.values() if pid != os.getpid()}
    assert spawned == {gc_tuning.FOLD}
    assert gc_tuning.FOLD != (700, 10, 10)  # Python's defaults: the test would be moot


class _Holder:
    """An argument every shard shares, which the work changes as it goes (as verify's chain
    keys keep the HMAC objects they make, which do not pickle)."""

    lock: threading.Lock | None = None


def _keep_a_lock(holder: _Holder, shard: int) -> int:
    time.sleep(0.2)
    holder.lock = threading.Lock()
    return shard


def test_work_in_this_process_does_not_change_what_is_sent_to_the_others():
    holder = _Holder()
    calls = {shard: (holder, shard) for shard in range(6)}
    assert sorted(dict(each_shard(2, _keep_a_lock, calls))) == list(range(6))
    assert holder.lock is None


def test_one_process_is_this_one_alone():
    assert {pid for pid, _ in dict(each_shard(1, _whose, {0: (0,), 1: (1,)})).values()} == {
        os.getpid()
    }


def test_a_failing_shard_in_a_spawned_process_cancels_the_shards_not_started(tmp_path):
    calls = {shard: (tmp_path, shard) for shard in range(16)}
    with pytest.raises(ValueError, match="shard 0 diverges"):
        dict(each_shard(2, _mark, calls))
    # Shard 0 goes to the spawned process first, while this one works on shard 1 and then
    # the next (0.5 s each); the failure stops both from taking more, where all sixteen
    # would otherwise have run (~4 s) before the error was raised.
    ran = {int(p.name) for p in tmp_path.iterdir()}
    assert 0 not in ran and len(ran) < 8, sorted(ran)


def test_a_failing_shard_in_this_process_cancels_the_shards_not_started(tmp_path):
    calls = {shard: (tmp_path, shard) for shard in range(16)}
    calls[1] = (tmp_path, 0)  # this process's first shard (the spawned one has shard 0)
    calls[0] = (tmp_path, 100)
    with pytest.raises(ValueError, match="shard 0 diverges"):
        dict(each_shard(2, _mark, calls))
    ran = {int(p.name) for p in tmp_path.iterdir()}
    assert len(ran) < 4, sorted(ran)


def test_walks_of_shards_merged_report_an_account_with_entries_in_two_shards():
    # What one walk through every shard reports (ledger.verify._walk_shard), when the
    # shards were walked apart: the account's book does not fold, named once.
    first, second, third = _Walked(), _Walked(), _Walked()
    first.books["a"] = (AccountBook("a"), 0)
    second.books |= {"a": (AccountBook("a"), 3), "b": (AccountBook("b"), 3)}
    third.books["a"] = (AccountBook("a"), 5)
    merged = _Walked()
    for walked in (first, second, third):
        merged.merge(walked)
    assert merged.unfoldable == {"a"}
    assert [str(d) for d in merged.out] == [
        "account_book: a: the journal does not fold: it has entries in shard 0 and in shard 3"
    ]
    assert {a: shard for a, (_, shard) in merged.books.items()} == {"a": 0, "b": 3}
