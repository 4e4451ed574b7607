"""Loading the classifier: the model its source builds (``sources.py``), on its device, with its
labels (``labels.py``) and the layers that may be explained (``layers.py``), rewritten for speed
where the rewrite leaves its logits unchanged (``fold.py``, ``same_padding.py``).

Nothing here downloads anything unless the settings ask for ``--weights pretrained``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..domain import ModelCard
from ..process.settings import Settings
from .fold import fold_batchnorms
from .labels import find_labels
from .layers import choose_layers, probe_model
from .placement import resolve_devices
from .same_padding import static_same_padding
from .sources import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """The model ready to run: the module on its device, and its torch-free description."""

    module: nn.Module  # eval mode, parameters frozen, on ``device``
    device: torch.device
    card: ModelCard  # name, labels, input size, normalisation, explainable layers
    load_seconds: float


def load_model(settings: Settings, device: Optional[torch.device] = None) -> LoadedModel:
    """Build the model the settings name, load its weights, find its labels and layers; on
    ``device``, or else the first of the settings' devices."""
    started = time.perf_counter()
    device = device if device is not None else resolve_devices(settings.device)[0]
    built = build_model(settings)
    module = built.module
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    module.to(device)
    input_size = settings.input_size or built.input_size
    mean = settings.mean or built.mean
    std = settings.std or built.std

    probe = probe_model(module, input_size, device, hookable=built.hookable)
    labels = find_labels(settings.labels, probe.num_classes, built.labels)
    layers = choose_layers(settings.layers or built.layers, probe, hookable=built.hookable,
                           model=settings.model)
    served = [info.name for info in layers]
    if settings.fold_batchnorm and built.hookable:
        module, folds = fold_batchnorms(module, tuple(input_size), device, keep=served)
        log.info("%d batch norms folded into their convolutions", folds)
    if settings.static_padding and built.hookable:
        module, pads = static_same_padding(module, tuple(input_size), device, keep=served)
        if pads:
            log.info("%d convolutions' \"same\" padding made static", pads)
    card = ModelCard(name=settings.model, labels=labels, input_size=tuple(input_size),
                     mean=tuple(mean), std=tuple(std), layers=layers, device=str(device))
    return LoadedModel(module=module, device=device, card=card,
                       load_seconds=time.perf_counter() - started)
