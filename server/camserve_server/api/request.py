"""From protobuf requests to validated domain values (the handler's side of the edge).

Everything a caller can get wrong is checked here and answered INVALID_ARGUMENT with a message
that says what to change. Nothing here touches the model.
"""

from __future__ import annotations

import difflib
from typing import Dict, List, Optional, Sequence

from camserve.methods import method_name, method_names
from camserve.v1 import camserve_pb2 as pb

from ..domain import METHODS, ExplainSpec, ModelCard, Outputs, RawPixels, Source
from ..errors import FailedPrecondition, InvalidArgument

DEFAULT_TOP_K = 5

class LabelIndex:
    """Case-insensitive label → class index lookup, built once per model."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self._by_name: Dict[str, List[int]] = {}
        for index, label in enumerate(self.labels):
            self._by_name.setdefault(label.strip().lower(), []).append(index)

    def index_of(self, label: str) -> int:
        matches = self._by_name.get(label.strip().lower())
        if not matches:
            close = difflib.get_close_matches(label.strip().lower(), list(self._by_name), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise InvalidArgument(f"no class is labelled {label!r}{hint} (GetModelInfo lists "
                                  f"the labels)")
        if len(matches) > 1:
            raise InvalidArgument(f"label {label!r} names classes {matches}; pass the class "
                                  f"index instead")
        return matches[0]


def image_sources(images: Sequence[pb.Image], max_images: int) -> List[Source]:
    """The request's images as encoded bytes or RawPixels, after the per-request checks."""
    if not images:
        raise InvalidArgument("the request has no images; add at least one")
    if len(images) > max_images:
        raise InvalidArgument(f"the request has {len(images)} images; this server takes at most "
                              f"{max_images} per request (max_images_per_request): split it")
    return [source(image, f"image {i}") for i, image in enumerate(images)]


def source(image: pb.Image, name: str) -> Source:
    """One image as encoded bytes or RawPixels; ``name`` says which in an error."""
    which = image.WhichOneof("source")
    if which == "encoded":
        return image.encoded
    if which == "raw":
        return RawPixels(image.raw.pixels, image.raw.height, image.raw.width, image.raw.channels)
    raise InvalidArgument(f"{name} is empty: set encoded (file bytes) or raw (pixels)")


def stream_policy(request) -> Optional[str]:
    """The policy a stream message names: "all", "latest", or None when unset."""
    value = request.policy
    if value == pb.STREAM_POLICY_UNSPECIFIED:
        return None
    if value not in (pb.STREAM_POLICY_ALL, pb.STREAM_POLICY_LATEST):
        raise InvalidArgument(f"policy {value} is not a StreamPolicy; choose ALL or LATEST")
    return pb.StreamPolicy.Name(value)[len("STREAM_POLICY_"):].lower()


def top_k(value: int, num_classes: int) -> int:
    return min(value or DEFAULT_TOP_K, num_classes)


MAX_MAPS = 64  # methods x targets x layers per image
MAX_FAITHFULNESS_STEPS = 256


def method(value: int) -> str:
    try:
        name = method_name(value)
    except ValueError:
        raise InvalidArgument(f"method {value} is not a CamMethod; choose from "
                              f"{', '.join(method_names())}") from None
    if name not in METHODS:
        raise InvalidArgument(f"method {name!r} is not served here; choose from "
                              f"{', '.join(METHODS)}")
    return name


def layer(name: str, model: ModelCard) -> str:
    if not model.layers:
        raise FailedPrecondition(f"the model {model.name} has no explainable layer, so it serves "
                                 "Predict only (a TorchScript model, or one without a 4-D layer)")
    if not name:
        return model.default_layer
    if model.layer(name) is None:
        names = [info.name for info in model.layers]
        raise InvalidArgument(f"layer {name!r} is not one this server explains; choose from "
                              f"{', '.join(names)} (start the server with --layer to add one)")
    return name


