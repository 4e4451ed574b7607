"""Token layouts: how a vision transformer's layer output becomes the (N, C, h, w) grid that
every CAM method works on.

A CNN layer's output is ``(N, C, h, w)`` (layout ``"nchw"``). Transformers keep two others:

- ``"tokens"``: ``(N, T, C)``, a sequence of T tokens. ViT and DeiT put ``prefix_tokens`` tokens
  that belong to no patch first (the class token, DeiT's distillation token, register tokens),
  then the h*w patch tokens, row by row over the patch grid.
- ``"nhwc"``: ``(N, h, w, C)``, channels last: Swin's stages, ConvNeXt-style blocks.

:func:`to_nchw` turns either into ``(N, C, h, w)``, which is what pytorch-grad-cam's
``reshape_transform`` does (its ``vit_reshape_transform`` and ``swinT_reshape_transform``). The
engine applies it to a layer's activations and to their gradients alike, so the CAM methods
never see a layout other than a conv layer's.

Which layout a layer has is decided once, at start-up, by :func:`find_grid`, from the layer's
output shape, the input size and what the model says about itself (:func:`model_hints`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

LAYOUTS = ("nchw", "tokens", "nhwc")

# Without a known patch grid, a token sequence is read as at most this many prefix tokens (class,
# distillation and register tokens: DeiT has 2, DINOv2 with registers 5) followed by a grid.
MAX_PREFIX_TOKENS = 8


@dataclass(frozen=True)
class Grid:
    """How one layer's output maps to (N, C, h, w)."""

    layout: str  # one of LAYOUTS
    channels: int  # C
    height: int  # h
    width: int  # w
    prefix_tokens: int = 0  # "tokens" only: tokens before the patch grid, dropped


@dataclass(frozen=True)
class Hints:
    """What the model says about its token grid (from its attributes and its patch embedding).

    Nothing here is required: without hints, shapes and the input size decide alone."""

    patch_grid: Optional[Tuple[int, int]] = None  # (h, w) of the patch embedding's output
    prefix_tokens: Optional[int] = None  # class/distillation/register tokens ahead of patches
    channels_last: bool = False  # the model keeps its feature maps (N, h, w, C) (Swin)


# --- the transforms ---------------------------------------------------------------------------


