"""Prometheus metrics: one registry per server (no process-global state), served on
``--metrics-port`` when it is set.

Names start with ``camserve_``. Times are in seconds, as Prometheus expects.

With ``--workers N`` every worker process writes its numbers to a folder that the supervisor
shares with them (prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), and
only the supervisor serves ``/metrics`` (:class:`SupervisorMetrics`): counters and histograms
are summed over the workers (a restarted worker's past counts stay in), ``camserve_queue_depth``
is the items waiting summed over the live workers, and ``camserve_requests_total``,
``camserve_state`` and ``camserve_device_memory_bytes`` carry a ``worker`` label (1..N). A
single process exports the same names without that label.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .settings import Settings

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
        self._http = None
        self._watched: List[Tuple[Gauge, Callable[[], float]]] = []
        self._poller: Optional[threading.Thread] = None
        self._closed = threading.Event()

    def set_state(self, state: str) -> None:
        for name in STATES:
            self.state.labels(name).set(1 if name == state else 0)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self._watch(self.queue_depth, depth)

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

    def serve(self, settings: Settings) -> int:
        """Expose /metrics (see :func:`_serve`); returns the bound port."""
        self._http = _serve(self.registry, settings)
        return self._http.server_port

    def close(self) -> None:
        self._closed.set()
        if self._http is not None:
            _shut(self._http)
            self._http = None

    @property
    def port(self) -> Optional[int]:
        return self._http.server_port if self._http is not None else None


class SupervisorMetrics:
    """The supervisor's /metrics: its workers' numbers merged from the shared folder, and the
    supervisor's own: ``camserve_worker_up`` (1 while a worker process runs) and
    ``camserve_worker_process_restarts_total``, both by ``worker``. Thread-safe."""

    def __init__(self, path: str, workers: int) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = path
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._up: Dict[int, int] = {i: 0 for i in range(1, workers + 1)}
        self._restarts: Dict[int, int] = {i: 0 for i in range(1, workers + 1)}
        self._http = None
        MultiProcessCollector(self.registry, path=path)
        self.registry.register(self)

    def started(self, worker: int) -> None:
        with self._lock:
            self._up[worker] = 1

    def exited(self, worker: int, pid: int, restarting: bool) -> None:
        """A worker's process ended: its live gauges leave the merge (its counts stay)."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.path)
        with self._lock:
            self._up[worker] = 0
            self._restarts[worker] += 1 if restarting else 0

    def collect(self):
        with self._lock:
            up, restarts = dict(self._up), dict(self._restarts)
        family = GaugeMetricFamily("camserve_worker_up",
                                   "1 while the worker process runs (it may still be loading: "
                                   "see camserve_state)", labels=["worker"])
        for worker, value in up.items():
            family.add_metric([str(worker)], value)
        yield family
        family = CounterMetricFamily("camserve_worker_process_restarts",
                                     "Worker processes restarted after they died",
                                     labels=["worker"])
        for worker, value in restarts.items():
            family.add_metric([str(worker)], value)
        yield family

    def serve(self, settings: Settings) -> int:
        self._http = _serve(self.registry, settings)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            _shut(self._http)
            self._http = None


def _serve(registry: CollectorRegistry, settings: Settings):
    """/metrics on ``--metrics-host`` (default: ``--host``) and ``--metrics-port``, in a thread.
    Only that path answers (404 elsewhere). With ``--auth-token`` a scrape must send one of the
    tokens as ``Authorization: Bearer``; with ``--tls-cert`` it is HTTPS with the server's
    certificate (and ``--tls-client-ca`` requires a client certificate), so /metrics is never
    less protected than the gRPC port."""
    tokens = [t.encode() for t in settings.auth_tokens]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if urlsplit(self.path).path != "/metrics":
                return self._answer(404, b"only /metrics is served here\n")
            if tokens:
                sent = self.headers.get("Authorization", "")
                token = sent[7:].strip().encode() if sent.startswith("Bearer ") else b""
                if not any(hmac.compare_digest(token, t) for t in tokens):
                    return self._answer(401, b"send a token as Authorization: Bearer\n",
                                        [("WWW-Authenticate", "Bearer")])
            return self._answer(200, generate_latest(registry),
                                [("Content-Type", CONTENT_TYPE_LATEST)])

        def _answer(self, code: int, body: bytes, headers=()) -> None:
            self.send_response(code)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # no access lines for scrapes
            pass

    http = ThreadingHTTPServer((settings.metrics_address, settings.metrics_port), Handler)
    http.daemon_threads = True
    if settings.tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            context.load_verify_locations(settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        # The handshake happens in each request's thread, so that a client that connects and
        # stays silent holds only its own thread, not the accepting one.
        http.socket = context.wrap_socket(http.socket, server_side=True,
                                          do_handshake_on_connect=False)
    threading.Thread(target=http.serve_forever, name="camserve-metrics-http",
                     daemon=True).start()
    return http


def _shut(http) -> None:
    http.shutdown()
    http.server_close()
