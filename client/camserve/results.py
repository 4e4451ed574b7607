"""What the client's calls return: plain, immutable values built from the server's answers."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional, Tuple

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


@dataclass(frozen=True)
class Explanation:
    """One image's explanation.

    ``raw`` is the map at the layer's grid (float32, unnormalised; None if RAW_MAP was not
    asked for). ``heatmap`` is computed from it on first use: normalised to [0, 1] and resized
    to the original image size. ``overlay()`` blends it over the image the call was given.
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

    @classmethod
    def from_proto(cls, msg: pb.ExplainResult, image: Any = None) -> Explanation:
        raw = None
        if msg.HasField("raw_map"):
            raw = np.asarray(msg.raw_map.values, dtype=np.float32).reshape(
                msg.raw_map.height, msg.raw_map.width)
        return cls(
            prediction=Prediction.from_proto(msg.prediction, msg.image_size, msg.timing),
            target=ClassScore.from_proto(msg.target), method=method_name(msg.method),
            layer=msg.layer, raw=raw, image_size=(msg.image_size.height, msg.image_size.width),
            timing=Timing.from_proto(msg.timing), heatmap_png=msg.heatmap_png or None,
            overlay_image=msg.overlay or None, overlay_format=msg.overlay_format or None,
            image=image)

    @cached_property
    def heatmap(self) -> np.ndarray:
        """float32 (H, W) in [0, 1] at the original image size."""
        if self.raw is not None:
            return maps.heatmap(self.raw, self.image_size)
        if self.heatmap_png is not None:
            from PIL import Image

            return np.asarray(Image.open(io.BytesIO(self.heatmap_png)), np.float32) / 255.0
        raise ValueError("this explanation has neither the raw map nor the heatmap PNG: ask for "
                         "outputs=('raw',) or ('heatmap',)")

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """uint8 (H, W, 3) RGB: the heatmap colour-mapped and blended over the image."""
        from .images import load_rgb

        if self.image is None:
            raise ValueError("this explanation does not hold its image; pass it to explain()")
        return maps.overlay(load_rgb(self.image), self.heatmap, alpha)


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