def tokens_to_nchw(x: torch.Tensor, prefix_tokens: int, height: int, width: int) -> torch.Tensor:
    """(N, prefix + h*w, C) → (N, C, h, w): drop the prefix tokens, lay the patch tokens out
    row by row on the h x w grid, channels first."""
    n, _, c = x.shape
    return x[:, prefix_tokens:, :].reshape(n, height, width, c).permute(0, 3, 1, 2)


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(N, h, w, C) → (N, C, h, w)."""
    return x.permute(0, 3, 1, 2)


def to_nchw(x: torch.Tensor, layout: str, prefix_tokens: int = 0, height: int = 0,
            width: int = 0) -> torch.Tensor:
    """A layer's activations (or their gradients) as (N, C, h, w). An ``"nchw"`` tensor is
    returned as it is (the same object)."""
    if layout == "nchw":
        return x
    if layout == "tokens":
        return tokens_to_nchw(x, prefix_tokens, height, width)
    if layout == "nhwc":
        return nhwc_to_nchw(x)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# --- finding a layer's grid -------------------------------------------------------------------


def fits(height: int, width: int, image_size: Tuple[int, int]) -> bool:
    """Whether an h x w grid is the image seen at some stride s: (h, w) is (⌈H/s⌉, ⌈W/s⌉) or
    (⌊H/s⌋, ⌊W/s⌋) for one integer s (padded and unpadded convolutions and patches round one
    way or the other, but the same way for both sides). On a square image only square grids
    fit; on 240x320, 8x10 fits (s = 32, rounded up)."""
    big_h, big_w = image_size
    if not (1 <= height <= big_h and 1 <= width <= big_w):
        return False
    for stride in range(max(1, big_h // (height + 1)), big_h // max(height - 1, 1) + 2):
        if ((-(-big_h // stride), -(-big_w // stride)) == (height, width)
                or (big_h // stride, big_w // stride) == (height, width)):
            return True
    return False


def grid_for(count: int, image_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """The h x w grid of ``count`` cells that :func:`fits` the image (a square on a square
    image), or None."""
    for height in range(1, math.isqrt(count) + 1):
        if count % height == 0:
            for h, w in ((height, count // height), (count // height, height)):
                if fits(h, w, image_size):
                    return (h, w)
    return None


def _channels_last_module(module: Optional[nn.Module]) -> Optional[bool]:
    """What a module's type says about its 4-D output: a LayerNorm or Linear works on the last
    dimension (channels last); a conv, 2-d norm or pooling layer works on (N, C, H, W). None when
    its type says nothing (containers, Identity, activations...)."""
    if module is None:
        return None
    if type(module).__name__.endswith(("2d", "2D")):  # Conv2d, BatchNorm2d, timm's LayerNorm2d
        return False
    if isinstance(module, (nn.LayerNorm, nn.Linear)):
        return True
    if isinstance(module, nn.GroupNorm):
        return False
    return None


def find_grid(shape: Optional[Sequence[int]], image_size: Tuple[int, int],
              hints: Optional[Hints] = None, module: Optional[nn.Module] = None) -> Grid:
    """The layout and grid of a layer whose output has ``shape`` (batch first) on an input of
    ``image_size`` (H, W). Raises ValueError saying why the output is no grid.

    - 3-D ``(N, T, C)`` is tokens. The grid is the model's patch grid when T minus the prefix
      tokens (the model's count if it says, else 0 to MAX_PREFIX_TOKENS) equals its cells; else
      the first (fewest prefix tokens) count of remaining tokens that forms a grid that fits the
      image (a square for a square image).
    - 4-D ``(N, A, B, C)`` is read both ways. If only one reading's grid fits the image (is the
      image at some stride, :func:`fits`) that is the layout: ``(N, 7, 7, 768)`` on a 224x224 image
      is channels last, ``(N, 768, 7, 7)`` is not. If both fit (e.g. ``(N, 14, 14, 14)``), the
      module's type decides (LayerNorm and Linear act on the last dimension, conv layers and 2-d
      norms on the second), then the model (``hints.channels_last``: Swin), and otherwise
      PyTorch's convention, NCHW. If neither fits, the output holds no grid of the image (an
      attention layer's (N, windows or heads, tokens, channels), a pooling to another shape):
      refused, since its map could not be laid over the image.
    """
    hints = hints or Hints()
    if shape is None:
        raise ValueError("does not return a tensor")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        return _token_grid(shape, image_size, hints)
    if len(shape) == 4:
        _, a, b, c = shape
        nchw, nhwc = fits(b, c, image_size), fits(a, b, image_size)
        channels_last = nhwc and not nchw
        if nhwc and nchw:
            said = _channels_last_module(module)
            channels_last = hints.channels_last if said is None else said
        grid = Grid("nhwc", c, a, b) if channels_last else Grid("nchw", a, b, c)
        if not (nchw or nhwc) and b * c > 1 and a * b > 1:
            raise ValueError(
                f"has output shape {shape}: neither {b}x{c} (read as batch, channels, height, "
                f"width) nor {a}x{b} (batch, height, width, channels) is the "
                f"{image_size[0]}x{image_size[1]} image at one stride, so its map cannot be "
                "laid over the image (an attention layer's (batch, windows or heads, tokens, "
                "channels) is such an output)")
        if grid.height * grid.width > 1:
            return grid
        raise ValueError(f"has output shape {shape}: a {grid.height}x{grid.width} grid, nothing "
                         "to locate")
    raise ValueError(f"has output shape {shape}, not (batch, channels, height, width), "
                     "(batch, tokens, channels) or (batch, height, width, channels)")


def _token_grid(shape: Tuple[int, int, int], image_size: Tuple[int, int], hints: Hints) -> Grid:
    _, tokens, channels = shape
    prefixes = list(range(min(tokens, MAX_PREFIX_TOKENS + 1)))
    if hints.prefix_tokens is not None and 0 <= hints.prefix_tokens < tokens:
        prefixes.insert(0, hints.prefix_tokens)
    if hints.patch_grid is not None:
        height, width = hints.patch_grid
        for prefix in prefixes:
            if tokens - prefix == height * width and height * width > 1:
                return Grid("tokens", channels, height, width, prefix)
    for prefix in prefixes:
        found = grid_for(tokens - prefix, image_size) if tokens - prefix > 1 else None
        if found is not None:
            return Grid("tokens", channels, found[0], found[1], prefix)
    known = (f"the model's {hints.patch_grid[0]}x{hints.patch_grid[1]} patch grid"
             if hints.patch_grid else "no patch grid known from the model")
    raise ValueError(
        f"has output shape {shape}: {tokens} tokens, which after 0 to {MAX_PREFIX_TOKENS} prefix "
        f"tokens form no grid of the {image_size[0]}x{image_size[1]} image's shape ({known})")


# --- what the model says about itself -----------------------------------------------------------


def model_hints(model: nn.Module, shapes: Mapping[str, Optional[Tuple[int, ...]]],
                order: Sequence[str] = ()) -> Hints:
    """The patch grid, prefix token count and channel order a model declares.

    - Patch grid: the output grid of the patch embedding, the first Conv2d to run (``order``:
      module names in the order their forward finished) whose kernel equals its stride (> 1):
      timm's ``patch_embed.proj``, torchvision's ``conv_proj``, Hugging Face's
      ``patch_embeddings.projection``. Measured on the served input size, so it holds for any
      size the model accepts. Else timm's ``patch_embed.grid_size``, or torchvision ViT's
      ``image_size // patch_size``.
    - Prefix tokens: timm's ``num_prefix_tokens`` (class + distillation + register tokens);
      torchvision's ViT has one class token (``class_token``). Others (Hugging Face) are found
      from the token count and the patch grid.
    - Channels last: timm models whose ``output_fmt`` is "NHWC" (Swin), torchvision's Swin.
    """
    modules: Dict[str, nn.Module] = dict(model.named_modules())
    grid = None
    for name in order:
        module, shape = modules.get(name), shapes.get(name)
        if (isinstance(module, nn.Conv2d) and shape is not None and len(shape) == 4
                and tuple(module.kernel_size) == tuple(module.stride)
                and max(module.stride) > 1):
            grid = (int(shape[2]), int(shape[3]))
            break
    patch_embed = getattr(model, "patch_embed", None)
    if grid is None and getattr(patch_embed, "grid_size", None) is not None:
        grid = tuple(int(s) for s in patch_embed.grid_size)
    prefix = getattr(model, "num_prefix_tokens", None)
    prefix = prefix if isinstance(prefix, int) else None
    if _is_torchvision(model, "VisionTransformer"):
        prefix = 1  # torchvision's ViT: one class token, then the patches
        if grid is None:
            side = model.image_size // model.patch_size
            grid = (side, side)
    channels_last = (getattr(model, "output_fmt", None) == "NHWC"
                     or _is_torchvision(model, "SwinTransformer"))
    return Hints(patch_grid=grid, prefix_tokens=prefix, channels_last=channels_last)


def _is_torchvision(model: nn.Module, name: str) -> bool:
    try:
        import torchvision.models as models
    except ImportError:  # pragma: no cover - torchvision comes with the server
        return False
    cls = getattr(models, name, None)
    return cls is not None and isinstance(model, cls)
