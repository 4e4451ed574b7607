"""The steps every request takes, whatever protocol it came by: check it against the model and
the server's limits, decode its images in the pool, queue them on the batcher, wait.

The protocol adapters (``servicer.py`` for camserve.v1, ``oip.py`` for the Open Inference
Protocol) only turn their messages into these calls and the outcomes into their answers, so a
check, a limit or its message is written once, here or in ``request.py``, and every protocol
answers it alike. Decoding and rendering run in one bounded thread pool (Pillow and NumPy
release the GIL), so the event loop never blocks on them; the batcher's worker thread is the
only one that touches the model. A call with one image, while the batcher is idle (see
Batcher.idle), has its worker decode it instead (the same decode): the call then passes
between threads twice instead of four times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from camserve.v1 import camserve_pb2 as pb

from ..batching.batcher import Batcher
from ..batching.levels import INTERACTIVE, LevelPool, Scheduling
from ..batching.tickets import Outcome, Ticket
from ..domain import DeferredDecode, ExplainSpec, ModelCard, Source, WorkItem
from ..errors import Cancelled, InvalidArgument, ServiceError
from ..render import images
from . import calls
from . import request as req
from . import response as resp
from .streams import settled


@dataclass(frozen=True)
class RequestLimits:
    """The bounds on one request, stream or answer (the server flags of the same names)."""

    max_images_per_request: int
    max_maps_per_image: int
    max_score_cam_channels: int
    max_faithfulness_steps: int
    max_item_cost: int
    max_render_pixels: int
    max_message_bytes: int
    max_stream_frames_in_flight: int
    max_streams: int
    stream_idle_s: float

    @property
    def max_queued_forwards(self) -> int:
        """The extra forwards (Score-CAM, faithfulness) queued and running at once, and so
        the most one request may ask for: four of the costliest images."""
        return 4 * self.max_item_cost


@dataclass(frozen=True)
class DecodedImage:
    image: images.Decoded
    ms: float


@dataclass(frozen=True)
class Pipeline:
    """Everything a request needs once the model is loaded, and the steps it takes."""

    model: ModelCard
    batcher: Batcher
    labels: req.LabelIndex
    limits: RequestLimits
    image_limits: images.Limits
    pool: LevelPool  # decoding and rendering
    batching: pb.BatchingInfo  # as GetModelInfo shows it
    worker: int = 0  # this process's number among --workers (0: the only one)
    sanity: Any = None  # engine/sanity.py's SanityChecker: CheckSanity runs on it
    ref: Any = None  # pb.ModelRef: the model's name in the repository and its version
    scheduling: Scheduling = Scheduling()  # the queue's levels and each kind's default

    # --- checks --------------------------------------------------------------------------

    def count(self, images: int, field: str) -> None:
        """A request's image count: at least one, at most max_images_per_request."""
        if images < 1:
            raise InvalidArgument("the request has no images; add at least one", field=field,
                                  reason="NO_IMAGES")
        limit = self.limits.max_images_per_request
        if images > limit:
            raise InvalidArgument(f"the request has {images} images; this server takes at most "
                                  f"{limit} per request (max_images_per_request): split it",
                                  field=field, reason="TOO_MANY_IMAGES")

    def level(self, priority: int, kind: str = "unary", field: str = "priority") -> int:
        """The queue level of a call's ``priority`` (0: ``kind``'s default, unary or stream);
        a caller without a priority token gets no level above --highest-priority."""
        s = self.scheduling
        return req.level(priority, getattr(s, kind), s.levels,
                         0 if calls.PRIVILEGED.get() else s.highest, field)

    def top_k(self, value: Optional[int], field: str = "options.top_k") -> int:
        """How many classes an answer ranks: ``value`` (None: the default), at most all."""
        return req.top_k(value, self.model.num_classes, field)

    def explain_plan(self, options: pb.ExplainOptions) -> req.ExplainPlan:
        return req.explain_plan(options, self.model, self.labels, self.limits)

    def check_explain(self, plan: req.ExplainPlan, sources: Sequence[Source]) -> None:
        """What a whole request's explanations may cost, and its answer weigh, before any
        work."""
        req.check_request_cost(plan.spec, len(sources), self.limits.max_queued_forwards)
        if plan.outputs.needs_heatmap:  # only rendered pictures depend on an image's size
            sizes = [images.peek_size(source) for source in sources]
        else:
            sizes = [(1, 1)] * len(sources)
        total = sum(resp.explain_bound(plan, size, self.model) for size in sizes
                    if size is not None)
        limit = self.limits.max_message_bytes
        if total > limit:
            raise InvalidArgument(
                f"the answer would take up to {total / 2**20:.0f} MiB ({len(sources)} images x "
                f"{plan.maps} maps), over the {limit / 2**20:.0f} MiB message limit "
                "(max_message_bytes): send fewer images per call, ask for fewer maps, or for "
                "raw maps or JPEG overlays instead of PNGs", field="options.outputs",
                reason="ANSWER_TOO_LARGE")

    # --- the steps -----------------------------------------------------------------------

    async def predict(self, sources: Sequence[Source], context, field: str = "images",
                      level: int = INTERACTIVE) -> Tuple[List[DecodedImage], List[Outcome]]:
        return await self.decode_and_run(sources, None, context, field=field, level=level)

    async def explain(self, sources: Sequence[Source], plan: req.ExplainPlan, context,
                      field: str = "images", level: int = INTERACTIVE
                      ) -> Tuple[List[DecodedImage], List[Outcome]]:
        self.check_explain(plan, sources)
        return await self.decode_and_run(sources, plan.spec, context,
                                         full=plan.outputs.overlay_format is not None,
                                         field=field, level=level)

    async def with_concept(self, sources: Sequence[Source], plan: req.ExplainPlan, context,
                           field: str = "images", level: int = INTERACTIVE) -> req.ExplainPlan:
        """``plan`` with its similarity concept: the output of the request's image
        ``similar_to_image`` (one more forward of it); ``plan`` itself without one."""
        at = plan.similar_to_image
        if not at:
            return plan
        self.check_explain(plan, sources)
        if at > len(sources):
            raise InvalidArgument(f"options.similar_to_image is {at}, and the request has "
                                  f"{len(sources)} images: name one of them, counting from 1",
                                  field="options.similar_to_image", reason="INVALID_OPTION")
        _, (outcome,) = await self.decode_and_run([sources[at - 1]], None, context,
                                                  field=f"{field}[{at - 1}]", level=level)
        concept = tuple(float(v) for v in outcome.result.logits)
        if not any(concept):
            raise InvalidArgument(f"{field}[{at - 1}]'s output is all zero: its cosine "
                                  "similarity is undefined; name another image",
                                  field="options.similar_to_image", reason="NO_CONCEPT")
        return dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, concept=concept),
                                   similar_to_image=0)

    def decode_here(self, source: Source, field: str, full: bool = False) -> DecodedImage:
        """Decode and resize one image on this thread; ``full`` keeps it whole for overlays."""
        started = time.perf_counter()
        try:
            image = images.prepare(source, self.model.input_size, self.image_limits,
                                   self.limits.max_render_pixels if full else None)
        except ServiceError as exc:
            raise exc.at(field, f"{field} ") from None
        return DecodedImage(image, (time.perf_counter() - started) * 1000.0)

    async def decode(self, source: Source, field: str, full: bool = False,
                     level: int = INTERACTIVE) -> DecodedImage:
        """Decode and resize one image in the pool, at that level (a stream frame's: STREAM)."""
        return await self.in_pool(self.decode_here, source, field, full, level=level)

    async def decode_all(self, sources: Sequence[Source], full: bool = False,
                         field: str = "images", level: int = INTERACTIVE) -> List[DecodedImage]:
        """Decode the images in the pool; ``field``: the request's field that holds them."""
        if len(sources) == 1:  # no task to schedule, one event-loop turn less
            return [await self.decode(sources[0], f"{field}[0]", full, level)]
        return list(await asyncio.gather(*(self.decode(s, f"{field}[{i}]", full, level)
                                           for i, s in enumerate(sources))))

    async def decode_and_run(self, sources: Sequence[Source], explain: Optional[ExplainSpec],
                             context, full: bool = False, field: str = "images",
                             level: int = INTERACTIVE
                             ) -> Tuple[List[DecodedImage], List[Outcome]]:
        """Decode the images and run them through the batcher. One image while the batcher is
        idle: its worker decodes it, just before the batch; otherwise the pool decodes them
        all first (announced to the batcher meanwhile). A call the queue would refuse now is
        refused before any decoding."""
        self.batcher.check(len(sources), level, calls.CALLER.get(),
                           explain is not None and explain.extra_cost > 0)
        if len(sources) == 1 and self.batcher.idle():
            decoded: List[DecodedImage] = []

            def decode():
                decoded.append(self.decode_here(sources[0], f"{field}[0]", full))
                return decoded[0].image.pixels
            outcomes = await self.run([WorkItem(DeferredDecode(decode), explain)], context,
                                      level)
            return decoded, outcomes
        with self.batcher.arriving(len(sources)):
            decoded = await self.decode_all(sources, full, field, level)
        return decoded, await self.run([WorkItem(d.image.pixels, explain) for d in decoded],
                                       context, level)

    async def run(self, works: Sequence[WorkItem], context,
                  level: int = INTERACTIVE) -> List[Outcome]:
        """Queue every item, then wait for all; a caller that goes away (or whose deadline
        passes) withdraws its queued items."""
        deadline = calls.deadline(context)
        tickets: List[Ticket] = []
        try:
            caller = calls.CALLER.get()
            for i, work in enumerate(works):  # admitted or refused whole, at the first item
                tickets.append(self.batcher.submit(work, deadline, level, caller,
                                                   0 if i else len(works)))
            for ticket in tickets:
                await settled(ticket)
        except BaseException:
            for ticket in tickets:
                ticket.withdraw()
            raise
        return [outcome(ticket) for ticket in tickets]

    async def in_pool(self, function, *args, level: int = INTERACTIVE):
        """``function(*args)`` on the pool's threads, whose tasks wait in priority levels, the
        callers taking turns within each."""
        return await asyncio.wrap_future(self.pool.submit_for(level, calls.CALLER.get(),
                                                              function, *args))


def outcome(ticket: Ticket) -> Outcome:
    """A settled ticket's outcome; its error raised."""
    if ticket.cancelled():
        raise Cancelled("the call was cancelled")
    return ticket.result()
