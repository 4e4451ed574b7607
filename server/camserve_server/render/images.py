"""Decoding and resizing images in the handler thread (Pillow releases the GIL while it works).

Encoded bytes (JPEG, PNG, WebP, BMP, GIF: first frame) and raw uint8 pixels both end as RGB
uint8 at the model's input size: the whole image resized (no crop), so a map covers the whole
picture. JPEGs are rotated as their EXIF orientation says; the size reported back to the
caller is the size after that rotation.

With ``Limits.device_jpeg`` (CUDA: the engine decodes JPEGs on its device, in batches) a plain
JPEG (RGB or gray, no EXIF rotation) is only checked here, from its
header (format, pixel limit), and travels as an EncodedJpeg; everything else is decoded here
as above.

Errors are InvalidArgument whose message starts with a verb ("is empty: ..."); the handler
puts the image's name in front ("image 2 is empty: ...", "frame 17 ...").
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..domain import EncodedJpeg, RawPixels
from ..errors import InvalidArgument

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_image_pixels: int
    device_jpeg: bool = False  # plain JPEGs go to the engine encoded (EncodedJpeg)


@dataclass(frozen=True)
class Decoded:
    # uint8 (H, W, 3) at the model's input size, or a JPEG the engine decodes on its device
    pixels: Union[np.ndarray, EncodedJpeg]
    size: Tuple[int, int]  # (height, width) of the image as decoded, before resizing
    # The whole image for overlays, at render_size(size, max_pixels); None unless asked for.
    full: Optional[np.ndarray] = None


def peek_size(source) -> Optional[Tuple[int, int]]:
    """(height, width) from the header alone, without decoding; None when the header cannot
    be read (decoding then says why)."""
    if isinstance(source, RawPixels):
        return source.height, source.width
    try:
        with Image.open(io.BytesIO(source), formats=FORMATS) as image:
            width, height = image.size
    except Exception:  # anything Pillow raises on a bad header: decoding reports it
        return None
    return height, width


def render_size(size: Tuple[int, int], max_pixels: int) -> Tuple[int, int]:
    """The size heatmaps and overlays are rendered at: ``size`` (height, width), scaled down
    to at most ``max_pixels`` pixels with its aspect ratio kept."""
    height, width = size
    if height * width <= max_pixels:
        return height, width
    scale = (max_pixels / (height * width)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


def prepare(source, input_size: Tuple[int, int], limits: Limits,
            full_pixels: Optional[int] = None) -> Decoded:
    """Decode ``source`` (encoded bytes or RawPixels) and resize it to ``input_size`` (h, w).

    With ``full_pixels``, the whole image is kept too (for overlays), downscaled to at most
    that many pixels. The model's input is made the same way whether or not it is: the
    overlay's copy of an encoded image is decoded on its own, so that an answer never depends
    on which outputs were asked for."""
    if isinstance(source, RawPixels):
        rgb = raw_rgb(source, limits)
        size = rgb.shape[:2]
        pixels = rgb if size == tuple(input_size) else _resized(Image.fromarray(rgb), input_size)
        full = None if full_pixels is None else _resized(Image.fromarray(rgb),
                                                         render_size(size, full_pixels))
        return Decoded(pixels, size, full)
    decoded = _device_jpeg(source, limits) if limits.device_jpeg else None
    if decoded is None:
        image, size = _open(source, limits, draft=input_size)
        decoded = Decoded(_resized(image, input_size), size)
    if full_pixels is None:
        return decoded
    shown = render_size(decoded.size, full_pixels)
    image, _ = _open(source, limits, draft=shown)
    return dataclasses.replace(decoded, full=_resized(image, shown))


def _resized(image: Image.Image, size: Tuple[int, int]) -> np.ndarray:
    """``image`` as uint8 RGB at ``size`` (height, width)."""
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def raw_rgb(raw: RawPixels, limits: Limits) -> np.ndarray:
    h, w, c = raw.height, raw.width, raw.channels
    if h < 1 or w < 1:
        raise InvalidArgument(f"has height {h} and width {w}; both must be at least 1",
                              reason="INVALID_IMAGE")
    if c not in (1, 3, 4):
        raise InvalidArgument(f"has {c} channels; send 1 (gray), 3 (RGB) or 4 (RGBA)",
                              reason="INVALID_IMAGE")
    _check_pixels(h, w, limits)
    if len(raw.pixels) != h * w * c:
        raise InvalidArgument(f"has {len(raw.pixels)} bytes of raw pixels, but height x width x "
                              f"channels = {h}x{w}x{c} needs {h * w * c}", reason="INVALID_IMAGE")
    array = np.frombuffer(raw.pixels, dtype=np.uint8).reshape(h, w, c)
    if c == 1:
        return np.repeat(array, 3, axis=2)
    if c == 4:
        return np.ascontiguousarray(array[:, :, :3])
    return array


def _check_pixels(height: int, width: int, limits: Limits) -> None:
    if height * width > limits.max_image_pixels:
        raise InvalidArgument(
            f"is {width}x{height} = {height * width:,} pixels; this server accepts at most "
            f"{limits.max_image_pixels:,} (max_image_pixels); send a smaller image",
            reason="INVALID_IMAGE")


def blank_jpeg(size: Tuple[int, int]) -> EncodedJpeg:
    """A black JPEG of ``size`` (height, width): warms the engine's JPEG decoder up."""
    buffer = io.BytesIO()
    Image.new("RGB", (size[1], size[0])).save(buffer, format="JPEG")
    return EncodedJpeg(buffer.getvalue(), tuple(size))


