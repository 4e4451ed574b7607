"""Loading the classifier: the model its source builds (``sources.py``), on its device, with its
labels (``labels.py``) and the layers that may be explained (``layers.py``), rewritten for speed
where the rewrite leaves its logits unchanged (``fold.py``, ``same_padding.py``).

Nothing here downloads anything unless the spec asks for ``--weights pretrained``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..domain import ModelCard
from .cams import guidable
from .fold import fold_batchnorms
from .labels import find_labels
from .layers import choose_layers, gradcam_is_zero, probe_images, probe_model
from .placement import resolve_device
from .same_padding import static_same_padding
from .sources import build_model
from .spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """The model ready to run: the module on its device, and its torch-free description."""

    module: nn.Module  # eval mode, parameters frozen, on ``device``
    device: torch.device
    card: ModelCard  # name, labels, input size, normalisation, explainable layers
    load_seconds: float


def output_activation(module: nn.Module) -> str:
    """What the model says its outputs are: its ``output_activation`` attribute ("sigmoid" or
    "embedding"), "sigmoid" for a Hugging Face config whose problem_type is
    multi_label_classification (a wrapper's inner model's too); else "softmax"."""
    for m in (module, getattr(module, "model", None)):
        config = getattr(m, "config", None)
        said = getattr(m, "output_activation", None)
        if said in ("sigmoid", "embedding"):
            return said
        if getattr(config, "problem_type", None) == "multi_label_classification":
            return "sigmoid"
    return "softmax"


def load_model(spec: ModelSpec, device: Optional[torch.device] = None) -> LoadedModel:
    """Build the model the spec names, load its weights, find its labels and layers; on
    ``device``, or else CUDA's current GPU when there is one, else the CPU."""
    started = time.perf_counter()
    device = device if device is not None else resolve_device("auto")
    built = build_model(spec)
    module = built.module
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    module.to(device)
    input_size = spec.input_size or built.input_size
    mean = spec.mean or built.mean
    std = spec.std or built.std

    probe = probe_model(module, input_size, device, hookable=built.hookable)
    labels = find_labels(spec.labels, probe.num_classes, built.labels)
    images = probe_images(input_size, device)
    layers = choose_layers(
        spec.layers or built.layers, probe, hookable=built.hookable, model=spec.source,
        zero_map=lambda name, grid: gradcam_is_zero(module, name, grid, images),
        reasons=None if spec.layers else built.reasons)
    for info in layers:
        log.info("layer %s (%dx%d, %d channels): %s", info.name, info.height, info.width,
                 info.channels, info.reason)
    if spec.input_size is None and built.size_reason:
        log.info("input size %dx%d: %s", input_size[0], input_size[1], built.size_reason)
    served = [info.name for info in layers]
    activation = spec.output_activation or output_activation(module)
    if spec.fold_batchnorm and built.hookable:
        module, folds = fold_batchnorms(module, tuple(input_size), device, keep=served)
        log.info("%d batch norms folded into their convolutions", folds)
    if spec.static_padding and built.hookable:
        module, pads = static_same_padding(module, tuple(input_size), device, keep=served)
        if pads:
            log.info("%d convolutions' \"same\" padding made static", pads)
    card = ModelCard(name=spec.source, labels=labels, input_size=tuple(input_size),
                     mean=tuple(mean), std=tuple(std), layers=layers, device=str(device),
                     guided=guidable(module), output_activation=activation)
    return LoadedModel(module=module, device=device, card=card,
                       load_seconds=time.perf_counter() - started)
