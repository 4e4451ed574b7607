"""gRPC handlers: convert the request, hand the items to the batcher, convert the answer back.

Handlers run on gRPC's thread pool. Decoding and rendering happen here, in parallel with the
engine; the batcher's worker thread is the only one that touches the model.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import grpc

from camserve.methods import method_value
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc

from . import images
from . import request as req
from . import response as resp
from .batcher import Batcher, Outcome
from .cams import METHODS
from .engine import ExplainSpec, WorkItem
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    QueueFull,
    ServiceError,
    Unavailable,
    abort,
)
from .metrics import Metrics
from .models import LoadedModel
from .settings import Settings

log = logging.getLogger(__name__)
access = logging.getLogger("camserve_server.access")
NO_DEADLINE_S = 1e6


@dataclass(frozen=True)
class Runtime:
    """Everything a handler needs once the model is loaded."""

    settings: Settings
    model: LoadedModel
    batcher: Batcher
    labels: req.LabelIndex
    limits: images.Limits
    info: pb.ModelInfo


def rpc(handler: Callable) -> Callable:
    """Map typed errors to their status (anything else is a bug: INTERNAL, and keep serving),
    count the RPC in the metrics and write one access-log line for it."""
    name = handler.__name__

    @functools.wraps(handler)
    def wrapper(self, request, context):
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return handler(self, request, context)
        except ServiceError as exc:
            code = exc.code
            abort(context, exc)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error in %s", name)
            context.abort(grpc.StatusCode.INTERNAL,
                          f"internal error in {name}; the server log has details")
        finally:
            self._finished(name, code, time.perf_counter() - started, request, context)

    return wrapper


class CamserveServicer(pb_grpc.CamserveServicer):
    def __init__(self, name: str, metrics: Metrics) -> None:
        self._name = name
        self._metrics = metrics
        self._runtime: Optional[Runtime] = None
        self.state = pb.SERVER_STATE_LOADING

    def serve(self, runtime: Runtime) -> None:
        """Start answering calls (until then they answer UNAVAILABLE)."""
        self._runtime = runtime
        self.state = pb.SERVER_STATE_SERVING

    def drain(self) -> None:
        self.state = pb.SERVER_STATE_DRAINING

    def _live(self) -> Runtime:
        runtime = self._runtime
        if runtime is None:
            raise Unavailable("the model is still loading; retry shortly (the health service "
                              "reports SERVING when it is ready)")
        if self.state == pb.SERVER_STATE_DRAINING:
            raise Unavailable("the server is shutting down; send the call to another replica")
        return runtime

    def _finished(self, rpc_name: str, code, seconds: float, request, context) -> None:
        self._metrics.requests.labels(rpc_name, code.name).inc()
        self._metrics.latency.labels(rpc_name).observe(seconds)
        metadata = dict(context.invocation_metadata() or ())
        access.info("%s %s %.1f ms", rpc_name, code.name, seconds * 1000.0, extra={
            "request_id": metadata.get("x-request-id") or uuid.uuid4().hex[:16],
            "rpc": rpc_name, "code": code.name, "ms": round(seconds * 1000.0, 2),
            "items": len(getattr(request, "images", ())), "peer": context.peer()})

    @rpc
    def GetModelInfo(self, request, context):
        runtime = self._runtime
        if runtime is None:
            return pb.ModelInfo(name=self._name, state=pb.SERVER_STATE_LOADING)
        info = pb.ModelInfo()
        info.CopyFrom(runtime.info)
        info.state = self.state
        return info

    @rpc
    def Predict(self, request, context):
        rt = self._live()
        sources = req.image_sources(request.images, rt.settings.max_images_per_request)
        top_k = req.top_k(request.top_k, rt.model.num_classes)
        decoded = _decode(rt, sources)
        outcomes = _run(rt.batcher, [WorkItem(d.pixels) for d, _ in decoded], context)
        return pb.PredictResponse(results=[
            _responded(resp.predict_result, o, rt.labels.labels, top_k, d.size, ms)
            for o, (d, ms) in zip(outcomes, decoded)])

    @rpc
    def Explain(self, request, context):
        rt = self._live()
        sources = req.image_sources(request.images, rt.settings.max_images_per_request)
        spec = ExplainSpec(
            method=req.method(request.method), layer=req.layer(request.layer, rt.model),
            target=req.target(request.target, rt.labels) if request.HasField("target") else None)
        outputs = req.outputs(request.outputs)
        top_k = req.top_k(request.top_k, rt.model.num_classes)
        decoded = _decode(rt, sources)
        outcomes = _run(rt.batcher, [WorkItem(d.pixels, spec) for d, _ in decoded], context)
        return pb.ExplainResponse(results=[
            _responded(resp.explain_result, o, rt.labels.labels, top_k, d.size, ms, spec.method,
                       spec.layer, outputs, functools.partial(images.full_rgb, source, rt.limits))
            for o, (d, ms), source in zip(outcomes, decoded, sources)])


def _decode(rt: Runtime, sources: Sequence[req.Source]) -> List[Tuple[images.Decoded, float]]:
    decoded = []
    for i, source in enumerate(sources):
        started = time.perf_counter()
        try:
            image = images.prepare(source, rt.model.input_size, rt.limits)
        except InvalidArgument as exc:
            raise req.image_error(i, exc) from None
        decoded.append((image, (time.perf_counter() - started) * 1000.0))
    return decoded


def _run(batcher: Batcher, works: Sequence[WorkItem], context) -> List[Outcome]:
    """Queue every item, then wait for all; a caller that goes away drops its queued items."""
    remaining = context.time_remaining()
    # gRPC reports "no deadline" as None or as a time centuries away.
    no_deadline = remaining is None or remaining > NO_DEADLINE_S
    deadline = None if no_deadline else time.monotonic() + remaining
    futures: List[Future] = []
    try:
        for work in works:
            futures.append(batcher.submit(work, deadline))
    except QueueFull:
        for future in futures:
            future.cancel()
        raise
    if not context.add_callback(lambda: [f.cancel() for f in futures]):
        for future in futures:
            future.cancel()
    return [_wait(future, deadline) for future in futures]


def _wait(future: Future, deadline: Optional[float]) -> Outcome:
    try:
        return future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        future.cancel()
        raise DeadlineExceeded("the deadline passed before the model answered") from None
    except CancelledError:
        raise Cancelled("the call was cancelled") from None


def _responded(build: Callable, *args):
    """Build one result and record how long that took in its timing."""
    started = time.perf_counter()
    result = build(*args)
    result.timing.respond_ms = (time.perf_counter() - started) * 1000.0
    return result


def model_info(settings: Settings, model: LoadedModel) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=model.name, labels=model.labels,
        input_size=resp.image_size(model.input_size), mean=model.mean, std=model.std,
        layers=[pb.LayerInfo(name=i.name, channels=i.channels, height=i.height, width=i.width)
                for i in model.layers],
        default_layer=model.default_layer or "",
        methods=[method_value(name) for name in METHODS] if model.layers else [],
        batching=pb.BatchingInfo(max_batch_size=settings.max_batch_size,
                                 max_delay_ms=settings.max_delay_ms, max_queue=settings.max_queue),
        device=str(model.device),
        limits=pb.Limits(max_image_bytes=settings.max_image_bytes,
                         max_image_pixels=settings.max_image_pixels,
                         max_images_per_request=settings.max_images_per_request,
                         max_message_bytes=settings.max_message_bytes))
