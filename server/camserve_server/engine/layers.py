"""The layers that may be explained: one probe forward records every module's output, and the
layers named by ``--layer`` are checked against it, or the default layer is chosen from it."""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..domain import LayerInfo
from ..errors import StartupError
from . import tokens

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


# The probe runs a batch of two images (a blank one and seeded noise): a module whose output's
# first dimension is not 2 folds something else into the batch dimension (windowed attention
# folds its windows there), and the default layer's Grad-CAM is tried on both.
PROBE_BATCH = 2


def probe_images(input_size, device) -> torch.Tensor:
    """The probe's batch: a blank image (the mean colour) and seeded standard-normal noise."""
    noise = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.zeros(1, 3, *input_size), noise]).to(device)


def probe_model(module: nn.Module, input_size, device, *, hookable: bool) -> Probe:
    """One forward on the probe's batch: the class count and every module's output shape."""
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
            out = module(probe_images(input_size, device))
    except Exception as exc:
        raise StartupError(f"the model fails on a {input_size[0]}x{input_size[1]} "
                           f"image: {exc}") from None
    finally:
        for handle in handles:
            handle.remove()
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != PROBE_BATCH:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise StartupError(f"the model must return (batch, classes) logits; for a batch of "
                           f"{PROBE_BATCH} images it returned {shape}")
    named = dict(module.named_modules()) if hookable else {}
    hints = tokens.model_hints(module, shapes, finished) if hookable else tokens.Hints()
    return Probe(int(out.shape[1]), tuple((n, shapes[n], calls[n]) for n in finished),
                 tuple(input_size), hints, named)


def _grid(name: str, shape, calls: int, probe: Probe) -> tokens.Grid:
    """The layer's layout and grid (``tokens.find_grid``); ValueError says why it has none."""
    if calls != 1:
        raise ValueError(f"runs {calls} times per forward")
    if shape is not None and len(shape) >= 1 and shape[0] != PROBE_BATCH:
        raise ValueError(
            f"returns {tuple(shape)} for a batch of {PROBE_BATCH} images: its first dimension "
            "is not the batch (windowed attention folds its windows into it), so an image's "
            "map cannot be told from its batch mates' or put back on the image grid")
    return tokens.find_grid(shape, probe.input_size, probe.hints,
                            (probe.named or {}).get(name))


def _explainable(name: str, shape, calls: int, probe: Probe) -> Optional[tokens.Grid]:
    """The grid of a module run once per forward whose output is (N, C, h, w), (N, tokens, C)
    or (N, h, w, C), batch first, with more than one cell that tiles the image; None for any
    other module."""
    try:
        return _grid(name, shape, calls, probe)
    except ValueError:
        return None


def resolve_name(name: str, named: Dict[str, nn.Module]) -> str:
    """A layer name as pytorch-grad-cam's users write it, as a dotted module name:
    ``layer4[-1]`` is ``layer4.2`` on a ResNet-50, ``model.features[-1]`` is ``features.12``
    (a leading ``model.`` is dropped when no module has that name). Names that are not of that
    form are returned as they are."""
    if name in named:
        return name
    text = name[len("model."):] if name.startswith("model.") else name
    if "[" not in text:
        return text if text in named else name
    parts = re.split(r"\[\s*(-?\d+)\s*\]", text)
    path = parts[0]
    for index, rest in zip(parts[1::2], parts[2::2]):
        parent = named.get(path)
        if parent is None:
            return name
        children = [child for child, _ in parent.named_children()]
        position = int(index)
        if not -len(children) <= position < len(children):
            return name
        path = f"{path}.{children[position]}" if path else children[position]
        path += rest
    return path if path in named else name


def _suggest_layer(name: str, found, named) -> str:
    """"; did you mean ..." for a module name that does not exist: the last child of the
    nearest existing parent first (``layer4.3`` on a ResNet-50: ``layer4.2``), then close
    spellings."""
    parent = name.rpartition(".")[0]
    while parent and parent not in named:
        parent = parent.rpartition(".")[0]
    last = []
    if parent:
        children = [child for child, _ in named[parent].named_children()]
        if children:
            last = [f"{parent}.{children[-1]} (the last of {parent}'s children)"]
    close = [n for n in difflib.get_close_matches(name, list(found), n=3) if not last
             or n != last[0].split(" ")[0]]
    choices = last + close
    return f"; did you mean {', '.join(choices)}?" if choices else ""


