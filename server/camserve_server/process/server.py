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
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Optional

from grpc import aio
from grpc_health.v1 import health as health_names
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from camserve.v1 import camserve_pb2 as pb

from ..api import calls, oip
from ..api.auth import AdminAuth, TokenAuth
from ..api.health import NOT_SERVING, SERVING, HealthServicer
from ..api.pipeline import RequestLimits
from ..api.servicer import SERVICE, CamserveService
from ..batching.gate import DeviceGates
from ..batching.levels import LevelPolicy, LevelPool, Scheduling
from ..engine.spec import ModelSpec
from ..errors import StartupError
from ..metrics import Metrics
from ..models.config import Repository, Serving
from ..models.registry import Registry
from ..models.runtime import Shared
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


def scheduling(settings: Settings) -> Scheduling:
    """The queue's levels (batching/levels.py) as the --priority-levels, --default-priority,
    --level-* and --highest-priority flags say (each priority given as a level, 0 the
    highest)."""
    levels = settings.priority_levels
    defaults = dict(unary=1, stream=2, expensive=3)
    defaults.update(settings.default_priorities)
    policies = [LevelPolicy() for _ in range(levels)]
    for flag, key, convert in (("level_max_wait_ms", "max_wait_s", lambda ms: ms / 1000.0),
                               ("level_max_queued", "max_queued", int),
                               ("level_max_batch", "max_batch", int)):
        for priority, value in getattr(settings, flag):
            level = int(priority) - 1
            policies[level] = dataclasses.replace(policies[level], **{key: convert(value)})
    for priority in settings.level_delay:
        policies[priority - 1] = dataclasses.replace(policies[priority - 1], delay=True)
    return Scheduling(levels=levels, share=settings.level_share, policies=tuple(policies),
                      highest=settings.highest_priority - 1,
                      **{kind: min(p, levels) - 1 for kind, p in defaults.items()})


def serving(settings: Settings) -> Serving:
    """How a model is batched and placed unless its config says otherwise: the server flags."""
    return Serving(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(Serving)})


def repository(settings: Settings) -> Repository:
    """--model-repository, or the repository of one that --model and its flags make."""
    root = Path(settings.model_repository) if settings.model_repository else None
    return Repository(root, model_spec(settings), serving(settings), settings.oip_model_name)


def model_spec(settings: Settings) -> ModelSpec:
    """What ``load_model`` needs of the settings: the model and how to prepare it."""
    return ModelSpec(source=settings.model, weights=settings.weights, layers=settings.layers,
                     labels=settings.labels, input_size=settings.input_size, mean=settings.mean,
                     std=settings.std, fold_batchnorm=settings.fold_batchnorm,
                     static_padding=settings.static_padding,
                     output_activation=settings.output_activation)


