"""One device's worker: the thread that owns the device's engine, runs its batches and its jobs'
slices in turn, and the supervisor that restarts it.

Prefetch (``prefetch=True``, on CUDA): while a batch runs, a worker that sees a full batch
already waiting (and no idle worker to take it) takes it at once and hands it to the engine as
the upcoming batch, which the engine copies to the device (and decodes) while the current one
computes; it runs next on the same worker.

Failures stay local: an exception in a batch fails only that batch's items; a batch that runs
out of device memory is split in two and retried on the same device; and if the worker thread
itself dies, its supervisor fails the batch it was running, reports it (health goes NOT_SERVING
while no worker runs) and starts a new worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Generator
from typing import Callable, Deque, List, Optional, Sequence, Tuple, Union

from ..domain import ItemResult, Job, WorkItem
from ..errors import BatchFailed, OutOfMemory, ServiceError
from .deferred import decode_deferred, decoded
from .gate import DeviceGate
from .jobs import SlicedJob
from .levels import caller_class
from .queue import Pending, WorkQueue
from .tickets import Outcome, resolve

log = logging.getLogger(__name__)

# A device's engine: each item's result, its error, or its job (slices still to run).
RunBatch = Callable[[Sequence[WorkItem]], List[Union[ItemResult, ServiceError, Job]]]


class DeviceWorker:
    """One device's worker thread and what it is doing; its supervisor thread restarts it."""

    def __init__(self, device: str, run_batch: RunBatch,
                 prepare: Optional[Callable[[], float]], queue: WorkQueue, *, prefetch: bool,
                 abandon_jobs: threading.Event, alive_changed: Callable[[int, bool], None],
                 restart_delay_s: float, gate: Optional[DeviceGate] = None) -> None:
        """``prepare`` runs first on each worker thread, before it takes work (torch's thread
        settings are per thread; the warm-up): a full batch's seconds, the queue's first
        estimate (0: none). ``alive_changed(change, report)`` counts the workers alive."""
        self.device = device
        self.run_batch = run_batch
        self.prepare = prepare
        self.prepare_error: Optional[Exception] = None  # its prepare failed with it
        self.last_batch = 0  # items in the batch it ran last
        self.jobs: Deque[SlicedJob] = deque()  # jobs with slices left, in turn
        # What it runs now: its batch and the upcoming batch it has taken, or a job's item.
        self.running: List[Pending] = []
        self.running_job: Optional[SlicedJob] = None  # the job whose slice runs now
        self.supervisor: Optional[threading.Thread] = None
        self._queue = queue
        self._prefetch = prefetch
        self._abandon_jobs = abandon_jobs
        self._alive_changed = alive_changed
        self._restart_delay_s = restart_delay_s
        self._counted = False  # its thread is counted alive (it has prepared)
        self.gate = gate or DeviceGate()  # the device's turns, shared with other models' workers

    def start(self, suffix: str) -> None:
        self.supervisor = threading.Thread(target=self._supervise, args=(suffix,),
                                           name=f"camserve-supervisor{suffix}", daemon=True)
        self.supervisor.start()

    def _supervise(self, suffix: str = "") -> None:
        queue, metrics = self._queue, self._queue.metrics
        while True:
            worker = threading.Thread(target=self._work, name=f"camserve-batcher{suffix}",
                                      daemon=True)
            worker.start()
            worker.join()
            counted, self._counted = self._counted, False
            # What it had taken and not answered (items that failed alone are answered).
            died = [p for p in self.running if not p.future.done()]
            if queue.stopping.is_set() and not died:
                if counted:
                    self._alive_changed(-1, False)
                return
            # The worker died (an exception that is not an Exception escaped the model or a
            # decode, or a bug here): fail what it was running, report it, start another.
            if counted:
                self._alive_changed(-1, True)
            metrics.worker_restarts.inc()
            job = self.running_job
            self.running, self.running_job = [], None
            log.error("the batcher's worker thread on %s died running %d items; restarting",
                      self.device, len(died))
            for p in died:
                if job is not None:
                    job.finish(queue)
                else:
                    queue.settle(p)
                resolve(p.future, exception=BatchFailed(
                    "the server's worker died while running this batch; retry"))
            if queue.stopping.is_set():
                return
            time.sleep(self._restart_delay_s)

    def _work(self) -> None:
        """A worker thread: prepare, report alive, then batches until stopped."""
        if self.prepare is not None:
            try:
                with self.gate.turn():
                    seconds = self.prepare()
            except Exception as exc:
                self.prepare_error = exc
                raise
            if seconds > 0:
                self._queue.estimate(seconds)
        self._counted = True
        self._alive_changed(+1, True)
        self._loop()

    def _loop(self) -> None:
        """A waiting batch, then a slice of the next job, in turn, until stopped and idle."""
        upcoming: List[Pending] = []
        while True:
            batch = upcoming or self._gather()
            if batch is None:
                return
            upcoming = []
            if batch:
                if self._prefetch:
                    upcoming = self._take_full_batch()
                self._run(batch, upcoming)
            if self.jobs:
                self._slice()

    def _gather(self) -> Optional[List[Pending]]:
        """The next batch; an empty list when everything gathered was dropped or when jobs
        wait for their slices; None: stop."""
        batch = self._queue.gather(self.last_batch, bool(self.jobs))
        if batch is None:
            return None
        # Taken: from here a worker that dies fails them (its supervisor reads running).
        self.running = [p for p in batch if self._queue.admit(p)]
        return decode_deferred(self._queue, self.running, self.running)

    def _take_full_batch(self) -> List[Pending]:
        """A full batch that is already waiting, when no worker is idle to take it: the
        upcoming batch, staged while the current one computes. Else nothing."""
        batch = self._queue.take_full_batch()
        if not batch:
            return []
        self.running = self.running + batch
        # It runs after the current batch: its deadline must allow two.
        return [p for p in batch if self._queue.admit(p, batches=2) and decoded(self._queue, p)]

    def _run(self, batch: List[Pending], upcoming: List[Pending]) -> None:
        queue, metrics = self._queue, self._queue.metrics
        self.running = batch + upcoming
        self.last_batch = len(batch)
        with self.gate.turn():  # waiting for another model on the device counts as queueing
            started = time.monotonic()
            for p in batch:
                metrics.queue.labels(str(p.level + 1), caller_class(p.caller)).observe(
                    started - p.enqueued)
            answers = self._compute([p.work for p in batch], [p.work for p in upcoming])
        compute = time.monotonic() - started
        queue.learn_batch(compute)
        metrics.compute.observe(compute)
        metrics.device_batches.labels(self.device).inc()
        metrics.device_seconds.labels(self.device).inc(compute)
        for p, (answer, size) in zip(batch, answers):
            if isinstance(answer, Generator):
                self.jobs.append(SlicedJob(p, answer, started, size, p.extra, compute))
                continue
            queue.settle(p)
            if isinstance(answer, ServiceError):
                resolve(p.future, exception=answer)
            else:
                resolve(p.future, result=Outcome(answer, (started - p.enqueued) * 1000.0,
                                                 compute * 1000.0, size, self.device))
        self.running = list(upcoming)  # taken: the worker runs it next

    def _slice(self) -> None:
        """One slice of the job whose turn it is (``SlicedJob.advance``)."""
        job = self.jobs.popleft()
        self.running, self.running_job = [job.pending], job
        try:
            with self.gate.turn():
                more = job.advance(self._queue, self._abandon_jobs, self.device)
        finally:
            self.running, self.running_job = [], None
        if more:
            self.jobs.append(job)

    def _compute(self, works: List[WorkItem],
                 upcoming: Sequence[WorkItem] = ()) -> List[Tuple[object, int]]:
        """Each item's result or error, with the size of the batch it ran in. Out of device
        memory, the batch is split in two and each half retried on the same device; any other
        exception fails this batch's items only."""
        metrics = self._queue.metrics
        try:
            results = self.run_batch(works, upcoming) if upcoming else self.run_batch(works)
        except OutOfMemory as exc:
            if len(works) == 1:
                metrics.batch_failures.labels("out_of_memory").inc()
                return [(BatchFailed(f"out of device memory even for one image: {exc}"), 1)]
            metrics.oom_splits.inc()
            log.warning("out of device memory on a batch of %d on %s: splitting it",
                        len(works), self.device)
            half = len(works) // 2
            return self._compute(works[:half]) + self._compute(works[half:])
        except Exception as exc:
            log.exception("a batch of %d failed", len(works))
            metrics.batch_failures.labels("exception").inc()
            error = BatchFailed(f"the model failed on this batch: {type(exc).__name__}: "
                                f"{str(exc)[:200]}")
            return [(error, len(works))] * len(works)
        metrics.batch_size.observe(len(works))
        failed = sum(isinstance(r, ServiceError) for r in results)
        if failed:
            metrics.batch_failures.labels("non_finite").inc(failed)
        return [(r, len(works)) for r in results]
