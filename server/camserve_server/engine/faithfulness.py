"""Deletion and insertion scores of a map (Petsiuk et al., "RISE", BMVC 2018, section 4.1).

The map, resized to the model's input, orders the pixels from most to least salient. Deletion
sets the most salient pixels to black, a fraction 1/steps at a time; insertion starts from a
blurred copy of the image and puts the original pixels back in the same order. After each step
the target class's softmax probability is recorded; each score is the area under its curve
(trapezoids over x = 0, 1/steps, ..., 1). All 2 (steps + 1) images go through the model in
chunks, which the batcher runs as slices of a job between batches.
"""

from __future__ import annotations

from typing import Callable, Generator, Tuple

import torch
import torch.nn.functional as F

BLUR_SIGMA = 5.0  # pixels at the model's input size


def _blur(image: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Gaussian blur of (H, W, 3) float pixels, reflecting at the edges."""
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    kernel = torch.exp(-(t * t) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    x = image.permute(2, 0, 1)[:, None]  # (3, 1, H, W)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0].permute(1, 2, 0)


def _area(probabilities: torch.Tensor) -> float:
    steps = probabilities.shape[0] - 1
    return float((probabilities.sum() - (probabilities[0] + probabilities[-1]) / 2) / steps)


def score_slices(forward: Callable[[torch.Tensor], torch.Tensor],
                 normalise: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                 raw_map: torch.Tensor, target: int, steps: int, chunk: int,
                 activation: str = "softmax") -> Generator[int, None, Tuple[float, float]]:
    """(deletion, insertion) for one map, a chunk of forwards at a time: yields the number of
    images each chunk forwarded. ``pixels``: uint8 (H, W, 3) on the device; ``forward``:
    logits of normalised inputs; ``normalise``: pixels → model input; ``activation``: the
    probability recorded, a softmax or (a multi-label model's) a sigmoid."""
    height, width = pixels.shape[:2]
    image = pixels.float()
    saliency = F.interpolate(raw_map.float()[None, None].to(image.device), size=(height, width),
                             mode="bilinear", align_corners=False).flatten()
    # Most salient first; ties broken by position, so a map always gives the same order.
    order = torch.argsort(-saliency, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    rank = rank.view(height, width, 1)
    cut = torch.linspace(0, height * width, steps + 1, device=image.device).round()
    blurred = _blur(image)
    probabilities = []
    # Images 0..steps delete, steps+1..2 steps+1 insert; each chunk is built when it runs.
    for start in range(0, 2 * (steps + 1), chunk):
        index = torch.arange(start, min(start + chunk, 2 * (steps + 1)), device=image.device)
        inserting = (index > steps).view(-1, 1, 1, 1)
        shown = rank[None] < cut[index % (steps + 1)].view(-1, 1, 1, 1)
        batch = torch.where(inserting, torch.where(shown, image, blurred),
                            torch.where(shown, torch.zeros_like(image), image))
        with torch.inference_mode():
            logits = forward(normalise(batch))
        logits = logits.float()
        probabilities.append((torch.sigmoid(logits) if activation == "sigmoid" else
                              torch.softmax(logits, dim=1))[:, target])
        yield index.numel()
    probabilities = torch.cat(probabilities)
    return _area(probabilities[:steps + 1]), _area(probabilities[steps + 1:])
