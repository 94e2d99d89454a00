"""Shards worked on side by side, each in a process of its own (`--jobs` of `projections
rebuild`, `replay` and `verify`). Shards are independent: an account, its hash chain, its
clock and its configuration versions all live on one, so folding them apart gives what one
process folding them in turn gives. Processes are spawned, not forked: the parent holds
connections."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

T = TypeVar("T")


def process_count(jobs: int | None, work: int, parallel_from: int, shards: int) -> int:
    """How many processes: `jobs` as given (1: none besides this one), or by default one per
    core when there are at least `parallel_from` units of work (below that, starting a
    process, ~0.7 s, costs more than it saves); never more than there are shards."""
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    if jobs is None:
        jobs = (os.cpu_count() or 1) if work >= parallel_from else 1
    return max(1, min(jobs, shards))


def each_shard(
    processes: int, work: Callable[..., T], calls: dict[int, tuple[Any, ...]]
) -> Iterator[tuple[int, T]]:
    """`work(*args)` for each shard's arguments in `calls`, `processes` at a time (in shard
    order), yielding (shard, result) as each finishes. The first failure (or the caller
    stopping, or Ctrl-C) cancels the shards not started yet and is raised once the running
    ones end: a divergence in one shard does not wait for every other shard's work first."""
    pool = ProcessPoolExecutor(
        max_workers=processes, mp_context=multiprocessing.get_context("spawn")
    )
    with pool:
        futures = {pool.submit(work, *args): shard for shard, args in sorted(calls.items())}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
