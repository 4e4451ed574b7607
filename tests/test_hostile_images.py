"""Images in every common form are handled correctly or refused clearly.

HOSTILE is the shipped table of cases: (name, how to build the bytes, what must happen). The
README reports how many there are. Each case runs through a real server; after each, the server
still serves.
"""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from camserve import CamserveError

from conftest import DATA, load_rgb

CAT = load_rgb(DATA / "chelsea.jpg")[:120, :160]  # a small real photo, 160x120


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb(array=CAT) -> Image.Image:
    return Image.fromarray(array)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG that claims width x height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def exif_rotated() -> bytes:
    """The photo stored sideways, with EXIF orientation 6 (rotate 90° clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.ascontiguousarray(np.rot90(CAT, k=1))  # what a sideways camera stores
    return save(rgb(stored), "JPEG", quality=95, exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [rgb(CAT), rgb(255 - CAT), rgb(np.zeros_like(CAT))]
    options = {"lossless": True} if fmt == "WEBP" else {}
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                **options)


def sixteen_bit_gray() -> bytes:
    gray = np.asarray(rgb().convert("L"), dtype=np.uint16) * 257  # 0..65535
    return save(Image.fromarray(gray), "PNG")


def cmyk_jpeg() -> bytes:
    return save(rgb().convert("CMYK"), "JPEG", quality=95)


# (name, bytes, expected size (height, width) or None for a refusal, words the refusal says)
HOSTILE = [
    ("RGB JPEG", lambda: save(rgb(), "JPEG"), (120, 160), None),
    ("progressive JPEG", lambda: save(rgb(), "JPEG", progressive=True), (120, 160), None),
    ("grayscale JPEG", lambda: save(rgb().convert("L"), "JPEG"), (120, 160), None),
    ("CMYK JPEG", cmyk_jpeg, (120, 160), None),
    ("EXIF-rotated JPEG", exif_rotated, (120, 160), None),
    ("JPEG with trailing garbage", lambda: save(rgb(), "JPEG") + b"\0garbage" * 100,
     (120, 160), None),
    ("RGB PNG", lambda: save(rgb(), "PNG"), (120, 160), None),
    ("grayscale PNG", lambda: save(rgb().convert("L"), "PNG"), (120, 160), None),
    ("gray+alpha PNG", lambda: save(rgb().convert("LA"), "PNG"), (120, 160), None),
    ("RGBA PNG", lambda: save(rgb().convert("RGBA"), "PNG"), (120, 160), None),
    ("palette PNG", lambda: save(rgb().convert("P"), "PNG"), (120, 160), None),
    ("palette PNG with transparency",
     lambda: save(rgb().convert("P"), "PNG", transparency=0), (120, 160), None),
    ("1-bit PNG", lambda: save(rgb().convert("1"), "PNG"), (120, 160), None),
    ("16-bit grayscale PNG", sixteen_bit_gray, (120, 160), None),
    ("RGB PNG with a transparent colour", lambda: save(rgb(), "PNG", transparency=(40, 40, 40)),
     (120, 160), None),
    ("animated GIF (first frame)", lambda: animated("GIF"), (120, 160), None),
    ("animated WebP (first frame)", lambda: animated("WEBP"), (120, 160), None),
    ("lossy WebP", lambda: save(rgb(), "WEBP", quality=80), (120, 160), None),
    ("BMP", lambda: save(rgb(), "BMP"), (120, 160), None),
    ("1x1 pixel PNG", lambda: save(rgb(CAT[:1, :1]), "PNG"), (1, 1), None),
    ("1x4000 strip", lambda: save(rgb(np.resize(CAT, (1, 4000, 3))), "PNG"), (1, 4000), None),
    ("4000x1 column", lambda: save(rgb(np.resize(CAT, (4000, 1, 3))), "PNG"), (4000, 1), None),
    ("PNG bomb: 50000x50000 header", lambda: png_header_only(50_000, 50_000), None,
     "max_image_pixels"),
    ("PNG claiming 2^31 width", lambda: png_header_only(2**31 - 1, 1), None, ""),
    ("truncated PNG", lambda: save(rgb(), "PNG")[:300], None, "could not be decoded"),
    ("truncated JPEG", lambda: save(rgb(), "JPEG")[:400], None, "could not be decoded"),
    ("PNG with a broken CRC", lambda: save(rgb(), "PNG")[:40] + b"\0\0\0\0"
     + save(rgb(), "PNG")[44:], None, ""),
    ("TIFF (not accepted)", lambda: save(rgb(), "TIFF"), None, "not a JPEG, PNG"),
    ("SVG text", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', None, "not a JPEG, PNG"),
    ("empty bytes", lambda: b"", None, "is empty"),
    ("JPEG magic then zeros", lambda: b"\xff\xd8\xff" + b"\0" * 1000, None, ""),
    ("GIF header only", lambda: b"GIF89a" + b"\xff\xff\xff\xff" + b"\0" * 10, None, ""),
    ("BMP claiming a huge size", lambda: b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
     + struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0), None, ""),
]


@pytest.mark.parametrize("name, build, size, words", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_image(tiny_server_large, name, build, size, words):
    _, client = tiny_server_large
    data = build()
    if size is None:
        with pytest.raises(CamserveError) as error:
            client.predict(data)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT, error.value
        assert words in error.value.details
    else:
        answer = client.predict(data)
        assert answer.image_size == size
        assert np.isfinite([c.probability for c in answer.top]).all()
    assert client.predict(CAT).top  # still serving


def test_exif_rotation_is_applied(default_server):
    _, client = default_server
    upright = client.predict(save(rgb(), "JPEG", quality=95), top_k=3)
    rotated = client.predict(exif_rotated(), top_k=3)
    assert rotated.image_size == upright.image_size == (120, 160)
    assert [c.index for c in rotated.top][:1] == [c.index for c in upright.top][:1]


def test_variants_of_the_same_pixels_agree(default_server):
    """16-bit, animated (first frame) and palette-free lossless forms give the same answer as
    the 8-bit original."""
    _, client = default_server
    base = client.predict(save(rgb(), "PNG"))
    for data in (animated("WEBP"), save(rgb().convert("RGBA"), "PNG"), save(rgb(), "BMP")):
        other = client.predict(data)
        np.testing.assert_allclose([c.logit for c in other.top], [c.logit for c in base.top],
                                   atol=1e-4)
    gray = client.predict(save(rgb().convert("L"), "PNG"))
    gray16 = client.predict(sixteen_bit_gray())
    np.testing.assert_allclose([c.logit for c in gray16.top], [c.logit for c in gray.top],
                               atol=1e-4)


def test_count_of_hostile_cases():
    """The README quotes this number."""
    assert len(HOSTILE) == 33
