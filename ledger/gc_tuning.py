"""The cyclic garbage collector's thresholds for every process of the ledger (the CLI, the
processes `shard_pool` spawns, the benchmark's own).

The folds allocate without pause (an entry, its postings and payload; decimals, tuples and
dicts for every event), and with Python's default thresholds (700, 10, 10) the collector ran
a young collection every 700 allocations and a full one, over every object the process
holds, every hundred of those. On the benchmark's 202,818-entry journal the account-status
fold spent a fifth of its CPU there: 9.8-10.0 µs per entry with the defaults, 7.6-7.7 with
these, 7.1 with the collector off (measured in one process, alternating). Reference counting
still frees everything that is not in a cycle at once; cycles (rare here) wait longer."""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 100)


def tune() -> None:
    gc.set_threshold(*THRESHOLDS)
