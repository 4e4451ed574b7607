"""Shared fixtures: the sample photos, real servers on port 0, clients."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

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
# Servers the tests start serve no HTTP unless a test asks (--http-port's default, 8000, is one
# port for all of them): subprocesses through the environment, CamServer through running().
os.environ.setdefault("CAMSERVE_HTTP_PORT", "off")


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def encode(pixels: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def resized(pixels: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """uint8 RGB resized to (height, width)."""
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.BILINEAR))


def wait_for(condition, timeout: float = 10.0, what: str = "the condition") -> None:
    """Wait until ``condition()`` holds (for what the server does just after it answers, such
    as its access line); fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.01)


class ServerProcess:
    """``python -m camserve_server`` on 127.0.0.1, a free port and ``args``, as a subprocess
    that can load the tests' models: its stdout's lines and its log (stderr), read as they
    come."""

    def __init__(self, *args: str) -> None:
        path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "camserve_server", "--host", "127.0.0.1", "--port", "0",
             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=path))
        self.stdout: List[str] = []
        self.log: List[str] = []
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.stdout),
                                               (self.process.stderr, self.log))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: List[str]) -> None:
        for line in stream:
            with self._lock:
                lines.append(line)

    def find(self, lines: List[str], pattern: str) -> Optional[re.Match]:
        with self._lock:
            return next(filter(None, (re.search(pattern, line) for line in lines)), None)

    def wait_line(self, lines: List[str], pattern: str, timeout: float = 120) -> re.Match:
        """The first match of ``pattern`` in ``lines`` (stdout or log), once it comes."""
        deadline = time.monotonic() + timeout
        while True:
            match = self.find(lines, pattern)
            if match:
                return match
            assert self.process.poll() is None or lines is self.log, (
                f"the server exited ({self.process.returncode}) before printing {pattern!r}:\n"
                + "".join(self.log[-30:]))
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n" + "".join(self.log[-30:])
            time.sleep(0.05)

    def ended(self, timeout: float = 120) -> int:
        """Its exit status, once it and everything that shares its output are done."""
        status = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return status

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@contextlib.contextmanager
def running(**overrides) -> Iterator[Tuple[CamServer, Client]]:
    """A real server on a free port, and a client connected to it."""
    overrides.setdefault("http_port", None)
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


def record_levels(batcher, monkeypatch) -> list:
    """The queue level of every item submitted to ``batcher`` from now on, in order."""
    levels = []
    submit = batcher.submit

    def recording(work, deadline=None, level=0, caller="", admit=1):
        levels.append(level)
        return submit(work, deadline, level, caller, admit)

    monkeypatch.setattr(batcher, "submit", recording)
    return levels
