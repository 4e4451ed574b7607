"""The engine: the only code that touches the model. It runs on the batcher's worker thread.

One call of :meth:`Engine.run` serves one batch: stack the uint8 images, move them to the device,
normalise there, run ONE forward. When any item explains, the hooked layers' outputs become the
roots of autograd (nothing below them records a graph, no parameter needs a gradient), the score
is the sum over explaining items of their target logits, and ONE ``torch.autograd.grad`` call
gives every explaining item's gradient. Items are independent (eval mode), so each item's answer
does not depend on its batch mates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .cams import METHODS
from .errors import BatchFailed
from .models import LoadedModel


class OutOfMemory(Exception):
    """The device ran out of memory on this batch; a smaller batch may fit."""


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


@dataclass(frozen=True)
class ExplainSpec:
    method: str  # a key of cams.METHODS
    layer: str  # one of the model's explainable layers
    target: Optional[int] = None  # class index; None: the item's top-1 class


@dataclass(frozen=True)
class WorkItem:
    pixels: np.ndarray  # uint8 (height, width, 3) RGB at the model's input size
    explain: Optional[ExplainSpec] = None


@dataclass(frozen=True)
class ItemResult:
    logits: np.ndarray  # float32 (classes,)
    probabilities: np.ndarray  # float32 (classes,)
    target: Optional[int] = None  # the explained class
    raw_map: Optional[np.ndarray] = None  # float32 (h, w) at the layer's grid


class Engine:
    """Runs batches on one model. Not thread-safe: one worker thread owns it."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        device = model.device
        mean = torch.tensor(model.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(model.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the device.
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self._pin = device.type == "cuda"
        self._recording: Optional[frozenset] = None
        self._activations: Dict[str, torch.Tensor] = {}
        modules = dict(model.module.named_modules())
        self._hooks = [modules[info.name].register_forward_hook(self._hook(info.name))
                       for info in model.layers]

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if self._recording is None or name not in self._recording:
                return None  # outside the engine's own explaining calls: record nothing
            # The lowest recorded layer becomes a leaf of autograd: nothing below it is
            # differentiated. A higher one is already part of the graph.
            acts = output if output.requires_grad else output.detach().requires_grad_()
            self._activations[name] = acts
            # Hand a copy downstream so that in-place ops after the layer (e.g. ReLU(inplace))
            # cannot change the activations we differentiate against.
            return acts.clone()
        return hook

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(pixels)
        if self._pin:
            batch = batch.pin_memory()
        batch = batch.to(self.model.device, non_blocking=True)
        # (N, H, W, C) permuted to (N, C, H, W) stays channels-last in memory, which oneDNN and
        # cuDNN convolutions run faster on (measured 10-50% on CPU); keep it that way.
        x = batch.permute(0, 3, 1, 2).float() * self._scale + self._shift
        return x.contiguous(memory_format=torch.channels_last)

    def run(self, items: Sequence[WorkItem]) -> List[Union[ItemResult, BatchFailed]]:
        """One result per item, in order. An item whose output is not finite gets a
        BatchFailed instead. Raises OutOfMemory when the batch does not fit the device."""
        try:
            return self._run(items)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(str(exc).splitlines()[0][:200]) from exc

    def _run(self, items: Sequence[WorkItem]) -> List[Union[ItemResult, BatchFailed]]:
        x = self._to_device(np.stack([item.pixels for item in items]))
        explaining = [i for i, item in enumerate(items) if item.explain is not None]
        if not explaining:
            with torch.inference_mode():
                logits = self.model.module(x)
            return self._results(items, logits, {}, {})
        return self._explain(items, x, explaining)

    def _explain(self, items, x, explaining: List[int]) -> List[ItemResult]:
        layers = sorted({items[i].explain.layer for i in explaining})
        self._recording = frozenset(layers)
        self._activations = {}
        try:
            with torch.enable_grad():
                logits = self.model.module(x)
                top1 = logits.detach().argmax(dim=1).tolist()
                targets = {i: items[i].explain.target if items[i].explain.target is not None
                           else top1[i] for i in explaining}
                rows = torch.tensor(explaining, device=logits.device)
                cols = torch.tensor([targets[i] for i in explaining], device=logits.device)
                score = logits[rows, cols].sum()
                activations = [self._activations[name] for name in layers]
                gradients = torch.autograd.grad(score, activations)
        finally:
            self._recording = None
            self._activations = {}
        acts = {name: a.detach() for name, a in zip(layers, activations)}
        grads = dict(zip(layers, gradients))
        maps: Dict[int, torch.Tensor] = {}
        with torch.no_grad():
            groups: Dict[tuple, List[int]] = {}
            for i in explaining:
                groups.setdefault((items[i].explain.method, items[i].explain.layer), []).append(i)
            for (method, layer), idx in groups.items():
                index = torch.tensor(idx, device=x.device)
                cams = METHODS[method].compute(acts[layer][index], grads[layer][index])
                for i, cam in zip(idx, cams.float().cpu().numpy()):
                    maps[i] = cam
        return self._results(items, logits.detach(), targets, maps)

    @staticmethod
    def _results(items, logits, targets, maps) -> List[Union[ItemResult, BatchFailed]]:
        logits = logits.float()
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        logits = logits.cpu().numpy()
        results = []
        for i in range(len(items)):
            result = ItemResult(logits[i], probs[i], targets.get(i), maps.get(i))
            finite = np.isfinite(result.logits).all() and (
                result.raw_map is None or np.isfinite(result.raw_map).all())
            results.append(result if finite else BatchFailed(
                "the model's output for this image is not finite (NaN or Inf)"))
        return results
