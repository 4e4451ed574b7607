"""Turning what a caller holds into the API's ``Image`` message, and back into pixels.

Paths and bytes travel as they are (the server decodes them). NumPy arrays and PIL images
travel as raw uint8 pixels, losslessly, so a map for an array is the map for exactly those
pixels.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from . import reasons
from .errors import invalid
from .v1 import camserve_pb2 as pb

ImageLike = Any  # str | os.PathLike | bytes | numpy.ndarray | PIL.Image.Image


def _is_pil(image: Any) -> bool:
    return type(image).__module__.startswith("PIL.") and hasattr(image, "mode")


def _pixels(array: np.ndarray) -> pb.Image:
    if array.dtype != np.uint8:
        raise invalid(f"arrays must be uint8 (0..255) pixels, got dtype {array.dtype}; "
                      "convert with (x * 255).round().astype(numpy.uint8) or similar",
                      reasons.INVALID_IMAGE)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise invalid(f"arrays must be (height, width) or (height, width, 1|3|4) RGB(A), got "
                      f"shape {array.shape}", reasons.INVALID_IMAGE)
    array = np.ascontiguousarray(array)
    h, w, c = array.shape
    return pb.Image(raw=pb.RawImage(pixels=array.tobytes(), height=h, width=w, channels=c))


def to_proto(image: ImageLike) -> pb.Image:
    """The ``Image`` message for a path, encoded bytes, a uint8 array or a PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise invalid(f"cannot read image {os.fspath(image)!r}: there is no such file",
                          reasons.IMAGE_NOT_FOUND) from None
        except OSError as exc:
            raise invalid(f"cannot read image {os.fspath(image)!r}: {exc.strerror}",
                          reasons.INVALID_IMAGE) from None
        if not data:
            raise invalid(f"the image {os.fspath(image)!r} is an empty file",
                          reasons.INVALID_IMAGE)
        return pb.Image(encoded=data)
    if isinstance(image, np.ndarray):
        return _pixels(image)
    if _is_pil(image):
        if image.mode not in ("RGB", "L", "RGBA"):
            image = image.convert("RGB")
        return _pixels(np.asarray(image))
    raise invalid(f"cannot send a {type(image).__name__} as an image: pass a path, encoded "
                  "bytes, a uint8 numpy array (H, W, 3) or a PIL image", reasons.INVALID_IMAGE)


def load_rgb(image: ImageLike) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of an image, as the server sees them (EXIF rotation applied)."""
    if isinstance(image, np.ndarray) or _is_pil(image):
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.shape[2] == 1:
            return np.repeat(array, 3, axis=2)
        return array[:, :, :3]
    from PIL import Image, ImageOps

    data = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else None
    with Image.open(io.BytesIO(data) if data is not None else image) as opened:
        return np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
