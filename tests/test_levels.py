"""Who goes first (batching/levels.py): interactive calls before stream frames before
expensive work, first come first served within a level, and a waiting lower level's share.
Checked on the queue's order, never on time taken."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from camserve_server.batching.batcher import Batcher
from camserve_server.batching.levels import EXPENSIVE, INTERACTIVE, STREAM, Levels
from camserve_server.domain import ItemResult, WorkItem

from conftest import wait_for


@dataclass(eq=False)
class Item:
    name: str
    level: int
    enqueued: float


def test_levels_take_the_highest_first_and_fifo_within_one():
    now = time.monotonic()
    levels = Levels(share=60)
    for name, level in [("s1", STREAM), ("x1", EXPENSIVE), ("i1", INTERACTIVE), ("s2", STREAM),
                        ("i2", INTERACTIVE)]:
        levels.append(Item(name, level, now))
    assert len(levels) == 5 and levels.ahead(INTERACTIVE) == 2 and levels.ahead(STREAM) == 4
    assert [levels.popleft().name for _ in range(5)] == ["i1", "i2", "s1", "s2", "x1"]
    assert not levels
    with pytest.raises(IndexError):
        levels.popleft()


def test_a_waiting_lower_level_gets_one_item_in_every_share_plus_one():
    now = time.monotonic()
    levels = Levels(share=2)
    for i in range(8):
        levels.append(Item(f"i{i}", INTERACTIVE, now))
    for i in range(3):
        levels.append(Item(f"s{i}", STREAM, now))
    levels.append(Item("x0", EXPENSIVE, now))
    order = [levels.popleft().name for _ in range(12)]
    # After 2 taken above them, the stream's next goes first, then the expensive level's
    # (3 taken above it by then); the counts start over once a level's item is taken.
    assert order == ["i0", "i1", "s0", "x0", "i2", "i3", "s1", "i4", "i5", "s2", "i6", "i7"]


def test_a_level_that_was_empty_has_no_credit():
    now = time.monotonic()
    levels = Levels(share=2)
    for i in range(4):
        levels.append(Item(f"i{i}", INTERACTIVE, now))
    assert [levels.popleft().name for _ in range(3)] == ["i0", "i1", "i2"]
    levels.append(Item("s0", STREAM, now))  # arrives now: no items were taken while it waited
    levels.append(Item("i4", INTERACTIVE, now))
    assert [levels.popleft().name for _ in range(3)] == ["i3", "i4", "s0"]


def test_remove_takes_an_item_out_of_its_level():
    now = time.monotonic()
    levels = Levels()
    items = [Item(str(i), i % 3, now) for i in range(6)]
    for item in items:
        levels.append(item)
    levels.remove(items[4])
    assert len(levels) == 5 and items[4] not in list(levels)
    with pytest.raises(ValueError):
        levels.remove(items[4])


def _run(share: int):
    """A slow engine's worker is busy with one item; three stream frames, then two
    interactive calls are queued: the order of the batches that follow."""
    release = threading.Event()
    batches = []

    def run_batch(works):
        batches.append([int(w.pixels[0, 0, 0]) for w in works])
        release.wait(30)
        return [ItemResult(np.zeros(1, np.float32), np.ones(1, np.float32)) for _ in works]

    def item(value: int) -> WorkItem:
        return WorkItem(np.full((2, 2, 3), value, np.uint8))

    batcher = Batcher(run_batch, max_batch_size=2, max_delay_ms=0, max_queue=16,
                      share=share)
    batcher.start()
    try:
        first = batcher.submit(item(0))
        wait_for(lambda: batches == [[0]], 10, "the first batch running")
        frames = [batcher.submit(item(10 + i), level=STREAM) for i in range(3)]
        calls = [batcher.submit(item(1 + i)) for i in range(2)]
        assert batcher.depth() == 5
        release.set()
        for ticket in [first, *frames, *calls]:
            ticket.result(30)
    finally:
        release.set()
        batcher.stop()
    return batches


def test_the_batcher_runs_queued_interactive_calls_before_queued_frames():
    assert _run(share=60) == [[0], [1, 2], [10, 11], [12]]


def test_with_a_share_of_one_the_batcher_alternates_calls_and_frames():
    assert _run(share=1) == [[0], [1, 10], [2, 11], [12]]


def test_an_item_with_extra_forwards_waits_at_the_expensive_level():
    from types import SimpleNamespace

    from camserve_server.batching.queue import WorkQueue
    from camserve_server.metrics import Metrics

    queue = WorkQueue(max_batch_size=2, max_delay_ms=0, max_queue=8, max_job_forwards=100,
                      metrics=Metrics(), batch_seconds=0.1, workers=1)
    pixels = np.zeros((2, 2, 3), np.uint8)
    queue.submit(WorkItem(pixels, SimpleNamespace(extra_cost=5)))  # asked as interactive
    queue.submit(WorkItem(pixels), level=STREAM)
    assert [p.level for p in queue.items] == [STREAM, EXPENSIVE]
    # An interactive item queued now waits behind neither; a frame behind the frame.
    assert queue.expected_wait(level=INTERACTIVE) < queue.expected_wait(level=EXPENSIVE)
    assert queue.items.ahead(INTERACTIVE) == 0 and queue.items.ahead(STREAM) == 1


def test_a_full_queue_refuses_the_newest_lower_item_to_make_room_for_a_higher_one():
    from camserve_server.batching.queue import WorkQueue
    from camserve_server.errors import QueueFull
    from camserve_server.metrics import Metrics

    metrics = Metrics()
    queue = WorkQueue(max_batch_size=2, max_delay_ms=0, max_queue=3, max_job_forwards=100,
                      metrics=metrics, batch_seconds=0.1, workers=1)
    pixels = np.zeros((2, 2, 3), np.uint8)
    frames = [queue.submit(WorkItem(pixels), level=STREAM) for _ in range(3)]
    with pytest.raises(QueueFull):  # no lower level to give way
        queue.submit(WorkItem(pixels), level=STREAM)
    call = queue.submit(WorkItem(pixels))
    assert not frames[0].done() and not frames[1].done() and not call.done()
    with pytest.raises(QueueFull, match="gave its place") as refused:
        frames[2].result(0)
    assert refused.value.retry_after_s > 0
    assert metrics.value("camserve_items_dropped_total", reason="evicted") == 1
    assert [p.level for p in queue.items] == [INTERACTIVE, STREAM, STREAM]
    queue.submit(WorkItem(pixels))
    queue.submit(WorkItem(pixels))
    with pytest.raises(QueueFull):  # full of interactive calls: refused, nothing evicted
        queue.submit(WorkItem(pixels))
    assert len(queue.items) == 3 and all(f.done() for f in frames)


def test_the_pool_runs_a_unary_calls_decode_before_queued_frames():
    from camserve_server.batching.levels import LevelPool

    pool = LevelPool(1, "test-pool", share=60)
    release, ran = threading.Event(), []
    try:
        busy = pool.submit(release.wait, 30)
        frames = [pool.submit_at(STREAM, ran.append, f"frame {i}") for i in range(3)]
        call = pool.submit(ran.append, "call")
        failing = pool.submit(int, "not a number")
        release.set()
        for future in [busy, *frames, call]:
            future.result(30)
        with pytest.raises(ValueError):
            failing.result(30)
        assert ran == ["call", "frame 0", "frame 1", "frame 2"]
        release.clear()
        pool.submit(release.wait, 30)
        left = pool.submit_at(STREAM, ran.append, "never")
    finally:
        release.set()
        pool.shutdown(wait=True, cancel_futures=True)
    assert left.done()  # run, or cancelled: never left pending
    with pytest.raises(RuntimeError):
        pool.submit(ran.append, "after")
