"""Heatmaps and overlays out: raw maps resized, scaled, colour-mapped and encoded.

The NumPy functions are the client's (``camserve.maps``), so a server-rendered picture and one
the client makes from the raw map are the same. Callers render one map at a time, so an
answer never holds more than one full-size float heatmap.
"""

from __future__ import annotations

import io
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from camserve import maps

JPEG_QUALITY = 90


def heatmap(raw: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """float32 (height, width) in [0, 1]: the raw map resized to ``size``, min-max scaled with
    pytorch-grad-cam's 1e-7 guard (``camserve.maps.heatmap``)."""
    return maps.heatmap(raw, size)


def heatmap_png(heat: np.ndarray) -> bytes:
    return encode(np.round(heat * 255.0).astype(np.uint8), "png")


def overlay(image: np.ndarray, heat: np.ndarray, fmt: str) -> bytes:
    """The heatmap colour-mapped and blended over ``image`` (same size), encoded."""
    return encode(maps.overlay(image, heat), fmt)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encoded_size_bound(size: Tuple[int, int], heatmap: bool,
                       overlay_format: Optional[str]) -> int:
    """An upper estimate of the bytes one map's pictures take at ``size``: what the answer
    size check counts before any work is done. PNG is bounded by its raw pixels; JPEG at
    quality 90 stays under 0.75 bytes per pixel on photographs and heatmap blends."""
    pixels = size[0] * size[1]
    total = pixels if heatmap else 0
    if overlay_format == "png":
        total += 3 * pixels
    elif overlay_format == "jpeg":
        total += 3 * pixels // 4
    return total + 1024
