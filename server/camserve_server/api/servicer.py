"""The camserve.v1.CamserveService handlers: the camserve protocol's adapter over the pipeline
(pipeline.py). Each handler turns its request into the pipeline's steps and the outcomes into
its answer; ``calls.py`` wraps every handler (parsing, errors, access log, metrics).
"""

from __future__ import annotations

from typing import Any, Optional

from camserve.v1 import camserve_pb2 as pb

from ..batching.levels import STREAM
from ..domain import WorkItem
from ..errors import ResourceExhausted, ServiceError, Unavailable
from . import calls, sanity
from . import request as req
from . import response as resp
from .pipeline import Outcome, Pipeline
from .streams import Prepared, StreamSession, Tally

SERVICE = pb.DESCRIPTOR.services_by_name["CamserveService"].full_name
STREAMS_RETRY_S = 1.0  # the retry hint when every stream slot is taken


class CamserveService:
    """The service's handlers. Until ``serve`` is called they answer UNAVAILABLE (and
    GetModelInfo says LOADING)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._pipeline: Optional[Pipeline] = None
        self._info: Optional[pb.GetModelInfoResponse] = None
        self.state = pb.SERVER_STATE_LOADING
        self.open_streams = 0
        self.stream_frames = Tally()

    def serve(self, pipeline: Pipeline) -> None:
        """Take the loaded model; calls still answer UNAVAILABLE until the state is SERVING."""
        self._pipeline = pipeline
        self._info = resp.model_info(pipeline, self.state)

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

    def live(self) -> Pipeline:
        pipeline = self._pipeline
        if pipeline is None or self.state == pb.SERVER_STATE_LOADING:
            raise Unavailable("the model is still loading; retry shortly (the health service "
                              "reports SERVING when it is ready)", reason="LOADING")
        if self.state == pb.SERVER_STATE_DRAINING:
            raise Unavailable("the server is shutting down; send the call to another replica",
                              reason="DRAINING")
        return pipeline

    async def GetModelInfo(self, request, context):
        if self._info is None:
            return pb.GetModelInfoResponse(name=self._name, state=self.state)
        info = pb.GetModelInfoResponse()
        info.CopyFrom(self._info)
        info.state = self.state
        return info

    async def Predict(self, request, context):
        rt = self.live()
        top_k = rt.top_k(request.options.top_k or None)
        sources = _sources(rt, request.images)
        decoded, outcomes = await rt.predict(sources, context)
        return pb.PredictResponse(results=[
            resp.predict_result(o, rt.model.labels, top_k, d.image.size, d.ms, rt.worker)
            for d, o in zip(decoded, outcomes)])

    async def Explain(self, request, context):
        rt = self.live()
        plan = rt.explain_plan(request.options)
        decoded, outcomes = await rt.explain(_sources(rt, request.images), plan, context)

        def build() -> pb.ExplainResponse:
            return pb.ExplainResponse(results=[
                resp.explain_result(o, rt.model.labels, plan, d.image.size, d.ms, rt.worker,
                                    d.image.full)
                for d, o in zip(decoded, outcomes)])

        return await rt.in_pool(build) if plan.outputs.needs_heatmap else build()

    async def CheckSanity(self, request, context):
        rt = self.live()
        sources = _sources(rt, request.images)
        plan = sanity.plan(request, rt.model, rt.limits, len(sources))
        if rt.sanity is None:
            raise Unavailable("this server runs no sanity checks", reason="NO_SANITY_CHECKS")
        decoded = await rt.decode_all(sources)
        report = await sanity.run(rt.sanity, [d.image.pixels for d in decoded], plan,
                                  calls.deadline(context))
        return sanity.response(report)

    async def StreamPredict(self, requests, context, frames):
        rt = self.live()

        def configure(options) -> int:
            return rt.top_k(options.top_k or None)

        async def prepare(frame, top_k: int) -> Prepared:
            d = await rt.decode(req.source(frame.image, "frame.image"), "frame.image",
                                level=STREAM)

            async def finish(o: Outcome):
                return resp.predict_result(o, rt.model.labels, top_k, d.image.size, d.ms,
                                           rt.worker)
            return Prepared(WorkItem(d.image.pixels), finish)

        def answer(frame_id, skipped, result=None, error=None):
            return pb.StreamPredictResponse(frame_id=frame_id, skipped=skipped, result=result,
                                            error=_status(error))

        async for message in self._stream(rt, requests, context, frames, configure,
                                          rt.top_k(None), prepare, answer):
            yield message

    async def StreamExplain(self, requests, context, frames):
        rt = self.live()

        def configure(options) -> req.ExplainPlan:
            return rt.explain_plan(options)

        async def prepare(frame, plan: req.ExplainPlan) -> Prepared:
            d = await rt.decode(req.source(frame.image, "frame.image"), "frame.image",
                                full=plan.outputs.overlay_format is not None, level=STREAM)

            async def finish(o: Outcome):
                def build():
                    return resp.explain_result(o, rt.model.labels, plan, d.image.size, d.ms,
                                               rt.worker, d.image.full)
                return (await rt.in_pool(build, level=STREAM) if plan.outputs.needs_heatmap
                        else build())
            return Prepared(WorkItem(d.image.pixels, plan.spec), finish)

        def answer(frame_id, skipped, result=None, error=None):
            return pb.StreamExplainResponse(frame_id=frame_id, skipped=skipped, result=result,
                                            error=_status(error))

        default = rt.explain_plan(pb.ExplainOptions())
        async for message in self._stream(rt, requests, context, frames, configure, default,
                                          prepare, answer):
            yield message

    async def _stream(self, rt: Pipeline, requests, context, frames, configure, default,
                      prepare, answer):
        if self.open_streams >= rt.limits.max_streams:
            raise ResourceExhausted(
                f"this server has {self.open_streams} streams open, its limit (max_streams); "
                f"retry in {STREAMS_RETRY_S:g} s or use another replica",
                retry_after_s=STREAMS_RETRY_S, reason="TOO_MANY_STREAMS")
        self.open_streams += 1
        try:
            session = StreamSession(
                requests, rt.batcher, configure=configure, default_options=default,
                prepare=prepare, answer=answer,
                max_in_flight=rt.limits.max_stream_frames_in_flight,
                idle_s=rt.limits.stream_idle_s, deadline=calls.deadline(context),
                frames=frames, tally=self.stream_frames)
            async for message in session.answers():
                yield message
        finally:
            self.open_streams -= 1


def _sources(rt: Pipeline, images) -> list:
    """A request's images as the pipeline's sources, after the per-request checks."""
    rt.count(len(images), "images")
    return [req.source(image, f"images[{i}]") for i, image in enumerate(images)]


def _status(error: Optional[ServiceError]) -> Any:
    return None if error is None else calls.status_of(error)
