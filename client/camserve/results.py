"""What the client's calls return: plain, immutable values built from the server's answers."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import maps
from .methods import method_name
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
    """Server-side milliseconds: waiting in the queue, the batch's compute, decoding, answering."""

    queue_ms: float
    compute_ms: float
    batch_size: int
    decode_ms: float
    respond_ms: float

    @classmethod
    def from_proto(cls, msg: pb.Timing) -> Timing:
        return cls(msg.queue_ms, msg.compute_ms, msg.batch_size, msg.decode_ms, msg.respond_ms)


@dataclass(frozen=True)
class Prediction:
    top: Tuple[ClassScore, ...]  # best first
    image_size: Size
    timing: Optional[Timing] = None

    @property
    def best(self) -> ClassScore:
        return self.top[0]

    @classmethod
    def from_proto(cls, msg: pb.Prediction, image_size: pb.ImageSize,
                   timing: Optional[pb.Timing]) -> Prediction:
        return cls(tuple(ClassScore.from_proto(c) for c in msg.top),
                   (image_size.height, image_size.width),
                   Timing.from_proto(timing) if timing is not None else None)


def _raw(msg) -> Optional[np.ndarray]:
    if not msg.HasField("raw_map"):
        return None
    return np.asarray(msg.raw_map.values, dtype=np.float32).reshape(msg.raw_map.height,
                                                                      msg.raw_map.width)


def _png_heatmap(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)), np.float32) / 255.0


@dataclass(frozen=True, eq=False)
class ClassMap:
    """One map: ``method``'s explanation of ``target`` at ``layer``.

    ``raw``: float32 at the layer's grid (None unless "raw" was asked for); ``heatmap``: the
    raw map resized to the image and scaled to [0, 1], computed on first use (or read from the
    server's PNG). ``deletion``/``insertion``: faithfulness scores when asked for.
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

    @classmethod
    def from_proto(cls, msg, image_size: Size) -> ClassMap:
        scored = msg.HasField("faithfulness")
        return cls(ClassScore.from_proto(msg.target), method_name(msg.method), msg.layer,
                   _raw(msg), image_size, msg.heatmap_png or None, msg.overlay or None,
                   msg.faithfulness.deletion if scored else None,
                   msg.faithfulness.insertion if scored else None)

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

    ``maps`` holds every map asked for, one per (method, target, layer); the first one's
    fields are repeated here: ``target``, ``method``, ``layer``, ``raw`` (the map at the
    layer's grid, float32, unnormalised; None if "raw" was not asked for), ``heatmap``
    (normalised to [0, 1] at the original image size, computed on first use) and ``overlay()``
    (blended over the image the call was given).
    """

    prediction: Prediction
    target: ClassScore
    method: str
    layer: str
    raw: Optional[np.ndarray]
    image_size: Size
    timing: Timing
    heatmap_png: Optional[bytes] = None
    overlay_image: Optional[bytes] = None  # encoded, as the server rendered it
    overlay_format: Optional[str] = None
    image: Any = field(default=None, repr=False, compare=False)  # what the caller passed
    maps: Tuple[ClassMap, ...] = ()
    combined_images: Tuple[Tuple[str, int, Optional[bytes], Optional[bytes]], ...] = field(
        default=(), repr=False)  # (method, class, heatmap PNG, overlay) rendered by the server

    @classmethod
    def from_proto(cls, msg: pb.ExplainResult, image: Any = None) -> Explanation:
        size = (msg.image_size.height, msg.image_size.width)
        first = ClassMap(ClassScore.from_proto(msg.target), method_name(msg.method), msg.layer,
                         _raw(msg), size, msg.heatmap_png or None, msg.overlay or None)
        all_maps = tuple(ClassMap.from_proto(m, size) for m in msg.maps) or (first,)
        first = all_maps[0]  # the top-level fields repeat it
        return cls(
            prediction=Prediction.from_proto(msg.prediction, msg.image_size, msg.timing),
            target=first.target, method=first.method, layer=first.layer, raw=first.raw,
            image_size=size, timing=Timing.from_proto(msg.timing),
            heatmap_png=first.heatmap_png, overlay_image=first.overlay_image,
            overlay_format=msg.overlay_format or None, image=image, maps=all_maps,
            combined_images=tuple((method_name(c.method), c.target.index, c.heatmap_png or None,
                                   c.overlay or None) for c in msg.combined))

    @property
    def heatmap(self) -> np.ndarray:
        """float32 (H, W) in [0, 1] at the original image size (of the first map)."""
        return self.maps[0].heatmap

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

    def overlay(self, alpha: float = 0.5, heatmap: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 (H, W, 3) RGB: a heatmap (the first map's by default) colour-mapped and
        blended over the image."""
        from .images import load_rgb

        if self.image is None:
            raise ValueError("this explanation does not hold its image; pass it to explain()")
        return maps.overlay(load_rgb(self.image), self.heatmap if heatmap is None else heatmap,
                            alpha)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    labels: Tuple[str, ...]
    input_size: Size
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    layers: Tuple[LayerInfo, ...]
    default_layer: str
    methods: Tuple[str, ...]
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    device: str
    max_image_bytes: int
    max_image_pixels: int
    max_images_per_request: int
    state: str  # "loading", "serving" or "draining"

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=msg.name, labels=tuple(msg.labels),
            input_size=(msg.input_size.height, msg.input_size.width),
            mean=tuple(msg.mean), std=tuple(msg.std),
            layers=tuple(LayerInfo(i.name, i.channels, i.height, i.width) for i in msg.layers),
            default_layer=msg.default_layer,
            methods=tuple(method_name(m) for m in msg.methods),
            max_batch_size=msg.batching.max_batch_size, max_delay_ms=msg.batching.max_delay_ms,
            max_queue=msg.batching.max_queue, device=msg.device,
            max_image_bytes=msg.limits.max_image_bytes,
            max_image_pixels=msg.limits.max_image_pixels,
            max_images_per_request=msg.limits.max_images_per_request,
            state=pb.ServerState.Name(msg.state)[len("SERVER_STATE_"):].lower())
