"""What to load: the model spec that :func:`~camserve_server.engine.models.load_model` takes.

Torch-free, so that the settings (``process/settings.py``) import the default model and the
sources' description from here without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

DEFAULT_MODEL = "efficientnet_lite0"

MODEL_SOURCES = ("efficientnet_lite0 (the default), torchvision:NAME, timm:NAME, hf:PATH "
                 "(a Hugging Face transformers image classifier saved with save_pretrained), "
                 "torchscript:PATH or python:MODULE:FACTORY")


@dataclass(frozen=True)
class ModelSpec:
    """The model to serve and how to prepare it (the server's ``--model``, ``--weights``,
    ``--layer``, ``--labels``, ``--input-size``, ``--mean``, ``--std``, ``--fold-batchnorm``
    and ``--static-padding``). ``None`` and empty values mean: as the model's source says."""

    source: str = DEFAULT_MODEL  # one of MODEL_SOURCES, e.g. "torchvision:resnet50"
    # A state_dict or checkpoint file, "pretrained" (downloads) or "random"; None: the source's
    # own (the default model's package, a TorchScript file or a Hugging Face folder).
    weights: Optional[str] = None
    layers: Tuple[str, ...] = ()  # the layers that may be explained; the first is the default
    labels: Optional[str] = None  # a file with one class name a line
    input_size: Optional[Tuple[int, int]] = None  # (height, width)
    mean: Optional[Tuple[float, float, float]] = None  # normalisation of 0..1 RGB
    std: Optional[Tuple[float, float, float]] = None
    fold_batchnorm: bool = True  # fold batch norms into the convolutions before them
    static_padding: bool = True  # make TensorFlow "same" padding static
    # "softmax" (one class per image), "sigmoid" (multi-label: per-class probabilities that
    # need not sum to 1) or "embedding" (no classes: the outputs are the answer); None: as the
    # model says (an ``output_activation`` attribute of the module, or a Hugging Face config's
    # problem_type multi_label_classification), else softmax
    output_activation: Optional[str] = None
