"""From engine results to protobuf answers (the handler's side of the edge, on the way out).

Rendering (heatmap PNG, overlay) happens here, in the handler thread, with the same NumPy
functions the client uses (``camserve.maps``).
"""

from __future__ import annotations

import io
from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image

from camserve import maps
from camserve.methods import method_value
from camserve.v1 import camserve_pb2 as pb

from .batcher import Outcome
from .engine import ItemResult
from .request import Outputs


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


def explain_result(outcome: Outcome, labels, top_k: int, size, decode_ms: float, method: str,
                   layer: str, outputs: Outputs,
                   full_image: Optional[Callable[[], np.ndarray]]) -> pb.ExplainResult:
    """``full_image`` gives the whole decoded image when an overlay is asked for."""
    result = outcome.result
    answer = pb.ExplainResult(
        prediction=prediction(result, labels, top_k),
        target=class_score(result, result.target, labels),
        method=method_value(method), layer=layer, image_size=image_size(size),
        timing=timing(outcome, decode_ms))
    raw = result.raw_map
    if outputs.raw_map:
        answer.raw_map.height, answer.raw_map.width = raw.shape
        answer.raw_map.values.extend(raw.ravel().tolist())
    if outputs.needs_heatmap:
        heat = maps.heatmap(raw, size)
        if outputs.heatmap_png:
            answer.heatmap_png = encode(np.round(heat * 255.0).astype(np.uint8), "png")
        if outputs.overlay_format is not None:
            answer.overlay = encode(maps.overlay(full_image(), heat), outputs.overlay_format)
            answer.overlay_format = outputs.overlay_format
    return answer


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
