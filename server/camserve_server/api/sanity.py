"""CheckSanity at the edge: the request validated into a SanityPlan, the SanityReport turned
into the answer. Torch-free; the measuring is ``engine/sanity.py``'s."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Optional, Sequence

import numpy as np

from camserve.methods import method_value
from camserve.v1 import camserve_pb2 as pb

from ..domain import METHODS, SANITY_STAGES, ModelCard, SanityPlan, SanityReport
from ..errors import Cancelled, DeadlineExceeded, InvalidArgument, ServiceError
from . import request as req
from .pipeline import RequestLimits

DEFAULT_SCORE_CAM_CHANNELS = 16
DEFAULT_THRESHOLD = 0.5


def plan(request: pb.CheckSanityRequest, model: ModelCard, limits: RequestLimits,
         images: int) -> SanityPlan:
    """Validate everything but the images; raises InvalidArgument naming the field."""
    # The methods and the layer are checked as Explain checks them (known, served here, an
    # explainable layer), with the messages named after this request's fields.
    options = pb.ExplainOptions(methods=request.methods, score_cam_channels=1,
                                layers=[request.layer] if request.layer else [])
    try:
        spec = req.explain_plan(options, model, req.LabelIndex(()), limits).spec
    except InvalidArgument as exc:
        raise req.renamed(exc, (("options.layers[0]", "layer"), ("options.", ""))) from None
    methods = spec.methods if request.methods else tuple(METHODS)
    layer = spec.layers[0]
    channels = 0
    if any(METHODS[m].channel_forwards for m in methods):
        widest = model.layer(layer).channels
        cap = limits.max_score_cam_channels
        channels = min(request.score_cam_channels or min(DEFAULT_SCORE_CAM_CHANNELS, cap),
                       widest)
        if channels > cap:
            raise InvalidArgument(
                f"score_cam_channels {channels} is over this server's {cap} "
                "(max_score_cam_channels): ask for fewer", field="score_cam_channels",
                reason="TOO_MANY_CHANNELS")
    classes = model.num_classes
    if classes < 2:
        raise InvalidArgument(f"the model has {classes} class; class discrimination needs two",
                              field="contrast_rank")
    rank = request.contrast_rank or classes // 2
    if rank >= classes:
        raise InvalidArgument(f"contrast_rank {request.contrast_rank} is out of range: the model "
                              f"has {classes} classes, so 1..{classes - 1} (0: the middle rank)",
                              field="contrast_rank", reason="INVALID_RANK")
    stages = request.stages or SANITY_STAGES
    if stages > SANITY_STAGES:
        raise InvalidArgument(f"stages must be 1..{SANITY_STAGES} (0: all), not {stages}",
                              field="stages", reason="INVALID_STAGES")
    threshold = request.threshold or DEFAULT_THRESHOLD
    if not 0 < threshold <= 1:  # also NaN
        raise InvalidArgument(f"threshold must be in (0, 1] (0: {DEFAULT_THRESHOLD}), not "
                              f"{request.threshold}", field="threshold",
                              reason="INVALID_THRESHOLD")
    result = SanityPlan(methods=methods, layer=layer, score_cam_channels=channels,
                        contrast_rank=rank, stages=stages, seed=request.seed,
                        threshold=threshold)
    _check_cost(result, images, limits)
    return result


def _check_cost(p: SanityPlan, images: int, limits: RequestLimits) -> None:
    per_image = p.cost
    total = per_image * images
    if per_image > limits.max_item_cost or total > limits.max_queued_forwards:
        raise InvalidArgument(
            f"this check costs about {total:,} forwards ({images} images x {per_image:,}: "
            f"{len(p.methods)} methods, 2 classes, the trained model and {p.stages} stages"
            + (f", Score-CAM on {p.score_cam_channels} channels" if p.score_cam_channels else "")
            + f"); this server allows {limits.max_item_cost:,} per image (max_item_cost) and "
            f"{limits.max_queued_forwards:,} per request: send fewer images, fewer methods or "
            "stages, or lower score_cam_channels", field="images", reason="REQUEST_TOO_COSTLY")


def response(report: SanityReport) -> pb.CheckSanityResponse:
    return pb.CheckSanityResponse(
        layer=report.layer, verdict_stage=max(report.verdict_stage, 0),
        threshold=report.threshold, seed=report.seed,
        stages=[pb.SanityStage(name=s.name, modules=s.modules) for s in report.stages],
        classes=[pb.SanityClasses(top=top, contrast=other) for top, other in report.classes],
        methods=[pb.MethodSanity(
            method=method_value(m.method),
            randomisation=m.randomisation, randomisation_passed=m.randomisation_pass,
            discrimination=m.discrimination, discrimination_passed=m.discrimination_pass)
            for m in report.methods])


async def run(checker, pixels: Sequence[np.ndarray], plan: SanityPlan,
              deadline: Optional[float]) -> SanityReport:
    """Run a check on ``checker`` (engine/sanity.py's SanityChecker: its own thread, one check
    at a time) without blocking the event loop. A caller that goes away, or whose deadline
    passes, stops the check at its next step."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future = loop.create_future()
    gone = threading.Event()

    def stop() -> Optional[ServiceError]:
        if gone.is_set():
            return Cancelled("the call was cancelled")
        if deadline is not None and time.monotonic() >= deadline:
            return DeadlineExceeded("the deadline passed during the sanity check, which runs "
                                    "several explanations of every image per method: allow "
                                    "more time, or send fewer images or methods")
        return None

    def settle(value: object) -> None:
        if not answer.done():
            answer.set_result(value)

    def done(value: object) -> None:
        try:
            loop.call_soon_threadsafe(settle, value)
        except RuntimeError:  # the loop closed: the server stopped
            pass

    checker.start(pixels, plan, stop, done)
    try:
        value = await answer
    except asyncio.CancelledError:
        gone.set()
        raise
    if isinstance(value, ServiceError):
        raise value
    return value
