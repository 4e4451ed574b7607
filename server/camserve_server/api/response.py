"""From engine results to protobuf answers (the handler's side of the edge, on the way out).

Rendering (heatmap PNG, overlay) happens here, in the handler thread, with the same NumPy
functions the client uses (``camserve.maps``).
"""

from __future__ import annotations

import io
from typing import Callable, Tuple

import numpy as np
from PIL import Image

from camserve import maps
from camserve.methods import method_value
from camserve.v1 import camserve_pb2 as pb

from ..batching.batcher import Outcome
from ..domain import ItemResult, Outputs


def class_score(result: ItemResult, index: int, labels) -> pb.ClassScore:
    return pb.ClassScore(index=index, label=labels[index],
                         probability=float(result.probabilities[index]),
                         logit=float(result.logits[index]))


def prediction(result: ItemResult, labels, top_k: int) -> pb.Prediction:
    probs = result.probabilities
    best = np.argpartition(-probs, top_k - 1)[:top_k] if top_k < probs.size else np.arange(
        probs.size)
    best = best[np.argsort(-probs[best], kind="stable")]
    return pb.Prediction(top=[class_score(result, int(i), labels) for i in best])


def timing(outcome: Outcome, decode_ms: float) -> pb.Timing:
    """The item's timing; the handler fills in respond_ms once the answer is built."""
    return pb.Timing(queue_ms=outcome.queue_ms, compute_ms=outcome.compute_ms,
                     batch_size=outcome.batch_size, decode_ms=decode_ms)


def image_size(size: Tuple[int, int]) -> pb.ImageSize:
    return pb.ImageSize(height=int(size[0]), width=int(size[1]))


def predict_result(outcome: Outcome, labels, top_k: int, size,
                   decode_ms: float) -> pb.PredictResult:
    return pb.PredictResult(prediction=prediction(outcome.result, labels, top_k),
                            timing=timing(outcome, decode_ms),
                            image_size=image_size(size))


def explain_result(outcome: Outcome, labels, top_k: int, size, decode_ms: float,
                   outputs: Outputs, full_image: Callable[[], np.ndarray]) -> pb.ExplainResult:
    """Every map of one image; the first repeated in the top-level fields. ``full_image``
    gives the whole decoded image, and is called only when an overlay is asked for."""
    result = outcome.result
    image = _Once(full_image)
    heatmaps = {}
    answers = []
    for m in result.maps:
        answer = pb.ClassMap(target=class_score(result, m.target, labels),
                             method=method_value(m.method), layer=m.layer)
        if outputs.raw_map:
            answer.raw_map.height, answer.raw_map.width = m.raw.shape
            answer.raw_map.values.extend(m.raw.ravel().tolist())
        if outputs.needs_heatmap:
            heatmaps[(m.method, m.target, m.layer)] = heat = maps.heatmap(m.raw, size)
            _render(answer, heat, outputs, image)
        if m.deletion is not None:
            answer.faithfulness.deletion = m.deletion
            answer.faithfulness.insertion = m.insertion
            answer.faithfulness.steps = m.steps
        answers.append(answer)
    first = answers[0]
    out = pb.ExplainResult(
        prediction=prediction(result, labels, top_k), target=first.target, method=first.method,
        layer=first.layer, image_size=image_size(size), timing=timing(outcome, decode_ms),
        overlay_format=outputs.overlay_format or "")
    if first.HasField("raw_map"):
        out.raw_map.CopyFrom(first.raw_map)
    out.heatmap_png, out.overlay = first.heatmap_png, first.overlay
    if len(answers) > 1:
        out.maps.extend(answers)
    layers = list(dict.fromkeys(m.layer for m in result.maps))
    if len(layers) > 1:
        for method, target in dict.fromkeys((m.method, m.target) for m in result.maps):
            combined = pb.CombinedMap(target=class_score(result, target, labels),
                                      method=method_value(method), layers=layers)
            if outputs.needs_heatmap:
                mean = np.mean([heatmaps[(method, target, layer)] for layer in layers], axis=0)
                _render(combined, mean, outputs, image)
            out.combined.append(combined)
    return out


def _render(answer, heat: np.ndarray, outputs: Outputs, image: _Once) -> None:
    if outputs.heatmap_png:
        answer.heatmap_png = encode(np.round(heat * 255.0).astype(np.uint8), "png")
    if outputs.overlay_format is not None:
        answer.overlay = encode(maps.overlay(image(), heat), outputs.overlay_format)


class _Once:
    """Calls a function the first time it is needed and keeps the value."""

    def __init__(self, function: Callable[[], np.ndarray]) -> None:
        self._function, self._value = function, None

    def __call__(self) -> np.ndarray:
        if self._value is None:
            self._value = self._function()
        return self._value


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
