"""Giving freed memory back to the system.

glibc's malloc keeps the pages it frees: after a burst of large requests (decoded images,
batches of activations, a sanity check's copies of the model) the process would stay at its
peak for good. :class:`Trimmer` watches the resident size from a thread of its own and,
while it is above the least it has been, calls ``malloc_trim(0)``, which hands every free page
of every arena back (the live data is untouched): every second while trims give memory back,
then ever less often, down to once a minute. It never runs on the event loop or the batcher's
thread. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("camserve_server.memory")

CHECK_S = 1.0  # how often the resident size is read
GROWTH_BYTES = 32 << 20  # trimmed while it is this much above the least it has been
SETTLED_BYTES = 4 << 20  # a trim that gave back less: the next waits twice as long
MAX_PAUSE = 63  # checks between trims that give nothing back, at most


def resident_bytes() -> int:
    """This process's resident set size (Linux); 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class Trimmer:
    """A daemon thread that trims the heap when the resident size grew; ``close()`` ends it.
    ``trim`` and ``size`` replace ``malloc_trim`` and :func:`resident_bytes` (for tests)."""

    def __init__(self, trim: Optional[Callable[[int], int]] = None,
                 size: Callable[[], int] = resident_bytes, every: float = CHECK_S) -> None:
        self._trim = trim or _malloc_trim()
        self._size, self._every = size, every
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # The least it has been, from now: read here, not when the thread first runs, which
        # may be after the process grew (the growth would then never be trimmed).
        self._low = size()
        if self._trim is not None and self._low:
            self._thread = threading.Thread(target=self._run, name="camserve-trim",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        low = self._low  # the least it has been
        skip = 0  # checks to let pass before the next trim
        pause = 0  # the last such pause
        while not self._closed.wait(self._every):
            size = self._size()
            low = min(low, size)
            if size - low <= GROWTH_BYTES:
                continue
            if skip:
                skip -= 1
                continue
            started = time.perf_counter()
            self._trim(0)
            after = self._size()
            log.debug("malloc_trim: %.0f MiB -> %.0f MiB in %.1f ms", size / 2**20,
                      after / 2**20, (time.perf_counter() - started) * 1000.0)
            # What is left is live: trim again at the next check while trims give memory
            # back, and ever less often (up to MAX_PAUSE checks apart) while they do not.
            pause = 0 if size - after > SETTLED_BYTES else min(MAX_PAUSE, 2 * pause + 1)
            skip = pause

    def trim_now(self) -> None:
        """Give freed pages back at once (after a model is unloaded: its weights' memory)."""
        if self._trim is not None:
            gc.collect()
            self._trim(0)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(5)
