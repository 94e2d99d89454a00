"""The batch sizer keeps a batch's write well inside the shard lease (pure, no services)."""

from __future__ import annotations

from ledger.consumer import BatchSizer
from ledger.settings import Settings


def test_starts_at_the_configured_ceiling_with_a_quarter_of_the_lease_as_target():
    sizer = BatchSizer.for_settings(Settings(batch_max_events=1500, lease_timeout_s=12))
    assert (sizer.limit, sizer.target_s) == (1500, 3.0)


def test_a_slow_batch_shrinks_the_next_in_proportion():
    sizer = BatchSizer(ceiling=2000, target_s=2.5)
    sizer.written(2000, 10.0)  # 4x the target
    assert sizer.limit == 500
    sizer.written(500, 5.0)  # still 2x
    assert sizer.limit == 250


def test_never_below_one_record():
    sizer = BatchSizer(ceiling=2000, target_s=2.5)
    sizer.written(1, 60.0)
    assert sizer.limit == 1
    sizer.written(1, 0.01)
    assert sizer.limit == 2


def test_fast_full_batches_grow_back_to_the_ceiling_and_not_past_it():
    sizer = BatchSizer(ceiling=2000, target_s=2.5)
    sizer.written(2000, 25.0)
    assert sizer.limit == 200
    steps = 0
    while sizer.limit < 2000:
        sizer.written(sizer.limit, 0.1)
        steps += 1
    assert sizer.limit == 2000 and steps < 20
    sizer.written(2000, 0.1)
    assert sizer.limit == 2000


def test_a_batch_between_half_and_the_whole_target_keeps_the_limit():
    sizer = BatchSizer(ceiling=2000, target_s=2.5)
    sizer.written(2000, 2.0)
    assert sizer.limit == 2000
    sizer.written(2000, 5.0)
    sizer.written(1000, 2.0)
    assert sizer.limit == 1000


def test_a_partial_batch_does_not_grow_the_limit():
    """A batch smaller than the limit (little traffic) says nothing about a full one's time."""
    sizer = BatchSizer(ceiling=2000, target_s=2.5)
    sizer.written(2000, 5.0)
    assert sizer.limit == 1000
    sizer.written(10, 0.01)
    assert sizer.limit == 1000
