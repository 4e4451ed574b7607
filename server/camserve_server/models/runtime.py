"""One loaded version of one model: its engines (one per device), its queue and batcher, its
sanity checker and the pipeline its calls take. ``load_runtime`` builds one (on the thread
that calls it, while the server serves the others) and returns once its workers have warmed up;
``ModelRuntime.stop`` drains it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from camserve.v1 import camserve_pb2 as pb

from ..api.pipeline import Pipeline, RequestLimits
from ..api.request import LabelIndex
from ..batching.batcher import Batcher
from ..batching.gate import DeviceGates
from ..batching.levels import LevelPool, Scheduling
from ..domain import ExplainSpec, WorkItem
from ..errors import StartupError
from ..metrics import Metrics
from ..render import images
from .config import ModelConfig

log = logging.getLogger(__name__)

WARM_UP_POLL_S = 0.1


@dataclass(frozen=True)
class Shared:
    """What every model's runtime takes from the server: its limits and shared resources."""

    limits: RequestLimits
    max_image_bytes: int
    max_image_pixels: int
    jpeg_decode: str  # auto, device or cpu
    torch_threads: int  # per engine
    workers: int  # server processes (GetModelInfo's batching.workers)
    worker_index: int
    pool: LevelPool  # decoding and rendering, shared by every model
    metrics: Metrics
    gates: DeviceGates  # each device's turns between models
    max_queue_per_caller: int = 0  # a caller's items waiting in one model's queue; 0: no bound
    tenant_header: bool = False  # callers named by x-camserve-tenant (GetModelInfo says so)
    scheduling: Scheduling = Scheduling()  # the queue's levels and their policies


class ModelRuntime:
    """A loaded version. ``pipeline`` is what its calls use; ``stop`` drains it."""

    def __init__(self, config: ModelConfig, version: int, pipeline: Pipeline, engines: list,
                 batcher: Batcher, sanity, nbytes: int, load_seconds: float) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self.pipeline = pipeline
        self.engines = engines
        self.batcher = batcher
        self.sanity = sanity
        self.bytes = nbytes
        self.load_seconds = load_seconds
        self.alive = True  # a batcher worker runs (its supervisor replaces a dead one)

    def stop(self, timeout: float) -> None:
        """Finish what is queued, end jobs and a sanity check at their next slice, release
        the engines (their hooks) and the model."""
        self.batcher.stop(timeout=timeout)
        if self.sanity is not None and not self.sanity.close(timeout=timeout):
            log.warning("a sanity check on %s v%d did not end within %.0fs", self.name,
                        self.version, timeout)
        for engine in self.engines:
            engine.close()
        self.engines = []
        self.sanity = None


def model_bytes(module) -> int:
    """Bytes a module's parameters and buffers take."""
    return sum(t.numel() * t.element_size()
               for t in list(module.parameters()) + list(module.buffers()))


def load_runtime(config: ModelConfig, version: int, shared: Shared,
                 on_worker: Callable[[bool], None] = lambda alive: None,
                 stopping: Callable[[], bool] = lambda: False) -> ModelRuntime:
    """Load one version on its devices, warm it up and start its batcher; returns once its
    workers serve. Raises StartupError (or the loader's error) when it cannot."""
    import torch

    from ..engine.engine import Engine, check_precision
    from ..engine.models import load_model
    from ..engine.placement import resolve_devices
    from ..engine.sanity import SanityChecker

    serving = config.serving
    devices = resolve_devices(serving.device)
    for device in devices:  # before minutes of loading
        check_precision(serving.precision, device)
    spec = config.spec_of(version)
    # One model replica, engine and batcher worker per device, sharing one queue.
    models = [load_model(spec, device) for device in devices]
    model = models[0]
    names = [str(m.device) for m in models]
    card = dataclasses.replace(model.card, device=",".join(names))
    threads = shared.torch_threads
    seconds = sum(m.load_seconds for m in models)
    log.info("loaded %s v%d (%s) on %s in %.1fs: %d classes, input %dx%d, layers %s; %d torch "
             "thread%s per engine; precision %s", config.name, version, card.name, card.device,
             seconds, card.num_classes, card.input_size[1], card.input_size[0],
             ", ".join(i.name for i in card.layers) or "none", threads,
             "" if threads == 1 else "s", serving.precision)
    cuda = all(m.device.type == "cuda" for m in models)
    device_jpeg = shared.jpeg_decode == "device" or (shared.jpeg_decode == "auto" and cuda)
    engines = [Engine(m, precision=serving.precision) for m in models]
    served = threading.Event()

    def prepare(engine) -> float:  # on the engine's worker thread
        torch.set_num_threads(threads)
        return warm_up(engine, serving.max_batch_size, device_jpeg)

    def worker_changed(alive: bool) -> None:
        if alive:
            served.set()
        on_worker(alive)

    limits = shared.limits
    batcher = Batcher([e.run_batch for e in engines], max_batch_size=serving.max_batch_size,
                      max_delay_ms=serving.max_delay_ms, max_queue=serving.max_queue,
                      metrics=shared.metrics, device=names,
                      max_job_forwards=limits.max_queued_forwards, on_worker=worker_changed,
                      prefetch=cuda, prepare=[functools.partial(prepare, e) for e in engines],
                      gates=[shared.gates[name] for name in names],
                      max_queue_per_caller=shared.max_queue_per_caller,
                      scheduling=shared.scheduling)
    sanity = SanityChecker(model)
    pipeline = Pipeline(
        model=card, batcher=batcher, labels=LabelIndex(card.labels), limits=limits,
        image_limits=images.Limits(shared.max_image_bytes, shared.max_image_pixels,
                                   device_jpeg=device_jpeg),
        pool=shared.pool, batching=pb.BatchingInfo(
            max_batch_size=serving.max_batch_size, max_delay_ms=serving.max_delay_ms,
            max_queue=serving.max_queue, workers=shared.workers,
            max_queue_per_caller=shared.max_queue_per_caller,
            tenant_header=shared.tenant_header, **scheduling_info(shared.scheduling)),
        scheduling=shared.scheduling,
        worker=shared.worker_index, sanity=sanity,
        ref=pb.ModelRef(name=config.name, version=version))
    runtime = ModelRuntime(config, version, pipeline, engines, batcher, sanity,
                           sum(model_bytes(m.module) for m in models), seconds)
    batcher.start()  # its workers warm up, then report alive
    while not served.wait(WARM_UP_POLL_S):
        if batcher.prepare_error is not None or stopping():
            runtime.stop(0)
            if batcher.prepare_error is None:
                raise StartupError("the server is shutting down")
            raise StartupError(f"the model fails its warm-up: {batcher.prepare_error}")
    return runtime


def scheduling_info(scheduling: Scheduling) -> dict:
    """BatchingInfo's scheduling fields (priorities, 1 the highest)."""
    policies = [pb.LevelPolicy(priority=level + 1, max_wait_ms=p.max_wait_s * 1000.0,
                               delay=p.delay, max_queued=p.max_queued, max_batch=p.max_batch)
                for level, p in enumerate(scheduling.policies)
                if p.max_wait_s or p.max_queued or p.max_batch]
    return dict(priority_levels=scheduling.levels, level_share=scheduling.share,
                unary_priority=scheduling.unary + 1, stream_priority=scheduling.stream + 1,
                expensive_priority=scheduling.expensive + 1,
                highest_priority=scheduling.highest + 1, level_policies=policies)


def warm_up(engine, max_batch_size: int, device_jpeg: bool = False) -> float:
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
