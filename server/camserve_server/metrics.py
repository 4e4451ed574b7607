"""Prometheus metrics: one registry per server (no process-global state). Every layer that
counts something (the handlers, the batcher) records it here; ``process/metrics.py`` serves
the registry on ``--metrics-port``.

Names start with ``camserve_``. Times are in seconds, as Prometheus expects.

With ``--workers N`` every worker process writes its numbers to a folder that the supervisor
shares with them (prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), and
only the supervisor serves ``/metrics``: counters and histograms are summed over the workers (a
restarted worker's past counts stay in), ``camserve_queue_depth`` is the items waiting summed
over the live workers, and ``camserve_requests_total``, ``camserve_state`` and
``camserve_device_memory_bytes`` carry a ``worker`` label (1..N). A single process exports the
same names without that label.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Callable, Dict, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

log = logging.getLogger(__name__)

# Latency buckets from 1 ms to 60 s.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

STATES = ("loading", "serving", "recovering", "draining", "stopped")

# How often a worker copies the gauges that are functions (queue depth, device memory) into
# the shared folder, where set_function cannot reach.
POLL_S = 0.5


def multiprocess() -> bool:
    """Whether prometheus_client writes this process's values to PROMETHEUS_MULTIPROC_DIR
    (decided once, when prometheus_client was first imported)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class _WorkerLabel:
    """A labelled metric whose last label, ``worker``, is this process's: callers name the
    other labels only, as they do in a single process."""

    def __init__(self, metric, worker: str) -> None:
        self._metric = metric
        self._worker = worker

    def labels(self, *labels: str):
        return self._metric.labels(*labels, self._worker)


