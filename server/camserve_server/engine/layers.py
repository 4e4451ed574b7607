"""The layers that may be explained: one probe forward records every module's output, and the
layers named by ``--layer`` are checked against it, or the default layer is chosen from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..domain import LayerInfo
from ..errors import StartupError
from . import tokens
from .sources import suggest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """What one forward on a blank image showed of the model."""

    num_classes: int
    # Modules in the order their forward finished: (name, output shape or None, call count).
    modules: Tuple[Tuple[str, Optional[Tuple[int, ...]], int], ...]
    input_size: Tuple[int, int] = (224, 224)
    hints: tokens.Hints = tokens.Hints()
    # Every module by name (also those that did not run, such as a ModuleList).
    named: Optional[Dict[str, nn.Module]] = None


def probe_model(module: nn.Module, input_size, device, *, hookable: bool) -> Probe:
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
    return Probe(int(out.shape[1]), tuple((n, shapes[n], calls[n]) for n in finished),
                 tuple(input_size), hints, named)


def _grid(name: str, shape, calls: int, probe: Probe) -> tokens.Grid:
    """The layer's layout and grid (``tokens.find_grid``); ValueError says why it has none."""
    if calls != 1:
        raise ValueError(f"runs {calls} times per forward")
    return tokens.find_grid(shape, probe.input_size, probe.hints,
                            (probe.named or {}).get(name))


def _explainable(name: str, shape, calls: int, probe: Probe) -> Optional[tokens.Grid]:
    """The grid of a module run once per forward whose output is (N, C, h, w), (N, tokens, C)
    or (N, h, w, C) with more than one cell; None for any other module."""
    try:
        return _grid(name, shape, calls, probe)
    except ValueError:
        return None


def choose_layers(names, probe: Probe, *, hookable: bool, model: str) -> Tuple[LayerInfo, ...]:
    """The layers served: ``names`` checked against the probe, or the default layer when
    ``names`` is empty; none for a model that cannot be hooked (TorchScript)."""
    if not hookable:
        if names:
            raise StartupError(f"{model} is TorchScript: its layers cannot be hooked, so it "
                               "serves Predict only; drop --layer or serve the model as "
                               "torchvision:/timm:/python: with --weights")
        return ()
    found = {n: (shape, calls) for n, shape, calls in probe.modules}
    if not names:
        # A default must tile the image; --layer may also name a 4-D output that does not
        # (such as attention's (N, heads, tokens, dim)), read as (N, C, h, w).
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
                               f"{suggest(name, list(found))}")
        shape, calls = found[name]
        try:
            grid = _grid(name, shape, calls, probe)
        except ValueError as exc:
            raise StartupError(f"--layer {name!r} cannot be explained: it {exc}") from None
        if name not in [info.name for info in layers]:
            layers.append(LayerInfo(name, grid.channels, grid.height, grid.width,
                                    layout=grid.layout, prefix_tokens=grid.prefix_tokens))
    return tuple(layers)


def _default_layer(candidates: Sequence[Tuple[str, tokens.Grid]], probe: Probe) -> str:
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
    - Otherwise (CNNs): the last module with an (N, C, h, w) output.
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


def _last_block(candidates, probe: Probe) -> Optional[str]:
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

