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

from collections.abc import Generator
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

    def __init__(self, model: LoadedModel, chunk: int = 16) -> None:
        self.model = model
        self._chunk = chunk  # images per extra forward (Score-CAM, faithfulness): one slice
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
        """One result per item, in order, every job run to its end (for in-process use; the
        server's batcher uses :meth:`run_batch`)."""
        return [finish(answer) for answer in self.run_batch(items)]

    def run_batch(self, items: Sequence[WorkItem]) -> List[Answer]:
        """One answer per item, in order: its result; a BatchFailed when its output is not
        finite; or, for an item whose explanation needs extra forwards (Score-CAM,
        faithfulness), a job: a generator that runs them a chunk at a time, yielding the
        images each chunk forwarded and returning the result. Raises OutOfMemory when the
        batch does not fit the device."""
        try:
            return self._run(items)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(str(exc).splitlines()[0][:200]) from exc

    def _run(self, items: Sequence[WorkItem]) -> List[Answer]:
        pixels = self._to_device(np.stack([item.pixels for item in items]))
        x = self.normalise(pixels)
        explaining = [i for i, item in enumerate(items) if item.explain is not None]
        if not explaining:
            with torch.inference_mode():
                logits, probs = _outputs(self.model.module(x))
            return [_result(logits[i], probs[i], ()) for i in range(len(items))]
        return self._explain(items, pixels, x, explaining)

    def _explain(self, items, pixels, x, explaining: List[int]) -> List[Answer]:
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
        computed = self._maps(specs, targets, acts, gradients, x)
        logits, probs = _outputs(logits.detach())
        answers: List[Answer] = []
        for i, item in enumerate(items):
            spec = item.explain
            if spec is not None and (spec.faithfulness_steps or any(
                    METHODS[m].slices is not None for m in spec.methods)):
                # Score-CAM channels or faithfulness steps: the rest runs as a job, in
                # slices between batches. It keeps only this item's tensors.
                item_acts = {layer: self._grid(layer, acts[layer][i:i + 1])[0].clone()
                             for layer in spec.layers}
                answers.append(self._job(spec, targets[i], computed, i, item_acts,
                                         x[i].clone(), pixels[i].clone(), logits[i], probs[i]))
                continue
            maps = [] if spec is None else [
                MapResult(method, targets[i][rank], layer, computed[(i, method, rank, layer)])
                for method, rank, layer in _order(spec, targets[i])]
            answers.append(_result(logits[i], probs[i], maps))
        return answers

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

    def _maps(self, specs, targets, acts, gradients, x) -> Dict[tuple, np.ndarray]:
        """Every map that needs no extra forwards, by (item, method, rank, layer), computed in
        groups of items that share method, layer, target rank and options."""
        groups: Dict[tuple, List[int]] = {}
        for i, spec in specs.items():
            for method, rank, layer in _order(spec, targets[i]):
                if METHODS[method].slices is None:
                    key = (method, rank, layer, spec.counterfactual, spec.signed)
                    groups.setdefault(key, []).append(i)
        computed: Dict[tuple, np.ndarray] = {}
        with torch.no_grad():
            for (method, rank, layer, counterfactual, signed), rows in groups.items():
                index = torch.tensor(rows, device=x.device)
                grads = None
                if METHODS[method].needs_gradient:
                    grads = self._grid(layer, gradients[rank][layer][index])
                    grads = -grads if counterfactual else grads
                cams = METHODS[method].compute(CamInputs(
                    activations=self._grid(layer, acts[layer][index]), gradients=grads,
                    inputs=x[index],
                    targets=torch.tensor([targets[i][rank] for i in rows], device=x.device),
                    forward=self.forward, chunk=self._chunk))
                if not signed:
                    cams = torch.relu(cams)
                for i, cam in zip(rows, cams.float().cpu().numpy()):
                    computed[(i, method, rank, layer)] = cam
        return computed

    def _job(self, spec: ExplainSpec, targets: List[int], computed, i: int, acts, x, pixels,
             logits: np.ndarray, probs: np.ndarray) -> Job:
        """One item's maps that need extra forwards, and its faithfulness scores, a chunk of
        forwards at a time (a generator: the batcher runs it in slices, see batcher.py)."""
        maps = []
        for method, rank, layer in _order(spec, targets):
            raw = computed.get((i, method, rank, layer))
            if raw is None:
                with torch.no_grad():
                    cam = yield from METHODS[method].slices(
                        acts[layer], x, targets[rank], self.forward, spec.score_cam_channels,
                        self._chunk)
                raw = (cam if spec.signed else torch.relu(cam)).float().cpu().numpy()
            maps.append(MapResult(method, targets[rank], layer, raw))
        if spec.faithfulness_steps:
            steps = spec.faithfulness_steps
            scored = []
            for m in maps:
                deletion, insertion = yield from faithfulness.score_slices(
                    self.forward, self.normalise, pixels, torch.from_numpy(m.raw), m.target,
                    steps, self._chunk)
                scored.append(MapResult(m.method, m.target, m.layer, m.raw, deletion,
                                        insertion, steps=steps))
            maps = scored
        return _result(logits, probs, maps)


Answer = Union[ItemResult, BatchFailed, Generator]
Job = Generator  # of int (images forwarded per slice), returning the ItemResult or BatchFailed


def finish(answer: Answer) -> Union[ItemResult, BatchFailed]:
    """An answer with its job, if it has one, run to the end."""
    if not isinstance(answer, Generator):
        return answer
    while True:
        try:
            next(answer)
        except StopIteration as done:
            return done.value


def _outputs(logits: torch.Tensor):
    """Logits and probabilities of a batch, on the host."""
    logits = logits.float()
    return logits.cpu().numpy(), torch.softmax(logits, dim=1).cpu().numpy()


def _result(logits: np.ndarray, probs: np.ndarray, maps) -> Union[ItemResult, BatchFailed]:
    maps = tuple(maps)
    if np.isfinite(logits).all() and all(np.isfinite(m.raw).all() for m in maps):
        return ItemResult(logits, probs, maps)
    return BatchFailed("the model's output for this image is not finite (NaN or Inf)")


def _order(spec: ExplainSpec, targets: List[int]):
    """An item's maps in the order it asked for them: (method, target rank, layer)."""
    return [(method, rank, layer) for method in spec.methods
            for rank in range(len(targets)) for layer in spec.layers]


def _targets(spec: ExplainSpec, logits: torch.Tensor) -> List[int]:
    if spec.targets:
        return list(spec.targets)
    k = max(1, min(spec.top_targets, logits.shape[0]))
    return torch.topk(logits.float(), k).indices.tolist()