def target(value: pb.Target, labels: LabelIndex) -> Optional[int]:
    kind = value.WhichOneof("kind")
    if kind == "class_index":
        if value.class_index >= len(labels.labels):
            raise InvalidArgument(f"class index {value.class_index} is out of range: the model "
                                  f"has {len(labels.labels)} classes (0..{len(labels.labels) - 1})")
        return value.class_index
    if kind == "label":
        return labels.index_of(value.label)
    return None


def _unique(values) -> tuple:
    return tuple(dict.fromkeys(values))


def explain_spec(request, model: ModelCard, labels: LabelIndex,
                 max_score_cam_channels: int) -> ExplainSpec:
    """The ExplainSpec of an ExplainRequest or StreamExplainRequest (they share field names)."""
    chosen = ([request.method] if request.method else []) + list(request.methods)
    methods = _unique(method(v) for v in chosen or [pb.CAM_METHOD_UNSPECIFIED])
    names = ([request.layer] if request.layer else []) + list(request.layers)
    layers = _unique(layer(name, model) for name in names or [""])
    given = ([request.target] if request.HasField("target") else []) + list(request.targets)
    targets = _unique(t for t in (target(v, labels) for v in given) if t is not None)
    if targets and request.top_targets:
        raise InvalidArgument("give target/targets or top_targets, not both")
    top = min(request.top_targets or 1, len(labels.labels))
    maps = len(methods) * (len(targets) or top) * len(layers)
    if maps > MAX_MAPS:
        raise InvalidArgument(f"{len(methods)} methods x {len(targets) or top} targets x "
                              f"{len(layers)} layers = {maps} maps per image; this server "
                              f"makes at most {MAX_MAPS}: ask for fewer")
    if "scorecam" in methods:
        widest = max(model.layer(name).channels for name in layers)
        channels = min(request.score_cam_channels or widest, widest)
        if channels > max_score_cam_channels:
            raise InvalidArgument(
                f"Score-CAM on {channels} channels costs {channels} forwards per map; this "
                f"server allows {max_score_cam_channels} (max_score_cam_channels): set "
                f"score_cam_channels to at most that")
    steps = request.faithfulness_steps
    if steps and not 2 <= steps <= MAX_FAITHFULNESS_STEPS:
        raise InvalidArgument(f"faithfulness_steps must be 0 (off) or 2..{MAX_FAITHFULNESS_STEPS},"
                              f" not {steps}")
    return ExplainSpec(methods=methods, layers=layers, targets=targets, top_targets=top,
                       counterfactual=request.counterfactual, signed=request.signed,
                       score_cam_channels=request.score_cam_channels, faithfulness_steps=steps)


def outputs(values: Sequence[int]) -> Outputs:
    known = set(pb.ExplainOutput.values())
    for v in values:
        if v not in known:
            raise InvalidArgument(f"output {v} is not an ExplainOutput; choose from "
                                  f"{', '.join(n for n, x in pb.ExplainOutput.items() if x)}")
    chosen = set(values) - {pb.EXPLAIN_OUTPUT_UNSPECIFIED} or {pb.EXPLAIN_OUTPUT_RAW_MAP}
    overlays = chosen & {pb.EXPLAIN_OUTPUT_OVERLAY_JPEG, pb.EXPLAIN_OUTPUT_OVERLAY_PNG}
    if len(overlays) > 1:
        raise InvalidArgument("ask for one overlay format: OVERLAY_JPEG or OVERLAY_PNG")
    overlay = None
    if overlays:
        overlay = "jpeg" if pb.EXPLAIN_OUTPUT_OVERLAY_JPEG in overlays else "png"
    return Outputs(raw_map=pb.EXPLAIN_OUTPUT_RAW_MAP in chosen,
                   heatmap_png=pb.EXPLAIN_OUTPUT_HEATMAP_PNG in chosen,
                   overlay_format=overlay)