def choose_layers(names, probe: Probe, *, hookable: bool, model: str,
                  zero_map: Optional[Callable[[str, tokens.Grid], bool]] = None,
                  reasons: Optional[Dict[str, str]] = None) -> Tuple[LayerInfo, ...]:
    """The layers served: ``names`` checked against the probe, or the default layer when
    ``names`` is empty; none for a model that cannot be hooked (TorchScript).

    ``zero_map(name, grid)``: whether that layer's Grad-CAM of the probe's top class is zero
    everywhere on every probe image; a default whose map is passes to the nearest layer whose
    map is not. ``reasons``: why each of ``names`` is served (a source's own choice); a layer
    named without one is "named by --layer"."""
    if not hookable:
        if names:
            raise StartupError(f"{model} is TorchScript: its layers cannot be hooked, so it "
                               "serves Predict only; drop --layer or serve the model as "
                               "torchvision:/timm:/python: with --weights")
        return ()
    found = {n: (shape, calls) for n, shape, calls in probe.modules}
    named = probe.named or {}
    candidates = [(n, grid) for n, shape, calls in probe.modules
                  if (grid := _explainable(n, shape, calls, probe)) is not None]
    why: Dict[str, str] = dict(reasons or {})
    if not names:
        if not candidates:
            log.warning("no module of %s has an output with a spatial grid (batch, channels, "
                        "height, width), tokens or channels-last; Explain is off", model)
            return ()
        name, reason = _default_layer(candidates, probe)
        if zero_map is not None:
            name, reason = _pass_over_zero_maps(name, reason, candidates, zero_map)
        names, why = (name,), {name: reason}
    layers = []
    for given in names:
        name = resolve_name(given, named)
        if name not in found:
            raise StartupError(f"--layer {given!r}: the model has no module of that name"
                               f"{_suggest_layer(name, found, named)}")
        shape, calls = found[name]
        try:
            grid = _grid(name, shape, calls, probe)
        except ValueError as exc:
            raise StartupError(f"--layer {given!r} cannot be explained: it {exc}; "
                               f"{_working_layer(name, candidates, probe)}") from None
        if name not in [info.name for info in layers]:
            reason = why.get(given, why.get(name, "named by --layer"))
            layers.append(LayerInfo(name, grid.channels, grid.height, grid.width,
                                    layout=grid.layout, prefix_tokens=grid.prefix_tokens,
                                    reason=reason))
    return tuple(layers)


def _working_layer(name: str, candidates, probe: Probe) -> str:
    """What to explain instead of ``name``: its nearest ancestor that explains, else the
    default layer."""
    usable = dict(candidates)
    parent = name.rpartition(".")[0]
    while parent:
        if parent in usable:
            grid = usable[parent]
            return (f"explain {parent!r} instead (the module around it: a {grid.height}x"
                    f"{grid.width} grid of {grid.channels} channels)")
        parent = parent.rpartition(".")[0]
    if candidates:
        default, _ = _default_layer(candidates, probe)
        grid = usable[default]
        return (f"explain {default!r} instead (the default: a {grid.height}x{grid.width} grid "
                f"of {grid.channels} channels)")
    return "this model has no layer that explains"


def _pass_over_zero_maps(name: str, reason: str, candidates, zero_map) -> Tuple[str, str]:
    """``name`` unless its Grad-CAM on the probe is zero everywhere; then the nearest layer
    before it (the last to finish first) whose map is not, of at most MAX_PASSED_OVER tried."""
    if not zero_map(name, dict(candidates)[name]):
        return name, reason
    order = [n for n, _ in candidates]
    position = order.index(name)
    tried = 0
    # The default's siblings (another stream's norm, as on CoaT) and earlier layers.
    for other, grid in reversed(candidates[:position]):
        if tried >= MAX_PASSED_OVER:
            break
        tried += 1
        if not zero_map(other, grid):
            return other, (f"{name} was passed over: its Grad-CAM of the probe's top class is "
                           f"zero everywhere; {other} is the nearest layer before it whose map "
                           "is not")
    log.warning("the default layer %s gives an all-zero Grad-CAM on the probe images, and so "
                "do the %d layers before it: serving it anyway", name, tried)
    return name, reason + " (its Grad-CAM on the probe images is zero everywhere)"