class CamServer:
    """One server process. ``start``, ``stop`` and ``wait`` may be called from any thread."""

    def __init__(self, settings: Settings) -> None:
        openmp_defaults()
        self.settings = settings
        self.port: Optional[int] = None
        self.models: Optional[Registry] = None
        # A worker of --workers N shares its metrics with the supervisor, which serves them.
        self.metrics = Metrics(worker=settings.worker_index or None)
        self.metrics_endpoint: Optional[MetricsEndpoint] = None  # /metrics, when served here
        self._service = CamserveService(settings.model, AdminAuth(
            settings.admin_tokens, settings.model_control, settings.workers))
        self._health: Optional[HealthServicer] = None
        self._grpc: Optional[aio.Server] = None
        self._http = None  # api/http/app.py's HttpServer, when --http-port is not off
        self.http_port: Optional[int] = None  # the port HTTP is served on; None: no HTTP
        self._recorder: Optional[calls.Recorder] = None
        self._now = False  # stop_now was called: no grace any more
        self._scheduling = scheduling(settings)
        self._pool = LevelPool(decode_threads(settings), "camserve-decode",
                               self._scheduling.levels, self._scheduling.share)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="camserve-grpc",
                                        daemon=True)
        self._trimmer = Trimmer()
        self._stopping = False
        self._serving = threading.Event()  # set once state and health first say SERVING
        self._stopped = threading.Event()

    @property
    def model(self):
        """The default model's LoadedModel (its first device's)."""
        return self.batcher_runtime().engines[0].model

    @property
    def batcher(self):
        """The default model's batcher."""
        with self.models.use(None) as pipeline:
            return pipeline.batcher

    def batcher_runtime(self):
        """The default model's ModelRuntime."""
        batcher = self.batcher
        return next(r for r in self.models.runtimes() if r.batcher is batcher)

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
        if s.accepted_tokens:
            interceptors.append(TokenAuth(s.accepted_tokens, on_denied=self._denied))
        credentials = server_credentials(s)
        server = aio.server(options=options, interceptors=interceptors)
        recorder = self._recorder = calls.Recorder(self.metrics, lambda: self._stopping,
                                                   trust_tenant=s.tenant_header,
                                                   priority_tokens=s.priority_tokens)
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
        if s.http_port is not None:
            await self._listen_http(recorder, inflight)
        log.info("listening on %s:%d (%s; loading %s)", s.host, port,
                 "TLS" if credentials is not None else "plaintext", s.model)
        return port

    async def _listen_http(self, recorder: calls.Recorder, inflight: calls.InflightBytes
                           ) -> None:
        """HTTP on --http-port (api/http/): the same handlers, wrapped as gRPC wraps them
        (recorder, in-flight bytes), with the same TLS and tokens, on this event loop."""
        from ..api.http import app as http

        s = self.settings
        registry = self.metrics.registry
        if self.metrics.shared:  # a worker of --workers: every worker's numbers
            from prometheus_client import CollectorRegistry
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        options = http.HttpOptions(s.host, s.http_port, s.max_message_bytes, s.tls_cert,
                                   s.tls_key, s.tls_client_ca, reuse_port=bool(s.worker_index))
        server = http.serve(self._service, s.oip_model_name, recorder, inflight, registry,
                            options, s.accepted_tokens, self._denied)
        try:
            self.http_port = await server.start()
        except OSError as exc:
            await self._grpc.stop(0)
            raise StartupError(f"cannot serve HTTP on {s.host}:{s.http_port}: "
                               f"{exc.strerror or exc}; pass another --http-port (or "
                               "--http-port off)") from None
        self._http = server
        log.info("HTTP on %s:%d (%s)", s.host, self.http_port,
                 "TLS" if s.tls_cert is not None else "plaintext")

    def _denied(self, method: str, context) -> None:
        rpc = method.rsplit("/", 1)[-1]
        self.metrics.requests.labels(rpc, "UNAUTHENTICATED").inc()
        access.info("%s UNAUTHENTICATED peer=%s", rpc, context.peer(), extra={
            "rpc": rpc, "code": "UNAUTHENTICATED", "peer": context.peer()})

    def load(self) -> None:
        """Load the models the repository serves at start (the default model first: without
        it the server does not start; another that fails is FAILED in ListModels), then
        serve."""
        import torch

        s = self.settings
        # Only the batcher's worker threads compute in parallel: this thread loads the model
        # on one torch thread, and each worker sets its own count (torch's OpenMP threads are
        # per calling thread). Once one thread has run parallel work, OpenMP keeps its team,
        # and another thread's parallel work runs slower beside it (bench/bench_threads.py).
        torch.set_num_threads(1)
        repo = repository(s)
        try:
            names = list(s.load_models) or repo.names()
        except OSError as exc:
            raise StartupError(f"cannot read --model-repository {s.model_repository}: "
                               f"{exc.strerror}") from None
        if not names:
            raise StartupError(f"the model repository {s.model_repository} holds no model (a "
                               "folder NAME/ with a config.toml): docs/models.md")
        default = s.default_model or (s.oip_model_name if s.model_repository is None
                                      else names[0])
        if default not in names:
            raise StartupError(f"--default-model {default!r} is not among the models loaded "
                               f"at start ({', '.join(names)})")
        shared = Shared(
            limits=limits(s), max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels, jpeg_decode=s.jpeg_decode,
            torch_threads=torch_threads(s), workers=s.workers, worker_index=s.worker_index,
            pool=self._pool, metrics=self.metrics, gates=DeviceGates(),
            max_queue_per_caller=s.max_queue_per_caller, tenant_header=s.tenant_header,
            scheduling=self._scheduling)
        models = self.models = Registry(repo, shared, default,
                                        max_bytes=s.max_models_bytes, drain_s=s.grace_s,
                                        on_default=self._worker_changed,
                                        on_change=self._models_changed)
        self.metrics.watch_queue(models.depth, self._scheduling.levels)
        self.metrics.watch_streams(lambda: self._service.open_streams,
                                   lambda: self._service.stream_frames.frames)
        self.metrics.watch_device_memory({
            device: (lambda d=device: torch.cuda.memory_allocated(d))
            for device in s.devices if device.startswith("cuda")})
        self._loop.call_soon_threadsafe(self._service.serve, models)
        for name in [default] + [n for n in names if n != default]:
            try:
                models.load_now(name)
            except Exception as exc:
                if name == default:
                    models.stop(0)
                    if isinstance(exc, StartupError):
                        raise
                    raise StartupError(f"model {name!r}: {exc}") from exc
                log.error("model %s failed to load; the others serve: %s", name, exc)
        self.metrics.model_load.set(sum(r.load_seconds for r in models.runtimes()))
        while not self._serving.wait(0.1):
            pass
        if s.model_control == "poll":
            self.every(s.repository_poll_s, lambda: threading.Thread(
                target=models.poll, name="camserve-poll", daemon=True).start())
        log.info("serving on port %d", self.port)

    def _models_changed(self) -> None:
        """Health per model (``camserve.v1.CamserveService/NAME``): SERVING while the server
        is and the model has a ready version; memory an unloaded model held given back (called
        from loader threads)."""
        asyncio.run_coroutine_threadsafe(self._models_health(), self._loop)
        self._trimmer.trim_now()

    async def _models_health(self) -> None:
        if self._health is None or self.models is None:
            return
        serving = self._service.state == pb.SERVER_STATE_SERVING and not self._stopping
        ready = {st.name for st in self.models.statuses(ready_only=True)}
        for name in sorted({st.name for st in self.models.statuses()}):
            await self._health.set_all((f"{SERVICE}/{name}",),
                                       SERVING if serving and name in ready else NOT_SERVING)

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
            await self._models_health()
        else:
            self._service.state = state
            await self._health.set_all(HEALTH_NAMES, NOT_SERVING)
            await self._models_health()
            self.metrics.set_state(pb.ServerState.Name(state)[len("SERVER_STATE_"):].lower())

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace`` seconds, drain."""
        if self._stopped.is_set() or self._stopping:
            return
        self._stopping = True
        grace = 0.0 if self._now else self.settings.grace_s if grace is None else grace
        if self._thread.is_alive():
            self._on_loop(self._drain(grace))
        # Each model's batcher drains; a sanity check still running (its caller gone) ends at
        # its next slice: its thread must not be inside torch when the interpreter exits (the
        # process would abort).
        if self.models is not None:
            self.models.stop(timeout=STOP_NOW_S if self._now else grace + 5)
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
        # Calls still running when the grace ends are cut off with a status of their own
        # (UNAVAILABLE, shutting down); gRPC's stop (and HTTP's) then gives their answers time
        # to go out.
        stopping = []
        if self._grpc is not None:
            stopping.append(asyncio.ensure_future(self._grpc.stop(grace + STOP_NOW_S)))
        if self._http is not None:
            stopping.append(asyncio.ensure_future(self._http.stop(grace)))
        if stopping:
            await asyncio.wait(stopping, timeout=grace)
            if not all(t.done() for t in stopping) and self._recorder is not None:
                self._recorder.cut_off()
            await asyncio.gather(*stopping)

    def stop_now(self) -> None:
        """Cut every call off now (each answers UNAVAILABLE) and stop without waiting for
        work in flight: a second SIGINT. Safe to call from a signal handler, during ``stop``."""
        self._now = True
        if self._recorder is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._recorder.cut_off)

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)
