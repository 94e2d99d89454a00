"""The batch sizer keeps a batch's write well inside the shard lease, and the poll batches only
while the writer is busy (pure, no services)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from kafka import TopicPartition

from ledger.consumer import BUFFERED_BATCHES, WRITER_CHECK_MS, BatchSizer, ShardConsumer
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


class _Records:
    """A stand-in for KafkaConsumer: each poll hands over the next planned records of one
    partition, and counts the polls and the time they were asked to wait."""

    def __init__(self, plan: list[int]):
        self.plan = plan
        self.polls: list[int] = []  # timeout_ms of each poll
        self.offset = 0

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        self.polls.append(timeout_ms)
        count = self.plan.pop(0) if self.plan else 0
        records = [SimpleNamespace(offset=self.offset + i) for i in range(count)]
        self.offset += count
        return {TopicPartition("usage", 0): records} if records else {}

    def paused(self) -> set:
        return set()

    def pause(self, *partitions) -> None:
        pass

    def resume(self, *partitions) -> None:
        pass


def _poll(plan: list[int], writing: bool, limit: int = 100) -> tuple[list, _Records]:
    records = _Records(plan)
    shards = ShardConsumer(records, writer=None, input_topics=["usage"])
    settings = Settings(batch_max_events=limit, batch_max_ms=60_000)
    batch, _ = shards.poll(settings, threading.Event(), limit, writing=lambda: writing)
    return batch, records


def test_with_the_writer_free_what_has_arrived_goes_at_once():
    """Group commit: no batching delay for a quiet ledger (a suspension waits for nothing)."""
    batch, records = _poll([3, 5, 5], writing=False)
    assert len(batch) == 3 and len(records.polls) == 1


def test_while_the_previous_batch_is_written_records_wait_for_more_up_to_the_limit():
    batch, records = _poll([3, 5, 500], writing=True, limit=100)
    assert len(batch) == 100 and len(records.polls) == 3
    # ... polling in short slices, to notice the write ending
    assert all(0 < timeout <= WRITER_CHECK_MS for timeout in records.polls[1:])


def test_with_nothing_buffered_the_poll_waits_for_the_first_record():
    batch, records = _poll([0, 0, 2, 7], writing=False)
    assert len(batch) == 2 and len(records.polls) == 3
    assert records.polls[1] > WRITER_CHECK_MS  # a long wait, not a busy loop


class _Partitions:
    """A stand-in for KafkaConsumer with several partitions and pause state: the first poll
    hands over `first[p]` records of partition p, later polls nothing."""

    def __init__(self, first: dict[int, int]):
        self.first = first
        self.polled = False
        self.paused_now: set[TopicPartition] = set()

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        if self.polled:
            return {}
        self.polled = True
        return {
            TopicPartition("usage", p): [SimpleNamespace(offset=i) for i in range(n)]
            for p, n in self.first.items()
            if n
        }

    def paused(self) -> set:
        return set(self.paused_now)

    def pause(self, *partitions) -> None:
        self.paused_now |= set(partitions)

    def resume(self, *partitions) -> None:
        self.paused_now -= set(partitions)

    def position(self, tp) -> int:
        return 0


def test_the_buffer_is_bounded_by_batches_not_by_partitions():
    # Eight partitions with 60 records each, none near a batch (100) alone: 480 buffered, 380
    # left after the first batch, more than BUFFERED_BATCHES' worth. The partitions with records
    # stop fetching; the one with none keeps fetching; all resume once the buffer is drained
    # below that.
    kafka = _Partitions({p: 60 for p in range(8)} | {8: 0})
    shards = ShardConsumer(kafka, writer=None, input_topics=["usage"])
    settings = Settings(batch_max_events=100, batch_max_ms=1)
    assert BUFFERED_BATCHES * 100 < 380
    batch, _ = shards.poll(settings, threading.Event(), 100, writing=lambda: False)
    assert len(batch) == 100
    assert kafka.paused_now == {TopicPartition("usage", p) for p in range(8)}
    for _ in range(2):
        batch, _ = shards.poll(settings, threading.Event(), 100, writing=lambda: False)
        assert len(batch) == 100
    assert kafka.paused_now == set()  # 180 left: below two batches' worth
