"""The camserve.v1.CamserveService handlers: the camserve protocol's adapter over the pipeline
(pipeline.py). Each handler turns its request into the pipeline's steps and the outcomes into
its answer; ``calls.py`` wraps every handler (parsing, errors, access log, metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, List, Optional, Tuple

from camserve.v1 import camserve_pb2 as pb

from ..batching.levels import INTERACTIVE
from ..domain import WorkItem
from ..errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from ..models.registry import Registry, words
from . import calls, compare, sanity
from . import request as req
from . import response as resp
from .auth import AdminAuth
from .pipeline import Outcome, Pipeline
from .streams import Prepared, StreamSession, Tally

SERVICE = pb.DESCRIPTOR.services_by_name["CamserveService"].full_name
STREAMS_RETRY_S = 1.0  # the retry hint when every stream slot is taken


class CamserveService:
    """The service's handlers. Until ``serve`` is called they answer UNAVAILABLE (and
    GetModelInfo says LOADING)."""

    def __init__(self, name: str, admin: Optional[AdminAuth] = None) -> None:
        self._name = name
        self.models: Optional[Registry] = None
        self._admin = admin or AdminAuth((), "none", 1)
        self.state = pb.SERVER_STATE_LOADING
        self.open_streams = 0
        self.stream_frames = Tally()

    def serve(self, models: Registry) -> None:
        """Take the models; calls still answer UNAVAILABLE until the state is SERVING."""
        self.models = models

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
            "ListModels": (self.ListModels, pb.ListModelsRequest, pb.ListModelsResponse,
                           False),
            "LoadModel": (self.LoadModel, pb.LoadModelRequest, pb.LoadModelResponse, False),
            "UnloadModel": (self.UnloadModel, pb.UnloadModelRequest, pb.UnloadModelResponse,
                            False),
            "CompareExplain": (self.CompareExplain, pb.CompareExplainRequest,
                               pb.CompareExplainResponse, False),
        }

    @contextlib.contextmanager
    def live(self, ref: Optional[pb.ModelRef] = None, field: str = "model"):
        """The pipeline of the model a call names, held while the call runs (``with``); the
        access log and the metrics name it."""
        models = self.models
        if models is None or self.state == pb.SERVER_STATE_LOADING:
            raise Unavailable("the model is still loading; retry shortly (the health service "
                              "reports SERVING when it is ready)", reason="LOADING")
        if self.state == pb.SERVER_STATE_DRAINING:
            raise Unavailable("the server is shutting down; send the call to another replica",
                              reason="DRAINING")
        with models.use(ref, field) as pipeline:
            calls.uses_model(pipeline.ref.name, pipeline.ref.version)
            yield pipeline

    async def GetModelInfo(self, request, context):
        state = self.state
        if self.models is None or state == pb.SERVER_STATE_LOADING:
            return pb.GetModelInfoResponse(name=self._name, state=state)
        with self.models.use(request.model if request.HasField("model") else None) as rt:
            calls.uses_model(rt.ref.name, rt.ref.version)
            return resp.model_info(rt, state)

    async def Predict(self, request, context):
        with self.live(request.model) as rt:
            top_k = rt.top_k(request.options.top_k or None)
            level = rt.level(request.priority)
            sources = _sources(rt, request.images)
            decoded, outcomes = await rt.predict(sources, context, level=level)
            return pb.PredictResponse(results=[
                resp.predict_result(o, rt.model.labels, top_k, d.image.size, d.ms, rt.worker,
                                    rt.model.embeds)
                for d, o in zip(decoded, outcomes)])

    async def Explain(self, request, context):
        with self.live(request.model) as rt:
            answer, _ = await _explain(rt, request.images, request.options, context,
                                       rt.level(request.priority))
            return answer

    async def CheckSanity(self, request, context):
        with self.live(request.model) as rt:
            sources = _sources(rt, request.images)
            plan = sanity.plan(request, rt.model, rt.limits, len(sources))
            if rt.sanity is None:
                raise Unavailable("this server runs no sanity checks", reason="NO_SANITY_CHECKS")
            decoded = await rt.decode_all(sources)
            report = await sanity.run(rt.sanity, [d.image.pixels for d in decoded], plan,
                                      calls.deadline(context))
            return sanity.response(report)

    # --- the models --------------------------------------------------------------------------

    async def ListModels(self, request, context):
        if self.models is None:
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=self.models.statuses(request.ready))

    async def LoadModel(self, request, context):
        self._admin.check(context)
        models = self._loaded()
        future = models.load(request.name)
        if not request.no_wait:
            try:
                await asyncio.wrap_future(future)
            except ServiceError:
                raise
            except Exception as exc:  # the load's own error: the server is fine
                raise FailedPrecondition(f"model {request.name!r} failed to load: "
                                         f"{words(exc)}", field="name",
                                         reason="MODEL_FAILED") from None
        return pb.LoadModelResponse(models=models.of(request.name))

    async def UnloadModel(self, request, context):
        self._admin.check(context)
        models = self._loaded()
        await asyncio.wrap_future(models.unload(request.name, request.version))
        return pb.UnloadModelResponse(models=models.of(request.name))

    def _loaded(self) -> Registry:
        if self.models is None or self.state != pb.SERVER_STATE_SERVING:
            raise Unavailable("the server is not serving yet (or is shutting down); retry "
                              "shortly", reason="LOADING")
        return self.models

    async def CompareExplain(self, request, context):
        if len(request.models) < 2:
            raise InvalidArgument(f"CompareExplain needs two or more models, got "
                                  f"{len(request.models)}: name each, e.g. resnet:1 and "
                                  "resnet:2", field="models", reason="TOO_FEW_MODELS")
        with contextlib.ExitStack() as held:
            rts = [held.enter_context(self.live(ref, f"models[{i}]"))
                   for i, ref in enumerate(request.models)]
            for i, rt in enumerate(rts[1:], 1):
                if rt.model.labels != rts[0].model.labels:
                    raise InvalidArgument(
                        f"models[{i}] has other labels than models[0] ({rt.model.num_classes} "
                        f"and {rts[0].model.num_classes} classes): their maps of a class do "
                        "not compare", field=f"models[{i}]", reason="LABELS_DIFFER")
            options, level = request.options, rts[0].level(request.priority)
            first, outcomes = await _explain(rts[0], request.images, options, context, level)
            answers, results = [first], [outcomes]
            for rt in rts[1:]:
                if options.targets or options.similar_to or options.similar_to_image:
                    # the same classes, or the same concept (similar_to_image: each model's
                    # own output of that image)
                    answer, outcomes = await _explain(rt, request.images, options, context,
                                                      level)
                else:  # each image's map of the class model 0 explained
                    answer, outcomes = await _explain_as(rt, request.images, options,
                                                         results[0], context, level)
                answers.append(answer)
                results.append(outcomes)
            return pb.CompareExplainResponse(
                explanations=answers, similarities=compare.similarities(results))
    # --- streams -----------------------------------------------------------------------------

    async def StreamPredict(self, requests, context, frames):
        def configure(rt: Pipeline, options) -> int:
            return rt.top_k(options.top_k or None)

        async def prepare(rt: Pipeline, frame, top_k: int, level: int) -> Prepared:
            d = await rt.decode(req.source(frame.image, "frame.image"), "frame.image",
                                level=level)

            async def finish(o: Outcome):
                return resp.predict_result(o, rt.model.labels, top_k, d.image.size, d.ms,
                                           rt.worker, rt.model.embeds)
            return Prepared(WorkItem(d.image.pixels), finish, rt.batcher, level)

        def answer(frame_id, skipped, result=None, error=None):
            return pb.StreamPredictResponse(frame_id=frame_id, skipped=skipped, result=result,
                                            error=_status(error))

        async for message in self._stream(requests, context, frames, configure,
                                          pb.PredictOptions, prepare, answer):
            yield message

    async def StreamExplain(self, requests, context, frames):
        def configure(rt: Pipeline, options) -> req.ExplainPlan:
            plan = rt.explain_plan(options)
            if plan.similar_to_image:
                raise InvalidArgument(
                    "config.options.similar_to_image names another image of the request, and "
                    "a stream's frames come one at a time: send the concept itself, "
                    "config.options.similar_to (e.g. that image's Predict embedding)",
                    field="config.options.similar_to_image", reason="NOT_APPLICABLE")
            return plan

        async def prepare(rt: Pipeline, frame, plan: req.ExplainPlan, level: int) -> Prepared:
            d = await rt.decode(req.source(frame.image, "frame.image"), "frame.image",
                                full=plan.outputs.overlay_format is not None, level=level)

            async def finish(o: Outcome):
                def build():
                    return resp.explain_result(o, rt.model.labels, plan, d.image.size, d.ms,
                                               rt.worker, d.image.full)
                return (await rt.in_pool(build, level=level) if plan.outputs.needs_heatmap
                        else build())
            return Prepared(WorkItem(d.image.pixels, plan.spec), finish, rt.batcher, level)

        def answer(frame_id, skipped, result=None, error=None):
            return pb.StreamExplainResponse(frame_id=frame_id, skipped=skipped, result=result,
                                            error=_status(error))

        async for message in self._stream(requests, context, frames, configure,
                                          pb.ExplainOptions, prepare, answer):
            yield message

    async def _stream(self, requests, context, frames, configure, options_type, prepare,
                      answer):
        """A stream's frames go to the model its last config named (the default model until
        one does); every model it named is held until the stream ends."""
        with contextlib.ExitStack() as held:
            default = held.enter_context(self.live())
            chosen = {}

            def configure_on(config):
                rt = default
                if config.HasField("model"):
                    key = (config.model.name, config.model.version)
                    if key not in chosen:
                        chosen[key] = held.enter_context(self.live(config.model,
                                                                   "config.model"))
                    rt = chosen[key]
                level = rt.level(config.priority, "stream", "config.priority")
                return rt, configure(rt, config.options), level

            async def prepare_on(frame, options) -> Prepared:
                rt, own, level = options
                return await prepare(rt, frame, own, level)

            async for message in self._session(
                    default, requests, context, frames, configure_on,
                    (default, configure(default, options_type()), default.level(0, "stream")),
                    prepare_on,
                    answer):
                yield message

    async def _session(self, rt: Pipeline, requests, context, frames, configure, default,
                       prepare, answer):
        if self.open_streams >= rt.limits.max_streams:
            raise ResourceExhausted(
                f"this server has {self.open_streams} streams open, its limit (max_streams); "
                f"retry in {STREAMS_RETRY_S:g} s or use another replica",
                retry_after_s=STREAMS_RETRY_S, reason="TOO_MANY_STREAMS")
        self.open_streams += 1
        try:
            session = StreamSession(
                requests, configure=configure, default_options=default,
                prepare=prepare, answer=answer,
                max_in_flight=rt.limits.max_stream_frames_in_flight,
                idle_s=rt.limits.stream_idle_s, deadline=calls.deadline(context),
                frames=frames, tally=self.stream_frames)
            async for message in session.answers():
                yield message
        finally:
            self.open_streams -= 1


async def _explain(rt: Pipeline, images, options, context, level: int = INTERACTIVE
                   ) -> Tuple[pb.ExplainResponse, List[Outcome]]:
    """An Explain call's answer, and its outcomes (CompareExplain reads their raw maps)."""
    plan = rt.explain_plan(options)
    sources = _sources(rt, images)
    plan = await rt.with_concept(sources, plan, context, level=level)
    decoded, outcomes = await rt.explain(sources, plan, context, level=level)

    def build() -> pb.ExplainResponse:
        return pb.ExplainResponse(results=[
            resp.explain_result(o, rt.model.labels, plan, d.image.size, d.ms, rt.worker,
                                d.image.full)
            for d, o in zip(decoded, outcomes)])

    answer = await rt.in_pool(build) if plan.outputs.needs_heatmap else build()
    return answer, outcomes


