"""The batcher: one bounded queue, and one worker thread per device that owns its engine.

Handlers :meth:`Batcher.submit` work items and wait on the returned ticket (a
``concurrent.futures.Future``, ``tickets.py``). The queue (``queue.py``) admits or refuses an
item at once, and each device's worker (``worker.py``) gathers the items waiting into a batch,
drops those whose caller gave up or whose deadline cannot be met before they cost compute, runs
the rest on its engine and resolves each ticket. Items may come undecoded and be decoded on the
worker (``deferred.py``); expensive explanations run as jobs, a slice of forwards at a time
between batches (``jobs.py``).

Several devices (``--device cuda:0 --device cuda:1``): one engine and one worker per device
take batches from the same queue, so an idle worker takes the next batch; a job's slices run on
the worker (device) whose batch made it; running out of memory splits the batch on that device
only; the expected wait counts the workers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator, Optional, Sequence, Union

from ..domain import WorkItem
from ..metrics import Metrics
from .gate import DeviceGate
from .levels import INTERACTIVE, Scheduling
from .queue import WorkQueue
from .tickets import Outcome, Ticket
from .worker import DeviceWorker, RunBatch

__all__ = ["Batcher", "Outcome", "Ticket"]


class Batcher:
    """``submit``, ``depth`` and ``expected_wait`` are thread-safe; ``start``/``stop`` belong
    to the owner."""

    def __init__(self, run_batch: Union[RunBatch, Sequence[RunBatch]], *, max_batch_size: int,
                 max_delay_ms: float, max_queue: int, metrics: Optional[Metrics] = None,
                 batch_seconds: float = 0.05, device: Union[str, Sequence[str]] = "cpu",
                 max_job_forwards: int = 1 << 30,
                 on_worker: Callable[[bool], None] = lambda alive: None,
                 restart_delay_s: float = 0.2, prefetch: bool = False,
                 prepare: Optional[Sequence[Callable[[], float]]] = None,
                 scheduling: Optional[Scheduling] = None,
                 gates: Optional[Sequence[DeviceGate]] = None,
                 max_queue_per_caller: int = 0) -> None:
        """``run_batch`` and ``device``: one each, or a list each (one worker per device).
        With ``prefetch`` the run functions take the upcoming batch as a second argument.
        ``prepare``: one per worker, run on its thread before it takes work; a worker counts
        as alive (``on_worker``) once prepared. ``gates``: one per worker, its device's turns,
        shared with the other models on that device (``gate.py``); None: a gate of its own."""
        runs = list(run_batch) if isinstance(run_batch, (list, tuple)) else [run_batch]
        devices = [device] * len(runs) if isinstance(device, str) else list(device)
        prepares = list(prepare) if prepare is not None else [None] * len(runs)
        if not len(devices) == len(prepares) == len(runs):
            raise ValueError(f"{len(runs)} run functions for {len(devices)} devices and "
                             f"{len(prepares)} prepare functions")
        self._queue = WorkQueue(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                                max_queue=max_queue, max_job_forwards=max_job_forwards,
                                metrics=metrics or Metrics(), batch_seconds=batch_seconds,
                                workers=len(runs), scheduling=scheduling,
                                max_queue_per_caller=max_queue_per_caller)
        self._abandon_jobs = threading.Event()  # set by stop(): end jobs instead of finishing
        gates = list(gates) if gates is not None else [None] * len(runs)
        self._workers = [DeviceWorker(d, r, p, self._queue, prefetch=prefetch,
                                      abandon_jobs=self._abandon_jobs,
                                      alive_changed=self._alive_changed,
                                      restart_delay_s=restart_delay_s, gate=g)
                         for d, r, p, g in zip(devices, runs, prepares, gates)]
        self.devices = tuple(devices)
        self.device = devices[0]
        self.max_batch_size = max_batch_size
        self._on_worker = on_worker
        self._alive = 0  # workers running (under the queue's lock)

    # --- handler side ----------------------------------------------------------------------

    def submit(self, work: WorkItem, deadline: Optional[float] = None,
               level: int = INTERACTIVE, caller: str = "", admit: int = 1) -> Ticket:
        """Queue one item at ``level`` (``levels.py``; an item with extra forwards is always
        EXPENSIVE), for ``caller`` (within a level callers take turns; ``admit``: the items of
        the call this one starts, 0 for its later ones). Raises QueueFull when the queue, or
        the caller's share of it, is full and DeadlineExceeded when the deadline
        leaves less time than the expected wait; both at once, before queueing.

        Withdrawing (or cancelling) the returned ticket before its batch starts removes the
        item from the queue unrun.
        """
        return self._queue.submit(work, deadline, level, caller, admit)

    def check(self, items: int, level: int = INTERACTIVE, caller: str = "",
              extra: bool = False) -> None:
        """Raise the QueueFull that submitting a call of that many items (``extra``: with
        extra forwards) would raise now, so that a refused call is refused before its images
        are decoded. The call's submits check again."""
        self._queue.check(items, level, caller, extra)

    def depth(self, level: Optional[int] = None) -> int:
        """The items waiting (at ``level`` only, when given)."""
        return self._queue.depth(level)

    def idle(self) -> bool:
        """A worker waits for items, none is queued and every worker's last batch ran alone:
        an item submitted now most likely runs alone, at once (a hint, read without the
        lock). Handlers then send its image undecoded (DeferredDecode)."""
        return (self._queue.idle_workers > 0 and not self._queue.items
                and all(w.last_batch <= 1 for w in self._workers))

    @contextlib.contextmanager
    def arriving(self, items: int) -> Iterator[None]:
        """Around a handler's decode of ``items`` it will submit next: a worker that is
        decoding a lone item itself waits for them to share its batch. Event-loop thread
        only: the count takes no lock (the worker reads it as a hint, and waits for it at
        most as long as its own decode took)."""
        with self._queue.arriving(items):
            yield

    def expected_wait(self, extra_forwards: int = 0) -> float:
        """Seconds until an item queued now (with that many extra forwards) would be
        answered: the batches ahead, a slice of the jobs' between each, and for an expensive
        item the jobs' forwards ahead, which it shares the worker with, and its own."""
        return self._queue.expected_wait(extra_forwards)

    @property
    def prepare_error(self) -> Optional[Exception]:
        """The exception a worker's prepare failed with; None while none has failed."""
        return next((w.prepare_error for w in self._workers if w.prepare_error is not None),
                    None)

    # --- worker side -----------------------------------------------------------------------

    def start(self) -> None:
        for i, w in enumerate(self._workers):
            w.start(f"-{i}" if len(self._workers) > 1 else "")

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish the batches queued, end the jobs at their next slice (their callers are gone
        by now: the server stops its calls first), then stop the worker."""
        self._queue.stopping.set()
        self._abandon_jobs.set()
        with self._queue.cond:
            self._queue.cond.notify_all()
        ends = None if timeout is None else time.monotonic() + timeout
        for w in self._workers:
            if w.supervisor is not None:
                w.supervisor.join(None if ends is None else max(0.0, ends - time.monotonic()))

    def _alive_changed(self, change: int, report: bool = True) -> None:
        """Health follows the workers: serving while at least one runs (``report``: tell
        ``on_worker``; a worker that ends at shutdown is only counted)."""
        with self._queue.cond:
            self._alive += change
            alive = self._alive
        if report:
            self._on_worker(alive > 0)
