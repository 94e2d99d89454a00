"""Shards worked on side by side, by this process and processes it spawns (`--jobs` of
`projections rebuild`, `replay` and `verify`). Shards are independent: an account, its hash
chain, its clock and its configuration versions all live on one, so folding them apart gives
what one process folding them in turn gives. Processes are spawned, not forked: the parent
holds connections."""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

from ledger import gc_tuning

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
    processes: int,
    work: Callable[..., T],
    calls: dict[int, tuple[Any, ...]],
    *,
    setup: tuple[Callable[..., Any], tuple[Any, ...]] | None = None,
) -> Iterator[tuple[int, T]]:
    """`work(*args)` for each shard's arguments in `calls`, `processes` at a time, yielding
    (shard, result) as each finishes. This process is one of the `processes`: it takes
    shards too, from its first moment, while the `processes - 1` it spawns start (a spawned
    process first imports the code, ~0.3 s, on a rebuild of 200,000 entries a sixth of the
    whole); each takes the next shard in shard order when it is free. `setup` is
    `(function, args)` run once in each spawned process before its first shard (logging),
    after the collector's thresholds (`ledger.gc_tuning`).

    The first failure (or the caller stopping, or Ctrl-C) cancels the shards not started yet
    and is raised once the running ones end (a failure in a spawned process, once this
    process has finished the shard it is on): a divergence in one shard does not wait for
    every other shard's work first."""
    todo = collections.deque(sorted(calls))
    if processes <= 1:  # nothing is sent anywhere: the arguments as they are
        for shard in todo:
            yield shard, work(*calls[shard])
        return
    lock = threading.Lock()
    stopped = False
    finished: queue.SimpleQueue[tuple[int, Future[T]]] = queue.SimpleQueue()
    started = 0  # shards handed to the spawned processes (under `lock`)
    pool = ProcessPoolExecutor(
        max_workers=processes - 1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start,
        initargs=(setup,),
    )

    def take() -> int | None:
        with lock:
            return None if stopped or not todo else todo.popleft()

    def hand_out() -> None:
        """The next shard to a spawned process: one in flight per process (a queue of them
        would keep shards from this one). No lock is held across `submit`, which takes the
        pool's own."""
        nonlocal started
        with lock:
            if stopped or not todo:
                return
            shard = todo.popleft()
            started += 1
        try:
            future = pool.submit(work, *calls[shard])
        except RuntimeError:  # the pool is shutting down: stopped already
            with lock:
                started -= 1
            return
        future.add_done_callback(lambda f: _done(shard, f))

    def _done(shard: int, future: Future[T]) -> None:
        finished.put((shard, future))
        if not future.cancelled() and future.exception() is None:
            hand_out()

    received = 0
    with pool:
        try:
            for _ in range(processes - 1):
                hand_out()
            while (shard := take()) is not None:
                yield shard, work(*_as_sent(calls[shard]))
                while not finished.empty():
                    done_shard, future = finished.get()
                    received += 1
                    yield done_shard, future.result()
            while True:
                with lock:
                    if received == started:
                        break
                done_shard, future = finished.get()
                received += 1
                yield done_shard, future.result()
        except BaseException:
            with lock:
                stopped = True
            pool.shutdown(cancel_futures=True)
            raise


def _start(setup: tuple[Callable[..., Any], tuple[Any, ...]] | None) -> None:
    """A spawned process before its first shard: the collector's thresholds of every ledger
    process (`ledger.gc_tuning`), then the caller's `setup`."""
    gc_tuning.tune()
    if setup is not None:
        function, args = setup
        function(*args)


def _as_sent(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arguments as a spawned process gets them (through pickle): a work function that
    caches something in an argument (verify's chain keys keep their HMAC objects, which do
    not pickle) must not change what is sent to the others, which share the same objects."""
    return pickle.loads(pickle.dumps(args))
