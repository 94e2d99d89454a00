"""The cyclic garbage collector's thresholds for the ledger's processes.

The folds allocate without pause (an entry, its postings and payload; decimals, tuples and
dicts for every event). With Python's default thresholds (700, 10, 10) a ledger worker
draining a backlog spent ~13 % of its time in the collector, most of it in a full collection
(~50 ms, over every object the process holds) twice a second; the account-status fold of a
rebuild spent a fifth of its CPU there (9.8-10.0 µs per entry, 7.6-7.7 with FOLD, 7.1 with
the collector off; one process, alternating). Reference counting still frees at once
everything that is not in a reference cycle; the code keeps its batches out of cycles.

- FOLD, for commands that fold a journal and exit (rebuild, verify, replay, audit, ...,
  and the processes they spawn): the fewest collections; a young collection then takes
  ~15 ms, which nobody waits on.
- LIVE, for `ledger worker`, whose pauses a suspension waits on: young collections of
  ~1.5 ms, and (`settle`, once the roles have started) the objects of the start-up frozen
  out of every later collection, so that a full one takes ~25 ms instead of ~50. Measured
  in a worker draining the benchmark's input for 10 s: time paused in the collector 1,281 ms
  with the defaults, 437 ms with these; longest pause 55 ms, 25 ms.
"""

from __future__ import annotations

import gc

FOLD = (50_000, 20, 100)
LIVE = (10_000, 10, 10)


def tune(thresholds: tuple[int, int, int] = FOLD) -> None:
    gc.set_threshold(*thresholds)


def settle() -> None:
    """A long-running process's start-up is done: what it holds now (modules, clients,
    caches) is never scanned again; it is still freed when nothing refers to it."""
    gc.freeze()
