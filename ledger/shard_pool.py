"""Shards worked on side by side, each in a process of its own (`projections rebuild` and
`replay`, `--jobs`). Shards are independent: an account, its hash chain, its clock and its
configuration versions all live on one, so folding them apart gives what one process folding
them in turn gives. Processes are spawned, not forked: the parent holds connections."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def process_count(jobs: int | None, work: int, parallel_from: int, shards: int) -> int:
    """How many processes: `jobs` as given (1: none besides this one), or by default one per
    core when there are at least `parallel_from` units of work (below that, starting a
    process, ~0.7 s, costs more than it saves); never more than there are shards."""
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    if jobs is None:
        jobs = (os.cpu_count() or 1) if work >= parallel_from else 1
    return max(1, min(jobs, shards))


def pool(processes: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=processes, mp_context=multiprocessing.get_context("spawn")
    )
