"""Weights files: reading a state_dict or checkpoint, and loading it into a model by name or,
for the default model, by position."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..errors import StartupError


def require_weights(model: str, weights: Optional[str]) -> None:
    if weights is None:
        raise StartupError(
            f"{model} needs --weights PATH (a state_dict or checkpoint file); camserve downloads "
            "nothing unless asked: --weights pretrained downloads the published weights, "
            "--weights random serves untrained ones")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise StartupError(f"weights file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable files
        raise StartupError(f"cannot read weights file {path!r}: {exc}") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise StartupError(f"{path!r} holds no state_dict (a mapping of names to tensors)")
    state = OrderedDict((k.removeprefix("module."), v) for k, v in obj.items())
    metadata = getattr(obj, "_metadata", None)
    if metadata is not None:  # the modules' versions, which some loaders read (MNASNet's)
        state._metadata = OrderedDict((k.removeprefix("module"), v)
                                      for k, v in metadata.items())
    return state


def num_classes(state: Optional[Dict[str, torch.Tensor]]) -> Optional[int]:
    """The class count of a checkpoint: the rows of its last 2-D weight or 1x1 convolution
    (the classifier: a Linear, or SqueezeNet's convolution)."""
    if not state:
        return None
    matrices = [v for k, v in state.items() if k.endswith("weight") and (
        v.ndim == 2 or (v.ndim == 4 and tuple(v.shape[2:]) == (1, 1)))]
    return int(matrices[-1].shape[0]) if matrices else None


def load_state(module: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:6]
        raise StartupError(f"weights {path!r} do not fit the model: " + " ".join(first)) from None


def load_by_position(module: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    target = module.state_dict()
    if len(target) != len(state):
        raise StartupError(f"weights {path!r} hold {len(state)} tensors, the model "
                           f"has {len(target)}")
    mapped = {}
    for (theirs, tensor), (ours, expected) in zip(state.items(), target.items()):
        if tensor.shape != expected.shape:
            raise StartupError(f"weights {path!r}: {theirs} has shape {tuple(tensor.shape)}, "
                               f"the model's {ours} has {tuple(expected.shape)}")
        mapped[ours] = tensor
    module.load_state_dict(mapped, strict=True)

