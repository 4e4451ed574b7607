"""Hugging Face image classifiers (``--model hf:PATH``): a folder written by ``save_pretrained``,
loaded offline, wrapped as a plain module, with its labels and preprocessing."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import StartupError
from .sources import IMAGENET_MEAN, IMAGENET_STD, BuiltModel

log = logging.getLogger(__name__)


class HuggingFaceClassifier(nn.Module):
    """A ``transformers`` image classifier as a plain module: ``forward(x)`` returns the logits
    tensor instead of a ModelOutput.

    The wrapped model's submodules are registered here under their own names (``vit.layers.11.
    layernorm_before``, as ``print(model)`` shows them), so ``--layer`` takes the names of the
    Hugging Face documentation. The wrapped model itself is kept unregistered; a model with
    parameters or buffers of its own (not in a submodule) is registered whole, as ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        own = list(model.parameters(recurse=False)) + list(model.buffers(recurse=False))
        if own:
            self.model = model
        else:
            self.__dict__["model"] = model
            for name, child in model.named_children():
                self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_hf(path: str, weights: Optional[str]) -> BuiltModel:
    """A folder written by ``save_pretrained``: config.json (labels in ``id2label``), the
    weights, and preprocessor_config.json when saved with the image processor."""
    if weights is not None:
        raise StartupError("a Hugging Face folder holds its own weights; drop --weights")
    # Offline before transformers (and huggingface_hub) read their settings; local_files_only
    # below is what guarantees it even if they were imported earlier.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise StartupError("hf: models need the transformers package: "
                           "pip install 'camserve[hf]'") from None
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise StartupError(f"hf:{path}: not a folder saved with save_pretrained "
                           "(no config.json in it)")
    try:
        model = AutoModelForImageClassification.from_pretrained(str(folder),
                                                                local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartupError(f"hf:{path}: transformers cannot load an image classifier from it: "
                           f"{first}") from None
    model = model.float().eval()
    config = model.config
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    labels = (tuple(id2label[i] for i in range(len(id2label)))
              if set(id2label) == set(range(len(id2label))) and id2label else None)
    size, mean, std = _hf_preprocessing(folder, config)
    return BuiltModel(HuggingFaceClassifier(model), size, mean, std, labels=labels)


def _hf_preprocessing(folder: Path, config) -> Tuple[Tuple[int, int], Tuple[float, ...],
                                                     Tuple[float, ...]]:
    """Input size, mean and std from preprocessor_config.json, else from the model config.

    The size is the center crop when the processor crops, else its resize (height/width, or a
    square of shortest_edge); camserve resizes the whole image to it, without cropping. The
    processor computes (x * rescale_factor - mean) / std from 0..255 pixels; camserve computes
    (x / 255 - mean') / std', so mean' = mean / (255 rescale_factor), and the same for std."""
    file = folder / "preprocessor_config.json"
    processor: dict = {}
    if file.is_file():
        try:
            processor = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot read {str(file)!r}: {exc}") from None
    size = None
    if processor.get("do_center_crop") and processor.get("crop_size") is not None:
        size = _hf_size(processor["crop_size"])
    if size is None and processor.get("do_resize", True):
        size = _hf_size(processor.get("size"))
    if size is None:
        size = _hf_size(getattr(config, "image_size", None)) or (224, 224)
    mean = processor.get("image_mean", getattr(config, "image_mean", None))
    std = processor.get("image_std", getattr(config, "image_std", None))
    if not processor.get("do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if mean is None or std is None:
        log.warning("%s says no mean/std: normalising with ImageNet's; pass --mean and --std "
                    "if the model was trained otherwise", folder)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    mean, std = _three(mean), _three(std)
    factor = float(processor.get("rescale_factor", 1 / 255)) if processor.get(
        "do_rescale", True) else 1.0
    if not math.isclose(factor * 255.0, 1.0, rel_tol=1e-6):
        mean = tuple(m / (255.0 * factor) for m in mean)
        std = tuple(s / (255.0 * factor) for s in std)
    return size, mean, std


def _hf_size(value) -> Optional[Tuple[int, int]]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value:
            return (int(value["shortest_edge"]),) * 2
    return None


def _three(values) -> Tuple[float, float, float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3:
        raise StartupError(f"the Hugging Face preprocessing has {len(values)} mean/std values; "
                           "pass --mean and --std (R,G,B)")
    return tuple(values)