def _device_jpeg(data: bytes, limits: Limits) -> Optional[Decoded]:
    """A plain JPEG, checked from its header only, for the engine to decode on its device;
    None for anything else (or anything wrong: the host path then says what)."""
    if not data or len(data) > limits.max_image_bytes or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            width, height = image.size
            mode = image.mode
            orientation = image.getexif().get(0x0112, 1)
    except Exception:
        return None
    if mode not in ("RGB", "L") or orientation != 1:
        return None
    _check_pixels(height, width, limits)
    return Decoded(EncodedJpeg(bytes(data), (height, width)), (height, width))


def _open(data: bytes, limits: Limits, draft: Optional[Tuple[int, int]]):
    """Open, check and decode encoded bytes. Returns (RGB image, (height, width) decoded)."""
    if not data:
        raise InvalidArgument("is empty: send encoded bytes (JPEG, PNG, WebP, BMP) or raw "
                              "pixels", reason="INVALID_IMAGE")
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(f"is {len(data):,} bytes; this server accepts at most "
                              f"{limits.max_image_bytes:,} (max_image_bytes)",
                              reason="INVALID_IMAGE")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidArgument(f"is not a JPEG, PNG, WebP, BMP or GIF file (it starts with "
                              f"{data[:8].hex(' ')})", reason="INVALID_IMAGE") from None
    except Image.DecompressionBombError as exc:  # Pillow's own, higher limit
        raise InvalidArgument(f"is too large to decode ({exc}); this server accepts at most "
                              f"{limits.max_image_pixels:,} pixels (max_image_pixels)",
                              reason="INVALID_IMAGE") from None
    except Exception as exc:  # Pillow's header parsers raise many types on garbage
        raise InvalidArgument(f"could not be decoded: its header is malformed ({exc})",
                              reason="INVALID_IMAGE") from None
    width, height = image.size
    _check_pixels(height, width, limits)
    orientation = image.getexif().get(0x0112, 1) if image.format == "JPEG" else 1
    size = (width, height) if orientation in _ROTATED else (height, width)
    try:
        if draft is not None and image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image stays at least as big
            # as the model input: much less work, the same input after resizing.
            want = (draft[0], draft[1]) if orientation in _ROTATED else (draft[1], draft[0])
            image.draft("RGB", want)
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image), size
    except InvalidArgument:
        raise
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError...
        raise InvalidArgument(f"could not be decoded as {image.format}: {exc}",
                              reason="INVALID_IMAGE") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the high byte (convert("L") would clip at 255 instead).
        high = (np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(high).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")
