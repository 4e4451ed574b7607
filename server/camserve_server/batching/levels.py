"""Who goes first: the queue's items in priority levels.

Three levels, highest first: ``INTERACTIVE`` (unary Predict, Explain and Open Inference
Protocol calls), ``STREAM`` (stream frames) and ``EXPENSIVE`` (any item whose explanation needs
extra forwards: Score-CAM channels, faithfulness steps). Within a level items are taken first
come, first served. A worker takes the head of the highest level that has items, except that a
lower level that waits gets a guaranteed share: once ``share`` items (4) have been taken from
above it while it waited, its next item goes first. So a lower level is never starved (it gets
at least one item in every ``share + 1`` while it waits), and a saturating lower level costs a
higher one at most one item in ``share + 1``. A share rather than aging: under a standing
backlog every waiting frame is old, so aged frames would take every batch and the levels would
vanish exactly when they matter.

When the queue is full, an item is refused only if no item of a lower level waits: else the
newest item of the lowest level waiting is refused (answered RESOURCE_EXHAUSTED with a retry
hint) and gives it its place, so frames never keep a unary call out of a full queue.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Deque, Iterable, List

INTERACTIVE, STREAM, EXPENSIVE = 0, 1, 2
LEVELS = ("interactive", "stream", "expensive")  # their names, by level
SHARE = 4  # a waiting lower level's next item goes first once this many were taken above it


class Levels:
    """The queue's items (each with ``level`` and ``enqueued``, a time.monotonic() value), as
    a deque that ``popleft`` takes from in priority order. Not thread-safe: the queue's lock
    guards it."""

    def __init__(self, share: int = SHARE) -> None:
        self.share = share
        self._levels: List[Deque] = [deque() for _ in LEVELS]
        self._passed = [0] * len(LEVELS)  # items taken above each level while it waited

    def append(self, item) -> None:
        self._levels[item.level].append(item)

    def remove(self, item) -> None:
        """Raises ValueError when it is not queued (a worker took it)."""
        self._levels[item.level].remove(item)

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    def __bool__(self) -> bool:
        return any(self._levels)

    def __iter__(self) -> Iterable:
        for level in self._levels:
            yield from level

    def oldest(self):
        """The item that has waited longest (a ValueError when there is none)."""
        return min((level[0] for level in self._levels if level), key=lambda i: i.enqueued)

    def ahead(self, level: int) -> int:
        """The items a new item of ``level`` would wait behind (the shares aside)."""
        return sum(len(q) for q in self._levels[:level + 1])

    def newest_below(self, level: int):
        """The item that came last to the lowest level below ``level`` that has items (the
        one a full queue refuses to make room for an item of ``level``), or None."""
        for queue in reversed(self._levels[level + 1:]):
            if queue:
                return queue[-1]
        return None

    def popleft(self):
        """The next item to run: the head of the highest level that has items, unless a
        lower one has had ``share`` items taken above it while it waited (an IndexError when
        there is none)."""
        waiting = [i for i, level in enumerate(self._levels) if level]
        if not waiting:
            raise IndexError("no item is queued")
        chosen = next((i for i in waiting[1:] if self._passed[i] >= self.share), waiting[0])
        for i in range(len(self._levels)):
            if i not in waiting or i == chosen:
                self._passed[i] = 0
            elif i > chosen:
                self._passed[i] += 1
        return self._levels[chosen].popleft()


@dataclass(eq=False)
class _Task:
    level: int
    enqueued: float
    future: Future
    call: Callable[[], Any]


class LevelPool(Executor):
    """The decode and render threads, taking their tasks in the queue's order (:class:`Levels`,
    with its shares): a stream's thousands of frames to decode do not hold up a unary call's
    image. ``submit`` queues at INTERACTIVE, ``submit_at`` at any level."""

    def __init__(self, threads: int, name: str, share: int = SHARE) -> None:
        self._tasks = Levels(share)
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self.submit_at(INTERACTIVE, fn, *args, **kwargs)

    def submit_at(self, level: int, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            self._tasks.append(_Task(level, time.monotonic(), future,
                                     functools.partial(fn, *args, **kwargs)))
            self._cond.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._closed:
                    self._cond.wait()
                if not self._tasks:
                    return
                task = self._tasks.popleft()
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                result = task.call()
            except BaseException as exc:  # the caller's to see, as in ThreadPoolExecutor
                task.future.set_exception(exc)
            else:
                task.future.set_result(result)
            del task

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._closed = True
            if cancel_futures:
                while self._tasks:
                    self._tasks.popleft().future.cancel()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()
