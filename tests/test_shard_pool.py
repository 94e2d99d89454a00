"""Shards side by side (`--jobs` of rebuild, replay and verify): how many processes start,
what a failing shard does to the others, and how verify merges the walks of its shards. No
services."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

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


def test_each_shard_yields_every_result_with_its_shard(tmp_path):
    calls = {shard: (tmp_path, shard) for shard in (3, 1, 2)}
    assert dict(each_shard(2, _mark, calls)) == {1: 10, 2: 20, 3: 30}


def test_a_failing_shard_cancels_the_shards_not_started_and_raises(tmp_path):
    calls = {shard: (tmp_path, shard) for shard in range(16)}
    with pytest.raises(ValueError, match="shard 0 diverges"):
        dict(each_shard(1, _mark, calls))
    # One process, shard 0 first: the pool may have queued a few more (its call queue is
    # refilled as its process takes work) before the failure cancelled the rest, which
    # would otherwise all have run before the error was raised.
    ran = {int(p.name) for p in tmp_path.iterdir()}
    assert len(ran) < 8, sorted(ran)


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
