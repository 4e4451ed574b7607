"""Prometheus metrics: one registry per server (no process-global state), served on
``--metrics-port`` when it is set.

Names start with ``camserve_``. Times are in seconds, as Prometheus expects.
"""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 1 ms to 60 s.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

STATES = ("loading", "serving", "recovering", "draining", "stopped")


class Metrics:
    """Every number the server exports. Thread-safe (prometheus_client's metrics are)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("camserve_requests", "RPCs answered, by RPC and status code",
                                ["rpc", "code"], registry=r)
        self.latency = Histogram("camserve_request_seconds",
                                 "End-to-end handler time of an RPC, by RPC", ["rpc"],
                                 buckets=_SECONDS, registry=r)
        self.queue = Histogram("camserve_queue_seconds",
                               "Time an item waited in the batcher's queue", buckets=_SECONDS,
                               registry=r)
        self.compute = Histogram("camserve_compute_seconds",
                                 "Engine time of one batch (forward, and backward when explaining)",
                                 buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("camserve_batch_size", "Items per batch run on the engine",
                                    buckets=_BATCH, registry=r)
        self.dropped = Counter("camserve_items_dropped",
                               "Items dropped before they reached the model, by reason "
                               "(deadline, cancelled, skipped)", ["reason"], registry=r)
        self.batch_failures = Counter("camserve_batch_failures",
                                      "Batches (or single items) that failed, by reason",
                                      ["reason"], registry=r)
        self.oom_splits = Counter("camserve_oom_splits",
                                  "Batches split in two after running out of device memory",
                                  registry=r)
        self.worker_restarts = Counter("camserve_worker_restarts",
                                       "Batcher worker threads restarted after dying", registry=r)
        self.queue_depth = Gauge("camserve_queue_depth", "Items waiting in the batcher's queue",
                                 registry=r)
        self.model_load = Gauge("camserve_model_load_seconds",
                                "Time it took to load the model", registry=r)
        self.state = Gauge("camserve_state", "1 for the server's current state", ["state"],
                           registry=r)
        self.set_state("loading")
        self._http = None

    def set_state(self, state: str) -> None:
        for name in STATES:
            self.state.labels(name).set(1 if name == state else 0)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def watch_device_memory(self, allocated: Callable[[], float]) -> None:
        Gauge("camserve_device_memory_bytes", "Device memory held by tensors (CUDA)",
              registry=self.registry).set_function(allocated)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port."""
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    @property
    def port(self) -> Optional[int]:
        return self._http.server_port if self._http is not None else None