# At most this many layers before an all-zero default are tried (one forward and backward
# each, at load).
MAX_PASSED_OVER = 8


def gradcam_is_zero(module: nn.Module, name: str, grid: tokens.Grid, images: torch.Tensor) -> bool:
    """Whether the Grad-CAM at ``name`` of each probe image's top class is zero everywhere
    (after the ReLU) on every image: one forward, one backward to the layer."""
    target = module.get_submodule(name)
    seen: Dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_()
        seen["acts"] = leaf
        return leaf.clone()
    handle = target.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = module(images)
            acts = seen["acts"]
            if not logits.requires_grad:  # the logits do not depend on the layer at all
                return True
            top = logits.detach().argmax(dim=1, keepdim=True)
            score = logits.gather(1, top).sum()
            grads = torch.autograd.grad(score, acts, allow_unused=True)[0]
    finally:
        handle.remove()
    if grads is None:
        return True
    with torch.no_grad():
        a = tokens.to_nchw(acts, grid.layout, grid.prefix_tokens, grid.height, grid.width)
        g = tokens.to_nchw(grads, grid.layout, grid.prefix_tokens, grid.height, grid.width)
        cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))
        return not bool(cam.gt(0).any())


def _default_layer(candidates: Sequence[Tuple[str, tokens.Grid]],
                   probe: Probe) -> Tuple[str, str]:
    """The layer explained when ``--layer`` is not given, and why, from the explainable modules
    in the order their forward finished; pytorch-grad-cam's recommended layers, family by
    family (docs/server.md has the table):

    - Tokens last (ViT, DeiT, CoaT, their Hugging Face versions): the first norm of the last
      transformer block (timm ``blocks[-1].norm1``, torchvision ``encoder.layers[-1].ln_1``,
      Hugging Face ``layer[-1].layernorm_before``). Later token layers do not work with a class
      token: after the last block's attention only the class token reaches the logits, so the
      patch tokens' gradients are 0. A block that opens with one norm per stream (CoaT's
      ``norm12``, ``norm13``, ``norm14``) gives its coarsest stream's, as a CNN gives its last
      stage's.
    - Channels last (Swin): the same, the first norm of the last block of the last stage
      (``layers[-1].blocks[-1].norm1``, torchvision ``features[-1][-1].norm1``). Not a stage's
      own output, nor the model's final norm after it: a stage feeds a per-position LayerNorm,
      whose output does not change when its input is scaled or shifted, so there the gradient
      at each position is orthogonal to the activations and gradient x activation methods
      (HiResCAM) give zero.
    - Otherwise (CNNs): the last module with an (N, C, h, w) output, passing over what only
      passes it on or resizes it (Identity, Dropout, a pooling to a fixed grid such as VGG's
      ``avgpool``) and a convolutional classifier (SqueezeNet's ``classifier.1``, whose
      channels are the classes); timm's RegNet and ByobNet families (RegNetZ, MobileViT...)
      their last stage, not the 1x1 ``final_conv`` after it.
    """
    name, grid = candidates[-1]
    layout = grid.layout
    if layout != "tokens" and (layout == "nhwc" or probe.hints.channels_last):
        layout = "nhwc" if any(g.layout == "nhwc" for _, g in candidates) else layout
    if layout in ("tokens", "nhwc"):
        kind = "transformer block" if layout == "tokens" else "block of the last stage"
        layered = [(n, g) for n, g in candidates if g.layout == layout]
        block = _last_block([n for n, _ in layered], probe)
        if block is None:
            return layered[-1][0], "the last layer whose output holds the image's grid"
        inside = [(n, g) for n, g in layered if n.startswith(block + ".")]
        leading = []
        for n, g in inside:
            if not _is_norm((probe.named or {}).get(n)):
                break
            leading.append((n, g))
        if not leading:
            return block, f"the last {kind}, which holds no norm"
        best = min(leading, key=lambda item: item[1].height * item[1].width)
        streams = (f", of the coarsest of its {len(leading)} streams" if len(leading) > 1
                   else "")
        why = ("after the last block's attention only the class token reaches the logits, "
               "so later token layers get no gradient at the patches" if layout == "tokens"
               else "a stage's output and the final norm feed a per-position LayerNorm, where "
               "the gradient is orthogonal to the activations")
        return best[0], (f"the first norm of the last {kind}{streams}, as pytorch-grad-cam "
                         f"recommends: {why}")
    cnn = [(n, g) for n, g in candidates if g.layout == "nchw"] or list(candidates)
    root = (probe.named or {}).get("")
    final = getattr(root, "final_conv", None)
    if type(root).__name__ in _STAGE_FAMILIES and not isinstance(final, _PASS_THROUGH):
        order = [n for n, _ in cnn]
        if "final_conv" in order:
            before = [n for n in order[:order.index("final_conv")]
                      if not n.startswith("final_conv.")]
            if before:
                return before[-1], ("the last stage's output (timm RegNet and ByobNet: "
                                    "RegNetZ, MobileViT...), as pytorch-grad-cam recommends, "
                                    "not the 1x1 final_conv after it")
    passed = _drop_trailing(cnn, probe)
    name = passed[-1][0]
    if len(passed) < len(cnn):
        skipped = cnn[len(passed)][0]
        return name, ("the last convolutional feature map before global pooling, passing over "
                      f"{skipped} and what follows it (a pass-through, a pooling to a fixed "
                      "grid, or a convolutional classifier)")
    return name, "the last convolutional feature map before global pooling"


