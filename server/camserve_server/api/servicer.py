"""The camserve.v1.CamserveService handlers: coroutines that convert the request, hand the
items to the batcher and convert the answer back.

Decoding and rendering run in one bounded thread pool (Pillow and NumPy release the GIL), so
the event loop never blocks on them; the batcher's worker thread is the only one that touches
the model. A call with one image, while the batcher is idle (see Batcher.idle), has its worker
decode it instead (the same decode): the call then passes between threads twice instead of
four times, which a lone caller feels (bench/bench_latency.py). ``calls.py`` wraps every
handler (parsing, errors, access log, metrics).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from camserve.v1 import camserve_pb2 as pb

from ..batching.batcher import Batcher, Outcome, Ticket
from ..domain import DeferredDecode, ExplainSpec, ModelCard, Source, WorkItem
from ..errors import Cancelled, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from ..process.settings import Settings
from ..render import images
from . import calls, sanity
from . import request as req
from . import response as resp
from .streams import Prepared, StreamSession, Tally, settled

SERVICE = pb.DESCRIPTOR.services_by_name["CamserveService"].full_name
STREAMS_RETRY_S = 1.0  # the retry hint when every stream slot is taken


@dataclass(frozen=True)
class Decoded:
    image: images.Decoded
    ms: float


@dataclass(frozen=True)
class Runtime:
    """Everything a handler needs once the model is loaded."""

    settings: Settings
    model: ModelCard
    batcher: Batcher
    labels: req.LabelIndex
    limits: images.Limits
    pool: Executor  # decoding and rendering
    sanity: Any = None  # engine/sanity.py's SanityChecker: CheckSanity runs on it

    def decode_here(self, source: Source, field: str, full: bool = False) -> Decoded:
        """Decode and resize one image on this thread; ``full`` keeps it whole for overlays."""
        started = time.perf_counter()
        try:
            image = images.prepare(source, self.model.input_size, self.limits,
                                   self.settings.max_render_pixels if full else None)
        except ServiceError as exc:
            raise exc.at(field, f"{field} ") from None
        return Decoded(image, (time.perf_counter() - started) * 1000.0)

    async def decode(self, source: Source, field: str, full: bool = False) -> Decoded:
        """Decode and resize one image in the pool."""
        return await self.in_pool(self.decode_here, source, field, full)

    async def decode_all(self, sources: Sequence[Source], full: bool = False,
                         field: str = "images") -> List[Decoded]:
        """Decode the images in the pool; ``field``: the request's field that holds them."""
        if len(sources) == 1:  # no task to schedule, one event-loop turn less
            return [await self.decode(sources[0], f"{field}[0]", full)]
        return list(await asyncio.gather(*(self.decode(s, f"{field}[{i}]", full)
                                           for i, s in enumerate(sources))))

    async def decode_and_run(self, sources: Sequence[Source], explain: Optional[ExplainSpec],
                             context, full: bool = False,
                             field: str = "images") -> Tuple[List[Decoded], List[Outcome]]:
        """Decode the images and run them through the batcher. One image while the batcher is
        idle: its worker decodes it, just before the batch; otherwise the pool decodes them
        all first (announced to the batcher meanwhile)."""
        if len(sources) == 1 and self.batcher.idle():
            decoded: List[Decoded] = []

            def decode():
                decoded.append(self.decode_here(sources[0], f"{field}[0]", full))
                return decoded[0].image.pixels
            outcomes = await self.run([WorkItem(DeferredDecode(decode), explain)], context)
            return decoded, outcomes
        with self.batcher.arriving(len(sources)):
            decoded = await self.decode_all(sources, full, field)
        return decoded, await self.run([WorkItem(d.image.pixels, explain) for d in decoded],
                                       context)

    async def run(self, works: Sequence[WorkItem], context) -> List[Outcome]:
        """Queue every item, then wait for all; a caller that goes away (or whose deadline
        passes) withdraws its queued items."""
        deadline = calls.deadline(context)
        tickets: List[Ticket] = []
        try:
            for work in works:
                tickets.append(self.batcher.submit(work, deadline))
            for ticket in tickets:
                await settled(ticket)
        except BaseException:
            for ticket in tickets:
                ticket.withdraw()
            raise
        return [outcome(ticket) for ticket in tickets]

    async def in_pool(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)


