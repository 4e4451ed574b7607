"""What the client's calls return: plain, immutable values built from the server's answers."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from . import maps
from .methods import method_name, target_kind_name
from .v1 import camserve_pb2 as pb

Size = Tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float
    logit: float

    @classmethod
    def from_proto(cls, msg: pb.ClassScore) -> ClassScore:
        return cls(msg.index, msg.label, msg.probability, msg.logit)


@dataclass(frozen=True)
class Timing:
    """Server-side milliseconds (waiting in the queue, the batch's compute, decoding,
    answering), the batch's size, and who served it: ``worker`` (0 for a single-process
    server, 1..N with --workers N) and ``device``."""

    queue_ms: float
    compute_ms: float
    batch_size: int
    decode_ms: float
    respond_ms: float
    worker: int = 0
    device: str = ""

    @classmethod
    def from_proto(cls, msg: pb.Timing) -> Timing:
        return cls(msg.queue_ms, msg.compute_ms, msg.batch_size, msg.decode_ms, msg.respond_ms,
                   msg.worker, msg.device)


@dataclass(frozen=True)
class Prediction:
    top: Tuple[ClassScore, ...]  # best first (none for an embedding model)
    image_size: Size
    timing: Optional[Timing] = None
    embedding: Optional[np.ndarray] = None  # an embedding model's output, float32


    @property
    def best(self) -> ClassScore:
        return self.top[0]

    @classmethod
    def from_proto(cls, msg: pb.Prediction, image_size: pb.ImageSize,
                   timing: Optional[pb.Timing], embedding: Sequence[float] = ()) -> Prediction:
        return cls(tuple(ClassScore.from_proto(c) for c in msg.top),
                   (image_size.height, image_size.width),
                   Timing.from_proto(timing) if timing is not None else None,
                   np.asarray(embedding, np.float32) if len(embedding) else None)


def _raw(msg) -> Optional[np.ndarray]:
    if not msg.HasField("raw_map"):
        return None
    return np.asarray(msg.raw_map.values, dtype=np.float32).reshape(msg.raw_map.height,
                                                                      msg.raw_map.width)


def _png_heatmap(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)), np.float32) / 255.0


@dataclass(frozen=True)
class Note:
    """A remark the server made about an answer: ``kind`` (e.g. "all_zero",
    "unlikely_class", "render_downscaled") for programs, ``message`` for people."""

    kind: str
    message: str

    @classmethod
    def from_proto(cls, msg: pb.Note) -> Note:
        return cls(pb.NoteKind.Name(msg.kind)[len("NOTE_KIND_"):].lower(), msg.message)


def _notes(msg) -> Tuple[Note, ...]:
    return tuple(Note.from_proto(n) for n in msg.notes)


@dataclass(frozen=True, eq=False)
class ClassMap:
    """One map: ``method``'s explanation of ``target`` at ``layer``.

    ``raw``: float32 at the layer's grid, or at the model's input size for the guided methods
    (None unless "raw" was asked for); ``target_kind``: the score explained; ``heatmap``: the
    raw map resized to the image and scaled to [0, 1], computed on first use (or read from the
    server's PNG). ``deletion``/``insertion``: faithfulness scores when asked for. ``notes``:
    the server's remarks (an all-zero map, a class the model does not see here).
    """

    target: ClassScore
    method: str
    layer: str
    raw: Optional[np.ndarray]
    image_size: Size
    heatmap_png: Optional[bytes] = None
    overlay_image: Optional[bytes] = None
    deletion: Optional[float] = None
    insertion: Optional[float] = None
    notes: Tuple[Note, ...] = ()
    target_kind: str = "logit"  # the score explained: "logit", "softmax", "rest", ...
    similarity: Optional[float] = None  # target_kind "similarity": the cosine similarity
    # ROAD, when road_percentiles were asked for: the mean MoRF change (lower is better),
    # the mean LeRF change (higher is better), (LeRF - MoRF) / 2 (higher is better)
    road_morf: Optional[float] = None
    road_lerf: Optional[float] = None
    road_combined: Optional[float] = None

    @classmethod
    def from_proto(cls, msg: pb.ClassMap, image_size: Size) -> ClassMap:
        f = msg.faithfulness
        scored, road = bool(f.steps), bool(f.road_percentiles)
        return cls(ClassScore.from_proto(msg.target), method_name(msg.method), msg.layer,
                   _raw(msg), image_size, msg.heatmap_png or None, msg.overlay or None,
                   f.deletion if scored else None, f.insertion if scored else None,
                   _notes(msg), target_kind_name(msg.target_kind),
                   msg.similarity if msg.target_kind == pb.TARGET_KIND_SIMILARITY else None,
                   f.road_morf if road else None, f.road_lerf if road else None,
                   f.road_combined if road else None)

    @property
    def all_zero(self) -> bool:
        """Whether the server found the map zero everywhere (its heatmap is blank)."""
        return any(n.kind == "all_zero" for n in self.notes)

    @cached_property
    def heatmap(self) -> np.ndarray:
        """float32 (H, W) in [0, 1] at the original image size."""
        if self.raw is not None:
            return maps.heatmap(self.raw, self.image_size)
        if self.heatmap_png is not None:
            return _png_heatmap(self.heatmap_png)
        raise ValueError("this map has neither the raw map nor the heatmap PNG: ask for "
                         "outputs=('raw',) or ('heatmap',)")


@dataclass(frozen=True, eq=False)
class Explanation:
    """One image's explanation.

    ``maps`` holds every map asked for, one per (method, target, layer). For the common case
    of one map, ``target``, ``method``, ``layer``, ``raw``, ``heatmap``, ``heatmap_png``,
    ``overlay_image`` and ``notes`` are the first map's, and ``overlay()`` blends its heatmap
    over the image the call was given.
    """

    prediction: Prediction
    maps: Tuple[ClassMap, ...]
    image_size: Size
    timing: Timing
    overlay_format: Optional[str] = None  # "jpeg" or "png", when overlays were asked for
    rendered_size: Optional[Size] = None  # heatmap PNGs' and overlays' size, when asked for
    notes: Tuple[Note, ...] = ()  # remarks about the whole answer (e.g. render_downscaled)
    image: Any = field(default=None, repr=False, compare=False)  # what the caller passed
    combined_images: Tuple[Tuple[str, int, Optional[bytes], Optional[bytes]], ...] = field(
        default=(), repr=False)  # (method, class, heatmap PNG, overlay) rendered by the server

    @classmethod
    def from_proto(cls, msg: pb.ExplainResult, image: Any = None) -> Explanation:
        size = (msg.image_size.height, msg.image_size.width)
        formats = {pb.IMAGE_FORMAT_JPEG: "jpeg", pb.IMAGE_FORMAT_PNG: "png"}
        return cls(
            prediction=Prediction.from_proto(msg.prediction, msg.image_size, msg.timing),
            maps=tuple(ClassMap.from_proto(m, size) for m in msg.maps),
            image_size=size, timing=Timing.from_proto(msg.timing),
            overlay_format=formats.get(msg.overlay_format),
            rendered_size=((msg.rendered_size.height, msg.rendered_size.width)
                           if msg.HasField("rendered_size") else None),
            notes=_notes(msg), image=image,
            combined_images=tuple((method_name(c.method), c.target.index, c.heatmap_png or None,
                                   c.overlay or None) for c in msg.combined))

    @property
    def first(self) -> ClassMap:
        if not self.maps:
            raise ValueError("this explanation has no maps")
        return self.maps[0]

    @property
    def target(self) -> ClassScore:
        return self.first.target

    @property
    def method(self) -> str:
        return self.first.method

    @property
    def layer(self) -> str:
        return self.first.layer

    @property
    def raw(self) -> Optional[np.ndarray]:
        return self.first.raw

    @property
    def heatmap_png(self) -> Optional[bytes]:
        return self.first.heatmap_png

    @property
    def overlay_image(self) -> Optional[bytes]:
        return self.first.overlay_image

    @property
    def heatmap(self) -> np.ndarray:
        """float32 (H, W) in [0, 1] at the original image size (of the first map)."""
        return self.first.heatmap

    def map(self, method: Optional[str] = None, target: Union[int, str, None] = None,
            layer: Optional[str] = None) -> ClassMap:
        """The first map that matches (target: a class index or label)."""
        for m in self.maps:
            if (method in (None, m.method) and layer in (None, m.layer)
                    and target in (None, m.target.index, m.target.label)):
                return m
        raise KeyError(f"no map for method={method!r} target={target!r} layer={layer!r}")

    def combined_heatmap(self, method: Optional[str] = None,
                         target: Union[int, str, None] = None) -> np.ndarray:
        """The mean of the per-layer heatmaps of one method and class (the first by default)."""
        first = self.map(method, target)
        layers = [m for m in self.maps
                  if m.method == first.method and m.target.index == first.target.index]
        return np.mean([m.heatmap for m in layers], axis=0)

    @cached_property
    def _pixels(self) -> np.ndarray:
        """The image the call was given, decoded once for every overlay()."""
        from .images import load_rgb

        if self.image is None:
            raise ValueError("this explanation does not hold its image; pass it to explain()")
        return load_rgb(self.image)

    def overlay(self, alpha: float = 0.5, heatmap: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 (H, W, 3) RGB: a heatmap (the first map's by default) colour-mapped and
        blended over the image."""
        return maps.overlay(self._pixels, self.heatmap if heatmap is None else heatmap, alpha)


@dataclass(frozen=True)
class LayerInfo:
    """A layer the server explains: its map is a ``height`` x ``width`` grid of ``channels``
    features; ``layout`` says how the layer's output was laid out ("nchw", "tokens" after
    ``prefix_tokens`` class/register tokens, or "nhwc")."""

    name: str
    channels: int
    height: int
    width: int
    layout: str = "nchw"
    prefix_tokens: int = 0
    reason: str = ""  # why the server serves it (the default's rule, or "named by --layer")


@dataclass(frozen=True)
class MethodInfo:
    """What a method needs (a backward pass or not) and whether its map depends on the class."""

    name: str
    needs_backward: bool
    class_discriminative: bool


@dataclass(frozen=True)
class LevelPolicy:
    """One priority's queue policy (0: no bound): items answered within ``max_wait_ms`` of
    being queued, else DEADLINE_EXCEEDED, unless ``delay`` (they then wait behind every other
    item); at most ``max_queued`` waiting and ``max_batch`` in one batch."""

    priority: int
    max_wait_ms: float = 0.0
    delay: bool = False
    max_queued: int = 0
    max_batch: int = 0


def _float32(value: float) -> float:
    """A float32 field as the decimal it was set from: the shortest one that rounds to the
    same float32 (0.485, not 0.48500001430511475)."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    state: str  # "loading", "serving", "recovering" or "draining"
    labels: Tuple[str, ...] = ()
    input_size: Size = (0, 0)
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    layers: Tuple[LayerInfo, ...] = ()
    default_layer: str = ""
    methods: Tuple[str, ...] = ()  # the method names Explain accepts
    method_info: Tuple[MethodInfo, ...] = ()
    max_batch_size: int = 0
    max_delay_ms: float = 0.0
    max_queue: int = 0
    workers: int = 0
    devices: Tuple[str, ...] = ()
    max_image_bytes: int = 0
    max_image_pixels: int = 0
    max_images_per_request: int = 0
    max_message_bytes: int = 0
    max_score_cam_channels: int = 0
    max_faithfulness_steps: int = 0
    model: str = ""  # the model's name in the server's repository
    version: int = 0  # the version described
    priority_levels: int = 0  # the queue's levels: 1 (the highest) to priority_levels
    level_share: int = 0  # a waiting lower level goes first after this many above it
    max_queue_per_caller: int = 0  # 0: only max_queue bounds a caller
    tenant_header: bool = False  # callers named by x-camserve-tenant
    unary_priority: int = 0  # the priority of a unary call that asks for none
    stream_priority: int = 0  # ... of a stream frame
    expensive_priority: int = 0  # ... of an item with extra forwards (the highest it may have)
    highest_priority: int = 0  # the highest a call may ask for without a priority token
    level_policies: Tuple[LevelPolicy, ...] = ()  # the priorities with bounds of their own
    output_activation: str = ""  # softmax, or sigmoid for a multi-label model

    @property
    def device(self) -> str:
        return self.devices[0] if self.devices else ""

    @classmethod
    def from_proto(cls, msg: pb.GetModelInfoResponse) -> ModelInfo:
        layouts = {pb.LAYER_LAYOUT_TOKENS: "tokens", pb.LAYER_LAYOUT_NHWC: "nhwc"}
        return cls(
            name=msg.name, state=pb.ServerState.Name(msg.state)[len("SERVER_STATE_"):].lower(),
            labels=tuple(msg.labels), input_size=(msg.input_size.height, msg.input_size.width),
            mean=tuple(_float32(v) for v in msg.mean), std=tuple(_float32(v) for v in msg.std),
            layers=tuple(LayerInfo(i.name, i.channels, i.height, i.width,
                                   layouts.get(i.layout, "nchw"), i.prefix_tokens,
                                   i.reason)
                         for i in msg.layers),
            default_layer=msg.default_layer,
            methods=tuple(method_name(m.method) for m in msg.methods),
            method_info=tuple(MethodInfo(method_name(m.method), m.needs_backward,
                                         m.class_discriminative) for m in msg.methods),
            max_batch_size=msg.batching.max_batch_size,
            max_delay_ms=_float32(msg.batching.max_delay_ms),
            max_queue=msg.batching.max_queue, workers=msg.batching.workers,
            devices=tuple(msg.devices),
            max_image_bytes=msg.limits.max_image_bytes,
            max_image_pixels=msg.limits.max_image_pixels,
            max_images_per_request=msg.limits.max_images_per_request,
            max_message_bytes=msg.limits.max_message_bytes,
            max_score_cam_channels=msg.limits.max_score_cam_channels,
            max_faithfulness_steps=msg.limits.max_faithfulness_steps,
            model=msg.model.name, version=msg.model.version,
            priority_levels=msg.batching.priority_levels,
            level_share=msg.batching.level_share,
            max_queue_per_caller=msg.batching.max_queue_per_caller,
            tenant_header=msg.batching.tenant_header,
            unary_priority=msg.batching.unary_priority,
            stream_priority=msg.batching.stream_priority,
            expensive_priority=msg.batching.expensive_priority,
            highest_priority=msg.batching.highest_priority,
            level_policies=tuple(LevelPolicy(p.priority, _float32(p.max_wait_ms), p.delay,
                                             p.max_queued, p.max_batch)
                                 for p in msg.batching.level_policies),
            output_activation=msg.output_activation)


@dataclass(frozen=True)
class ModelStatus:
    """One version of one model the server knows (``Client.models()``)."""

    name: str
    version: int  # 0: a model of the repository that was never loaded
    state: str  # "loading", "ready", "unloading", "failed" or "unloaded"
    error: str = ""  # failed: why
    is_default: bool = False  # calls that name no model go to it
    bytes: int = 0  # its parameters and buffers on its devices
    source: str = ""  # e.g. "torchvision:resnet18"

    @classmethod
    def from_proto(cls, msg: pb.ModelStatus) -> ModelStatus:
        return cls(msg.name, msg.version,
                   pb.ModelState.Name(msg.state)[len("MODEL_STATE_"):].lower(), msg.error,
                   msg.is_default, msg.bytes, msg.source)


@dataclass(frozen=True)
class Similarity:
    """How alike two models' maps of one image are (``Client.compare``)."""

    first: int  # the index of the first model, in the order they were named
    second: int
    method: str
    target: int  # the class both maps explain
    spearman: float  # Spearman's rank correlation of the raw maps, in [-1, 1]


@dataclass(frozen=True)
class Comparison:
    """One image explained on several models: each model's Explanation, in the order the
    models were named, and the similarity of every pair's maps."""

    explanations: Tuple[Explanation, ...]
    similarities: Tuple[Similarity, ...]


@dataclass(frozen=True)
class SanityStage:
    """A stage of the cascading randomisation: the modules whose parameters are random."""

    name: str  # "head", "head + 2", ...
    modules: Tuple[str, ...]


@dataclass(frozen=True)
class MethodSanity:
    """One method's sanity figures (Spearman's rank correlation of raw maps, averaged over
    the images) and verdicts."""

    method: str
    randomisation: Tuple[float, ...]  # per stage: |correlation| trained vs randomised
    randomisation_passed: bool  # below the threshold at the verdict stage
    discrimination: float  # correlation of the top class's map with another class's
    discrimination_passed: bool

    @property
    def passed(self) -> bool:
        return self.randomisation_passed and self.discrimination_passed


@dataclass(frozen=True)
class SanityReport:
    """What ``Client.check_sanity`` returns: the parameter-randomisation check (Adebayo et al.
    2018, cascading from the top of the model) and the class-discrimination check, per
    method."""

    layer: str
    stages: Tuple[SanityStage, ...]
    verdict_stage: int  # the index into stages whose figures decide randomisation_passed
    threshold: float  # a method passes a check when its correlation is below this
    classes: Tuple[Tuple[int, int], ...]  # per image: (top class, contrast class)
    methods: Tuple[MethodSanity, ...]
    seed: int = 0

    def method(self, name: str) -> MethodSanity:
        """The figures of one method; KeyError if it was not checked."""
        for m in self.methods:
            if m.method == name:
                return m
        raise KeyError(name)

    @classmethod
    def from_proto(cls, msg: pb.CheckSanityResponse) -> SanityReport:
        return cls(
            layer=msg.layer,
            stages=tuple(SanityStage(s.name, tuple(s.modules)) for s in msg.stages),
            verdict_stage=msg.verdict_stage, threshold=msg.threshold,
            classes=tuple((c.top, c.contrast) for c in msg.classes),
            methods=tuple(MethodSanity(method_name(m.method), tuple(m.randomisation),
                                       m.randomisation_passed, m.discrimination,
                                       m.discrimination_passed) for m in msg.methods),
            seed=msg.seed)
