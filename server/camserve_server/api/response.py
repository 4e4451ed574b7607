"""From domain results to protobuf answers (the handler's side of the edge, on the way out).

Explanations are built one map at a time: each map's heatmap is rendered and encoded before
the next one's is made, and combined maps keep a running sum, so an answer holds at most one
full-size float heatmap besides that sum.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from camserve.methods import method_value, target_kind_value
from camserve.v1 import camserve_pb2 as pb

from ..batching.batcher import Outcome
from ..domain import METHODS, ItemResult, ModelCard, Outputs
from ..render import heatmaps
from ..render.images import render_size
from .request import ExplainPlan

UNLIKELY_PROBABILITY = 0.01  # below this, a map's class gets an UNLIKELY_CLASS note


def image_size(size: Tuple[int, int]) -> pb.ImageSize:
    return pb.ImageSize(height=int(size[0]), width=int(size[1]))


def class_score(result: ItemResult, index: int, labels: Sequence[str]) -> pb.ClassScore:
    return pb.ClassScore(index=index, label=labels[index],
                         probability=float(result.probabilities[index]),
                         logit=float(result.logits[index]))


def ranked(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` most probable classes, most probable first (ties: the lower
    index first), as every protocol's answer ranks them."""
    best = (np.argpartition(-probabilities, k - 1)[:k] if k < probabilities.size
            else np.arange(probabilities.size))
    return best[np.argsort(-probabilities[best], kind="stable")]


def prediction(result: ItemResult, labels: Sequence[str], top_k: int) -> pb.Prediction:
    """The ``top_k`` best classes (0: none, an embedding model's)."""
    if not top_k:
        return pb.Prediction()
    return pb.Prediction(top=[class_score(result, int(i), labels)
                              for i in ranked(result.probabilities, top_k)])


def timing(outcome: Outcome, decode_ms: float, worker: int) -> pb.Timing:
    """The item's timing; the caller fills in respond_ms once the answer is built."""
    return pb.Timing(queue_ms=outcome.queue_ms, compute_ms=outcome.compute_ms,
                     batch_size=outcome.batch_size, decode_ms=decode_ms, worker=worker,
                     device=outcome.device)


def predict_result(outcome: Outcome, labels: Sequence[str], top_k: int,
                   size: Tuple[int, int], decode_ms: float, worker: int,
                   embeds: bool = False) -> pb.PredictResult:
    """One image's Predict answer: its best classes, or (``embeds``: an embedding model's)
    its output vector."""
    started = time.perf_counter()
    result = pb.PredictResult(prediction=prediction(outcome.result, labels,
                                                    0 if embeds else top_k),
                              image_size=image_size(size),
                              timing=timing(outcome, decode_ms, worker),
                              embedding=outcome.result.logits.tolist() if embeds else ())
    result.timing.respond_ms = (time.perf_counter() - started) * 1000.0
    return result


def explain_result(outcome: Outcome, labels: Sequence[str], plan: ExplainPlan,
                   size: Tuple[int, int], decode_ms: float, worker: int,
                   full: Optional[np.ndarray]) -> pb.ExplainResult:
    """Every map of one image. ``full``: the image at the size overlays are rendered at (None
    unless an overlay was asked for)."""
    started = time.perf_counter()
    result, outputs = outcome.result, plan.outputs
    shown = tuple(full.shape[:2]) if full is not None else render_size(size,
                                                                       plan.render_pixels)
    out = pb.ExplainResult(
        prediction=prediction(result, labels, plan.top_k), image_size=image_size(size),
        timing=timing(outcome, decode_ms, worker),
        overlay_format={None: pb.IMAGE_FORMAT_UNSPECIFIED, "jpeg": pb.IMAGE_FORMAT_JPEG,
                        "png": pb.IMAGE_FORMAT_PNG}[outputs.overlay_format])
    if outputs.needs_heatmap:
        out.rendered_size.CopyFrom(image_size(shown))
        if shown != tuple(size):
            out.notes.add(kind=pb.NOTE_KIND_RENDER_DOWNSCALED, message=(
                f"heatmaps and overlays are {shown[1]}x{shown[0]}, not the image's "
                f"{size[1]}x{size[0]}: this server renders at most {plan.render_pixels:,} "
                "pixels (max_render_pixels); the raw map is the same at any size"))
    layers = list(dict.fromkeys(m.layer for m in result.maps))
    sums: Dict[Tuple[str, int], np.ndarray] = {}
    concept = plan.spec.concept
    similarity = _cosine(result.logits, concept) if concept else 0.0
    for m in result.maps:
        similar = m.target_kind == "similarity"
        answer = out.maps.add(target=pb.ClassScore(index=0, label="similarity") if similar
                              else class_score(result, m.target, labels),
                              method=method_value(m.method), layer=m.layer,
                              target_kind=target_kind_value(m.target_kind),
                              similarity=similarity if similar else 0.0)
        if outputs.raw_map:
            answer.raw_map.height, answer.raw_map.width = m.raw.shape
            answer.raw_map.values.extend(m.raw.ravel().tolist())
        if m.deletion is not None:
            answer.faithfulness.deletion = m.deletion
            answer.faithfulness.insertion = m.insertion
            answer.faithfulness.steps = m.steps
        if m.road is not None:
            f = answer.faithfulness
            f.road_morf, f.road_lerf, f.road_combined = m.road
            f.road_percentiles.extend(plan.spec.road_percentiles)
        _notes(answer, m.raw, 1.0 if similar else float(result.probabilities[m.target]),
               m.method, plan, m.no_gradient)
        if outputs.needs_heatmap:
            heat = heatmaps.heatmap(m.raw, shown)
            _render(answer, heat, outputs, full)
            if len(layers) > 1:
                key = (m.method, m.target)
                sums[key] = heat if key not in sums else sums[key] + heat
    if len(layers) > 1:
        for method, target in dict.fromkeys((m.method, m.target) for m in result.maps):
            similar = concept and target == 0
            combined = out.combined.add(target=pb.ClassScore(index=0, label="similarity")
                                        if similar else class_score(result, target, labels),
                                        method=method_value(method), layers=layers)
            if outputs.needs_heatmap:
                _render(combined, sums.pop((method, target)) / len(layers), outputs, full)
    out.timing.respond_ms = (time.perf_counter() - started) * 1000.0
    return out


