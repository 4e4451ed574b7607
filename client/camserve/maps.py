"""From a raw map to pictures, with NumPy alone (the server renders with the same functions).

- :func:`heatmap`: the raw map resized bilinearly to the image size exactly as
  ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` does (pixel centres aligned, edges
  clamped), then min-max scaled to [0, 1] over the image with pytorch-grad-cam's 1e-7 guard
  (``(x - min) / (1e-7 + max - min)``, what pytorch-grad-cam returns). An all-zero (or
  constant) map gives an all-zero heatmap, and a map whose range is far below 1e-7 one close
  to it.
- :func:`colorize`: a heatmap through the "jet" colour map, uint8 RGB.
- :func:`overlay`: the coloured heatmap blended over the image.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["resize_bilinear", "heatmap", "colorize", "overlay", "spearman"]

MIN_RANGE = 1e-7  # added to a map's range before scaling, as pytorch-grad-cam does


def _interpolation_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) weights of OpenCV's INTER_LINEAR along one axis."""
    position = (np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5
    left = np.floor(position)
    frac = position - left
    frac[left < 0] = 0.0
    left[left < 0] = 0
    last = left >= source - 1
    frac[last] = 0.0
    left[last] = source - 1
    left = left.astype(np.int64)
    right = np.minimum(left + 1, source - 1)
    weights = np.zeros((target, source), dtype=np.float64)
    rows = np.arange(target)
    np.add.at(weights, (rows, left), 1.0 - frac)
    np.add.at(weights, (rows, right), frac)
    return weights.astype(np.float32)


def resize_bilinear(values: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float array to ``size`` = (height, width) like cv2's INTER_LINEAR."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {values.shape}")
    height, width = int(size[0]), int(size[1])
    rows = _interpolation_matrix(values.shape[0], height)
    cols = _interpolation_matrix(values.shape[1], width)
    return rows @ values @ cols.T


def heatmap(raw: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """float32 (height, width) in [0, 1]: the raw map resized to ``size``, then min-max scaled."""
    resized = resize_bilinear(raw, size)
    low, high = float(resized.min()), float(resized.max())
    # A spread within float rounding of the values is a constant map, not a signal.
    if not np.isfinite(low) or not np.isfinite(high) or high - low <= 1e-6 * abs(high):
        return np.zeros(resized.shape, dtype=np.float32)
    # pytorch-grad-cam's guard (scale_cam_image: x / (1e-7 + max)): a map whose whole range
    # is far below 1e-7 stays near zero, blank, instead of its rounding noise being
    # stretched to [0, 1].
    return ((resized - low) / (MIN_RANGE + (high - low))).astype(np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB: values in [0, 1] through the jet colour map (blue low, red high)."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # R, G, B
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): the coloured heatmap blended over ``image`` (uint8 RGB, same size)."""
    image = np.asarray(image)
    if image.shape[:2] != heat.shape:
        raise ValueError(f"image is {image.shape[:2]}, heatmap is {heat.shape}: sizes differ")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    blended = (1.0 - alpha) * image[:, :, :3].astype(np.float32) + alpha * colorize(heat)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation of two raw maps, the coarser resized bilinearly to the finer
    one's grid: 1 when they rank every place alike, 0 when one is constant."""
    if first.size < second.size:
        first = resize_bilinear(first, second.shape)
    elif second.size < first.size:
        second = resize_bilinear(second, first.shape)
    a = _ranks(np.asarray(first, dtype=np.float64).ravel())
    b = _ranks(np.asarray(second, dtype=np.float64).ravel())
    a, b = a - a.mean(), b - b.mean()
    scale = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / scale) if scale > 0 else 0.0
