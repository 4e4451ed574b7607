"""Assembling and running the server: gRPC, health, reflection, auth, metrics, model, engine,
batcher.

Start-up: listen (health NOT_SERVING, GetModelInfo says LOADING, other calls answer
UNAVAILABLE), load the model, warm the engine up, start the batcher, report SERVING.
Shut-down: NOT_SERVING and DRAINING, refuse new calls, let in-flight ones finish within the
grace period, drain the batcher.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from typing import Optional

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc

from ..api.auth import TokenAuth
from ..api.request import LabelIndex
from ..api.servicer import CamserveServicer, Runtime, model_info
from ..batching.batcher import Batcher
from ..domain import ExplainSpec, WorkItem
from ..engine.engine import Engine
from ..engine.models import LoadedModel, load_model
from ..render import images
from .metrics import Metrics
from .settings import Settings
from .tls import server_credentials

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Camserve"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CamServer:
    """One server process's worth of state. ``start`` returns the bound port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: Optional[int] = None
        self.model: Optional[LoadedModel] = None
        self.metrics = Metrics()
        self._servicer = CamserveServicer(settings.model, self.metrics)
        self._health = health.HealthServicer()
        self._grpc: Optional[grpc.Server] = None
        self._engine: Optional[Engine] = None
        self._batcher: Optional[Batcher] = None
        self._stopped = threading.Event()

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
        s = self.settings
        options = [("grpc.max_receive_message_length", s.max_message_bytes),
                   ("grpc.max_send_message_length", s.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        interceptors = []
        if s.auth_tokens:
            interceptors.append(TokenAuth(s.auth_tokens, on_denied=lambda method: (
                self.metrics.requests.labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc())))
        credentials = server_credentials(s)
        pool = futures.ThreadPoolExecutor(max_workers=s.threads,
                                          thread_name_prefix="camserve-handler")
        server = grpc.server(pool, options=options, interceptors=interceptors)
        pb_grpc.add_CamserveServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self._set_health(NOT_SERVING)
        address = f"{s.host}:{s.port}"
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        server.start()
        self._grpc, self.port = server, port
        if s.metrics_port is not None:
            metrics_port = self.metrics.serve(s.host, s.metrics_port)
            log.info("metrics on http://%s:%d/metrics", s.host, metrics_port)
        log.info("listening on %s:%d (%s; loading %s)", s.host, port,
                 "TLS" if credentials is not None else "plaintext", s.model)
        return port

    def load(self) -> None:
        s = self.settings
        model = load_model(s)
        self.metrics.model_load.set(model.load_seconds)
        card = model.card
        log.info("loaded %s on %s in %.1fs: %d classes, input %dx%d, layers %s", card.name,
                 model.device, model.load_seconds, card.num_classes, card.input_size[1],
                 card.input_size[0], ", ".join(i.name for i in card.layers) or "none")
        engine = Engine(model)
        batch_seconds = _warm_up(engine, s.max_batch_size)
        batcher = Batcher(engine.run, max_batch_size=s.max_batch_size,
                          max_delay_ms=s.max_delay_ms, max_queue=s.max_queue,
                          metrics=self.metrics, batch_seconds=batch_seconds,
                          on_worker=self._worker_changed)
        self.metrics.watch_queue(batcher.depth)
        if model.device.type == "cuda":
            import torch

            self.metrics.watch_device_memory(lambda: torch.cuda.memory_allocated(model.device))
        self.model, self._engine, self._batcher = model, engine, batcher
        self._servicer.serve(Runtime(
            settings=s, model=card, batcher=batcher, labels=LabelIndex(card.labels),
            limits=images.Limits(s.max_image_bytes, s.max_image_pixels),
            info=model_info(s, card)))
        batcher.start()  # reports the worker alive: health SERVING
        self.metrics.set_state("serving")
        log.info("serving on port %d", self.port)

    def _worker_changed(self, alive: bool) -> None:
        """Health follows the batcher's worker: NOT_SERVING while none runs."""
        if not self._stopped.is_set():
            self._set_health(SERVING if alive else NOT_SERVING)

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace`` seconds, drain."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.grace_s if grace is None else grace
        self._health.enter_graceful_shutdown()
        self._servicer.drain()
        self.metrics.set_state("draining")
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self._batcher is not None:
            self._batcher.stop(timeout=grace + 5)
        if self._engine is not None:
            self._engine.close()
        self.metrics.set_state("stopped")
        self.metrics.close()
        log.info("stopped")

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self._health.set(name, status)


def _warm_up(engine: Engine, max_batch_size: int) -> float:
    """Run the shapes the batcher will use once, so the first callers do not pay for it.
    Returns the time of one full batch: the batcher's first estimate."""
    card = engine.model.card
    blank = np.zeros((*card.input_size, 3), dtype=np.uint8)
    spec = ExplainSpec(layers=(card.default_layer,)) if card.layers else None
    started = time.perf_counter()
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
