"""gRPC handlers: convert the request, hand the items to the batcher, convert the answer back.

Handlers run on gRPC's thread pool. Decoding and rendering happen here, in parallel with the
engine; the batcher's worker thread is the only one that touches the model.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import grpc

from camserve.methods import method_value
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc

from ..batching.batcher import Batcher, Outcome, Ticket
from ..domain import METHODS, ExplainSpec, ModelCard, Outputs, WorkItem
from ..errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ServiceError,
    Unavailable,
    abort,
)
from ..process.metrics import Metrics
from ..process.settings import Settings
from ..render import images
from . import request as req
from . import response as resp
from .streams import Frame, StreamSession

log = logging.getLogger(__name__)
access = logging.getLogger("camserve_server.access")
NO_DEADLINE_S = 1e6


@dataclass(frozen=True)
class Runtime:
    """Everything a handler needs once the model is loaded."""

    settings: Settings
    model: ModelCard
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
        except Exception as exc:
            code = _status(exc)
            _fail(context, name, exc)
        finally:
            self._finished(name, code, time.perf_counter() - started,
                           len(getattr(request, "images", ())), context)

    return wrapper


def _status(exc: Exception) -> grpc.StatusCode:
    return exc.code if isinstance(exc, ServiceError) else grpc.StatusCode.INTERNAL


def _fail(context, name: str, exc: Exception) -> None:
    """End the RPC for ``exc`` (``context.abort`` raises): a typed error with its own status,
    anything else (a bug) with INTERNAL after logging it; the server keeps serving."""
    if isinstance(exc, ServiceError):
        abort(context, exc)
    log.exception("unexpected error in %s", name)
    context.abort(grpc.StatusCode.INTERNAL,
                  f"internal error in {name}; the server log has details")


def stream_rpc(handler: Callable) -> Callable:
    """``rpc`` for a bidirectional stream: the handler returns a StreamSession whose answers
    are yielded; the stream is counted and logged once, when it ends."""
    name = handler.__name__

    @functools.wraps(handler)
    def wrapper(self, requests, context):
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        session = None
        try:
            session = handler(self, requests, context)
            yield from session.answers()
        except GeneratorExit:  # the caller went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = _status(exc)
            _fail(context, name, exc)
        finally:
            if session is not None:
                session.close()
            self._finished(name, code, time.perf_counter() - started,
                           session.frames if session is not None else 0, context)

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

    def _finished(self, rpc_name: str, code, seconds: float, items: int, context) -> None:
        self._metrics.requests.labels(rpc_name, code.name).inc()
        self._metrics.latency.labels(rpc_name).observe(seconds)
        metadata = dict(context.invocation_metadata() or ())
        access.info("%s %s %.1f ms", rpc_name, code.name, seconds * 1000.0, extra={
            "request_id": metadata.get("x-request-id") or uuid.uuid4().hex[:16],
            "rpc": rpc_name, "code": code.name, "ms": round(seconds * 1000.0, 2),
            "items": items, "peer": context.peer()})

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
        frames = [_predict_frame(rt, source, request.top_k, f"image {i}")
                  for i, source in enumerate(sources)]
        outcomes = _run(rt.batcher, [f.work for f in frames], context)
        return pb.PredictResponse(results=[f.finish(o) for f, o in zip(frames, outcomes)])

    @rpc
    def Explain(self, request, context):
        rt = self._live()
        sources = req.image_sources(request.images, rt.settings.max_images_per_request)
        options = _explain_options(rt, request)
        frames = [_explain_frame(rt, source, options, f"image {i}")
                  for i, source in enumerate(sources)]
        outcomes = _run(rt.batcher, [f.work for f in frames], context)
        return pb.ExplainResponse(results=[f.finish(o) for f, o in zip(frames, outcomes)])

    @stream_rpc
    def StreamPredict(self, requests, context):
        rt = self._live()

        def parse(frame):
            name = f"frame {frame.frame_id}"
            return _predict_frame(rt, req.source(frame.image, name), frame.top_k, name)

        def answer(frame_id, skipped, result=None, error=None):
            return pb.StreamPredictResponse(frame_id=frame_id, skipped=skipped, result=result,
                                            error=_frame_error(error))

        return _stream(rt, requests, context, parse, answer)

    @stream_rpc
    def StreamExplain(self, requests, context):
        rt = self._live()

        def parse(frame):
            name = f"frame {frame.frame_id}"
            return _explain_frame(rt, req.source(frame.image, name), _explain_options(rt, frame),
                                  name)

        def answer(frame_id, skipped, result=None, error=None):
            return pb.StreamExplainResponse(frame_id=frame_id, skipped=skipped, result=result,
                                            error=_frame_error(error))

        return _stream(rt, requests, context, parse, answer)


@dataclass(frozen=True)
class _ExplainOptions:
    spec: ExplainSpec
    outputs: Outputs
    top_k: int


def _explain_options(rt: Runtime, request) -> _ExplainOptions:
    """The options of an ExplainRequest or StreamExplainRequest, validated."""
    spec = req.explain_spec(request, rt.model, rt.labels, rt.settings.max_score_cam_channels)
    return _ExplainOptions(spec,
                           req.outputs(request.outputs),
                           req.top_k(request.top_k, rt.model.num_classes))


def _decode(rt: Runtime, source: req.Source, name: str) -> Tuple[images.Decoded, float]:
    started = time.perf_counter()
    try:
        image = images.prepare(source, rt.model.input_size, rt.limits)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{name} {exc.message}") from None
    return image, (time.perf_counter() - started) * 1000.0


def _predict_frame(rt: Runtime, source: req.Source, top_k: int, name: str) -> Frame:
    top_k = req.top_k(top_k, rt.model.num_classes)
    image, decode_ms = _decode(rt, source, name)
    return Frame(WorkItem(image.pixels), functools.partial(
        _responded, resp.predict_result, labels=rt.labels.labels, top_k=top_k, size=image.size,
        decode_ms=decode_ms))


def _explain_frame(rt: Runtime, source: req.Source, options: _ExplainOptions,
                   name: str) -> Frame:
    image, decode_ms = _decode(rt, source, name)
    return Frame(WorkItem(image.pixels, options.spec), functools.partial(
        _responded, resp.explain_result, labels=rt.labels.labels, top_k=options.top_k,
        size=image.size, decode_ms=decode_ms, outputs=options.outputs,
        full_image=functools.partial(images.full_rgb, source, rt.limits)))


def _stream(rt: Runtime, requests, context, parse, answer):
    session = StreamSession(
        requests, rt.batcher, parse=parse, policy_of=req.stream_policy, answer=answer,
        max_in_flight=rt.settings.max_stream_frames_in_flight, deadline=_deadline(context))
    context.add_callback(session.close)
    return session


def _frame_error(error: Optional[ServiceError]) -> Optional[pb.FrameError]:
    if error is None:
        return None
    return pb.FrameError(code=error.code.value[0], message=error.message)


def _deadline(context) -> Optional[float]:
    remaining = context.time_remaining()
    # gRPC reports "no deadline" as None or as a time centuries away.
    if remaining is None or remaining > NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining


def _run(batcher: Batcher, works: Sequence[WorkItem], context) -> List[Outcome]:
    """Queue every item, then wait for all; a caller that goes away drops its queued items."""
    deadline = _deadline(context)
    tickets: List[Ticket] = []
    try:
        for work in works:
            tickets.append(batcher.submit(work, deadline))
    except ServiceError:
        for ticket in tickets:
            ticket.withdraw()
        raise
    if not context.add_callback(lambda: [t.withdraw() for t in tickets]):
        for ticket in tickets:
            ticket.withdraw()
    return [_wait(ticket, deadline) for ticket in tickets]


def _wait(ticket: Ticket, deadline: Optional[float]) -> Outcome:
    try:
        return ticket.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        ticket.withdraw()
        raise DeadlineExceeded("the deadline passed before the model answered") from None
    except CancelledError:
        raise Cancelled("the call was cancelled") from None


def _responded(build: Callable, outcome: Outcome, **kwargs):
    """Build one result and record how long that took in its timing."""
    started = time.perf_counter()
    result = build(outcome, **kwargs)
    result.timing.respond_ms = (time.perf_counter() - started) * 1000.0
    return result


def model_info(settings: Settings, model: ModelCard) -> pb.ModelInfo:
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
                         max_stream_frames_in_flight=settings.max_stream_frames_in_flight,
                         max_score_cam_channels=settings.max_score_cam_channels,
                         max_message_bytes=settings.max_message_bytes))
