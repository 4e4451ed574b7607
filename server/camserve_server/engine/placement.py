"""Which devices the engines run on: ``--device`` as torch devices, checked against this
machine."""

from __future__ import annotations

from typing import List

import torch

from ..errors import StartupError


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise StartupError(f"--device {spec!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"--device {spec}: CUDA is not available on this machine")
    return device


def resolve_devices(spec: str) -> List[torch.device]:
    """``--device`` (comma-separated when repeated) as devices, one engine each: "cuda" alone
    is every GPU; "auto" is CUDA's current GPU when there is one, else the CPU."""
    names = [name.strip() for name in spec.split(",")]
    if names == ["cuda"]:
        if not torch.cuda.is_available():
            raise StartupError("--device cuda: CUDA is not available on this machine")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    devices = [resolve_device(name) for name in names]
    for device in devices:
        if device.type == "cuda" and device.index is not None and (
                device.index >= torch.cuda.device_count()):
            raise StartupError(f"--device {device}: this machine has "
                               f"{torch.cuda.device_count()} CUDA devices (cuda:0.."
                               f"cuda:{torch.cuda.device_count() - 1})")
    return devices

