"""TensorFlow's "same" padding made static, once, when the model is loaded.

timm's ``tf_*`` models (the default efficientnet_lite0 among them) pad the input of each
strided convolution at every call (``Conv2dSame``): TensorFlow's "same" pads one pixel more
after than before when the total is odd, which the symmetric ``padding`` of a PyTorch
convolution cannot say, so timm copies the input into a padded tensor first. The served model
always sees one input size, so each such convolution's padding is known at load:

- an even total, ``(a, a)``, is an ordinary symmetric ``padding=a``;
- an odd one, ``(a, a + 1)``, is the same convolution with one zero tap put before its kernel
  and a symmetric ``padding=a + 1``: output i then reads, with the same weights, the pixels it
  read before, and the added tap (weight 0) one pixel before them.

The forward then runs without the copies, with identical logits (``--static-padding``;
``bench/bench_fold.py`` measures the difference). As for folding (``fold.py``), the served
layers are left as they are, a convolution called more than once (or with a dilation) is left
too, and the rewritten copy is adopted only when its logits on a probe equal the original's.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import torch
from torch import nn

from .rewrite import probe_with, rewrite, served, swap


def _dynamic(module: nn.Module) -> bool:
    """timm's Conv2dSame: a Conv2d that pads its input "same" at every call."""
    return type(module).__name__ == "Conv2dSame" and isinstance(module, nn.Conv2d) and \
        module.dilation == (1, 1) and module.padding_mode == "zeros"


def _same_total(size: int, kernel: int, stride: int) -> int:
    """TensorFlow's total "same" padding of one dimension (timm's get_same_padding)."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def _input_sizes(module: nn.Module, probe: torch.Tensor,
                 keep: Iterable[str]) -> Dict[str, Tuple[int, int]]:
    """The input height and width of each dynamic-padding convolution called exactly once."""
    keep = tuple(keep)
    seen: Dict[str, list] = {}
    handles = [m.register_forward_pre_hook(
        lambda _m, inputs, name=name: seen.setdefault(name, []).append(
            tuple(inputs[0].shape[-2:])))
        for name, m in module.named_modules() if _dynamic(m) and not served(name, keep)]
    probe_with(module, probe, handles)
    return {name: sizes[0] for name, sizes in seen.items() if len(sizes) == 1}


def _static(conv: nn.Conv2d, size: Tuple[int, int]) -> nn.Conv2d:
    """An ordinary Conv2d that computes what ``conv`` computes on inputs of ``size``."""
    weight, padding = conv.weight.detach(), []
    for dim in (0, 1):
        total = _same_total(size[dim], conv.kernel_size[dim], conv.stride[dim])
        if total % 2:  # (a, a + 1): a zero tap before the kernel, and a + 1 on both sides
            shape = list(weight.shape)
            shape[2 + dim] = 1
            weight = torch.cat([weight.new_zeros(shape), weight], dim=2 + dim)
        padding.append((total + 1) // 2)
    static = nn.Conv2d(conv.in_channels, conv.out_channels, tuple(weight.shape[-2:]),
                       stride=conv.stride, padding=tuple(padding), groups=conv.groups,
                       bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
    static.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if conv.bias is not None:
        static.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
    return static.train(conv.training)


def static_same_padding(module: nn.Module, input_size: Tuple[int, int], device: torch.device,
                        keep: Iterable[str] = ()) -> Tuple[nn.Module, int]:
    """A copy of the eval-mode ``module`` whose dynamic "same" paddings are static for
    ``input_size`` (the layers named in ``keep`` untouched), and how many; ``(module, 0)``
    when there are none."""
    def make_static(rewritten: nn.Module, named: Dict[str, nn.Module],
                    conv: Tuple[str, Tuple[int, int]]) -> None:
        name, size = conv
        swap(rewritten, named, name, _static(named[name], size))

    return rewrite(module, input_size, device,
                   lambda m, probe: list(_input_sizes(m, probe, keep).items()), make_static,
                   "\"same\" paddings not made static: the rewritten model's logits differ "
                   "from the model's")
