"""The engine: the only code that touches the model. It runs on the batcher's worker thread.

One call of :meth:`Engine.run` serves one batch: stack the uint8 images, move them to the device,
normalise there, run ONE forward. When any item explains with a gradient method, the hooked
layers' outputs become the roots of autograd (nothing below them records a graph, no parameter
needs a gradient), and for each target rank r one ``torch.autograd.grad`` of the sum, over the
explaining items, of their r-th target logit gives every item's gradient for that rank: as few
backward passes as the most targets any item asked for, whatever the mix of methods and layers.
A batch whose maps need no gradient (EigenCAM, Score-CAM) runs no backward at all. Items are
independent (eval mode), so each item's answer does not depend on its batch mates.

A layer may hold its grid as tokens (ViT) or channels last (Swin) instead of (N, C, h, w): its
activations and gradients are recorded as the layer returns them (the gradient is taken with
respect to that very tensor), and turned into (N, C, h, w) (``tokens.to_nchw``) just before a CAM
method sees them, so that every method works on every layout unchanged.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..domain import ExplainSpec, ItemResult, MapResult, WorkItem
from ..errors import BatchFailed, OutOfMemory
from . import faithfulness
from .cams import METHODS, CamInputs
from .models import LoadedModel
from .tokens import to_nchw


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


class Engine:
    """Runs batches on one model. Not thread-safe: one worker thread owns it."""

    def __init__(self, model: LoadedModel, chunk: int = 32) -> None:
        self.model = model
        self._chunk = chunk  # images per extra forward (Score-CAM, faithfulness)
        device = model.device
        mean = torch.tensor(model.card.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(model.card.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the device.
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self._pin = device.type == "cuda"
        self._recording: Optional[frozenset] = None
        self._activations: Dict[str, torch.Tensor] = {}
        self._layers = {info.name: info for info in model.card.layers}
        modules = dict(model.module.named_modules())
        self._hooks = [modules[info.name].register_forward_hook(self._hook(info.name))
                       for info in model.card.layers]

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if self._recording is None or name not in self._recording:
                return None  # outside the engine's own explaining calls: record nothing
            acts = output
            if torch.is_grad_enabled() and not output.requires_grad:
                # The lowest recorded layer becomes a leaf of autograd: nothing below it is
                # differentiated. A higher one is already part of the graph.
                acts = output.detach().requires_grad_()
            self._activations[name] = acts
            # Hand a copy downstream so that in-place ops after the layer (e.g. ReLU(inplace))
            # cannot change the activations we explain. Kept in the layer's own layout: the
            # gradient is taken with respect to this tensor; _grid turns both into (N, C, h, w).
            return acts.clone()
        return hook

    def _grid(self, layer: str, tensor: torch.Tensor) -> torch.Tensor:
        """A layer's activations or gradients as (N, C, h, w); conv layers' as they are."""
        info = self._layers[layer]
        return to_nchw(tensor, info.layout, info.prefix_tokens, info.height, info.width)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or float (n, H, W, 3) pixels in 0..255 → the model's normalised input."""
        # (N, H, W, C) permuted to (N, C, H, W) stays channels-last in memory, which oneDNN and
        # cuDNN convolutions run faster on (measured 10-50% on CPU); keep it that way.
        x = pixels.permute(0, 3, 1, 2).float() * self._scale + self._shift
        return x.contiguous(memory_format=torch.channels_last)

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(pixels)
        if self._pin:
            batch = batch.pin_memory()
        return batch.to(self.model.device, non_blocking=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of normalised inputs, in chunks, without hooks or gradients."""
        with torch.inference_mode():
            return torch.cat([self.model.module(x[i:i + self._chunk])
                              for i in range(0, x.shape[0], self._chunk)])

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
        pixels = self._to_device(np.stack([item.pixels for item in items]))
        x = self.normalise(pixels)
        explaining = [i for i, item in enumerate(items) if item.explain is not None]
        if not explaining:
            with torch.inference_mode():
                logits = self.model.module(x)
            return self._results(items, logits, {})
        return self._explain(items, pixels, x, explaining)

    def _explain(self, items, pixels, x, explaining: List[int]) -> List[ItemResult]:
        specs = {i: items[i].explain for i in explaining}
        layers = sorted({layer for spec in specs.values() for layer in spec.layers})
        gradient_items = [i for i in explaining
                          if any(METHODS[m].needs_gradient for m in specs[i].methods)]
        self._recording = frozenset(layers)
        self._activations = {}
        try:
            mode = torch.enable_grad() if gradient_items else torch.inference_mode()
            with mode:
                logits = self.model.module(x)
                targets = {i: _targets(specs[i], logits[i].detach()) for i in explaining}
                activations = [self._activations[name] for name in layers]
                gradients = self._gradients(logits, activations, gradient_items, targets, layers)
        finally:
            self._recording = None
            self._activations = {}
        acts = {name: a.detach() for name, a in zip(layers, activations)}
        maps = self._maps(specs, targets, acts, gradients, x)
        if any(spec.faithfulness_steps for spec in specs.values()):
            maps = self._faithfulness(specs, maps, pixels)
        return self._results(items, logits.detach(), maps)

    @staticmethod
    def _gradients(logits, activations, rows, targets, layers) -> List[Dict[str, torch.Tensor]]:
        """Per target rank, per layer: d(each row's rank-r target logit)/d(activations)."""
        ranks = max((len(targets[i]) for i in rows), default=0)
        out = []
        for rank in range(ranks):
            ranked = [i for i in rows if len(targets[i]) > rank]
            index = torch.tensor(ranked, device=logits.device)
            classes = torch.tensor([targets[i][rank] for i in ranked], device=logits.device)
            score = logits[index, classes].sum()
            grads = torch.autograd.grad(score, activations, retain_graph=rank < ranks - 1)
            out.append(dict(zip(layers, grads)))
        return out

    def _maps(self, specs, targets, acts, gradients, x) -> Dict[int, List[MapResult]]:
        """Every item's maps, computed in groups of items that share method, layer, target
        rank and options."""
        groups: Dict[tuple, List[int]] = {}
        for i, spec in specs.items():
            for method in spec.methods:
                for rank in range(len(targets[i])):
                    for layer in spec.layers:
                        key = (method, rank, layer, spec.counterfactual, spec.signed,
                               spec.score_cam_channels)
                        groups.setdefault(key, []).append(i)
        computed: Dict[tuple, np.ndarray] = {}
        with torch.no_grad():
            for (method, rank, layer, counterfactual, signed, channels), rows in groups.items():
                index = torch.tensor(rows, device=x.device)
                grads = None
                if METHODS[method].needs_gradient:
                    grads = self._grid(layer, gradients[rank][layer][index])
                    grads = -grads if counterfactual else grads
                cams = METHODS[method].compute(CamInputs(
                    activations=self._grid(layer, acts[layer][index]), gradients=grads,
                    inputs=x[index],
                    targets=torch.tensor([targets[i][rank] for i in rows], device=x.device),
                    forward=self.forward, max_channels=channels, chunk=self._chunk))
                if not signed:
                    cams = torch.relu(cams)
                for i, cam in zip(rows, cams.float().cpu().numpy()):
                    computed[(i, method, rank, layer)] = cam
        return {i: [MapResult(method, targets[i][rank], layer, computed[(i, method, rank, layer)])
                    for method in spec.methods for rank in range(len(targets[i]))
                    for layer in spec.layers]
                for i, spec in specs.items()}

    def _faithfulness(self, specs, maps, pixels) -> Dict[int, List[MapResult]]:
        out = {}
        for i, item_maps in maps.items():
            steps = specs[i].faithfulness_steps
            if not steps:
                out[i] = item_maps
                continue
            out[i] = [MapResult(m.method, m.target, m.layer, m.raw, *faithfulness.scores(
                self.forward, self.normalise, pixels[i], torch.from_numpy(m.raw), m.target,
                steps), steps=steps) for m in item_maps]
        return out

    @staticmethod
    def _results(items, logits, maps) -> List[Union[ItemResult, BatchFailed]]:
        logits = logits.float()
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        logits = logits.cpu().numpy()
        results = []
        for i in range(len(items)):
            item_maps = tuple(maps.get(i, ()))
            finite = np.isfinite(logits[i]).all() and all(
                np.isfinite(m.raw).all() for m in item_maps)
            results.append(ItemResult(logits[i], probs[i], item_maps) if finite else BatchFailed(
                "the model's output for this image is not finite (NaN or Inf)"))
        return results


def _targets(spec: ExplainSpec, logits: torch.Tensor) -> List[int]:
    if spec.targets:
        return list(spec.targets)
    k = max(1, min(spec.top_targets, logits.shape[0]))
    return torch.topk(logits.float(), k).indices.tolist()
