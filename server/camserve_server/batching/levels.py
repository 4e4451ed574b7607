"""Who goes first: the queue's items in priority levels.

``Scheduling.levels`` levels (3 by default), highest first; by default unary Predict, Explain
and Open Inference Protocol calls wait at the first (``INTERACTIVE``), stream frames at the
second (``STREAM``) and any item whose explanation needs extra forwards (Score-CAM channels,
faithfulness steps) at the third (``EXPENSIVE``). Each level may have its policy
(:class:`LevelPolicy`): the longest an item waits, the most items queued, the most items in one
batch. Within a level items are taken
round-robin over their callers (a caller: its bearer token, an operator-trusted
``x-camserve-tenant`` header, else its connection), each caller's first come, first served,
so one caller's many items do not push everyone else back. A worker takes the next caller's
item at the highest level that has items, except that a lower level that waits gets a
guaranteed share: once ``share`` items (4) have been taken from above it while it waited, its
next item goes first. So a lower level is never starved (it gets
at least one item in every ``share + 1`` while it waits), and a saturating lower level costs a
higher one at most one item in ``share + 1``. A share rather than aging: under a standing
backlog every waiting frame is old, so aged frames would take every batch and the levels would
vanish exactly when they matter.

When the queue is full, an item is refused only if no item of a lower level waits and no caller
of its own level holds two items more than its caller: else the newest item of the greediest
caller of the lowest level waiting (or of its own level) is refused (answered
RESOURCE_EXHAUSTED with a retry hint) and gives it its place, so frames never keep a unary call
out of a full queue, and a greedy caller is refused before a polite one.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Deque, Iterator, List, Tuple

INTERACTIVE, STREAM, EXPENSIVE = 0, 1, 2  # the default levels of unary calls, frames, jobs
SHARE = 4  # a waiting lower level's next item goes first once this many were taken above it


@dataclass(frozen=True)
class LevelPolicy:
    """One level's queue policy (Triton's per-priority queue policy); 0: no bound."""

    max_wait_s: float = 0.0  # the longest an item waits in the queue, then:
    delay: bool = False  # False: it is answered DEADLINE_EXCEEDED; True: it waits behind
    # every item that has not waited that long (it still runs)
    max_queued: int = 0  # the most items of this level waiting
    max_batch: int = 0  # the most items of this level in one batch


@dataclass(frozen=True)
class Scheduling:
    """The levels, the defaults of each kind of work, the share and each level's policy."""

    levels: int = 3
    unary: int = INTERACTIVE  # the level of a unary call that asks for none
    stream: int = STREAM  # ... of a stream frame
    expensive: int = EXPENSIVE  # ... of an item with extra forwards (the highest it may have)
    share: int = SHARE
    policies: Tuple[LevelPolicy, ...] = field(default=())  # by level; missing ones: no bounds
    highest: int = 0  # the highest level a caller may ask for without a priority token

    def policy(self, level: int) -> LevelPolicy:
        return self.policies[level] if level < len(self.policies) else LevelPolicy()

    def __post_init__(self) -> None:
        for kind in ("unary", "stream", "expensive", "highest"):
            if not 0 <= getattr(self, kind) < self.levels:
                raise ValueError(f"the {kind} level {getattr(self, kind) + 1} is not one of "
                                 f"the {self.levels} priorities")


def caller_class(caller: str) -> str:
    """What kind of name a caller has (``api/calls.py`` names them ``KIND:NAME``: token,
    tenant or peer), for metric labels that never hold the name itself; "none" without one."""
    kind, named, _ = caller.partition(":")
    return kind if named else "none"


