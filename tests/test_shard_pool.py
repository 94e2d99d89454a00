"""How many processes rebuild and replay start (`--jobs`): pure, no services."""

from __future__ import annotations

import os

import pytest

from ledger.shard_pool import process_count


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
