"""Taking turns on a device between the models that share it.

Each loaded model (each version) has its own queue, batcher and worker thread per device; a
worker runs a batch, a job's slice or its warm-up only while it holds its device's gate. The
gate goes to the waiting workers in the order they asked for it (a ticket lock): a worker asks
once it holds a batch, so between two batches of a busy model every other model waiting with a
batch gets one, and a quiet model waits at most one batch of each busy one. Oldest-item-first
across queues would need every worker to read every queue under one lock; asking order gives
the same bound without it. Two models never compute on one device at once: on a CPU both would
split the same cores, and on a GPU they would contend for its memory.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator


class DeviceGate:
    """One device's turns (thread-safe; not re-entrant)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the ticket the next worker to ask takes
        self._serving = 0  # the ticket whose turn it is

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


class DeviceGates:
    """The server's gates, one per device name, made when first asked for."""

    def __init__(self) -> None:
        self._gates: Dict[str, DeviceGate] = {}
        self._lock = threading.Lock()

    def __getitem__(self, device: str) -> DeviceGate:
        with self._lock:
            return self._gates.setdefault(device, DeviceGate())
