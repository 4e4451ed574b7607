"""What every rewrite of the model at load shares (``fold.py``, ``same_padding.py``): trace a
probe forward to find what to rewrite, change a deep copy, and adopt the copy only when its
logits on the probe equal the original's; the served layers are never touched.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

log = logging.getLogger(__name__)


def served(name: str, keep: Iterable[str]) -> bool:
    """The module is a served layer, or holds one (timm's bn2 holds bn2.act): rewrites at
    load leave it as it is."""
    return any(k == name or k.startswith(name + ".") for k in keep)


def _probe(input_size: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """The random images a rewrite at load is traced and checked on."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, *input_size, generator=gen).to(device)


def swap(root: nn.Module, named: Dict[str, nn.Module], name: str, new: nn.Module) -> None:
    """Put ``new`` in the place of ``root``'s submodule ``name`` (``named``: root's modules)."""
    parent, _, child = name.rpartition(".")
    setattr(named[parent] if parent else root, child, new)


def probe_with(module: nn.Module, probe: torch.Tensor, handles: List) -> None:
    """One forward of the probe with these hooks, which are removed after it."""
    try:
        with torch.inference_mode():
            module(probe)
    finally:
        for handle in handles:
            handle.remove()


def rewrite(module: nn.Module, input_size: Tuple[int, int], device: torch.device,
            find: Callable[[nn.Module, torch.Tensor], Sequence],
            apply: Callable[[nn.Module, Dict[str, nn.Module], object], None],
            refused: str) -> Tuple[nn.Module, int]:
    """A rewrite at load: ``find(module, probe)`` lists what to rewrite, ``apply(copy, named,
    each)`` rewrites one in a deep copy, and the copy is adopted, with how many, only when its
    logits on the probe equal the module's up to float rounding; else ``(module, 0)`` and the
    ``refused`` warning."""
    probe = _probe(input_size, device)
    found = find(module, probe)
    if not found:
        return module, 0
    rewritten = copy.deepcopy(module)
    named = dict(rewritten.named_modules())
    for each in found:
        apply(rewritten, named, each)
    with torch.inference_mode():
        before, after = module(probe), rewritten(probe)
    tolerance = 1e-4 * (1.0 + before.abs().max().item())
    if before.shape != after.shape or (before - after).abs().max().item() > tolerance:
        log.warning(refused)
        return module, 0
    return rewritten, len(found)
