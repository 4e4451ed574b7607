"""The bounded queue every device worker takes from: admission when an item is submitted, and
again when a worker takes it, and how a worker gathers its next batch. Its items wait in
priority levels (``levels.py``): interactive calls, then stream frames, then expensive work.

Admission. A full queue refuses at once with a retry hint (``QueueFull``); so does an expensive
item (extra forwards: Score-CAM channels, faithfulness steps) when the forwards of the queued
items and the jobs would pass ``max_job_forwards``; a deadline shorter than the expected wait is
refused before the item is queued (``DeadlineExceeded``). When a worker takes an item, one whose
caller gave up, or whose deadline would pass before its batch could finish, is dropped before it
costs compute.

The expected wait that deadlines and retry hints use counts waiting work in forwards: the
batches ahead, a slice of the jobs' between each, and for an expensive item the jobs' forwards
ahead and its own, divided among the workers. Its estimates of a batch's and of one forward's
compute time are running means of what the workers measure.

Gathering. A worker takes every item waiting, up to ``max_batch_size``: when it is idle a lone
item starts at once, and under load items gather while the previous batch computes, so batches
fill by themselves. After a batch of n > 1 items it waits up to a quarter of a batch's compute
time (50 ms at most) for n items: closed-loop callers answered together come back one by one,
and would otherwise split into a batch of 1 and a batch of n - 1. With ``max_delay_ms`` > 0 the
worker instead waits up to that long after the first item for the batch to fill.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

from ..domain import SLICE_FORWARDS, WorkItem
from ..errors import DeadlineExceeded, QueueFull
from ..metrics import Metrics
from .levels import INTERACTIVE, Levels, Scheduling
from .tickets import Ticket, resolve

# After a batch of n > 1 items, wait up to this fraction of a batch's compute time (at most
# COMPANY_WAIT_MAX_S) for n items before starting the next (--max-delay-ms 0 only).
COMPANY_WAIT = 0.25
COMPANY_WAIT_MAX_S = 0.05
# A level's max_batch holds while a higher level has had an item queued this recently: its
# closed-loop callers are then computing or on their way back, and a shorter batch lets them
# in sooner; a level alone keeps full batches.
HIGHER_ACTIVE_S = 1.0

@dataclass(eq=False)
class Pending:
    """An item in the queue, or taken from it and not yet answered."""

    work: WorkItem
    future: Ticket
    enqueued: float
    deadline: Optional[float]  # time.monotonic() value; None: no deadline
    level: int = INTERACTIVE  # levels.py
    caller: str = ""  # who sent it (levels.py takes a level's items round-robin over callers)
    bounded: bool = False  # the deadline is its level's longest wait, not its caller's
    delayed: bool = False  # past its level's longest wait, it waits behind every other item

    @property
    def extra(self) -> int:
        """The extra forwards its explanation needs (its job's), 0 when none."""
        explain = self.work.explain
        return explain.extra_cost if explain is not None else 0


class WorkQueue:
    """The items waiting, the forwards of expensive work not yet run, and the estimates of
    compute time; shared by the handlers (``submit``) and the device workers. ``cond`` guards
    ``items`` and ``job_forwards``."""

    def __init__(self, *, max_batch_size: int, max_delay_ms: float, max_queue: int,
                 max_job_forwards: int, metrics: Metrics, batch_seconds: float,
                 workers: int, scheduling: Optional[Scheduling] = None,
                 max_queue_per_caller: int = 0) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.metrics = metrics
        scheduling = self.scheduling = scheduling or Scheduling()
        self.items = Levels(scheduling.levels, scheduling.share)
        self._queued_at = [float("-inf")] * scheduling.levels  # each level's latest submit
        self._delaying = [(level, p.max_wait_s) for level, p in enumerate(scheduling.policies)
                          if p.max_wait_s and p.delay]
        self.cond = threading.Condition()
        self.job_forwards = 0  # extra forwards of the queued items and the jobs, not yet run
        self.stopping = threading.Event()
        self.idle_workers = 0  # workers waiting for items (under cond)
        self.arriving_items = 0  # items the handlers are decoding for the queue (event loop only)
        # Running means of one batch's compute time and of one forward's (from the slices):
        # retry hints and deadline checks use them.
        self.batch_seconds = batch_seconds
        self.forward_seconds = batch_seconds / max_batch_size
        self._max_queue = max_queue
        self._max_per_caller = max_queue_per_caller  # 0: no bound of its own
        self._per_caller: Dict[str, int] = {}  # items queued per caller (under cond)
        self._max_job_forwards = max_job_forwards
        self._workers = workers

    # --- handler side ----------------------------------------------------------------------

    def submit(self, work: WorkItem, deadline: Optional[float] = None,
               level: int = INTERACTIVE, caller: str = "", admit: int = 1) -> Ticket:
        """Queue one item (see :meth:`Batcher.submit`). ``admit``: the items of the call this
        one starts, checked against the caller's bound at once (a call's later items pass 0:
        a call is admitted or refused whole, and one larger than the bound when its caller has
        nothing waiting)."""
        now = time.monotonic()
        extra = work.explain.extra_cost if work.explain is not None else 0
        if extra:  # expensive work waits at its level or below
            level = max(level, self.scheduling.expensive)
        policy = self.scheduling.policy(level)
        bounded = bool(policy.max_wait_s) and not policy.delay and (
            deadline is None or now + policy.max_wait_s < deadline)
        if bounded:
            deadline = now + policy.max_wait_s
        if deadline is not None:
            expected = self.expected_wait(extra, level)
            if deadline - now < expected:
                self.metrics.dropped.labels("deadline").inc()
                if bounded:
                    raise DeadlineExceeded(
                        f"priority {level + 1} is answered within "
                        f"{policy.max_wait_s * 1000:.0f} ms or not at all "
                        "(--level-max-wait-ms), and this server needs about "
                        f"{expected * 1000:.0f} ms to answer now; retry later, or at a higher "
                        "priority", reason="LEVEL_WAIT")
                raise DeadlineExceeded(
                    f"the deadline leaves {max(0.0, deadline - now) * 1000:.0f} ms, and this "
                    f"server needs about {expected * 1000:.0f} ms to answer now; allow more "
                    "time (the call's timeout)")
        pending = Pending(work, Ticket(), now, deadline, level, caller, bounded)
        evicted = None
        with self.cond:
            self._refuse(level, caller, admit)
            if extra and self.job_forwards + extra > self._max_job_forwards:
                retry = self.job_forwards * self.forward_seconds
                raise QueueFull(f"the server is busy with {self.job_forwards} forwards of "
                                f"expensive explanations; retry in {retry:.0f} s",
                                retry_after_s=retry, reason="EXPENSIVE_WORK_FULL")
            if len(self.items) >= self._max_queue:  # last: an item evicted is answered below
                evicted = self._evictable(level, caller)
                self._take(evicted)
            self.items.append(pending)
            self._queued_at[level] = now
            self._per_caller[caller] = self._per_caller.get(caller, 0) + 1
            self.job_forwards += extra
            self.cond.notify()
        if evicted is not None:  # a full queue: the newest item of a lower level makes room
            self.metrics.dropped.labels("evicted").inc()
            retry = self.expected_wait(level=evicted.level)
            why = ("a call of a higher priority" if evicted.level > level else
                   "a caller with fewer items waiting")
            resolve(evicted.future, exception=QueueFull(
                f"the server is busy: {self._max_queue} items are waiting, and this one gave "
                f"its place to {why}; retry in {retry * 1000:.0f} ms", retry_after_s=retry))
        pending.future.add_done_callback(lambda f: f.cancelled() and self._forget(pending))
        return pending.future

    def check(self, items: int, level: int = INTERACTIVE, caller: str = "",
              extra: bool = False) -> None:
        """Raise what ``submit`` would raise now for a call of that many items (``extra``:
        with extra forwards), before its images are decoded: a refused call costs no
        decoding."""
        if extra:
            level = max(level, self.scheduling.expensive)
        with self.cond:
            self._refuse(level, caller, items)
            if len(self.items) >= self._max_queue:
                self._evictable(level, caller)

    def _refuse(self, level: int, caller: str, admit: int) -> None:
        """The bounds of a caller and of a level, for a call of ``admit`` items (0: a later
        item of an admitted call); under cond."""
        mine = self._per_caller.get(caller, 0)
        if admit and self._max_per_caller and mine and mine + admit > self._max_per_caller:
            retry = self.expected_wait(level=level)
            self.metrics.dropped.labels("caller_full").inc()
            raise QueueFull(f"you have {mine} items waiting, this server's limit per caller "
                            f"(max_queue_per_caller); retry in {retry * 1000:.0f} ms, when "
                            "some are answered", retry_after_s=retry,
                            reason="CALLER_QUEUE_FULL")
        policy = self.scheduling.policy(level)
        if policy.max_queued and self.items.depth(level) >= policy.max_queued:
            retry = self.expected_wait(level=level)
            self.metrics.dropped.labels("level_full").inc()
            raise QueueFull(f"{policy.max_queued} items of priority {level + 1} are "
                            "waiting, this server's limit for that priority "
                            f"(--level-max-queued); retry in {retry * 1000:.0f} ms",
                            retry_after_s=retry, reason="LEVEL_QUEUE_FULL")

    def _evictable(self, level: int, caller: str) -> Pending:
        """For a full queue: the item that gives its place to one of ``level`` for
        ``caller``; QueueFull when none does (under cond)."""
        evicted = self.items.newest_below(level) or self.items.greedier(level, caller)
        if evicted is None:
            retry = self.expected_wait(level=level)
            raise QueueFull(f"the server is busy: {len(self.items)} items are "
                            f"waiting; retry in {retry * 1000:.0f} ms", retry_after_s=retry)
        return evicted

    def _forget(self, pending: Pending) -> None:
        """A withdrawn item leaves the queue at once (so it holds no queue slot)."""
        with self.cond:
            try:
                self._take(pending)
            except ValueError:
                return  # the worker took it already and drops it there
        self.metrics.dropped.labels(pending.future.reason).inc()

    def _take(self, pending: Pending) -> None:
        """Remove a queued item (ValueError when it is not queued); under cond."""
        self.items.remove(pending)
        self.job_forwards -= pending.extra
        self._left(pending)

    def _pop(self, skip=()) -> Pending:
        """The next item in the levels' order, taken (under cond)."""
        pending = self.items.popleft(skip)
        self._left(pending)
        return pending

    def _pop_batch(self, room: int) -> List[Pending]:
        """Up to ``room`` items in the levels' order, no more of a level than its policy's
        ``max_batch`` while a higher level is active (under cond); those past a delaying
        level's longest wait first move behind every other."""
        now = time.monotonic()
        for level, wait in self._delaying:
            self.items.delay(level, now - wait)
        caps = self._caps(now)
        taken: List[Pending] = []
        counts: Dict[int, int] = {}
        full: set = set()
        while len(taken) < room:
            try:
                pending = self._pop(full)
            except IndexError:
                break
            taken.append(pending)
            if pending.delayed or pending.level not in caps:
                continue
            counts[pending.level] = counts.get(pending.level, 0) + 1
            if counts[pending.level] >= caps[pending.level]:
                full.add(pending.level)
        return taken

    def _caps(self, now: float) -> Dict[int, int]:
        """Each level's max_batch that holds now: a higher level had an item queued within
        HIGHER_ACTIVE_S."""
        caps, active = {}, False
        for level, policy in enumerate(self.scheduling.policies):
            if active and policy.max_batch:
                caps[level] = policy.max_batch
            active = active or now - self._queued_at[level] < HIGHER_ACTIVE_S
        return caps

    def _left(self, pending: Pending) -> None:
        """An item left the queue: its caller holds one item less (under cond)."""
        left = self._per_caller.get(pending.caller, 0) - 1
        if left > 0:
            self._per_caller[pending.caller] = left
        else:
            self._per_caller.pop(pending.caller, None)

    def depth(self, level: Optional[int] = None) -> int:
        """The items waiting (at ``level``; the number of levels: those delayed)."""
        return len(self.items) if level is None else self.items.depth(level)

    @contextlib.contextmanager
    def arriving(self, items: int) -> Iterator[None]:
        """See :meth:`Batcher.arriving`."""
        self.arriving_items += items
        try:
            yield
        finally:
            self.arriving_items -= items

    def expected_wait(self, extra_forwards: int = 0, level: int = INTERACTIVE) -> float:
        """Seconds until an item of ``level`` queued now (with that many extra forwards)
        would be answered: the batches ahead of it (its level and those above), a slice of
        the jobs' between each, and for an expensive item the jobs' forwards ahead, which it
        shares the worker with, and its own."""
        workers = self._workers
        ahead = self.items.ahead(level)
        batches_ahead = math.ceil((ahead // self.max_batch_size + 1) / workers)
        wait = self.batch_seconds * batches_ahead
        if self.job_forwards:
            wait += batches_ahead * SLICE_FORWARDS * self.forward_seconds
        if extra_forwards:
            wait += (self.job_forwards / workers + extra_forwards) * self.forward_seconds
        return wait

    # --- worker side -----------------------------------------------------------------------

    def gather(self, last_batch: int, jobs_waiting: bool) -> Optional[List[Pending]]:
        """The items of a worker's next batch, taken from the queue (not yet admitted); an
        empty list when the worker's jobs wait for their slices (or another worker took the
        items meanwhile); None: stop. ``last_batch``: the size of the worker's last batch."""
        with self.cond:
            self.idle_workers += 1
            try:
                while not self.items:
                    if jobs_waiting:
                        return []
                    if self.stopping.is_set():
                        return None
                    self.cond.wait(0.5)
            finally:
                self.idle_workers -= 1
            if self.max_delay_s > 0:
                closes = self.items.oldest().enqueued + self.max_delay_s
                want = self.max_batch_size
            else:
                # The last batch had company: its callers are likely sending again. Wait a
                # fraction of a batch's time for as many items, so that closed-loop callers
                # do not split into a small batch and a large one. A lone caller never waits.
                closes = time.monotonic() + min(COMPANY_WAIT * self.batch_seconds,
                                                COMPANY_WAIT_MAX_S)
                want = min(last_batch, self.max_batch_size) if last_batch > 1 else 0
            while len(self.items) < want and not self.stopping.is_set():
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            return self._pop_batch(self.max_batch_size)

    def take_full_batch(self) -> List[Pending]:
        """A full batch that is already waiting, when no worker is idle to take it; else
        nothing."""
        with self.cond:
            if self.idle_workers or len(self.items) < self.max_batch_size:
                return []
            return self._pop_batch(self.max_batch_size)

    def take_arriving(self, room: int, closes: float) -> List[Pending]:
        """Up to ``room`` items, after waiting until ``closes`` (a time.monotonic() value) at
        most for those the handlers are still decoding (:meth:`arriving`)."""
        with self.cond:
            while len(self.items) < room and self.arriving_items and not self.stopping.is_set():
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            return self._pop_batch(room)

    def admit(self, pending: Pending, batches: int = 1) -> bool:
        """Drop an item whose caller cancelled, or whose deadline would pass before its batch
        could finish, before it costs compute."""
        if not pending.future.set_running_or_notify_cancel():
            self.settle(pending)
            self.metrics.dropped.labels(pending.future.reason).inc()
            return False
        if pending.deadline is not None and (
                pending.deadline - time.monotonic() < batches * self.batch_seconds):
            self.settle(pending)
            self.metrics.dropped.labels("deadline").inc()
            if pending.bounded:
                wait = self.scheduling.policy(pending.level).max_wait_s
                error = DeadlineExceeded(
                    f"priority {pending.level + 1} is answered within {wait * 1000:.0f} ms "
                    "of being queued or not at all (--level-max-wait-ms), and this item's "
                    "batch could not finish in time; retry later, or at a higher priority",
                    reason="LEVEL_WAIT")
            else:
                error = DeadlineExceeded(
                    "the deadline would pass before this item's batch finished; allow more time")
            pending.future.set_exception(error)
            return False
        return True

    def settle(self, pending: Pending) -> None:
        """The item's extra forwards will not run (or have run): stop counting them."""
        self.release(pending.extra)

    def release(self, forwards: int) -> None:
        """That many extra forwards have run, or will not: stop counting them."""
        with self.cond:
            self.job_forwards -= forwards

    def estimate(self, batch_seconds: float) -> None:
        """A full batch takes that long (a worker's warm-up measured it): both estimates
        start from it."""
        self.batch_seconds = batch_seconds
        self.forward_seconds = batch_seconds / self.max_batch_size

    def learn_batch(self, seconds: float) -> None:
        """A batch took that long: the running mean follows it."""
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds

    def learn_forwards(self, seconds: float, forwards: int) -> None:
        """A slice of that many forwards took that long: the running mean follows it."""
        self.forward_seconds = 0.8 * self.forward_seconds + 0.2 * seconds / forwards
