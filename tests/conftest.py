"""Shared fixtures: the sample photos, real servers on port 0, clients."""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np
import pytest
from PIL import Image

from camserve import Client
from camserve_server.process.server import CamServer
from camserve_server.process.settings import Settings

TESTS = Path(__file__).parent
DATA = TESTS / "data"
if str(TESTS) not in sys.path:  # so servers can load python:tiny_models:tiny_cnn
    sys.path.insert(0, str(TESTS))

TINY = "python:tiny_models:tiny_cnn"


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def encode(pixels: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def resized(pixels: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """uint8 RGB resized to (height, width)."""
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.BILINEAR))


def wait_for(condition, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds (for what the server does just after it answers, such
    as its access line); fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


@contextlib.contextmanager
def running(**overrides) -> Iterator[Tuple[CamServer, Client]]:
    """A real server on a free port, and a client connected to it."""
    server = CamServer(Settings(host="127.0.0.1", port=0, **overrides))
    port = server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            yield server, client
    finally:
        server.stop(grace=1)


@pytest.fixture(scope="session")
def cat_path() -> Path:
    return DATA / "chelsea.jpg"


@pytest.fixture(scope="session")
def coffee_path() -> Path:
    return DATA / "coffee.jpg"


@pytest.fixture(scope="session")
def cat(cat_path) -> np.ndarray:
    return load_rgb(cat_path)


@pytest.fixture(scope="session")
def coffee(coffee_path) -> np.ndarray:
    return load_rgb(coffee_path)


@pytest.fixture(scope="session")
def resnet_weights(tmp_path_factory) -> Path:
    """Seeded random resnet18 weights saved to a file (nothing is downloaded)."""
    import torch
    import torchvision

    torch.manual_seed(1234)
    model = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial batch-norm statistics, so maps are not degenerate
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18-seeded.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def default_server():
    """The real default model (EfficientNet-Lite0, ImageNet)."""
    with running(max_delay_ms=20) as pair:
        yield pair


@pytest.fixture(scope="session")
def resnet_server(resnet_weights):
    with running(model="torchvision:resnet18", weights=str(resnet_weights),
                 layers=("layer4", "layer3"), max_delay_ms=20) as pair:
        yield pair


@pytest.fixture(scope="session")
def tiny_server_large():
    """The tiny model with the default limits."""
    with running(model=TINY) as pair:
        yield pair


@pytest.fixture(scope="session")
def tiny_server():
    with running(model=TINY, max_delay_ms=50, max_image_bytes=200_000,
                 max_images_per_request=10, max_score_cam_channels=8) as pair:
        yield pair