def _cosine(output: np.ndarray, concept: Sequence[float]) -> float:
    """The cosine similarity the similarity target explains (torch's eps of 1e-8)."""
    vector = np.asarray(concept, dtype=np.float64)
    output = output.astype(np.float64)
    return float(output @ vector / max(np.linalg.norm(output) * np.linalg.norm(vector), 1e-8))


def explain_bound(plan: ExplainPlan, size: Tuple[int, int], card: ModelCard) -> int:
    """An upper estimate of one image's ExplainResult in bytes, before any work: what
    Explain checks against the message limit."""
    spec, outputs = plan.spec, plan.outputs
    total = 1024 + plan.top_k * 64 + plan.maps * 256
    if outputs.raw_map:
        guided = len(spec.methods) if spec.aug_smooth else sum(  # maps at the input's size
            METHODS[m].input_resolution for m in spec.methods)
        grids = sum(5 * card.layer(name).height * card.layer(name).width + 16
                    for name in spec.layers)
        pixels = len(spec.layers) * (5 * card.input_size[0] * card.input_size[1] + 16)
        total += spec.ranks * ((len(spec.methods) - guided) * grids + guided * pixels)
    if outputs.needs_heatmap:
        pictures = plan.maps + (len(spec.methods) * spec.ranks if len(spec.layers) > 1 else 0)
        total += pictures * heatmaps.encoded_size_bound(
            render_size(size, plan.render_pixels), outputs.heatmap_png, outputs.overlay_format)
    return total


def _notes(answer: pb.ClassMap, raw: np.ndarray, probability: float, method: str,
           plan: ExplainPlan, no_gradient: bool = False) -> None:
    if not np.any(raw) and no_gradient:
        answer.notes.add(kind=pb.NOTE_KIND_ALL_ZERO, message=(
            f"the map is zero everywhere, and its heatmap blank, because the gradient at layer "
            f"{answer.layer} is: the score of {answer.target.label!r} does not reach that "
            "layer's grid (after a transformer's last attention block only the class token "
            "reaches the logits, so the patch tokens get no gradient); explain an earlier "
            "layer, such as the last block's first norm"))
    elif not np.any(raw):
        why = ("lowers" if plan.spec.counterfactual else "raises")
        answer.notes.add(kind=pb.NOTE_KIND_ALL_ZERO, message=(
            f"the map is zero everywhere: nothing at layer {answer.layer} {why} the score of "
            f"{answer.target.label!r} here, so its heatmap is blank"))
    if probability < UNLIKELY_PROBABILITY and METHODS[method].class_discriminative:
        answer.notes.add(kind=pb.NOTE_KIND_UNLIKELY_CLASS, message=(
            f"{answer.target.label!r} has probability {probability:.2%} here: the model does "
            "not see that class in this image, so the map shows at most what would speak "
            "for it"))


def _render(answer, heat: np.ndarray, outputs: Outputs, full: Optional[np.ndarray]) -> None:
    if outputs.heatmap_png:
        answer.heatmap_png = heatmaps.heatmap_png(heat)
    if outputs.overlay_format is not None:
        answer.overlay = heatmaps.overlay(full, heat, outputs.overlay_format)


def model_info(pipeline, state: int) -> pb.GetModelInfoResponse:
    """GetModelInfo's answer for a loaded model (``pipeline``: pipeline.py's Pipeline)."""
    card, limits, images = pipeline.model, pipeline.limits, pipeline.image_limits
    layout = {"nchw": pb.LAYER_LAYOUT_NCHW, "tokens": pb.LAYER_LAYOUT_TOKENS,
              "nhwc": pb.LAYER_LAYOUT_NHWC}
    return pb.GetModelInfoResponse(
        name=card.name, state=state, labels=card.labels,
        input_size=image_size(card.input_size), mean=card.mean, std=card.std,
        layers=[pb.LayerInfo(name=i.name, channels=i.channels, height=i.height, width=i.width,
                             layout=layout[getattr(i, "layout", "nchw")],
                             prefix_tokens=getattr(i, "prefix_tokens", 0),
                             reason=getattr(i, "reason", ""))
                for i in card.layers],
        default_layer=card.default_layer or "",
        methods=[pb.MethodInfo(method=method_value(name), needs_backward=traits.needs_backward,
                               class_discriminative=traits.class_discriminative)
                 for name, traits in METHODS.items()
                 if card.guided or not traits.guided] if card.layers else [],
        batching=pipeline.batching,
        devices=list(card.devices), model=pipeline.ref,
        output_activation=card.output_activation,
        limits=pb.Limits(max_image_bytes=images.max_image_bytes,
                         max_image_pixels=images.max_image_pixels,
                         max_images_per_request=limits.max_images_per_request,
                         max_message_bytes=limits.max_message_bytes,
                         max_stream_frames_in_flight=limits.max_stream_frames_in_flight,
                         max_score_cam_channels=limits.max_score_cam_channels,
                         max_maps_per_image=limits.max_maps_per_image,
                         max_faithfulness_steps=limits.max_faithfulness_steps))
