"""From protobuf requests to validated domain values (the handler's side of the edge).

Everything a caller can get wrong is checked here and answered INVALID_ARGUMENT with a message
that says what to change and the field at fault. Enum values are named as the .proto names
them (``CAM_METHOD_GRADCAM``), in every message. Nothing here touches the model or torch.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from camserve.methods import method_name, target_kind_name
from camserve.v1 import camserve_pb2 as pb

from ..domain import (
    METHODS,
    SOFTMAX_KINDS,
    TARGET_KINDS,
    ExplainSpec,
    ModelCard,
    Outputs,
    RawPixels,
    Source,
)
from ..errors import FailedPrecondition, InvalidArgument, ServiceError, quote

if TYPE_CHECKING:
    from .pipeline import RequestLimits

DEFAULT_TOP_K = 5


def _enum_names(enum, skip_zero: bool = True) -> str:
    return ", ".join(name for name, value in enum.items() if value or not skip_zero)


class LabelIndex:
    """Case-insensitive label → class index lookup, built once per model."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self._by_name: Dict[str, List[int]] = {}
        for index, label in enumerate(self.labels):
            self._by_name.setdefault(label.strip().lower(), []).append(index)

    def index_of(self, label: str) -> int:
        key = label.strip().lower()
        matches = self._by_name.get(key)
        if not matches:
            close = difflib.get_close_matches(key[:200], list(self._by_name), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise InvalidArgument(f"no class is labelled {quote(label)}{hint} (GetModelInfo "
                                  "lists the labels)", reason="UNKNOWN_LABEL")
        if len(matches) > 1:
            raise InvalidArgument(f"label {quote(label)} names classes {matches}; pass the "
                                  "class index instead", reason="AMBIGUOUS_LABEL")
        return matches[0]


# --- images ----------------------------------------------------------------------------------


def source(image: pb.Image, field: str) -> Source:
    """One image as encoded bytes or RawPixels; ``field`` names it in an error."""
    which = image.WhichOneof("source")
    if which == "encoded":
        return image.encoded
    if which == "raw":
        return RawPixels(image.raw.pixels, image.raw.height, image.raw.width, image.raw.channels)
    raise InvalidArgument(f"{field} is empty: set encoded (file bytes) or raw (pixels)",
                          field=field, reason="INVALID_IMAGE")


# --- options ---------------------------------------------------------------------------------


def top_k(value: Optional[int], num_classes: int, field: str = "options.top_k") -> int:
    """How many classes an answer ranks: ``value`` (None: the default), at most all."""
    if value is None:
        value = DEFAULT_TOP_K
    if value < 1:
        raise InvalidArgument(f"{field} is {value}; it must be at least 1", field=field,
                              reason="INVALID_OPTION")
    return min(value, num_classes)


def level(priority: int, default: int, levels: int, highest: int,
          field: str = "priority") -> int:
    """The queue level (batching/levels.py, 0 the highest) of a call's ``priority``, Triton's
    meaning: 1 the highest, 0 the call's ``default`` level; never above ``highest``, asked or
    by default (a level: the highest a caller without a priority token may have)."""
    if priority != 0 and not 1 <= priority <= levels:
        raise InvalidArgument(f"{field} is {priority}; this server has priorities 1 (the "
                              f"highest) to {levels}, or 0 for the call's default",
                              field=field, reason="INVALID_PRIORITY")
    return max(priority - 1 if priority else default, highest)


@dataclass(frozen=True)
class ExplainPlan:
    """An ExplainOptions message, validated: what the engine computes and what the answer
    carries."""

    spec: ExplainSpec
    outputs: Outputs
    top_k: int
    render_pixels: int  # heatmaps and overlays are rendered at most this large
    similar_to_image: int = 0  # the similarity concept is this image's output (1-based; 0: none)

    @property
    def maps(self) -> int:
        spec = self.spec
        return len(spec.methods) * (len(spec.targets) or spec.top_targets) * len(spec.layers)


def _method(value: int, field: str) -> str:
    try:
        name = method_name(value)
    except ValueError:
        raise InvalidArgument(f"{field} is {value}, not a CamMethod; choose from "
                              f"{_enum_names(pb.CamMethod)}", field=field,
                              reason="UNKNOWN_METHOD") from None
    if name not in METHODS:
        raise InvalidArgument(f"{field} {pb.CamMethod.Name(value)} is not served here; choose "
                              f"from {', '.join(_method_enum(n) for n in METHODS)}",
                              field=field, reason="UNKNOWN_METHOD")
    return name


def _method_enum(name: str) -> str:
    return "CAM_METHOD_" + name.upper()


def _target_kind(value: int, methods: Sequence[str], field: str, model: ModelCard,
                 concept: bool = False) -> str:
    """The TargetKind's name (UNSPECIFIED: similarity when a ``concept`` is given, else
    logit), checked against the methods and the model."""
    if value not in pb.TargetKind.values():
        raise InvalidArgument(f"{field} is {value}, not a TargetKind; choose from "
                              f"{_enum_names(pb.TargetKind)}", field=field,
                              reason="INVALID_OPTION")
    kind = "similarity" if value == 0 and concept else target_kind_name(value)
    assert kind in TARGET_KINDS, kind
    if model.output_activation == "embedding" and kind not in ("similarity", "raw_scores"):
        raise InvalidArgument(
            f"{model.name} is an embedding model (its outputs are no classes): explain the "
            "similarity of its output to a concept, options.similar_to (a vector of "
            f"{model.num_classes} floats) or options.similar_to_image (another image of the "
            f"request), not TARGET_KIND_{kind.upper()}",
            field=f"{field.rsplit('.', 1)[0]}.similar_to", reason="NO_CONCEPT")
    sigmoid = model.output_activation == "sigmoid"
    if kind == "sigmoid" and not sigmoid:
        raise InvalidArgument(
            f"{field} TARGET_KIND_SIGMOID is a multi-label model's probability, and "
            f"{model.name}'s outputs are one softmax over its classes: ask for "
            "TARGET_KIND_SOFTMAX (or LOGIT), or serve a multi-label model", field=field,
            reason="NOT_APPLICABLE")
    if sigmoid and kind in SOFTMAX_KINDS:
        raise InvalidArgument(
            f"{field} TARGET_KIND_{kind.upper()} reads the logits as one softmax over the "
            f"classes, and {model.name} is multi-label (a sigmoid per class): ask for "
            "TARGET_KIND_SIGMOID (or LOGIT)", field=field, reason="NOT_APPLICABLE")
    for name in methods:
        own = METHODS[name].target_kind
        if own and kind not in ("logit", own):
            raise InvalidArgument(
                f"{_method_enum(name)} explains its own target, TARGET_KIND_{own.upper()}, and "
                f"{field} asks for TARGET_KIND_{kind.upper()}: leave {field} unset (or ask for "
                f"another method with TARGET_KIND_{kind.upper()})", field=field,
                reason="NOT_APPLICABLE")
    return kind


def _concept(options: pb.ExplainOptions, kind: str, model: ModelCard, scored: bool,
             f: str) -> Tuple[float, ...]:
    """TARGET_KIND_SIMILARITY's vector (empty with similar_to_image, resolved later), checked:
    a concept given for that kind alone, one of the two ways, as long as the model's output."""
    given, image = tuple(options.similar_to), options.similar_to_image
    if kind != "similarity":
        if given or image:
            raise InvalidArgument(
                f"{f}similar_to and {f}similar_to_image are the concept of "
                f"TARGET_KIND_SIMILARITY, and {f}target_kind asks for "
                f"TARGET_KIND_{kind.upper()}: unset {f}target_kind (or set it to "
                "TARGET_KIND_SIMILARITY)", field=f"{f}target_kind", reason="NOT_APPLICABLE")
        return ()
    if given and image:
        raise InvalidArgument(f"set {f}similar_to or {f}similar_to_image, not both",
                              field=f"{f}similar_to_image", reason="INVALID_OPTION")
    if not given and not image:
        raise InvalidArgument(
            f"TARGET_KIND_SIMILARITY needs a concept: set {f}similar_to (a vector of "
            f"{model.num_classes} floats, as long as the model's output) or "
            f"{f}similar_to_image (another image of the request)", field=f"{f}similar_to",
            reason="NO_CONCEPT")
    if given and len(given) != model.num_classes:
        raise InvalidArgument(
            f"{f}similar_to has {len(given)} values, and {model.name}'s output has "
            f"{model.num_classes}: send a vector of its length (e.g. another image's Predict "
            "embedding)", field=f"{f}similar_to", reason="CONCEPT_LENGTH")
    if given and (not all(math.isfinite(v) for v in given) or not any(given)):
        raise InvalidArgument(f"{f}similar_to must be finite and not all zero (its cosine "
                              "similarity is undefined otherwise)", field=f"{f}similar_to",
                              reason="CONCEPT_LENGTH")
    if options.targets or options.top_targets:
        raise InvalidArgument(f"a TARGET_KIND_SIMILARITY map explains one score, the "
                              f"similarity to the concept: unset {f}targets and "
                              f"{f}top_targets", field=f"{f}targets", reason="NOT_APPLICABLE")
    if scored:
        raise InvalidArgument(f"{f}faithfulness_steps and {f}road_percentiles score a class's "
                              "probability, and a TARGET_KIND_SIMILARITY map explains a "
                              f"similarity: unset {f}faithfulness_steps and "
                              f"{f}road_percentiles", field=f"{f}faithfulness_steps",
                              reason="NOT_APPLICABLE")
    return given


MAX_ROAD_PERCENTILES = 19  # e.g. every 5 % from 5 to 95


def _road(values: Sequence[int], field: str) -> Tuple[int, ...]:
    """ROAD's percentiles: each 1..99, none twice, at most MAX_ROAD_PERCENTILES."""
    bad = [v for v in values if not 1 <= v <= 99]
    if bad:
        raise InvalidArgument(f"{field} has {bad[0]}; a percentile of the pixels removed is "
                              "1..99 (pytorch-grad-cam's default: 10, 20, ..., 90)",
                              field=field, reason="INVALID_OPTION")
    if len(set(values)) != len(values) or len(values) > MAX_ROAD_PERCENTILES:
        raise InvalidArgument(f"{field} names {len(values)} percentiles; give at most "
                              f"{MAX_ROAD_PERCENTILES}, each once", field=field,
                              reason="INVALID_OPTION")
    return tuple(values)


def _eigen_smooth(value: bool, methods: Sequence[str], field: str) -> bool:
    """eigen_smooth, for methods whose map is a sum over channels only."""
    other = [m for m in methods if not METHODS[m].channel_sum]
    if value and other:
        raise InvalidArgument(
            f"{field} projects the terms a map sums over the channels, and "
            f"{_method_enum(other[0])}'s map is no such sum: unset {field}, or ask for one "
            f"of {', '.join(_method_enum(m) for m in METHODS if METHODS[m].channel_sum)}",
            field=field, reason="NOT_APPLICABLE")
    return value


def _aug_smooth(value: bool, methods: Sequence[str], field: str) -> bool:
    """aug_smooth, for methods whose maps are at the layer's grid from one forward only."""
    def fits(m: str) -> bool:
        return not (METHODS[m].input_resolution or METHODS[m].channel_forwards)

    other = [m for m in methods if not fits(m)]
    if value and other:
        raise InvalidArgument(
            f"{field} averages the heatmaps of 6 copies of the image, and "
            f"{_method_enum(other[0])} has its own resolution or runs a forward per channel: "
            f"unset {field}, or ask for one of "
            f"{', '.join(_method_enum(m) for m in METHODS if fits(m))}", field=field,
            reason="NOT_APPLICABLE")
    return value


def _layer(name: str, model: ModelCard, field: str) -> str:
    if not model.layers:
        raise FailedPrecondition(f"the model {model.name} has no explainable layer, so it serves "
                                 "Predict only (a TorchScript model, or one without a layer "
                                 "whose output is a grid)", field=field)
    if not name:
        return model.default_layer
    if model.layer(name) is None:
        names = [info.name for info in model.layers]
        raise InvalidArgument(f"{field} {quote(name)} is not a layer this server explains; "
                              f"choose from {', '.join(names)} (start the server with --layer "
                              "to add one)", field=field, reason="UNKNOWN_LAYER")
    return name


def _target(value: pb.Target, labels: LabelIndex, field: str) -> int:
    kind = value.WhichOneof("kind")
    if kind == "class_index":
        if value.class_index >= len(labels.labels):
            raise InvalidArgument(
                f"{field}.class_index {value.class_index} is out of range: the model has "
                f"{len(labels.labels)} classes (0..{len(labels.labels) - 1})",
                field=f"{field}.class_index", reason="UNKNOWN_CLASS")
        return value.class_index
    if kind == "label":
        try:
            return labels.index_of(value.label)
        except InvalidArgument as exc:
            raise exc.at(f"{field}.label", f"{field}.label: ") from None
    raise InvalidArgument(f"{field} is empty: set class_index or label", field=field,
                          reason="UNKNOWN_CLASS")


def _unique(values) -> tuple:
    return tuple(dict.fromkeys(values))


def _outputs(values: Sequence[int]) -> Outputs:
    known = set(pb.ExplainOutput.values())
    for i, v in enumerate(values):
        if v not in known:
            raise InvalidArgument(f"options.outputs[{i}] is {v}, not an ExplainOutput; choose "
                                  f"from {_enum_names(pb.ExplainOutput)}",
                                  field=f"options.outputs[{i}]", reason="UNKNOWN_OUTPUT")
    chosen = set(values) - {pb.EXPLAIN_OUTPUT_UNSPECIFIED} or {pb.EXPLAIN_OUTPUT_RAW_MAP}
    overlays = chosen & {pb.EXPLAIN_OUTPUT_OVERLAY_JPEG, pb.EXPLAIN_OUTPUT_OVERLAY_PNG}
    if len(overlays) > 1:
        raise InvalidArgument("options.outputs asks for two overlay formats: choose "
                              "EXPLAIN_OUTPUT_OVERLAY_JPEG or EXPLAIN_OUTPUT_OVERLAY_PNG",
                              field="options.outputs", reason="UNKNOWN_OUTPUT")
    overlay = None
    if overlays:
        overlay = "jpeg" if pb.EXPLAIN_OUTPUT_OVERLAY_JPEG in overlays else "png"
    return Outputs(raw_map=pb.EXPLAIN_OUTPUT_RAW_MAP in chosen,
                   heatmap_png=pb.EXPLAIN_OUTPUT_HEATMAP_PNG in chosen,
                   overlay_format=overlay)


def explain_plan(options: pb.ExplainOptions, model: ModelCard, labels: LabelIndex,
                 limits: RequestLimits) -> ExplainPlan:
    """Validate an ExplainOptions message (of an Explain call or a stream's config) against
    the model and the server's limits."""
    f = "options."
    methods = _unique(_method(v, f"{f}methods[{i}]") for i, v in enumerate(options.methods)) \
        or ("gradcam",)
    layers = _unique(_layer(name, model, f"{f}layers[{i}]")
                     for i, name in enumerate(options.layers)) or (_layer("", model, f"{f}layers"),)
    for i, name in enumerate(methods):
        if name == "ablationcam":
            grids = [n for n in layers if model.layer(n).layout != "nchw"]
            if grids:
                raise InvalidArgument(
                    f"{f}methods[{i}] CAM_METHOD_ABLATIONCAM ablates the channels of a "
                    f"convolutional layer's (N, C, h, w) output, and {quote(grids[0])} holds its "
                    f"grid as {model.layer(grids[0]).layout}: ask for another method (e.g. "
                    "CAM_METHOD_SCORECAM) there, or a convolutional layer",
                    field=f"{f}methods[{i}]", reason="NOT_APPLICABLE")
        if METHODS[name].guided and not model.guided:
            raise InvalidArgument(
                f"{f}methods[{i}] {_method_enum(name)} guides the backward through the model's "
                f"ReLU modules, and {model.name} has none (no nn.ReLU or nn.ReLU6: e.g. a "
                "GELU-only transformer, whose gradient would go unguided): ask for "
                "CAM_METHOD_GRADCAM or another method that needs no guided backward",
                field=f"{f}methods[{i}]", reason="NOT_APPLICABLE")
    targets = _unique(_target(t, labels, f"{f}targets[{i}]")
                      for i, t in enumerate(options.targets))
    if targets and options.top_targets:
        raise InvalidArgument("set options.targets or options.top_targets, not both",
                              field=f"{f}top_targets")
    top = min(options.top_targets or 1, len(labels.labels))
    maps = len(methods) * (len(targets) or top) * len(layers)
    if maps > limits.max_maps_per_image:
        raise InvalidArgument(f"{len(methods)} methods x {len(targets) or top} targets x "
                              f"{len(layers)} layers = {maps} maps per image; this server "
                              f"makes at most {limits.max_maps_per_image} "
                              "(max_maps_per_image): ask for fewer",
                              field=f"{f}methods", reason="TOO_MANY_MAPS")
    channels = 0
    if any(METHODS[m].channel_forwards for m in methods):
        # Unset: every channel, or the max_score_cam_channels most active ones of a wider
        # layer. Resolved to a count here, so that the item's cost is known.
        widest = max(model.layer(name).channels for name in layers)
        cap = limits.max_score_cam_channels
        channels = min(options.score_cam_channels or min(widest, cap), widest)
        if channels > cap:
            raise InvalidArgument(
                f"Score-CAM or AblationCAM on {channels} channels costs {channels} forwards "
                f"per map; this "
                f"server allows {cap} (max_score_cam_channels): set "
                f"options.score_cam_channels to at most that", field=f"{f}score_cam_channels",
                reason="TOO_MANY_CHANNELS")
    steps = options.faithfulness_steps
    if steps and not 2 <= steps <= limits.max_faithfulness_steps:
        raise InvalidArgument(f"options.faithfulness_steps must be 0 (off) or "
                              f"2..{limits.max_faithfulness_steps}, not {steps}",
                              field=f"{f}faithfulness_steps", reason="INVALID_STEPS")
    road = _road(options.road_percentiles, f"{f}road_percentiles")
    kind = _target_kind(options.target_kind, methods, f"{f}target_kind", model,
                        bool(options.similar_to or options.similar_to_image))
    concept = _concept(options, kind, model, bool(steps or road), f)
    if kind == "similarity":
        targets, top = (0,), 1
    spec = ExplainSpec(methods=methods, layers=layers, targets=targets, top_targets=top,
                       counterfactual=options.counterfactual, signed=options.keep_sign,
                       score_cam_channels=channels, faithfulness_steps=steps,
                       target_kind=kind, concept=concept, road_percentiles=road,
                       eigen_smooth=_eigen_smooth(options.eigen_smooth, methods,
                                                  f"{f}eigen_smooth"),
                       aug_smooth=_aug_smooth(options.aug_smooth, methods,
                                              f"{f}aug_smooth"))
    if spec.cost > limits.max_item_cost:
        raise InvalidArgument(
            f"this explanation costs about {spec.cost:,} forwards per image ({maps} maps"
            + (f", Score-CAM on {channels} channels" if channels else "")
            + (f", faithfulness in {steps} steps" if steps else "")
            + f"); this server allows {limits.max_item_cost:,} (max_item_cost): ask for fewer "
            "methods, targets or layers, or lower score_cam_channels or faithfulness_steps",
            field=f"{f}faithfulness_steps" if steps else f"{f}score_cam_channels",
            reason="ITEM_TOO_COSTLY")
    return ExplainPlan(spec, _outputs(options.outputs),
                       0 if model.embeds else top_k(options.top_k or None, model.num_classes),
                       limits.max_render_pixels,
                       options.similar_to_image)


def renamed(error: ServiceError, names: Sequence[Tuple[str, str]],
            fields: Optional[Sequence[Tuple[str, str]]] = None) -> ServiceError:
    """``error`` with the fields it names renamed (``names``: (old, new) pairs, applied in
    order, in its message, and in its field too unless ``fields`` gives other pairs for it):
    what explain_plan checks in an ExplainOptions, said in the terms of another request
    (CheckSanity's fields, the Open Inference Protocol's parameters)."""
    text, field = error.message, error.field or ""
    for old, new in names:
        text = text.replace(old, new)
    for old, new in names if fields is None else fields:
        field = field.replace(old, new)
    return type(error)(text, field=field or None, reason=error.reason,
                       retry_after_s=error.retry_after_s)


# --- streams ---------------------------------------------------------------------------------


def stream_policy(value: int) -> Optional[str]:
    """A config's policy: "all", "latest", or None when unset."""
    if value == pb.STREAM_POLICY_UNSPECIFIED:
        return None
    if value not in (pb.STREAM_POLICY_ALL, pb.STREAM_POLICY_LATEST):
        raise InvalidArgument(f"config.policy is {value}, not a StreamPolicy; choose "
                              f"{_enum_names(pb.StreamPolicy)}", field="config.policy",
                              reason="UNKNOWN_POLICY")
    return pb.StreamPolicy.Name(value)[len("STREAM_POLICY_"):].lower()


def check_request_cost(spec: ExplainSpec, images: int, max_forwards: int) -> None:
    """A request's extra forwards (Score-CAM, faithfulness) must fit what the server queues
    at once, or it could never run."""
    total = spec.extra_cost * images
    if total > max_forwards:
        raise InvalidArgument(
            f"these {images} images cost about {total:,} extra forwards (Score-CAM channels and "
            f"faithfulness steps, {spec.extra_cost:,} each); this server runs at most "
            f"{max_forwards:,} at once (4 x max_item_cost): send fewer images per call, or "
            "lower score_cam_channels or faithfulness_steps", field="images",
            reason="REQUEST_TOO_COSTLY")