class Callers:
    """One level's items, taken round-robin over their callers (each item's ``caller``, a
    string; items without one share the caller ""): a caller with many items waiting takes one
    turn in each round, as a caller with one does, so it cannot push the others back."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, Deque] = OrderedDict()  # in turn order
        self._count = 0

    def append(self, item) -> None:
        self._queues.setdefault(getattr(item, "caller", ""), deque()).append(item)
        self._count += 1

    def remove(self, item) -> None:
        """Raises ValueError when it is not queued."""
        caller = getattr(item, "caller", "")
        queue = self._queues.get(caller)
        if queue is None:
            raise ValueError("not queued")
        queue.remove(item)
        self._count -= 1
        if not queue:
            del self._queues[caller]

    def expired(self, before: float) -> List:
        """Remove and return the items enqueued before that time (each caller's first items:
        a caller's items wait in order)."""
        gone = []
        for caller, queue in list(self._queues.items()):
            while queue and queue[0].enqueued < before:
                gone.append(queue.popleft())
            if not queue:
                del self._queues[caller]
        self._count -= len(gone)
        return gone

    def popleft(self):
        caller, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        self._count -= 1
        del self._queues[caller]
        if queue:  # its next item waits for its next turn, after every other caller's
            self._queues[caller] = queue
        return item

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator:
        for queue in self._queues.values():
            yield from queue

    def first(self):
        """The item that has waited longest (each caller's first is its oldest)."""
        return min((q[0] for q in self._queues.values()), key=lambda i: i.enqueued)

    def newest(self):
        """The newest item of the caller with the most items waiting."""
        return max(self._queues.values(), key=len)[-1]

    def of(self, caller: str) -> int:
        queue = self._queues.get(caller)
        return len(queue) if queue is not None else 0


class Levels:
    """The queue's items (each with ``level``, ``enqueued``, a time.monotonic() value, and
    ``caller``), as a deque that ``popleft`` takes from in priority order, round-robin over the
    callers within a level (:class:`Callers`). Items past a delaying level's longest wait
    (``delay``) move to a last level of their own, behind every other. Not thread-safe: the
    queue's lock guards it."""

    def __init__(self, levels: int = 3, share: int = SHARE) -> None:
        self.share = share
        self._levels: List[Callers] = [Callers() for _ in range(levels + 1)]  # + the delayed
        self._passed = [0] * (levels + 1)  # items taken above each level while it waited

    def append(self, item) -> None:
        self._levels[self._slot(item)].append(item)

    def _slot(self, item) -> int:
        return len(self._levels) - 1 if getattr(item, "delayed", False) else item.level

    def remove(self, item) -> None:
        """Raises ValueError when it is not queued (a worker took it)."""
        self._levels[self._slot(item)].remove(item)

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    def __bool__(self) -> bool:
        return any(self._levels)

    def __iter__(self) -> Iterator:
        for level in self._levels:
            yield from level

    def oldest(self):
        """The item that has waited longest (a ValueError when there is none)."""
        return min((level.first() for level in self._levels if level),
                   key=lambda i: i.enqueued)

    def depth(self, level: int) -> int:
        """The items waiting at ``level`` (the number of levels: those delayed)."""
        return len(self._levels[level])

    def delay(self, level: int, before: float) -> int:
        """Move the items of ``level`` enqueued before that time behind every other; returns
        how many moved."""
        moved = self._levels[level].expired(before)
        for item in moved:
            item.delayed = True
            self._levels[-1].append(item)
        return len(moved)

    def ahead(self, level: int) -> int:
        """The items a new item of ``level`` would wait behind (the shares aside)."""
        return sum(len(q) for q in self._levels[:level + 1])

    def newest_below(self, level: int):
        """The item a full queue refuses to make room for an item of ``level``: the newest of
        the greediest caller of the lowest level below it that has items; None when no lower
        level has any."""
        for queue in reversed(self._levels[level + 1:]):
            if queue:
                return queue.newest()
        return None

    def greedier(self, level: int, caller: str):
        """For a full queue and no lower level to take from: the newest item of the caller
        with the most items at ``level`` when it holds at least two more than ``caller`` (the
        greedy caller gives way to a polite one); else None."""
        queue = self._levels[level]
        if not queue:
            return None
        newest = queue.newest()
        return newest if queue.of(newest.caller) >= queue.of(caller) + 2 else None

    def popleft(self, skip: Collection[int] = ()):
        """The next item to run: the next caller's turn at the highest level that has items,
        unless a lower one has had ``share`` items taken above it while it waited (an
        IndexError when there is none). The levels in ``skip`` are passed over."""
        queued = [i for i, level in enumerate(self._levels) if level]
        waiting = [i for i in queued if i not in skip]
        if not waiting:
            raise IndexError("no item is queued")
        chosen = next((i for i in waiting[1:] if self._passed[i] >= self.share), waiting[0])
        for i in range(len(self._levels)):
            if i not in queued or i == chosen:
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
    caller: str = ""  # whose call it serves: callers take turns within a level


class LevelPool(Executor):
    """The decode and render threads, taking their tasks in the queue's order (:class:`Levels`,
    with its shares): a stream's thousands of frames to decode do not hold up a unary call's
    image, nor a caller's 64 images another caller's one. ``submit`` queues at INTERACTIVE,
    ``submit_at`` at any level, ``submit_for`` at any level for a caller."""

    def __init__(self, threads: int, name: str, levels: int = 3, share: int = SHARE) -> None:
        self._tasks = Levels(levels, share)
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self.submit_at(INTERACTIVE, fn, *args, **kwargs)

    def submit_at(self, level: int, fn, /, *args, **kwargs) -> Future:
        return self.submit_for(level, "", fn, *args, **kwargs)

    def submit_for(self, level: int, caller: str, fn, /, *args, **kwargs) -> Future:
        """``fn(*args, **kwargs)`` at ``level`` for ``caller`` (callers take turns)."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            self._tasks.append(_Task(level, time.monotonic(), future,
                                     functools.partial(fn, *args, **kwargs), caller))
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
