"""Assembling and running one server process: the asyncio gRPC server (camserve's API,
health, reflection, auth), metrics, model, engine, batcher.

The gRPC server runs on an event loop in a thread of its own, so ``CamServer`` is a plain,
blocking object: ``start`` returns the bound port once the model serves, ``stop`` drains.

Start-up: listen (health NOT_SERVING, GetModelInfo says LOADING, other calls answer
UNAVAILABLE), load the model, warm the engine up, start the batcher; when its worker runs,
health and state become SERVING together. Shut-down: state DRAINING and health NOT_SERVING,
refuse new calls, let in-flight ones finish within the grace period, drain the batcher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
import socket
import threading
import time
from typing import Optional

import numpy as np
from grpc import aio
from grpc_health.v1 import health as health_names
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from camserve.v1 import camserve_pb2 as pb

from ..api import calls, oip
from ..api.auth import TokenAuth
from ..api.health import NOT_SERVING, SERVING, HealthServicer
from ..api.pipeline import Pipeline, RequestLimits
from ..api.request import LabelIndex
from ..api.servicer import SERVICE, CamserveService
from ..batching.batcher import Batcher
from ..batching.levels import LevelPool
from ..domain import ExplainSpec, WorkItem
from ..engine.spec import ModelSpec
from ..errors import StartupError
from ..metrics import Metrics
from ..render import images
from .memory import Trimmer
from .metrics import MetricsEndpoint
from .settings import Settings, usable_cpus
from .tls import server_credentials

log = logging.getLogger(__name__)
access = logging.getLogger("camserve_server.access")

HEALTH_NAMES = ("", SERVICE, oip.SERVICE)  # the server as a whole, and each served API
KEEPALIVE_TIMEOUT_MS = 20_000
PENDING_CALLS = 20_000  # gRPC core's max_pending_requests (soft; the hard limit twice that)
STOP_NOW_S = 1.0  # how long cut-off calls' answers and the batcher's last step may take
OVER_LIMIT_SLACK = 1 << 20  # bytes over --max-message-bytes still read, to answer INVALID_ARGUMENT
# How long an idle torch (libgomp) thread spins before it sleeps, in iterations; libgomp's own
# default is 300,000, i.e. milliseconds after every parallel step. See openmp_defaults.
GOMP_SPINCOUNT = "30000"


def openmp_defaults() -> None:
    """Shorten the spin of torch's idle OpenMP threads, unless the environment says otherwise
    (GOMP_SPINCOUNT or OMP_WAIT_POLICY). libgomp reads this once, when torch loads: it must run
    before, and does nothing after. At libgomp's default the batcher worker's spare threads
    keep cores busy for milliseconds after each step of a forward, and the decode pool and the
    event loop wait for them (bench/abuse.py --case unread_latest shows it beside an unread
    stream, with GOMP_SPINCOUNT=300000 for libgomp's default); far fewer spins slow the
    forward itself (bench/bench_latency.py's in-process side)."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT


def port_problem(host: str, port: int) -> Optional[str]:
    """Why listening on host:port would fail (it is in use, or host is not this machine's),
    found by binding it as gRPC would; None when it would not."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{host} cannot be resolved ({exc.strerror})"
    failures = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} is in use"
                failures.append(exc)
    if failures and len(failures) == len(addresses):
        return f"{host} is not an address of this machine ({failures[0].strerror})"
    return None


def decode_threads(settings: Settings) -> int:
    """Threads for decoding and rendering: as set, else one per core (at least 2, at most
    8), shared by this process's calls."""
    return settings.decode_threads or max(2, min(8, usable_cpus()))


def torch_threads(settings: Settings) -> int:
    """torch's intra-op threads per engine: as set, else the cores split between the worker
    processes and, within each, between its CPU engines (``--device cpu,cpu``)."""
    cpu_engines = max(1, [name.strip() for name in settings.device.split(",")].count("cpu"))
    return settings.torch_threads or max(1, usable_cpus() // (settings.workers * cpu_engines))


def limits(settings: Settings) -> RequestLimits:
    """What the pipeline needs of the settings: the bounds on a request, of the same names."""
    return RequestLimits(**{f.name: getattr(settings, f.name)
                            for f in dataclasses.fields(RequestLimits)})


def model_spec(settings: Settings) -> ModelSpec:
    """What ``load_model`` needs of the settings: the model and how to prepare it."""
    return ModelSpec(source=settings.model, weights=settings.weights, layers=settings.layers,
                     labels=settings.labels, input_size=settings.input_size, mean=settings.mean,
                     std=settings.std, fold_batchnorm=settings.fold_batchnorm,
                     static_padding=settings.static_padding)


class CamServer:
    """One server process. ``start``, ``stop`` and ``wait`` may be called from any thread."""

    def __init__(self, settings: Settings) -> None:
        openmp_defaults()
        self.settings = settings
        self.port: Optional[int] = None
        self.model = None
        # A worker of --workers N shares its metrics with the supervisor, which serves them.
        self.metrics = Metrics(worker=settings.worker_index or None)
        self.metrics_endpoint: Optional[MetricsEndpoint] = None  # /metrics, when served here
        self._service = CamserveService(settings.model)
        self._health: Optional[HealthServicer] = None
        self._grpc: Optional[aio.Server] = None
        self._recorder: Optional[calls.Recorder] = None
        self._now = False  # stop_now was called: no grace any more
        self._engines = []  # one per device
        self._batcher: Optional[Batcher] = None
        self._sanity = None  # engine/sanity.py's SanityChecker, once loaded
        self._pool = LevelPool(decode_threads(settings), "camserve-decode")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="camserve-grpc",
                                        daemon=True)
        self._trimmer = Trimmer()
        self._stopping = False
        self._serving = threading.Event()  # set once state and health first say SERVING
        self._stopped = threading.Event()

    @property
    def metrics_port(self) -> Optional[int]:
        """The port /metrics is served on by this process; None when it serves none."""
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    def _on_loop(self, coroutine, timeout: Optional[float] = None):
        """Run a coroutine on the server's loop from another thread; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def every(self, seconds: float, callback) -> None:
        """Call ``callback()`` on the server's event loop now and every ``seconds`` after, until
        the loop stops: it runs only while the loop does (a worker's heartbeat)."""
        def tick() -> None:
            callback()
            self._loop.call_later(seconds, tick)

        self._loop.call_soon_threadsafe(tick)

    def start(self) -> int:
        """Listen, load the model and warm up; returns once the server reports SERVING."""
        self.listen()
        try:
            self.load()
        except BaseException:
            self.stop(grace=0)
            raise
        return self.port

    def listen(self) -> int:
        if not self._thread.is_alive():
            self._thread.start()
        self.port = self._on_loop(self._listen())
        s = self.settings
        if s.metrics_port is not None and not self.metrics.shared:
            self.metrics_endpoint = MetricsEndpoint(self.metrics.registry, s)
            log.info("metrics on http://%s:%d/metrics", s.metrics_address, self.metrics_port)
        return self.port

    async def _listen(self) -> int:
        s = self.settings
        keepalive_ms = int(s.keepalive_s * 1000)
        options = [
            # gRPC refuses a larger message from its length prefix, before reading it
            # (RESOURCE_EXHAUSTED, nothing buffered); up to OVER_LIMIT_SLACK over ours it
            # reaches calls.py and is answered INVALID_ARGUMENT with what to change. A larger
            # slack would let every call in flight hold that much more.
            ("grpc.max_receive_message_length", s.max_message_bytes + OVER_LIMIT_SLACK),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 1 if s.worker_index else 0),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            # A flood of calls opened and cancelled at once (HTTP/2 rapid reset) is bounded per
            # connection; calls gRPC holds for the application to take beyond 1,000 (its
            # default) would be cancelled at random, innocent callers' too: the limits leave
            # room for a flood on many connections (each holds a stream's window at most).
            ("grpc.max_concurrent_streams", s.max_calls_per_connection),
            ("grpc.server.max_pending_requests", PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
        ]
        if s.max_connection_age_s > 0:
            options += [("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms",
                         int(s.max_connection_age_grace_s * 1000))]
        interceptors = []
        if s.auth_tokens:
            interceptors.append(TokenAuth(s.auth_tokens, on_denied=self._denied))
        credentials = server_credentials(s)
        server = aio.server(options=options, interceptors=interceptors)
        recorder = self._recorder = calls.Recorder(self.metrics, lambda: self._stopping)
        inflight = calls.InflightBytes(s.max_inflight_bytes)
        server.add_generic_rpc_handlers((calls.generic_handler(
            SERVICE, self._service.methods(), s.max_message_bytes, recorder, inflight),))
        server.add_generic_rpc_handlers((oip.handler(self._service, s.oip_model_name,
                                                     s.max_message_bytes, recorder, inflight),))
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE, oip.SERVICE, health_names.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._health.set_all(HEALTH_NAMES, NOT_SERVING)
        address = f"{s.host}:{s.port}"
        # Found before gRPC tries, which would log a line of its own first.
        problem = None if s.worker_index else port_problem(s.host, s.port)
        port = 0
        if problem is None:
            try:
                port = (server.add_secure_port(address, credentials) if credentials is not None
                        else server.add_insecure_port(address))
            except RuntimeError:
                port = 0
        if port == 0:
            problem = problem or (f"port {s.port} is in use (or {s.host} is not an address of "
                                  "this machine)")
            raise StartupError(f"cannot listen on {address}: {problem}; pass another --port "
                               "or --host, or stop the server that holds the port")
        await server.start()
        self._grpc = server
        log.info("listening on %s:%d (%s; loading %s)", s.host, port,
                 "TLS" if credentials is not None else "plaintext", s.model)
        return port

    def _denied(self, method: str, context) -> None:
        rpc = method.rsplit("/", 1)[-1]
        self.metrics.requests.labels(rpc, "UNAUTHENTICATED").inc()
        access.info("%s UNAUTHENTICATED peer=%s", rpc, context.peer(), extra={
            "rpc": rpc, "code": "UNAUTHENTICATED", "peer": context.peer()})

    def load(self) -> None:
        import torch

        from ..engine.engine import Engine, check_precision
        from ..engine.models import load_model
        from ..engine.placement import resolve_devices
        from ..engine.sanity import SanityChecker

        s = self.settings
        # Only the batcher's worker threads compute in parallel: this thread loads the model
        # on one torch thread, and each worker sets its own count (torch's OpenMP threads are
        # per calling thread). Once one thread has run parallel work, OpenMP keeps its team,
        # and another thread's parallel work runs slower beside it (bench/bench_threads.py).
        torch.set_num_threads(1)
        threads = torch_threads(s)
        devices = resolve_devices(s.device)
        for device in devices:  # before minutes of loading
            check_precision(s.precision, device)
        # One model replica, engine and batcher worker per device, sharing one queue.
        models = [load_model(model_spec(s), device) for device in devices]
        model = models[0]
        self.metrics.model_load.set(sum(m.load_seconds for m in models))
        names = [str(m.device) for m in models]
        card = dataclasses.replace(model.card, device=",".join(names))
        log.info("loaded %s on %s in %.1fs: %d classes, input %dx%d, layers %s; %d torch "
                 "thread%s per engine; precision %s", card.name, card.device,
                 sum(m.load_seconds for m in models), card.num_classes, card.input_size[1],
                 card.input_size[0], ", ".join(i.name for i in card.layers) or "none",
                 threads, "" if threads == 1 else "s", s.precision)
        cuda = all(m.device.type == "cuda" for m in models)
        device_jpeg = s.jpeg_decode == "device" or (s.jpeg_decode == "auto" and cuda)
        engines = [Engine(m, precision=s.precision) for m in models]

        def prepare(engine) -> float:  # on the engine's worker thread
            torch.set_num_threads(threads)
            return _warm_up(engine, s.max_batch_size, device_jpeg)

        batcher = Batcher([e.run_batch for e in engines], max_batch_size=s.max_batch_size,
                          max_delay_ms=s.max_delay_ms, max_queue=s.max_queue,
                          metrics=self.metrics, device=names,
                          max_job_forwards=limits(s).max_queued_forwards,
                          on_worker=self._worker_changed, prefetch=cuda,
                          prepare=[functools.partial(prepare, e) for e in engines])
        self.metrics.watch_queue(batcher.depth)
        self.metrics.watch_streams(lambda: self._service.open_streams,
                                   lambda: self._service.stream_frames.frames)
        self.metrics.watch_device_memory({
            str(m.device): (lambda d=m.device: torch.cuda.memory_allocated(d))
            for m in models if m.device.type == "cuda"})
        self.model, self._engines, self._batcher = model, engines, batcher
        self._sanity = SanityChecker(model)
        pipeline = Pipeline(
            model=card, batcher=batcher, labels=LabelIndex(card.labels), limits=limits(s),
            image_limits=images.Limits(s.max_image_bytes, s.max_image_pixels,
                                       device_jpeg=device_jpeg),
            pool=self._pool, batching=pb.BatchingInfo(
                max_batch_size=s.max_batch_size, max_delay_ms=s.max_delay_ms,
                max_queue=s.max_queue, workers=s.workers),
            worker=s.worker_index, sanity=self._sanity)
        self._loop.call_soon_threadsafe(self._service.serve, pipeline)
        batcher.start()  # its workers warm up, then report alive: state and health SERVING
        while not self._serving.wait(0.1):
            if batcher.prepare_error is not None:
                batcher.stop(0)
                raise StartupError(f"the model fails its warm-up: {batcher.prepare_error}")
        log.info("serving on port %d", self.port)

    def _worker_changed(self, alive: bool) -> None:
        """State and health follow the batcher's worker (called from its supervisor)."""
        state = pb.SERVER_STATE_SERVING if alive else pb.SERVER_STATE_RECOVERING
        asyncio.run_coroutine_threadsafe(self._set_state(state), self._loop)

    async def _set_state(self, state: int) -> None:
        """Change the state and health together: health says SERVING whenever the state does
        (so it is raised first and lowered after)."""
        if self._stopping and state != pb.SERVER_STATE_DRAINING:
            return
        if state == pb.SERVER_STATE_SERVING:
            await self._health.set_all(HEALTH_NAMES, SERVING)
            self._service.state = state
            self.metrics.set_state("serving")
            self._serving.set()
        else:
            self._service.state = state
            await self._health.set_all(HEALTH_NAMES, NOT_SERVING)
            self.metrics.set_state(pb.ServerState.Name(state)[len("SERVER_STATE_"):].lower())

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace`` seconds, drain."""
        if self._stopped.is_set() or self._stopping:
            return
        self._stopping = True
        grace = 0.0 if self._now else self.settings.grace_s if grace is None else grace
        if self._thread.is_alive():
            self._on_loop(self._drain(grace))
        if self._batcher is not None:
            self._batcher.stop(timeout=STOP_NOW_S if self._now else grace + 5)
        # A sanity check still running (its caller gone) ends at its next slice: its thread
        # must not be inside torch when the interpreter exits (the process would abort).
        if self._sanity is not None and not self._sanity.close(timeout=grace + 5):
            log.warning("a sanity check did not end within %.0fs of the shutdown", grace + 5)
        for engine in self._engines:
            engine.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._trimmer.close()
        self.metrics.set_state("stopped")
        self.metrics.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._stopped.set()
        log.info("stopped")

    async def _drain(self, grace: float) -> None:
        if self._health is not None:
            self._service.state = pb.SERVER_STATE_DRAINING
            await self._health.enter_graceful_shutdown()
        self.metrics.set_state("draining")
        if self._grpc is not None:
            # Calls still running when the grace ends are cut off with a status of their own
            # (UNAVAILABLE, shutting down); gRPC's stop then gives their answers time to go out.
            stopped = asyncio.ensure_future(self._grpc.stop(grace + STOP_NOW_S))
            await asyncio.wait([stopped], timeout=grace)
            if not stopped.done() and self._recorder is not None:
                self._recorder.cut_off()
            await stopped

    def stop_now(self) -> None:
        """Cut every call off now (each answers UNAVAILABLE) and stop without waiting for
        work in flight: a second SIGINT. Safe to call from a signal handler, during ``stop``."""
        self._now = True
        if self._recorder is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._recorder.cut_off)

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)


def _warm_up(engine, max_batch_size: int, device_jpeg: bool = False) -> float:
    """Run the shapes the batcher will use once, so the first callers do not pay for it (and
    the device's JPEG decoder, when it decodes). Returns the time of one full batch: the
    batcher's first estimate."""
    card = engine.model.card
    blank = np.zeros((*card.input_size, 3), dtype=np.uint8)
    spec = ExplainSpec(layers=(card.default_layer,)) if card.layers else None
    started = time.perf_counter()
    if device_jpeg:
        engine.run([WorkItem(images.blank_jpeg(card.input_size))] * 2)
    for size in sorted({1, max_batch_size}):
        engine.run([WorkItem(blank)] * size)
        if spec is not None:
            engine.run([WorkItem(blank, spec)] * size)
    timed = time.perf_counter()
    engine.run([WorkItem(blank, spec)] * max_batch_size)
    full = time.perf_counter() - timed
    log.info("warmed up in %.1fs; a full batch takes %.0f ms", time.perf_counter() - started,
             full * 1000)
    return full
