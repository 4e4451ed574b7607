"""The batcher: one bounded queue and one worker thread that owns the engine.

Handler threads :meth:`Batcher.submit` work items and wait on the returned future. The worker
takes the first item, then gathers more until ``max_batch_size`` items or ``max_delay_ms`` after
the first one arrived, drops items whose caller gave up or whose deadline passed, runs the batch
on the engine and resolves each item's future. A full queue refuses at once with a retry hint. An
exception in a batch fails only that batch's items; the worker goes on with the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from .engine import ItemResult, WorkItem
from .errors import BatchFailed, DeadlineExceeded, QueueFull

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What an item's future resolves to: the engine's result and where the time went."""

    result: ItemResult
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass
class _Pending:
    work: WorkItem
    future: Future
    enqueued: float
    deadline: Optional[float]  # time.monotonic() value; None: no deadline
    started: float = field(default=0.0)


class Batcher:
    """Thread-safe ``submit``; ``start``/``stop`` from the owning thread."""

    def __init__(self, run_batch: Callable[[Sequence[WorkItem]], List[ItemResult]], *,
                 max_batch_size: int, max_delay_ms: float, max_queue: int) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._max_delay_s = max_delay_ms / 1000.0
        self._queue: queue.Queue[Optional[_Pending]] = queue.Queue(maxsize=max_queue)
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._batch_seconds = 0.05  # running mean of batch compute time, for retry hints

    # --- handler side ----------------------------------------------------------------------

    def submit(self, work: WorkItem, deadline: Optional[float] = None) -> Future:
        """Queue one item. Raises QueueFull at once when the queue is full.

        Cancelling the returned future before its batch starts drops the item unrun.
        """
        pending = _Pending(work, Future(), time.monotonic(), deadline)
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            waiting = self._queue.qsize()
            retry = max(0.01, self._batch_seconds * (waiting / self.max_batch_size + 1))
            raise QueueFull(f"the server is busy: {waiting} items are waiting; retry in "
                            f"{retry * 1000:.0f} ms", retry_after_s=retry) from None
        return pending.future

    def depth(self) -> int:
        return self._queue.qsize()

    # --- worker side -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="camserve-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish what is queued, then stop the worker."""
        self._stopping.set()
        try:
            self._queue.put_nowait(None)  # wake the worker
        except queue.Full:
            pass  # the worker is busy and will see _stopping after the queue drains
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _gather(self) -> Optional[List[_Pending]]:
        """The next batch; an empty list when everything gathered was dropped; None: stop."""
        try:
            first = self._queue.get(timeout=0.5 if not self._stopping.is_set() else 0)
        except queue.Empty:
            return None if self._stopping.is_set() else []
        if first is None:
            return self._gather() if not self._queue.empty() else None
        batch = [first]
        closes = first.enqueued + self._max_delay_s
        while len(batch) < self.max_batch_size:
            remaining = closes - time.monotonic()
            try:
                item = (self._queue.get(timeout=remaining) if remaining > 0
                        else self._queue.get_nowait())
            except queue.Empty:
                break
            if item is None:  # a stop request: serve this batch and what follows
                continue
            batch.append(item)
        return [p for p in batch if self._admit(p)]

    @staticmethod
    def _admit(pending: _Pending) -> bool:
        """Drop an item whose caller cancelled or whose deadline passed, before it costs compute."""
        if not pending.future.set_running_or_notify_cancel():
            return False
        if pending.deadline is not None and time.monotonic() >= pending.deadline:
            pending.future.set_exception(DeadlineExceeded(
                "the deadline passed while the request waited in the queue"))
            return False
        return True

    def _run(self, batch: List[_Pending]) -> None:
        started = time.monotonic()
        try:
            results = self._run_batch([p.work for p in batch])
        except Exception as exc:  # a failing batch fails only its own items
            log.exception("batch of %d failed", len(batch))
            error = BatchFailed(f"the model failed on this batch: {type(exc).__name__}: "
                                f"{str(exc)[:200]}")
            for p in batch:
                p.future.set_exception(error)
            return
        compute = time.monotonic() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * compute
        for p, result in zip(batch, results):
            p.future.set_result(Outcome(result, (started - p.enqueued) * 1000.0,
                                        compute * 1000.0, len(batch)))
