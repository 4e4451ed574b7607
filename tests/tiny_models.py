"""Tiny models for fast tests, served as ``python:tiny_models:FACTORY`` (tests/ is on the path)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small CNN: a 28x28 grid of 16 channels at ``features``, 10 classes."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(inplace=True))
        self.features = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(self.stem(x))).flatten(1))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # non-trivial batch-norm statistics
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model


# --- models that misbehave on purpose ------------------------------------------------------
#
# A "marked" image is a raw 224x224 image whose top-left pixel is (1, 2, N); N says what the
# model does with the batch that holds it.
RAISE, NAN, DIE, OOM = 3, 4, 5, 6
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def marked(mark: int):
    """A raw 224x224 RGB image carrying ``mark``."""
    import numpy as np

    pixels = np.full((224, 224, 3), 128, np.uint8)
    pixels[0, 0] = (1, 2, mark)
    return pixels


def _marks(x: torch.Tensor) -> list:
    corner = torch.round((x[:, :, 0, 0] * STD.view(1, 3) + MEAN.view(1, 3)) * 255).int()
    return [int(c[2]) if (int(c[0]), int(c[1])) == (1, 2) else 0 for c in corner]


class FaultyNet(TinyNet):
    """TinyNet that fails as its inputs' marks say; counts the batches it was given."""

    batches: list = []  # sizes of the batches run, in order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        marks = _marks(x)
        FaultyNet.batches.append(len(marks))
        if RAISE in marks:
            raise RuntimeError("marked input")
        if DIE in marks:
            raise SystemExit("a fault that kills the worker thread")
        if OOM in marks and len(marks) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        out = super().forward(x)
        nan = torch.tensor([m == NAN for m in marks]).view(-1, 1)
        return torch.where(nan, torch.full_like(out, float("nan")), out)


def faulty_cnn() -> nn.Module:
    torch.manual_seed(0)
    return FaultyNet()


class SlowNet(TinyNet):
    """TinyNet that takes at least 0.3 s per batch; counts the batches it was given."""

    delay_s = 0.3
    batches: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        SlowNet.batches.append(x.shape[0])
        time.sleep(SlowNet.delay_s)
        return super().forward(x)


def slow_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SlowNet()


def slow_loading_cnn() -> nn.Module:
    """TinyNet that takes 2 s to build, to observe the LOADING state."""
    import time

    time.sleep(2.0)
    return tiny_cnn()


class UnusedBranch(TinyNet):
    """TinyNet with a 4-D layer after ``features`` whose output never reaches the logits (an
    auxiliary map): the last 4-D layer, and its Grad-CAM is zero for every class."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Conv2d(16, 4, 1)
        self.aux_map = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(self.stem(x))
        self.aux_map = self.aux(features)
        return self.head(self.pool(features).flatten(1))


def unused_branch() -> nn.Module:
    torch.manual_seed(0)
    return UnusedBranch()
