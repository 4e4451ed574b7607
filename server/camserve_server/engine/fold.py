"""Batch norms folded into the convolutions before them, once, when the model is loaded.

In eval mode a BatchNorm2d is a per-channel ``x * scale + shift`` with frozen statistics, so a
convolution followed by it is one convolution with its weights scaled and its bias shifted,
which saves the norm's pass over the activations; the engine serves the folded model
(``--fold-batchnorm``; ``bench/bench_fold.py`` measures the difference). Maps do not change:
the layers that may be explained are never folded (neither a served convolution, whose output
would then include the norm, nor a served norm), and folds above an explained layer change
neither its activations nor the gradients that reach it, up to float rounding.

A pair is folded only when one probe forward shows the norm reading exactly the tensor the
convolution returned, each called once; the folded copy is adopted only when its logits on a
random image match the original's. Anything else (a model that reuses the convolution's output
elsewhere, a norm subclass of unknown behaviour) keeps the model as it was.

The steps every rewrite at load shares are ``rewrite.py``'s; ``same_padding.py`` is the other
rewrite.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from .rewrite import probe_with, rewrite, served, swap


class _AfterNorm(nn.Module):
    """What is left of timm's BatchNormAct2d once its norm is folded: its dropout and
    activation, under their own names (``bn2.act`` stays ``bn2.act``)."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _norm_rest(norm: nn.Module):
    """What runs after the normalisation itself: nothing for a plain BatchNorm2d, dropout then
    activation for timm's BatchNormAct2d; None for any other subclass (not folded)."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm).__name__ == "BatchNormAct2d" and hasattr(norm, "act") and hasattr(norm, "drop"):
        return _AfterNorm(norm.drop, norm.act)
    return None


def _pairs(module: nn.Module, probe: torch.Tensor, keep: Iterable[str]) -> List[Tuple[str, str]]:
    """(convolution, norm) names where the norm reads exactly the convolution's output."""
    keep = tuple(keep)
    # id of a convolution's output -> (its name, the tensor, held so that the id is not reused)
    outputs: Dict[int, Tuple[str, torch.Tensor]] = {}
    calls: Dict[str, int] = {}
    reads: Dict[str, str] = {}  # norm -> the convolution whose output it read
    handles = []

    def conv_hook(name):
        def hook(_m, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            outputs[id(output)] = (name, output)
        return hook

    def norm_hook(name):
        def hook(_m, inputs):
            calls[name] = calls.get(name, 0) + 1
            conv, output = outputs.get(id(inputs[0]) if inputs else 0, ("", None))
            if output is not None and inputs[0] is output:
                reads[name] = conv
        return hook

    for name, m in module.named_modules():
        if served(name, keep):
            continue
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats and _norm_rest(m) is not None:
            handles.append(m.register_forward_pre_hook(norm_hook(name)))
    probe_with(module, probe, handles)
    return [(conv, norm) for norm, conv in reads.items()
            if calls.get(norm) == 1 and calls.get(conv) == 1]


def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(shift, requires_grad=False)


def fold_batchnorms(module: nn.Module, input_size: Tuple[int, int], device: torch.device,
                    keep: Iterable[str] = ()) -> Tuple[nn.Module, int]:
    """A copy of the eval-mode ``module`` with its conv -> batch-norm pairs folded (the layers
    named in ``keep`` untouched), and how many; ``(module, 0)`` when nothing folds."""
    def fold(folded: nn.Module, named: Dict[str, nn.Module], pair: Tuple[str, str]) -> None:
        conv, norm = pair
        _fold_into(named[conv], named[norm])
        swap(folded, named, norm, _norm_rest(named[norm]))

    return rewrite(module, input_size, device, lambda m, probe: _pairs(m, probe, keep), fold,
                   "batch norms not folded: the folded model's logits differ from the model's "
                   "(it may reuse a convolution's output elsewhere)")
