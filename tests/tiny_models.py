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