class Metrics:
    """Every number the server exports. Thread-safe (prometheus_client's metrics are).

    ``worker``: this process's index (1..N) when it is one of the supervisor's worker
    processes; its numbers then go to the shared folder (``shared`` is True) and it serves no
    /metrics of its own. Without a shared folder (prometheus_client not in multiprocess mode)
    the index is ignored and the process exports its numbers itself.
    """

    def __init__(self, worker: Optional[int] = None) -> None:
        self.shared = worker is not None and multiprocess()
        self.worker = worker if self.shared else None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        by_worker = ["worker"] if self.shared else []
        requests = Counter("camserve_requests", "RPCs answered, by RPC and status code"
                           + (" and worker process" if self.shared else ""),
                           ["rpc", "code", *by_worker], registry=r)
        # Calls to a model (every call but the server's own: ListModels, health): by model,
        # version, RPC and status code; the model is its repository name.
        self.model_requests = Counter(
            "camserve_model_requests", "RPCs answered for a model, by model, version, RPC and "
            "status code", ["model", "version", "rpc", "code"], registry=r)
        self.latency = Histogram("camserve_request_seconds",
                                 "End-to-end handler time of an RPC, by RPC", ["rpc"],
                                 buckets=_SECONDS, registry=r)
        self.queue = Histogram("camserve_queue_seconds",
                               "Time an item waited in the batcher's queue, by its priority "
                               "and its caller's kind (token, tenant, peer)", ["priority",
                                                                               "caller"],
                               buckets=_SECONDS, registry=r)
        self.compute = Histogram("camserve_compute_seconds",
                                 "Engine time of one batch (forward, and backward when explaining)",
                                 buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("camserve_batch_size", "Items per batch run on the engine",
                                    buckets=_BATCH, registry=r)
        self.dropped = Counter("camserve_items_dropped",
                               "Items dropped before they reached the model, by reason "
                               "(deadline, cancelled, skipped; evicted: a full queue's "
                               "place given to an item of a higher level or a politer "
                               "caller; caller_full: over --max-queue-per-caller)", ["reason"],
                               registry=r)
        self.batch_failures = Counter("camserve_batch_failures",
                                      "Batches (or single items) that failed, by reason",
                                      ["reason"], registry=r)
        self.oom_splits = Counter("camserve_oom_splits",
                                  "Batches split in two after running out of device memory",
                                  registry=r)
        self.worker_restarts = Counter("camserve_worker_restarts",
                                       "Batcher worker threads restarted after dying", registry=r)
        # One engine and worker per device (--device cuda:0 --device cuda:1): what each ran.
        self.device_batches = Counter("camserve_device_batches",
                                      "Batches run, by device", ["device"], registry=r)
        self.device_seconds = Counter("camserve_device_compute_seconds",
                                      "Engine time of the batches run, by device", ["device"],
                                      registry=r)
        # Gauges of several processes: the queue's depth adds up over the live workers (the
        # HPA's metric keeps its meaning: items waiting in the pod); a state and a device's
        # memory are each worker's own (its label), the load time the slowest worker's.
        self.queue_depth = Gauge("camserve_queue_depth", "Items waiting in the batcher's queue",
                                 registry=r, multiprocess_mode="livesum")
        self.model_load = Gauge("camserve_model_load_seconds",
                                "Time it took to load the model", registry=r,
                                multiprocess_mode="livemax")
        state = Gauge("camserve_state", "1 for the server's current state", ["state", *by_worker],
                      registry=r, multiprocess_mode="livesum")
        if self.shared:
            requests, state = (_WorkerLabel(m, str(worker)) for m in (requests, state))
        self.requests, self.state = requests, state
        self.set_state("loading")
        self._watched: List[Tuple[Gauge, Callable[[], float]]] = []
        self._poller: Optional[threading.Thread] = None
        self._closed = threading.Event()

    def set_state(self, state: str) -> None:
        for name in STATES:
            self.state.labels(name).set(1 if name == state else 0)

    def watch_queue(self, depth: Callable[[Optional[int]], int], levels: int) -> None:
        """``depth(None)``: every item waiting; ``depth(level)``: those of a level (0 the
        highest; ``levels``: those delayed past their level's longest wait)."""
        self._watch(self.queue_depth, depth)
        by_level = Gauge("camserve_queue_priority_depth", "Items waiting in the batchers' "
                         "queues, by priority (delayed: past their priority's longest wait)",
                         ["priority"], registry=self.registry, multiprocess_mode="livesum")
        for level in range(levels + 1):
            name = str(level + 1) if level < levels else "delayed"
            self._watch(by_level.labels(name), functools.partial(depth, level))

    def watch_streams(self, open_streams: Callable[[], int], frames: Callable[[], int]) -> None:
        for name, text, read in (
                ("camserve_streams_open", "Streams open", open_streams),
                ("camserve_stream_frames_held", "Frames the open streams hold: read and not "
                 "yet answered or skipped", frames)):
            self._watch(Gauge(name, text, registry=self.registry, multiprocess_mode="livesum"),
                        read)

    def watch_device_memory(self, allocated: Dict[str, Callable[[], float]]) -> None:
        """``camserve_device_memory_bytes`` by device (and worker): device name → reader."""
        by_worker = ["worker"] if self.shared else []
        gauge = Gauge("camserve_device_memory_bytes", "Device memory held by tensors (CUDA)",
                      ["device", *by_worker], registry=self.registry,
                      multiprocess_mode="livesum")
        for device, read in allocated.items():
            labels = (device, str(self.worker)) if self.shared else (device,)
            self._watch(gauge.labels(*labels), read)

    def _watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """A gauge that is a function's value: read at each scrape in a single process; in a
        worker (set_function cannot reach the shared folder), copied there every POLL_S."""
        if not self.shared:
            gauge.set_function(read)
            return
        gauge.set(read())
        self._watched.append((gauge, read))
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="camserve-metrics",
                                            daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._closed.wait(POLL_S):
            for gauge, read in self._watched:
                try:
                    gauge.set(read())
                except Exception:  # a gauge must never take the server down
                    log.debug("reading a gauge failed", exc_info=True)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value by its exported name and labels, 0 while it has none:
        ``value("camserve_items_dropped_total", reason="skipped")``."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        """Stop copying the watched gauges (a worker process's)."""
        self._closed.set()