def outcome(ticket: Ticket) -> Outcome:
    """A settled ticket's outcome; its error raised."""
    if ticket.cancelled():
        raise Cancelled("the call was cancelled")
    return ticket.result()


class CamserveService:
    """The service's handlers. Until ``serve`` is called they answer UNAVAILABLE (and
    GetModelInfo says LOADING)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._runtime: Optional[Runtime] = None
        self._info: Optional[pb.GetModelInfoResponse] = None
        self.state = pb.SERVER_STATE_LOADING
        self.open_streams = 0
        self.stream_frames = Tally()

    def serve(self, runtime: Runtime) -> None:
        """Take the loaded model; calls still answer UNAVAILABLE until the state is SERVING."""
        self._runtime = runtime
        self._info = resp.model_info(runtime.model, runtime.settings, self.state)

    def methods(self) -> dict:
        """RPC name → (handler, request type, response type, streaming), for calls.py."""
        return {
            "Predict": (self.Predict, pb.PredictRequest, pb.PredictResponse, False),
            "Explain": (self.Explain, pb.ExplainRequest, pb.ExplainResponse, False),
            "GetModelInfo": (self.GetModelInfo, pb.GetModelInfoRequest,
                             pb.GetModelInfoResponse, False),
            "StreamPredict": (self.StreamPredict, pb.StreamPredictRequest,
                              pb.StreamPredictResponse, True),
            "StreamExplain": (self.StreamExplain, pb.StreamExplainRequest,
                              pb.StreamExplainResponse, True),
            "CheckSanity": (self.CheckSanity, pb.CheckSanityRequest, pb.CheckSanityResponse,
                            False),
        }

    def live(self) -> Runtime:
        runtime = self._runtime
        if runtime is None or self.state == pb.SERVER_STATE_LOADING:
            raise Unavailable("the model is still loading; retry shortly (the health service "
                              "reports SERVING when it is ready)", reason="LOADING")
        if self.state == pb.SERVER_STATE_DRAINING:
            raise Unavailable("the server is shutting down; send the call to another replica",
                              reason="DRAINING")
        return runtime

    async def GetModelInfo(self, request, context):
        if self._info is None:
            return pb.GetModelInfoResponse(name=self._name, state=self.state)
        info = pb.GetModelInfoResponse()
        info.CopyFrom(self._info)
        info.state = self.state
        return info

    async def Predict(self, request, context):
        rt = self.live()
        top_k = req.top_k(request.options.top_k, rt.model.num_classes)
        sources = req.image_sources(request.images, rt.settings.max_images_per_request)
        decoded, outcomes = await rt.decode_and_run(sources, None, context)
        return pb.PredictResponse(results=[
            resp.predict_result(o, rt.model.labels, top_k, d.image.size, d.ms,
                                rt.settings.worker_index) for d, o in zip(decoded, outcomes)])

    async def Explain(self, request, context):
        rt = self.live()
        plan = req.explain_plan(request.options, rt.model, rt.labels, rt.settings)
        sources = req.image_sources(request.images, rt.settings.max_images_per_request)
        req.check_request_cost(plan.spec, len(sources), rt.settings.max_queued_forwards)
        _check_answer_size(rt, plan, sources)
        decoded, outcomes = await rt.decode_and_run(
            sources, plan.spec, context, full=plan.outputs.overlay_format is not None)

        def build() -> pb.ExplainResponse:
            return pb.ExplainResponse(results=[
                resp.explain_result(o, rt.model.labels, plan, d.image.size, d.ms,
                                    rt.settings.worker_index, d.image.full)
                for d, o in zip(decoded, outcomes)])

        return await rt.in_pool(build) if plan.outputs.needs_heatmap else build()

    async def CheckSanity(self, request, context):
        rt = self.live()
        sources = req.image_sources(request.images, rt.settings.max_images_per_request)
        plan = sanity.plan(request, rt.model, rt.settings, len(sources))
        if rt.sanity is None:
            raise Unavailable("this server runs no sanity checks", reason="NO_SANITY_CHECKS")
        decoded = await rt.decode_all(sources)
        report = await sanity.run(rt.sanity, [d.image.pixels for d in decoded], plan,
                                  calls.deadline(context))
        return sanity.response(report)

    async def StreamPredict(self, requests, context, frames):
        rt = self.live()

        def configure(options) -> int:
            return req.top_k(options.top_k, rt.model.num_classes)

        async def prepare(frame, top_k: int) -> Prepared:
            d = await rt.decode(req.source(frame.image, "frame.image"), "frame.image")

            async def finish(o: Outcome):
                return resp.predict_result(o, rt.model.labels, top_k, d.image.size, d.ms,
                                           rt.settings.worker_index)
            return Prepared(WorkItem(d.image.pixels), finish)

        def answer(frame_id, skipped, result=None, error=None):
            return pb.StreamPredictResponse(frame_id=frame_id, skipped=skipped, result=result,
                                            error=_status(error))

        async for message in self._stream(rt, requests, context, frames, configure,
                                          req.top_k(0, rt.model.num_classes), prepare, answer):
            yield message

    async def StreamExplain(self, requests, context, frames):
        rt = self.live()

        def configure(options) -> req.ExplainPlan:
            return req.explain_plan(options, rt.model, rt.labels, rt.settings)

        async def prepare(frame, plan: req.ExplainPlan) -> Prepared:
            d = await rt.decode(req.source(frame.image, "frame.image"), "frame.image",
                                full=plan.outputs.overlay_format is not None)

            async def finish(o: Outcome):
                def build():
                    return resp.explain_result(o, rt.model.labels, plan, d.image.size, d.ms,
                                               rt.settings.worker_index, d.image.full)
                return await rt.in_pool(build) if plan.outputs.needs_heatmap else build()
            return Prepared(WorkItem(d.image.pixels, plan.spec), finish)

        def answer(frame_id, skipped, result=None, error=None):
            return pb.StreamExplainResponse(frame_id=frame_id, skipped=skipped, result=result,
                                            error=_status(error))

        default = req.explain_plan(pb.ExplainOptions(), rt.model, rt.labels, rt.settings)
        async for message in self._stream(rt, requests, context, frames, configure, default,
                                          prepare, answer):
            yield message

    async def _stream(self, rt: Runtime, requests, context, frames, configure, default,
                      prepare, answer):
        if self.open_streams >= rt.settings.max_streams:
            raise ResourceExhausted(
                f"this server has {self.open_streams} streams open, its limit (max_streams); "
                f"retry in {STREAMS_RETRY_S:g} s or use another replica",
                retry_after_s=STREAMS_RETRY_S, reason="TOO_MANY_STREAMS")
        self.open_streams += 1
        try:
            session = StreamSession(
                requests, rt.batcher, configure=configure, default_options=default,
                prepare=prepare, answer=answer,
                max_in_flight=rt.settings.max_stream_frames_in_flight,
                idle_s=rt.settings.stream_idle_s, deadline=calls.deadline(context),
                frames=frames, tally=self.stream_frames)
            async for message in session.answers():
                yield message
        finally:
            self.open_streams -= 1


def _check_answer_size(rt: Runtime, plan: req.ExplainPlan, sources: Sequence[Source]) -> None:
    """Refuse, before any work, an answer that could not be sent (over max_message_bytes).
    Only rendered pictures depend on an image's size: their headers are read only then."""
    if plan.outputs.needs_heatmap:
        sizes = [images.peek_size(source) for source in sources]
    else:
        sizes = [(1, 1)] * len(sources)
    total = sum(resp.explain_bound(plan, size, rt.model) for size in sizes if size is not None)
    limit = rt.settings.max_message_bytes
    if total > limit:
        raise InvalidArgument(
            f"the answer would take up to {total / 2**20:.0f} MiB ({len(sources)} images x "
            f"{plan.maps} maps), over the {limit / 2**20:.0f} MiB message limit "
            "(max_message_bytes): send fewer images per call, ask for fewer maps, or for raw "
            "maps or JPEG overlays instead of PNGs", field="options.outputs",
            reason="ANSWER_TOO_LARGE")


def _status(error: Optional[ServiceError]) -> Any:
    return None if error is None else calls.status_of(error)
