"""The batcher: one bounded queue, and one worker thread per device that owns its engine.

Handlers :meth:`Batcher.submit` work items and wait on the returned ticket (a
``concurrent.futures.Future``). The worker takes every item waiting, up to
``max_batch_size``: when it is idle a lone item starts at once, and under load items gather
while the previous batch computes, so batches fill by themselves. After a batch of n > 1 items
it waits up to a quarter of a batch's compute time (50 ms at most) for n items: closed-loop
callers answered together come back one by one, and would otherwise split into a batch of 1
and a batch of n - 1. With ``max_delay_ms`` > 0 the worker instead waits up to that long after
the first item for the batch to fill. Items whose caller gave up or whose deadline cannot be
met are dropped before they cost compute; the rest run on the engine and each ticket is
resolved.

An item may come undecoded (``DeferredDecode``): the worker decodes it when it takes the item,
before the batch runs, and an item whose decode fails answers its error alone. Handlers send
that only while :meth:`Batcher.idle` (a worker waits, and the last batches ran alone): a lone
request then goes from the event loop to the worker and back, instead of through the decode
pool as well. Callers that send at the same moment must still share a batch: handlers
announce the items they are decoding in the pool (:meth:`Batcher.arriving`), and a worker that
has just decoded an item itself waits for those, up to as long as its own decode took.

Expensive work never holds the worker for long. An item whose explanation needs extra
forwards (Score-CAM channels, faithfulness steps) runs its forward and backward in an ordinary
batch; the engine then hands back a job (a generator) that the worker advances one slice (one
chunk of forwards) at a time, taking turns between the jobs and running any waiting batch
between slices. Before each slice the job's caller is checked: a caller that has gone, or
whose deadline has passed, stops the job there. Waiting work is counted in forwards: the
expected wait that deadlines and retry hints use includes the jobs ahead, and the jobs' total
is bounded (``max_job_forwards``).

Several devices (``--device cuda:0 --device cuda:1``): one engine and one worker per device
take batches from the same queue, so an idle worker takes the next batch; a job's slices run on
the worker (device) whose batch made it; running out of memory splits the batch on that device
only; the expected wait counts the workers.

Prefetch (``prefetch=True``, on CUDA): while a batch runs, a worker that sees a full batch
already waiting (and no idle worker to take it) takes it at once and hands it to the engine as
the upcoming batch, which the engine copies to the device (and decodes) while the current one
computes; it runs next on the same worker.

Failures stay local: a full queue refuses at once with a retry hint; a deadline too short for
the expected wait is refused before it is queued; an exception in a batch fails only that
batch's items; a batch that runs out of device memory is split in two and retried; and if the
worker thread itself dies, a supervisor fails the batch it was running, reports it (health goes
NOT_SERVING while no worker runs) and starts a new worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Callable, Deque, Iterator, List, Optional, Sequence, Tuple, Union

from ..domain import DeferredDecode, ItemResult, WorkItem
from ..errors import (
    BatchFailed,
    Cancelled,
    DeadlineExceeded,
    OutOfMemory,
    QueueFull,
    ServiceError,
    Unavailable,
)
from ..process.metrics import Metrics

log = logging.getLogger(__name__)

# After a batch of n > 1 items, wait up to this fraction of a batch's compute time (at most
# COMPANY_WAIT_MAX_S) for n items before starting the next (--max-delay-ms 0 only).
COMPANY_WAIT = 0.25
COMPANY_WAIT_MAX_S = 0.05

# The engine's answer per item: a result, an error, or a job whose slices are still to run (a
# generator that yields the number of images each slice forwarded and returns the result).
Job = Generator
RunBatch = Callable[[Sequence[WorkItem]], List[Union[ItemResult, ServiceError, Job]]]


@dataclass(frozen=True)
class Outcome:
    """What an item's ticket resolves to: the engine's result and where the time went."""

    result: ItemResult
    queue_ms: float
    compute_ms: float
    batch_size: int
    device: str


class Ticket(Future):
    """An item's future. ``withdraw`` drops the item from the queue if its batch has not
    started, and stops its job at the next slice if it has."""

    reason = "cancelled"  # why it was withdrawn, for the metrics: cancelled or skipped
    abandoned = False  # withdrawn while running: its job stops at the next slice

    def withdraw(self, reason: str = "cancelled") -> bool:
        """Drop the item before it costs compute; False if it already runs or ran."""
        if self.done():
            return False
        self.reason = reason
        if self.running():
            self.abandoned = True
            return False
        return self.cancel()


@dataclass(eq=False)
class _Pending:
    work: WorkItem
    future: Ticket
    enqueued: float
    deadline: Optional[float]  # time.monotonic() value; None: no deadline


@dataclass(eq=False)
class _Job:
    """An item whose batch ran and whose extra forwards run in slices."""

    pending: _Pending
    slices: Job
    started: float  # when its batch started
    batch_size: int
    forwards_left: int
    compute: float = 0.0  # seconds of its batch and slices so far


@dataclass(eq=False)
class _Worker:
    """One device's worker thread and what it is doing."""

    device: str
    run_batch: RunBatch
    # Run first on each worker thread, before it takes work (torch's thread settings are per
    # thread; the warm-up): a full batch's seconds, the batcher's first estimate (0: none).
    prepare: Optional[Callable[[], float]] = None
    counted: bool = False  # its thread is counted alive (it has prepared)
    last_batch: int = 0  # items in the batch it ran last
    jobs: Deque[_Job] = field(default_factory=deque)  # jobs with slices left, in turn
    # What it runs now: its batch and the upcoming batch it has taken, or a job's item.
    running: List[_Pending] = field(default_factory=list)
    running_job: Optional[_Job] = None  # the job whose slice runs now
    supervisor: Optional[threading.Thread] = None