_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d)
# timm families whose last stage is followed by a 1x1 ``final_conv`` head.
_STAGE_FAMILIES = ("ByobNet", "RegNet")
_FIXED_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _drop_trailing(cnn, probe: Probe):
    """``cnn`` without its trailing pass-throughs, poolings to a fixed grid and convolutional
    classifier (a run of layers as wide as the classes that opens with a 1x1 convolution not
    inside any of them); at least one layer is kept."""
    named = probe.named or {}
    kept = list(cnn)
    while len(kept) > 1:
        name, grid = kept[-1]
        module = named.get(name)
        if isinstance(module, _PASS_THROUGH + _FIXED_POOLS):
            kept.pop()
            continue
        run = []
        for n, g in reversed(kept):
            if g.channels != probe.num_classes:
                break
            run.append(n)
        first = named.get(run[-1]) if run else None
        if (run and len(run) < len(kept) and isinstance(first, nn.Conv2d)
                and tuple(first.kernel_size) == (1, 1)
                and not any(run[-1].startswith(n + ".") for n in run[:-1])):
            del kept[-len(run):]
            continue
        break
    return kept


def _last_block(names: Sequence[str], probe: Probe) -> Optional[str]:
    """The last transformer block among the ancestors of ``names`` (in the order their forward
    finished): a module with submodules whose class the model holds more than once
    (``blocks.11`` beside ``blocks.0..10``; a Swin stage's only block beside the other stages'
    blocks). Walking down from the model: the last to finish of the outermost such modules,
    then the last inside it, and so on until one has a norm of its own (a ViT or Swin block;
    CoaT's streams and their attentions are inside it)."""
    named = probe.named or {}
    order = {n: i for i, (n, _, _) in enumerate(probe.modules)}
    counts: Dict[type, int] = {}
    for module in named.values():
        counts[type(module)] = counts.get(type(module), 0) + 1
    repeated = set()
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            here = ".".join(parts[:depth])
            module = named.get(here)
            if (here in order and module is not None and counts[type(module)] > 1
                    and next(module.children(), None) is not None):
                repeated.add(here)
    block = None
    while True:
        if block is not None and any(n.rpartition(".")[0] == block and _is_norm(named.get(n))
                                     for n in names):
            return block
        inside = [r for r in repeated if block is None or r.startswith(block + ".")]
        outer = [r for r in inside if not any(r.startswith(o + ".") for o in inside)]
        if not outer:
            return block
        block = max(outer, key=order.__getitem__)


def _is_norm(module: Optional[nn.Module]) -> bool:
    return module is not None and (isinstance(module, nn.LayerNorm)
                                   or "norm" in type(module).__name__.lower())