async def _explain_as(rt: Pipeline, images, options, first: List[Outcome], context,
                      level: int = INTERACTIVE) -> Tuple[pb.ExplainResponse, List[Outcome]]:
    """Explain each image on ``rt`` for the class its first map explained in ``first`` (model
    0's outcomes): one call per class, answered in image order."""
    wanted = [o.result.maps[0].target if o.result.maps else 0 for o in first]
    answer, outcomes = pb.ExplainResponse(), [None] * len(images)
    results = [None] * len(images)
    for target in dict.fromkeys(wanted):
        picked = [i for i, t in enumerate(wanted) if t == target]
        own = pb.ExplainOptions()
        own.CopyFrom(options)
        own.ClearField("top_targets")
        own.targets.add(class_index=target)
        part, got = await _explain(rt, [images[i] for i in picked], own, context, level)
        for i, result, outcome in zip(picked, part.results, got):
            results[i], outcomes[i] = result, outcome
    answer.results.extend(results)
    return answer, outcomes


def _sources(rt: Pipeline, images) -> list:
    """A request's images as the pipeline's sources, after the per-request checks."""
    rt.count(len(images), "images")
    return [req.source(image, f"images[{i}]") for i, image in enumerate(images)]


def _status(error: Optional[ServiceError]) -> Any:
    return None if error is None else calls.status_of(error)