class Batcher:
    """``submit``, ``depth`` and ``expected_wait`` are thread-safe; ``start``/``stop`` belong
    to the owner."""

    def __init__(self, run_batch: Union[RunBatch, Sequence[RunBatch]], *, max_batch_size: int,
                 max_delay_ms: float, max_queue: int, metrics: Optional[Metrics] = None,
                 batch_seconds: float = 0.05, device: Union[str, Sequence[str]] = "cpu",
                 max_job_forwards: int = 1 << 30,
                 on_worker: Callable[[bool], None] = lambda alive: None,
                 restart_delay_s: float = 0.2, prefetch: bool = False,
                 prepare: Optional[Sequence[Callable[[], float]]] = None) -> None:
        """``run_batch`` and ``device``: one each, or a list each (one worker per device).
        With ``prefetch`` the run functions take the upcoming batch as a second argument.
        ``prepare``: one per worker, run on its thread before it takes work; a worker counts
        as alive (``on_worker``) once prepared."""
        runs = list(run_batch) if isinstance(run_batch, (list, tuple)) else [run_batch]
        devices = [device] * len(runs) if isinstance(device, str) else list(device)
        prepares = list(prepare) if prepare is not None else [None] * len(runs)
        if not len(devices) == len(prepares) == len(runs):
            raise ValueError(f"{len(runs)} run functions for {len(devices)} devices and "
                             f"{len(prepares)} prepare functions")
        self._workers = [_Worker(d, r, p) for d, r, p in zip(devices, runs, prepares)]
        self.devices = tuple(devices)
        self.max_batch_size = max_batch_size
        self._max_delay_s = max_delay_ms / 1000.0
        self._max_queue = max_queue
        self._max_job_forwards = max_job_forwards
        self._prefetch = prefetch
        self._queue: Deque[_Pending] = deque()
        self._job_forwards = 0  # extra forwards of the queued items and the jobs, not yet run
        self._cond = threading.Condition()
        self._metrics = metrics or Metrics()
        self.device = devices[0]
        # Running means of one batch's compute time and of one forward's (from the slices):
        # retry hints and deadline checks use them.
        self._batch_seconds = batch_seconds
        self._forward_seconds = batch_seconds / max_batch_size
        self._on_worker = on_worker
        self._restart_delay_s = restart_delay_s
        self._stopping = threading.Event()
        self._abandon_jobs = threading.Event()  # set by stop(): end jobs instead of finishing
        self._alive = 0  # workers running (under _cond)
        self.prepare_error: Optional[Exception] = None  # a worker's prepare failed with it
        self._idle = 0  # workers waiting for items (under _cond)
        self._arriving = 0  # items the handlers are decoding for the queue (event loop only)

    # --- handler side ----------------------------------------------------------------------

    def submit(self, work: WorkItem, deadline: Optional[float] = None) -> Ticket:
        """Queue one item. Raises QueueFull when the queue is full and DeadlineExceeded when
        the deadline leaves less time than the expected wait; both at once, before queueing.

        Withdrawing (or cancelling) the returned ticket before its batch starts removes the
        item from the queue unrun.
        """
        now = time.monotonic()
        extra = work.explain.extra_cost if work.explain is not None else 0
        if deadline is not None:
            expected = self.expected_wait(extra)
            if deadline - now < expected:
                self._metrics.dropped.labels("deadline").inc()
                raise DeadlineExceeded(
                    f"the deadline leaves {max(0.0, deadline - now) * 1000:.0f} ms, and this "
                    f"server needs about {expected * 1000:.0f} ms to answer now; allow more "
                    "time (the call's timeout)")
        pending = _Pending(work, Ticket(), now, deadline)
        with self._cond:
            if len(self._queue) >= self._max_queue:
                retry = self.expected_wait()
                raise QueueFull(f"the server is busy: {len(self._queue)} items are waiting; "
                                f"retry in {retry * 1000:.0f} ms", retry_after_s=retry)
            if extra and self._job_forwards + extra > self._max_job_forwards:
                retry = self._job_forwards * self._forward_seconds
                raise QueueFull(f"the server is busy with {self._job_forwards} forwards of "
                                f"expensive explanations; retry in {retry:.0f} s",
                                retry_after_s=retry, reason="EXPENSIVE_WORK_FULL")
            self._queue.append(pending)
            self._job_forwards += extra
            self._cond.notify()
        pending.future.add_done_callback(lambda f: f.cancelled() and self._forget(pending))
        return pending.future

    def _forget(self, pending: _Pending) -> None:
        """A withdrawn item leaves the queue at once (so it holds no queue slot)."""
        with self._cond:
            try:
                self._queue.remove(pending)
            except ValueError:
                return  # the worker took it already and drops it there
            self._job_forwards -= _extra(pending)
        self._metrics.dropped.labels(pending.future.reason).inc()

    def depth(self) -> int:
        return len(self._queue)

    def idle(self) -> bool:
        """A worker waits for items, none is queued and every worker's last batch ran alone:
        an item submitted now most likely runs alone, at once (a hint, read without the
        lock). Handlers then send its image undecoded (DeferredDecode)."""
        return (self._idle > 0 and not self._queue
                and all(w.last_batch <= 1 for w in self._workers))

    @contextlib.contextmanager
    def arriving(self, items: int) -> Iterator[None]:
        """Around a handler's decode of ``items`` it will submit next: a worker that is
        decoding a lone item itself waits for them to share its batch. Event-loop thread
        only: the count takes no lock (the worker reads it as a hint, and waits for it at
        most as long as its own decode took)."""
        self._arriving += items
        try:
            yield
        finally:
            self._arriving -= items

    def expected_wait(self, extra_forwards: int = 0) -> float:
        """Seconds until an item queued now (with that many extra forwards) would be
        answered: the batches ahead, a slice of the jobs' between each, and for an expensive
        item the jobs' forwards ahead, which it shares the worker with, and its own."""
        workers = len(self._workers)
        batches_ahead = math.ceil((len(self._queue) // self.max_batch_size + 1) / workers)
        wait = self._batch_seconds * batches_ahead
        if self._job_forwards:
            wait += batches_ahead * _SLICE_FORWARDS * self._forward_seconds
        if extra_forwards:
            wait += (self._job_forwards / workers + extra_forwards) * self._forward_seconds
        return wait

    # --- worker side -----------------------------------------------------------------------

    def start(self) -> None:
        for i, w in enumerate(self._workers):
            suffix = f"-{i}" if len(self._workers) > 1 else ""
            w.supervisor = threading.Thread(target=self._supervise, args=(w, suffix),
                                            name=f"camserve-supervisor{suffix}", daemon=True)
            w.supervisor.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish the batches queued, end the jobs at their next slice (their callers are gone
        by now: the server stops its calls first), then stop the worker."""
        self._stopping.set()
        self._abandon_jobs.set()
        with self._cond:
            self._cond.notify_all()
        ends = None if timeout is None else time.monotonic() + timeout
        for w in self._workers:
            if w.supervisor is not None:
                w.supervisor.join(None if ends is None else max(0.0, ends - time.monotonic()))

    def _alive_changed(self, change: int) -> None:
        """Health follows the workers: serving while at least one runs."""
        with self._cond:
            self._alive += change
            alive = self._alive
        self._on_worker(alive > 0)

    def _supervise(self, w: _Worker, suffix: str = "") -> None:
        while True:
            worker = threading.Thread(target=self._work, args=(w,),
                                      name=f"camserve-batcher{suffix}", daemon=True)
            worker.start()
            worker.join()
            counted, w.counted = w.counted, False
            # What it had taken and not answered (items that failed alone are answered).
            died = [p for p in w.running if not p.future.done()]
            if self._stopping.is_set() and not died:
                if counted:
                    with self._cond:
                        self._alive -= 1
                return
            # The worker died (an exception that is not an Exception escaped the model or a
            # decode, or a bug here): fail what it was running, report it, start another.
            if counted:
                self._alive_changed(-1)
            self._metrics.worker_restarts.inc()
            job = w.running_job
            w.running, w.running_job = [], None
            log.error("the batcher's worker thread on %s died running %d items; restarting",
                      w.device, len(died))
            for p in died:
                if job is not None:
                    self._finish_job(job)
                else:
                    self._settle(p)
                _resolve(p.future, exception=BatchFailed(
                    "the server's worker died while running this batch; retry"))
            if self._stopping.is_set():
                return
            time.sleep(self._restart_delay_s)

    def _work(self, w: _Worker) -> None:
        """A worker thread: prepare, report alive, then batches until stopped."""
        if w.prepare is not None:
            try:
                seconds = w.prepare()
            except Exception as exc:
                self.prepare_error = exc
                raise
            if seconds > 0:
                self._batch_seconds = seconds
                self._forward_seconds = seconds / self.max_batch_size
        w.counted = True
        self._alive_changed(+1)
        self._loop(w)

    def _loop(self, w: _Worker) -> None:
        """A waiting batch, then a slice of the next job, in turn, until stopped and idle."""
        upcoming: List[_Pending] = []
        while True:
            batch = upcoming or self._gather(w)
            if batch is None:
                return
            upcoming = []
            if batch:
                if self._prefetch:
                    upcoming = self._take_full_batch(w)
                self._run(w, batch, upcoming)
            if w.jobs:
                self._slice(w)

    def _gather(self, w: _Worker) -> Optional[List[_Pending]]:
        """The next batch; an empty list when everything gathered was dropped or when jobs
        wait for their slices; None: stop."""
        with self._cond:
            self._idle += 1
            try:
                while not self._queue:
                    if w.jobs:
                        return []
                    if self._stopping.is_set():
                        return None
                    self._cond.wait(0.5)
            finally:
                self._idle -= 1
            if self._max_delay_s > 0:
                closes, want = self._queue[0].enqueued + self._max_delay_s, self.max_batch_size
            else:
                # The last batch had company: its callers are likely sending again. Wait a
                # fraction of a batch's time for as many items, so that closed-loop callers
                # do not split into a small batch and a large one. A lone caller never waits.
                closes = time.monotonic() + min(COMPANY_WAIT * self._batch_seconds,
                                                COMPANY_WAIT_MAX_S)
                want = min(w.last_batch, self.max_batch_size) if w.last_batch > 1 else 0
            while len(self._queue) < want and not self._stopping.is_set():
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [self._queue.popleft()
                     for _ in range(min(self.max_batch_size, len(self._queue)))]
        # Taken: from here a worker that dies fails them (its supervisor reads w.running).
        w.running = [p for p in batch if self._admit(p)]
        return self._decode_deferred(w, w.running)

    def _take_full_batch(self, w: _Worker) -> List[_Pending]:
        """A full batch that is already waiting, when no worker is idle to take it: the
        upcoming batch, staged while the current one computes. Else nothing."""
        with self._cond:
            if self._idle or len(self._queue) < self.max_batch_size:
                return []
            batch = [self._queue.popleft() for _ in range(self.max_batch_size)]
        w.running = w.running + batch
        # It runs after the current batch: its deadline must allow two.
        return [p for p in batch if self._admit(p, batches=2) and self._decoded(p)]

    def _admit(self, pending: _Pending, batches: int = 1) -> bool:
        """Drop an item whose caller cancelled, or whose deadline would pass before its batch
        could finish, before it costs compute."""
        if not pending.future.set_running_or_notify_cancel():
            self._settle(pending)
            self._metrics.dropped.labels(pending.future.reason).inc()
            return False
        if pending.deadline is not None and (
                pending.deadline - time.monotonic() < batches * self._batch_seconds):
            self._settle(pending)
            self._metrics.dropped.labels("deadline").inc()
            pending.future.set_exception(DeadlineExceeded(
                "the deadline would pass before this item's batch finished; allow more time"))
            return False
        return True

    def _decode_deferred(self, w: _Worker, batch: List[_Pending]) -> List[_Pending]:
        """Decode the batch's undecoded items here. When there were any and the batch has
        room, it takes the items that came meanwhile, and waits (as long as its own decodes
        took, at most) for those the handlers are still decoding: callers that sent together
        share a batch, as when the pool decodes them all."""
        if not any(isinstance(p.work.pixels, DeferredDecode) for p in batch):
            return batch
        started = time.monotonic()
        batch = [p for p in batch if self._decoded(p)]
        now = time.monotonic()
        closes = now + (now - started)
        room = self.max_batch_size - len(batch)
        if not batch or not room:
            return batch
        with self._cond:
            while len(self._queue) < room and self._arriving and not self._stopping.is_set():
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            late = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
        w.running = batch + late
        return batch + [p for p in late if self._admit(p) and self._decoded(p)]

    def _decoded(self, pending: _Pending) -> bool:
        """Decode an admitted item that came undecoded (DeferredDecode), here on the worker;
        False when its decode failed (the item answers that error alone). Its time in the
        queue does not count the decode."""
        pixels = pending.work.pixels
        if not isinstance(pixels, DeferredDecode):
            return True
        started = time.monotonic()
        try:
            pending.work = replace(pending.work, pixels=pixels.decode())
        except Exception as exc:  # the image's ServiceError, or a bug: this item only
            self._settle(pending)
            _resolve(pending.future, exception=exc)
            return False
        pending.enqueued += time.monotonic() - started
        return True

    def _run(self, w: _Worker, batch: List[_Pending], upcoming: List[_Pending]) -> None:
        w.running = batch + upcoming
        w.last_batch = len(batch)
        started = time.monotonic()
        for p in batch:
            self._metrics.queue.observe(started - p.enqueued)
        answers = self._compute(w, [p.work for p in batch], [p.work for p in upcoming])
        compute = time.monotonic() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * compute
        self._metrics.compute.observe(compute)
        self._metrics.device_batches.labels(w.device).inc()
        self._metrics.device_seconds.labels(w.device).inc(compute)
        for p, (answer, size) in zip(batch, answers):
            if isinstance(answer, Generator):
                w.jobs.append(_Job(p, answer, started, size, _extra(p), compute))
                continue
            self._settle(p)
            if isinstance(answer, ServiceError):
                _resolve(p.future, exception=answer)
            else:
                _resolve(p.future, result=Outcome(answer, (started - p.enqueued) * 1000.0,
                                                  compute * 1000.0, size, w.device))
        w.running = list(upcoming)  # taken: the worker runs it next

    def _settle(self, pending: _Pending) -> None:
        """The item's extra forwards will not run (or have run): stop counting them."""
        with self._cond:
            self._job_forwards -= _extra(pending)

    def _slice(self, w: _Worker) -> None:
        """One slice of the job whose turn it is; a job whose caller has gone (or whose
        deadline has passed) ends here, unrun."""
        job = w.jobs.popleft()
        future, p = job.pending.future, job.pending
        stop: Optional[ServiceError] = None
        if future.abandoned:
            stop = Cancelled("the call was cancelled")
            self._metrics.dropped.labels("cancelled").inc()
        elif p.deadline is not None and time.monotonic() >= p.deadline:
            stop = DeadlineExceeded("the deadline passed while this explanation was computed; "
                                    "allow more time")
            self._metrics.dropped.labels("deadline").inc()
        elif self._abandon_jobs.is_set():
            stop = Unavailable("the server shut down before this explanation was finished; "
                               "send it to another replica", reason="DRAINING")
        if stop is not None:
            job.slices.close()
            self._finish_job(job)
            _resolve(future, exception=stop)
            return
        w.running, w.running_job = [p], job
        started = time.monotonic()
        try:
            forwards = next(job.slices)
        except StopIteration as finished:
            job.compute += time.monotonic() - started
            self._finish_job(job)
            _resolve(future, result=Outcome(finished.value, (job.started - p.enqueued) * 1000.0,
                                            job.compute * 1000.0, job.batch_size, w.device))
            return
        except Exception as exc:  # out of memory, or a bug: this item only
            log.exception("an explanation's slice failed")
            self._metrics.batch_failures.labels("exception").inc()
            self._finish_job(job)
            _resolve(future, exception=BatchFailed(
                f"the model failed on this explanation: {type(exc).__name__}: "
                f"{str(exc)[:200]}"))
            return
        finally:
            w.running, w.running_job = [], None
        spent = time.monotonic() - started
        job.compute += spent
        if forwards:
            self._forward_seconds = 0.8 * self._forward_seconds + 0.2 * spent / forwards
            done = min(forwards, job.forwards_left)
            job.forwards_left -= done
            with self._cond:
                self._job_forwards -= done
        w.jobs.append(job)

    def _finish_job(self, job: _Job) -> None:
        with self._cond:
            self._job_forwards -= job.forwards_left
        job.forwards_left = 0

    def _compute(self, w: _Worker, works: List[WorkItem],
                 upcoming: Sequence[WorkItem] = ()) -> List[Tuple[object, int]]:
        """Each item's result or error, with the size of the batch it ran in. Out of device
        memory, the batch is split in two and each half retried on the same device; any other
        exception fails this batch's items only."""
        try:
            results = w.run_batch(works, upcoming) if upcoming else w.run_batch(works)
        except OutOfMemory as exc:
            if len(works) == 1:
                self._metrics.batch_failures.labels("out_of_memory").inc()
                return [(BatchFailed(f"out of device memory even for one image: {exc}"), 1)]
            self._metrics.oom_splits.inc()
            log.warning("out of device memory on a batch of %d on %s: splitting it",
                        len(works), w.device)
            half = len(works) // 2
            return self._compute(w, works[:half]) + self._compute(w, works[half:])
        except Exception as exc:
            log.exception("a batch of %d failed", len(works))
            self._metrics.batch_failures.labels("exception").inc()
            error = BatchFailed(f"the model failed on this batch: {type(exc).__name__}: "
                                f"{str(exc)[:200]}")
            return [(error, len(works))] * len(works)
        self._metrics.batch_size.observe(len(works))
        failed = sum(isinstance(r, ServiceError) for r in results)
        if failed:
            self._metrics.batch_failures.labels("non_finite").inc(failed)
        return [(r, len(works)) for r in results]


_SLICE_FORWARDS = 16  # images per slice of a job (the engine's chunk)


def _extra(pending: _Pending) -> int:
    explain = pending.work.explain
    return explain.extra_cost if explain is not None else 0


def _resolve(future: Future, result=None, exception: Optional[BaseException] = None) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
