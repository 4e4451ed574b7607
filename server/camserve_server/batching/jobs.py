"""Sliced jobs: expensive explanations that never hold a worker for long.

An item whose explanation needs extra forwards (Score-CAM channels, faithfulness steps) runs its
forward and backward in an ordinary batch; the engine then hands back a job (a generator) that
the worker advances one slice (one chunk of forwards) at a time, taking turns between its jobs
and running any waiting batch between slices. Before each slice the job's caller is checked: a
caller that has gone, or whose deadline has passed, stops the job there; so does the server's
shutdown. A job's slices run on the worker (device) whose batch made it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Optional

from ..domain import Job
from ..errors import BatchFailed, Cancelled, DeadlineExceeded, ServiceError, Unavailable
from .queue import Pending, WorkQueue
from .tickets import Outcome, resolve

log = logging.getLogger(__name__)

@dataclass(eq=False)
class SlicedJob:
    """An item whose batch ran and whose extra forwards run in slices."""

    pending: Pending
    slices: Job
    started: float  # when its batch started
    batch_size: int
    forwards_left: int
    compute: float = 0.0  # seconds of its batch and slices so far

    def finish(self, queue: WorkQueue) -> None:
        """Its forwards left will not run: the queue stops counting them."""
        queue.release(self.forwards_left)
        self.forwards_left = 0

    def advance(self, queue: WorkQueue, abandon: threading.Event, device: str) -> bool:
        """Run one slice; False when the job has ended and its ticket is answered. A job whose
        caller has gone, or whose deadline has passed, or that the shutdown abandons
        (``abandon``), ends here, unrun."""
        future, p = self.pending.future, self.pending
        metrics = queue.metrics
        stop: Optional[ServiceError] = None
        if future.abandoned:
            stop = Cancelled("the call was cancelled")
            metrics.dropped.labels("cancelled").inc()
        elif p.deadline is not None and time.monotonic() >= p.deadline:
            stop = DeadlineExceeded("the deadline passed while this explanation was computed; "
                                    "allow more time")
            metrics.dropped.labels("deadline").inc()
        elif abandon.is_set():
            stop = Unavailable("the server shut down before this explanation was finished; "
                               "send it to another replica", reason="DRAINING")
        if stop is not None:
            self.slices.close()
            self.finish(queue)
            resolve(future, exception=stop)
            return False
        started = time.monotonic()
        try:
            forwards = next(self.slices)
        except StopIteration as finished:
            self.compute += time.monotonic() - started
            self.finish(queue)
            resolve(future, result=Outcome(finished.value, (self.started - p.enqueued) * 1000.0,
                                           self.compute * 1000.0, self.batch_size, device))
            return False
        except Exception as exc:  # out of memory, or a bug: this item only
            log.exception("an explanation's slice failed")
            metrics.batch_failures.labels("exception").inc()
            self.finish(queue)
            resolve(future, exception=BatchFailed(
                f"the model failed on this explanation: {type(exc).__name__}: "
                f"{str(exc)[:200]}"))
            return False
        spent = time.monotonic() - started
        self.compute += spent
        if forwards:
            queue.learn_forwards(spent, forwards)
            done = min(forwards, self.forwards_left)
            self.forwards_left -= done
            queue.release(done)
        return True
