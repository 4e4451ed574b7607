"""The class names a model answers with: a labels file, the model's own, ImageNet's, or
numbered."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from ..errors import StartupError


def imagenet_labels() -> Tuple[str, ...]:
    """The 1000 ImageNet class names that torchvision ships (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def find_labels(path: Optional[str], num_classes: int,
                own: Optional[Tuple[str, ...]] = None) -> Tuple[str, ...]:
    """The labels file's lines when there is one (as many as the model's classes), else the
    model's own names, else ImageNet's for 1000 classes, else "class 0", "class 1", ..."""
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise StartupError(f"cannot read labels file {path!r}: {exc}") from None
        labels = tuple(line.strip() for line in lines if line.strip())
        if len(labels) != num_classes:
            raise StartupError(f"labels file {path!r} has {len(labels)} labels, the model "
                               f"has {num_classes} classes")
        return labels
    if own is not None and len(own) == num_classes:
        return own
    if num_classes == 1000:
        return imagenet_labels()
    return tuple(f"class {i}" for i in range(num_classes))

