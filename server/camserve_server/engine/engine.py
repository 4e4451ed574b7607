"""The engine: the only code that touches the model. It runs on the batcher's worker thread.

One call of :meth:`Engine.run` serves one batch: stack the uint8 images, move them to the device,
normalise there, run ONE forward. When any item explains with a gradient method, the hooked
layers' outputs become the roots of autograd (nothing below them records a graph, no parameter
needs a gradient), and for each target rank r one ``torch.autograd.grad`` of the sum, over the
explaining items, of their r-th target logit gives every item's gradient for that rank: as few
backward passes as the most targets any item asked for, whatever the mix of methods and layers.
A batch whose maps need no gradient (EigenCAM, Score-CAM) runs no backward at all. Items are
independent (eval mode), so each item's answer does not depend on its batch mates.

Precision (``--precision``): fp32 runs in strict float32; bf16 and fp16 run the forward and the
partial backward under ``torch.autocast`` (the hooked activations and their gradients are
cast back to float32 before a CAM method sees them, and so are the logits). fp16 needs CUDA.

The data path (pinned buffers, a copy stream, JPEG decoded on the device, answers back in one
copy) is ``device.py``; ``run_batch(items, upcoming)`` stages the upcoming batch there while
this one computes.

A layer may hold its grid as tokens (ViT) or channels last (Swin) instead of (N, C, h, w): its
activations and gradients are recorded as the layer returns them (the gradient is taken with
respect to that very tensor), and turned into (N, C, h, w) (``tokens.to_nchw``) just before a CAM
method sees them, so that every method works on every layout unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Generator
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..domain import (
    AUGMENTATIONS,
    SLICE_FORWARDS,
    ExplainSpec,
    ItemResult,
    Job,
    MapResult,
    WorkItem,
)
from ..errors import BatchFailed, OutOfMemory, ServiceError, StartupError
from . import faithfulness, road
from .cams import (
    CAM_METHODS,
    GUIDED_ACTIVATIONS,
    CamInputs,
    SliceInputs,
    bias_layers,
    finish_map,
    guided_output,
)
from .device import DataPath, Staged, key
from .models import LoadedModel
from .targets import concepts, target_scores
from .tokens import to_nchw


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


# Autocast dtypes. fp32 is strict float32: on CUDA, TF32 tensor cores are off for this engine's
# convolutions and matrix products (PyTorch lets cuDNN use TF32 by default, about 1e-3 off);
# tf32 lets them on (CUDA only), still without autocast.
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Raises StartupError when ``precision`` cannot run on ``device``."""
    if precision not in PRECISIONS:
        raise StartupError(f"--precision {precision!r}: choose fp32, tf32, bf16 or fp16")
    if precision in ("fp16", "tf32") and device.type != "cuda":
        raise StartupError(f"--precision {precision} needs a CUDA device, and this engine runs "
                           f"on {device}: use --precision bf16 (or fp32) on CPU")


class Engine:
    """Runs batches on one model. Not thread-safe: one worker thread owns it.

    ``precision``: fp32, bf16 or fp16 (CUDA only). Items whose pixels are an EncodedJpeg are
    decoded on the engine's device (``device.py``)."""

    def __init__(self, model: LoadedModel, precision: str = "fp32") -> None:
        self.model = model
        self._chunk = SLICE_FORWARDS  # images per extra forward (Score-CAM, faithfulness)
        self._activation = model.card.output_activation
        device = model.device
        check_precision(precision, device)
        self.precision = precision
        self._dtype = PRECISIONS[precision]
        self._data = DataPath(device, model.card.input_size)
        self._staged: Optional[Staged] = None  # the upcoming batch, staged in advance
        mean = torch.tensor(model.card.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(model.card.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the device.
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self._recording: Optional[frozenset] = None
        self._replacing: Optional[tuple] = None  # (layer, the output it returns instead)
        self._activations: Dict[str, torch.Tensor] = {}
        self._layers = {info.name: info for info in model.card.layers}
        modules = dict(model.module.named_modules())
        self._hooks = [modules[info.name].register_forward_hook(self._hook(info.name))
                       for info in model.card.layers]
        # Guided backpropagation's ReLUs: their backward is guided during _input_pass only.
        self._guiding = False
        self._hooks += [m.register_forward_hook(self._guide()) for m in model.module.modules()
                        if isinstance(m, GUIDED_ACTIVATIONS)]
        # FullGrad's bias layers: their outputs recorded during _input_pass's pass only.
        self._biases = bias_layers(model.module)
        self._bias_outputs: Optional[Dict[str, torch.Tensor]] = None
        self._hooks += [modules[name].register_forward_hook(self._bias_hook(name))
                        for name, _ in self._biases]

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if self._replacing is not None and self._replacing[0] == name:
                return self._replacing[1].to(output.dtype)  # AblationCAM's ablated outputs
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

    def _bias_hook(self, name: str):
        def record(_module, _inputs, output):
            if self._bias_outputs is None:
                return None
            self._bias_outputs[name] = output
            return output.clone()  # in-place ops after it (ReLU) leave the recorded one be
        return record

    def _guide(self):
        def guide(_module, _inputs, output):
            return guided_output(output) if self._guiding else None
        return guide

    def _grid(self, layer: str, tensor: torch.Tensor) -> torch.Tensor:
        """A layer's activations or gradients as (N, C, h, w); conv layers' as they are."""
        info = self._layers[layer]
        return to_nchw(tensor, info.layout, info.prefix_tokens, info.height, info.width)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or float (n, H, W, 3) pixels in 0..255 → the model's normalised input."""
        # (N, H, W, C) permuted to (N, C, H, W) stays channels-last in memory, which oneDNN and
        # cuDNN convolutions run faster on; keep it that way.
        x = pixels.permute(0, 3, 1, 2).float() * self._scale + self._shift
        return x.contiguous(memory_format=torch.channels_last)

    def _autocast(self):
        """The precision's autocast; nothing in fp32."""
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=self._dtype)

    def _on_device(self):
        """The engine's CUDA device as the current one (streams, autocast), on any thread, and
        TF32 as its precision says (process-wide flags: every engine of a server shares one
        precision)."""
        if self.model.device.type != "cuda":
            return contextlib.nullcontext()
        tf32 = self.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        return torch.cuda.device(self.model.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of normalised inputs, in chunks, without hooks or gradients (float32)."""
        with torch.inference_mode(), self._on_device(), self._autocast():
            logits = torch.cat([self.model.module(x[i:i + self._chunk])
                                for i in range(0, x.shape[0], self._chunk)])
        return logits if self._dtype is None else logits.float()

    def _replaced(self, layer: str, x: torch.Tensor):
        """Logits of the input ``x`` (3, H, W) with ``layer``'s output replaced by each of a
        batch of (m, C, h, w) (an nchw layer's): the layers below it still run."""
        def forward(outputs: torch.Tensor) -> torch.Tensor:
            self._replacing = (layer, outputs)
            try:
                return self.forward(x[None].repeat(outputs.shape[0], 1, 1, 1))
            finally:
                self._replacing = None
        return forward

    def run(self, items: Sequence[WorkItem]) -> List[Union[ItemResult, BatchFailed]]:
        """One result per item, in order, every job run to its end (for in-process use; the
        server's batcher uses :meth:`run_batch`)."""
        return [finish(answer) for answer in self.run_batch(items)]

    def run_batch(self, items: Sequence[WorkItem],
                  upcoming: Optional[Sequence[WorkItem]] = None) -> List[Answer]:
        """One answer per item, in order: its result; a BatchFailed when its output is not
        finite; an InvalidArgument for a JPEG that cannot be decoded; or, for an item whose
        explanation needs extra forwards (Score-CAM, faithfulness), a job: a generator that
        runs them a chunk at a time, yielding the images each chunk forwarded and returning
        the result. Raises OutOfMemory when the batch does not fit the device.

        ``upcoming``: the batch the caller will run next; it is staged (copied to the device,
        its JPEGs decoded) once this batch's forward is launched, so that on CUDA its copy
        overlaps this batch's compute."""
        try:
            with self._on_device():
                return self._run(items, upcoming)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            self._staged = None
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(str(exc).splitlines()[0][:200]) from exc

    def _run(self, items: Sequence[WorkItem], upcoming=None) -> List[Answer]:
        staged, self._staged = self._staged, None
        if staged is None or staged.key != key(items):
            staged = self._data.stage(items)
        pixels = self._data.wait(staged)
        if staged.errors:  # JPEGs that could not be decoded answer alone; the rest run
            ok = [i for i in range(len(items)) if i not in staged.errors]
            answers: List[Answer] = list(staged.errors.get(i) for i in range(len(items)))
            if ok:
                for i, answer in zip(ok, self._compute([items[i] for i in ok], pixels,
                                                       upcoming)):
                    answers[i] = answer
            elif upcoming:
                self._stage_upcoming(upcoming)
            return answers
        return self._compute(items, pixels, upcoming)

    def _stage_upcoming(self, upcoming) -> None:
        """Stage the next batch now (the current one's forward is launched)."""
        if not upcoming:
            return
        try:
            self._staged = self._data.stage(upcoming)
        except Exception:  # staged again (and its error raised) when that batch runs
            self._staged = None

    def _compute(self, items: Sequence[WorkItem], pixels: torch.Tensor,
                 upcoming) -> List[Answer]:
        x = self.normalise(pixels)
        explaining = [i for i, item in enumerate(items) if item.explain is not None]
        if not explaining:
            with torch.inference_mode(), self._autocast():
                logits = self.model.module(x)
            self._stage_upcoming(upcoming)
            logits, probs = self._data.to_host(_outputs(logits, self._activation))
            return [_result(logits[i], probs[i], ()) for i in range(len(items))]
        return self._explain(items, pixels, x, explaining, upcoming)

    def _explain(self, items, pixels, x, explaining: List[int], upcoming=None) -> List[Answer]:
        specs = {i: items[i].explain for i in explaining}
        layers = sorted({layer for spec in specs.values() for layer in spec.layers})
        gradient_items = [i for i in explaining
                          if any(CAM_METHODS[m].needs_gradient for m in specs[i].methods)]
        self._recording = frozenset(layers)
        self._activations = {}
        self._no_gradient: set = set()
        # A second-order backward (ShapleyCAM) needs attention in plain operations: the fused
        # scaled-dot-product kernels have no derivative of their backward.
        second = any(CAM_METHODS[m].second_order for i in gradient_items
                     for m in specs[i].methods)
        try:
            mode = torch.enable_grad() if gradient_items else torch.inference_mode()
            attention = sdpa_kernel([SDPBackend.MATH]) if second else contextlib.nullcontext()
            with mode, self._autocast(), attention:
                logits = self.model.module(x)
                self._stage_upcoming(upcoming)  # on CUDA the forward runs meanwhile
                targets = _targets(specs, logits.detach())
                activations = [self._activations[name] for name in layers]
                gradients = self._gradients(logits, activations, gradient_items, targets, layers,
                                            specs)
        finally:
            self._recording = None
            self._activations = {}
        # Reduced precision: the methods work on float32 (a no-op in fp32).
        acts = {name: a.detach().float() for name, a in zip(layers, activations)}
        guided = self._input_pass(x, [i for i in explaining if specs[i].guided], specs,
                                  targets, guide=True)
        full = self._input_pass(x, [i for i in explaining if any(
            CAM_METHODS[m].full_gradient for m in specs[i].methods)], specs, targets,
            biases=True)
        self._no_gradient = set()  # (item, method, rank, layer) whose gradient is all zero
        computed, (logits, probs) = self._maps(specs, targets, acts, gradients, x,
                                               _outputs(logits.detach(), self._activation),
                                               guided, full)
        silent = self._no_gradient
        self._augmented(specs, targets, x, computed)
        self._no_gradient = silent
        answers: List[Answer] = []
        for i, item in enumerate(items):
            spec = item.explain
            if spec is not None and (spec.faithfulness_steps or spec.road_percentiles or any(
                    CAM_METHODS[m].slices is not None for m in spec.methods)):
                # Score-CAM channels or faithfulness steps: the rest runs as a job, in
                # slices between batches. It keeps only this item's tensors.
                item_acts = {layer: self._grid(layer, acts[layer][i:i + 1])[0].clone()
                             for layer in spec.layers}
                silent = frozenset(k for k in self._no_gradient if k[0] == i)
                answers.append(self._job(spec, targets[i], computed, i, item_acts,
                                         x[i].clone(), pixels[i].clone(), logits[i], probs[i],
                                         silent))
                continue
            maps = [] if spec is None else [
                MapResult(method, targets[i][rank], layer, computed[(i, method, rank, layer)],
                          target_kind=spec.kind(method),
                          no_gradient=(i, method, rank, layer) in self._no_gradient)
                for method, rank, layer in _order(spec, targets[i])]
            answers.append(_result(logits[i], probs[i], maps))
        return answers

    @staticmethod
    def _gradients(logits, activations, rows, targets, layers, specs) -> Dict[tuple, dict]:
        """Per (target rank, finer), per layer: d(each row's rank-r target score)/d(activations),
        the score FinerCAM's (``finer``) or the row's own target kind; and per (rank, finer,
        "hvp") the Hessian-vector products ShapleyCAM's rows need. One backward per (rank,
        finer) the rows ask for; ShapleyCAM's rows have one of their own, which keeps its graph
        for the second-order backward of each layer."""
        calls: Dict[tuple, List[int]] = {}
        for i in rows:
            methods = [m for m in specs[i].methods if CAM_METHODS[m].needs_gradient]
            for finer in sorted({specs[i].kind(m) == "finer" for m in methods}):
                second = any(CAM_METHODS[m].second_order and (specs[i].kind(m) == "finer")
                             == finer for m in methods)
                for rank in range(len(targets[i])):
                    calls.setdefault((rank, finer, second), []).append(i)
        out: Dict[tuple, dict] = {}
        for (rank, finer, second), ranked in sorted(calls.items()):
            score = 0
            by_kind: Dict[str, List[int]] = {}
            for i in ranked:
                by_kind.setdefault("finer" if finer else specs[i].target_kind, []).append(i)
            for kind, group in by_kind.items():
                index = torch.tensor(group, device=logits.device)
                classes = torch.tensor([targets[i][rank] for i in group], device=logits.device)
                score = score + target_scores(logits[index], classes, kind,
                                              concepts(specs, group, kind)).sum()
            grads = torch.autograd.grad(score, activations, retain_graph=True,
                                        create_graph=second)
            if second:
                # A gradient that does not depend on the activations (the network is linear
                # above the layer) has a zero Hessian.
                hvp = [torch.autograd.grad(g, a, grad_outputs=a.detach(), retain_graph=True,
                                           allow_unused=True)[0] if g.requires_grad else None
                       for g, a in zip(grads, activations)]
                _accumulate(out, (rank, finer, "hvp"), layers, [
                    torch.zeros_like(a) if h is None else h.detach()
                    for h, a in zip(hvp, activations)])
                grads = [g.detach() for g in grads]
            _accumulate(out, (rank, finer), layers, grads)
        return out

    def _augmented(self, specs, targets, x, computed) -> None:
        """aug_smooth (pytorch-grad-cam's forward_augmentation_smoothing): each such item's
        copies (AUGMENTATIONS: flipped, scaled, all of them in one more batch) explained for
        the item's own targets; each copy's map after its ReLU min-max scaled at the layer's
        grid, resized to the input, scaled again (pytorch-grad-cam's two scale_cam_image),
        flipped back; the item's map the mean of its copies' (at the input's size)."""
        rows = [i for i, spec in specs.items() if spec.aug_smooth]
        if not rows:
            return
        copies, inputs = [], []
        for i in rows:
            spec = dataclasses.replace(specs[i], aug_smooth=False, targets=tuple(targets[i]),
                                       faithfulness_steps=0)
            for flip, factor in AUGMENTATIONS:
                inputs.append((x[i].flip(-1) if flip else x[i]) * factor)
                copies.append(WorkItem(pixels=None, explain=spec))
        stacked = torch.stack(inputs).contiguous(memory_format=torch.channels_last)
        answers = self._explain(copies, stacked, stacked, list(range(len(copies))))
        size = tuple(x.shape[-2:])
        smoothed: Dict[tuple, np.ndarray] = {}
        for n, i in enumerate(rows):
            mine = answers[n * len(AUGMENTATIONS):(n + 1) * len(AUGMENTATIONS)]
            if any(not isinstance(a, ItemResult) for a in mine):
                continue  # not finite: the item's own maps stay, and answer for it
            for (flip, _), answer in zip(AUGMENTATIONS, mine):
                for m in answer.maps:
                    heat = _scale(torch.relu(torch.from_numpy(m.raw)))
                    heat = _scale(F.interpolate(heat[None, None], size=size, mode="bilinear",
                                                align_corners=False)[0, 0])
                    heat = heat.flip(-1) if flip else heat
                    key = (i, m.method, targets[i].index(m.target), m.layer)
                    smoothed[key] = smoothed.get(key, 0) + heat.numpy() / len(AUGMENTATIONS)
        computed.update(smoothed)

    def _input_pass(self, x, rows, specs, targets, guide: bool = False,
                    biases: bool = False) -> List[dict]:
        """A forward of ``rows``' own and per target rank one backward to the input of the sum
        of the rows' target scores (negated for counterfactual items, before any guide: it is
        not linear). ``guide``: every ReLU's backward guided (guided backpropagation).
        ``biases``: the gradients at FullGrad's bias layers too. Per rank {"input": (len(x),
        3, H, W), zero for the other rows; "biases": [(bias, gradient (len(rows), C, h, w))];
        "rows": rows}."""
        if not rows:
            return []
        index = torch.tensor(rows, device=x.device)
        inputs = x[index].detach().requires_grad_()
        ranks = max(len(targets[i]) for i in rows)
        out = []
        self._guiding = guide
        self._bias_outputs = {} if biases else None
        try:
            with torch.enable_grad(), self._autocast():  # the scores recorded too
                logits = self.model.module(inputs)
                scores = [self._guided_score(logits, rows, specs, targets, rank)
                          for rank in range(ranks)]
            recorded = self._bias_outputs or {}
            self._bias_outputs = None
            names = [name for name, _ in self._biases if name in recorded] if biases else []
            wrt = [inputs, *(recorded[name] for name in names)]
            for rank, score in enumerate(scores):
                grads = torch.autograd.grad(score, wrt, retain_graph=rank < ranks - 1,
                                            allow_unused=True)
                full = torch.zeros(x.shape, device=x.device)
                full[index] = grads[0].float()
                bias = dict(self._biases)
                out.append({"input": full, "rows": rows, "biases": [
                    (bias[name], torch.zeros_like(recorded[name]).float() if g is None
                     else g.float()) for name, g in zip(names, grads[1:])]})
        finally:
            self._guiding = False
            self._bias_outputs = None
        return out

    @staticmethod
    def _guided_score(logits, rows, specs, targets, rank: int):
        """The sum of the rows' rank-r target scores, negated for counterfactual rows."""
        score = 0
        device = logits.device
        for kind in {specs[i].target_kind for i in rows}:
            ranked = [j for j, i in enumerate(rows)
                      if len(targets[i]) > rank and specs[i].target_kind == kind]
            if not ranked:
                continue
            signs = torch.tensor([-1.0 if specs[rows[j]].counterfactual else 1.0
                                  for j in ranked], device=device)
            classes = torch.tensor([targets[rows[j]][rank] for j in ranked], device=device)
            scores = target_scores(logits[torch.tensor(ranked, device=device)], classes, kind,
                                   concepts(specs, [rows[j] for j in ranked], kind))
            score = score + (scores * signs).sum()
        return score

    def _maps(self, specs, targets, acts, gradients, x, outputs, guided=(), full=()) -> tuple:
        """Every map that needs no extra forwards, by (item, method, rank, layer), computed in
        groups of items that share method, layer, target rank and options; and ``outputs``
        (device tensors) on the host: everything copied back together."""
        groups: Dict[tuple, List[int]] = {}
        for i, spec in specs.items():
            for method, rank, layer in _order(spec, targets[i]):
                if CAM_METHODS[method].slices is None:
                    key = (method, rank, layer, spec.counterfactual, spec.signed,
                           spec.kind(method) == "finer", spec.eigen_smooth)
                    groups.setdefault(key, []).append(i)
        computed: Dict[tuple, np.ndarray] = {}
        maps: List[tuple] = []  # (rows, method, rank, layer, cams on the device)
        silent: List[torch.Tensor] = []  # per group, per row: 1 where the gradient is all 0
        with torch.no_grad():
            for (method, rank, layer, counterfactual, signed, finer, smooth), rows in \
                    groups.items():
                index = torch.tensor(rows, device=x.device)
                grads = hvp = None
                sign = -1.0 if counterfactual else 1.0
                if CAM_METHODS[method].needs_gradient:
                    grads = sign * self._grid(layer, gradients[rank, finer][layer][index].float())
                if CAM_METHODS[method].second_order:
                    hvp = sign * self._grid(layer, gradients[rank, finer, "hvp"][layer][index]
                                            .float())
                silent.append(torch.zeros(len(rows), device=x.device) if grads is None
                              else grads.flatten(1).abs().amax(dim=1).eq(0).float())
                cams = finish_map(CAM_METHODS[method], CAM_METHODS[method].compute(CamInputs(
                    activations=self._grid(layer, acts[layer][index]), gradients=grads,
                    inputs=x[index],
                    targets=torch.tensor([targets[i][rank] for i in rows], device=x.device),
                    forward=self.forward,
                    guided=(guided[rank]["input"][index] if CAM_METHODS[method].guided
                            else None),
                    hvp=hvp, **_full_gradients(full, rank, rows, method))), smooth)
                if not signed:
                    cams = torch.relu(cams)
                maps.append((rows, method, rank, layer, cams))
        host = self._data.to_host([*outputs, *(m[4] for m in maps), *silent])
        flags = host[len(outputs) + len(maps):]
        for (rows, method, rank, layer, _), cams, zero in zip(maps, host[len(outputs):], flags):
            for i, cam, none in zip(rows, cams, zero):
                computed[(i, method, rank, layer)] = cam
                if none:
                    self._no_gradient.add((i, method, rank, layer))
        return computed, host[:len(outputs)]

    def _job(self, spec: ExplainSpec, targets: List[int], computed, i: int, acts, x, pixels,
             logits: np.ndarray, probs: np.ndarray, silent=frozenset()) -> Job:
        """One item's maps that need extra forwards, and its faithfulness scores, a chunk of
        forwards at a time (a generator: the batcher runs it in slices, see batching/jobs.py)."""
        maps = []
        for method, rank, layer in _order(spec, targets):
            raw = computed.get((i, method, rank, layer))
            if raw is None:
                score = _score(targets[rank], spec.kind(method), x.device, spec.concept)
                # No grad-mode context around the slices: it would stay set across their
                # yields, into the batches that run meanwhile. Their tensors need no gradient
                # (the forwards run under inference mode).
                cam = yield from CAM_METHODS[method].slices(SliceInputs(
                    activations=acts[layer], inputs=x, score=score, forward=self.forward,
                    replaced=self._replaced(layer, x),
                    original=torch.from_numpy(logits)[None].to(x.device),
                    max_channels=spec.score_cam_channels, chunk=self._chunk))
                cam = finish_map(CAM_METHODS[method], cam[None], spec.eigen_smooth)[0]
                raw = (cam if spec.signed else torch.relu(cam)).float().cpu().numpy()
            maps.append(MapResult(method, targets[rank], layer, raw,
                                  target_kind=spec.kind(method),
                                  no_gradient=(i, method, rank, layer) in silent))
        if spec.faithfulness_steps:
            steps = spec.faithfulness_steps
            scored = []
            for m in maps:
                deletion, insertion = yield from faithfulness.score_slices(
                    self.forward, self.normalise, pixels, torch.from_numpy(m.raw), m.target,
                    steps, self._chunk, self._activation)
                scored.append(dataclasses.replace(m, deletion=deletion, insertion=insertion,
                                                  steps=steps))
            maps = scored
        if spec.road_percentiles:
            scored = []
            for m in maps:
                scores = yield from road.road_slices(
                    self.forward, x, torch.from_numpy(m.raw), _probability(m.target,
                                                                           self._activation),
                    spec.road_percentiles, chunk=ROAD_CHUNK,
                    original=torch.from_numpy(logits).to(x.device))
                scored.append(dataclasses.replace(m, road=(
                    scores.morf_average, scores.lerf_average, scores.combined)))
            maps = scored
        return _result(logits, probs, maps)


Answer = Union[ItemResult, BatchFailed, ServiceError, Job]
# ROAD's images per slice: each needs its imputation solved on the worker thread (a fraction
# of a second at 224x224 on a CPU), so its slices hold the worker a short while at a time.
ROAD_CHUNK = 2


def finish(answer: Answer) -> Union[ItemResult, BatchFailed]:
    """An answer with its job, if it has one, run to the end."""
    if not isinstance(answer, Generator):
        return answer
    while True:
        try:
            next(answer)
        except StopIteration as done:
            return done.value


def _scale(cam: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's scale_cam_image: (x - min) / (1e-7 + max of that)."""
    cam = cam - cam.min()
    return cam / (1e-7 + cam.max())


def _full_gradients(full, rank: int, rows, method: str) -> dict:
    """FullGrad's CamInputs fields for ``rows`` from _input_pass's answer."""
    if not CAM_METHODS[method].full_gradient:
        return {}
    entry = full[rank]
    index = torch.tensor(rows, device=entry["input"].device)
    at = torch.tensor([entry["rows"].index(i) for i in rows], device=index.device)
    return {"input_gradient": entry["input"][index],
            "bias_gradients": [(b, g[at]) for b, g in entry["biases"]]}


def _probability(target: int, activation: str):
    """ROAD's score of an output row: the class's probability, a softmax or (a multi-label
    model's) a sigmoid, as faithfulness records it."""
    if activation == "sigmoid":
        return lambda row: torch.sigmoid(row.float()[target])
    return road.softmax_target(target)


def _score(target: int, kind: str, device, concept=()):
    """The target's score of a batch of logits (m, classes) -> (m,); ``concept``: the
    similarity target's."""
    classes = torch.tensor([target], device=device)
    vector = torch.tensor([concept], dtype=torch.float32) if kind == "similarity" else None
    return lambda logits: target_scores(
        logits, classes.expand(logits.shape[0]), kind,
        None if vector is None else vector.expand(logits.shape[0], -1))


def _accumulate(out: Dict[tuple, dict], key: tuple, layers, grads) -> None:
    """Adds per-layer gradients of a batch (rows outside a backward's score get zeros) into
    ``out[key]``."""
    if key not in out:
        out[key] = dict(zip(layers, grads))
    else:
        out[key] = {layer: out[key][layer] + g for layer, g in zip(layers, grads)}


def _outputs(logits: torch.Tensor, activation: str = "softmax"):
    """Logits and probabilities of a batch, on the device (``DataPath.to_host`` brings
    them back): a softmax over the classes, for a multi-label model a sigmoid each, for an
    embedding model the outputs themselves."""
    logits = logits.float()
    if activation == "embedding":  # no classes: its outputs are the answer
        return logits, logits
    return logits, torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(
        logits, dim=1)


def _result(logits: np.ndarray, probs: np.ndarray, maps) -> Union[ItemResult, BatchFailed]:
    maps = tuple(maps)
    if np.isfinite(logits).all() and all(np.isfinite(m.raw).all() for m in maps):
        return ItemResult(logits, probs, maps)
    return BatchFailed("the model's output for this image is not finite (NaN or Inf)")


def _order(spec: ExplainSpec, targets: List[int]):
    """An item's maps in the order it asked for them: (method, target rank, layer)."""
    return [(method, rank, layer) for method in spec.methods
            for rank in range(len(targets)) for layer in spec.layers]


def _targets(specs: Dict[int, ExplainSpec], logits: torch.Tensor) -> Dict[int, List[int]]:
    """Each explaining item's target classes: as asked, or its top classes (one top-k of the
    batch, one synchronisation)."""
    classes = logits.shape[1]
    ks = {i: max(1, min(spec.top_targets, classes)) for i, spec in specs.items()
          if not spec.targets}
    top: Dict[int, List[int]] = {}
    if ks:
        rows = sorted(ks)
        index = torch.tensor(rows, device=logits.device)
        best = torch.topk(logits[index].float(), max(ks.values()), dim=1).indices.tolist()
        top = {i: b[:ks[i]] for i, b in zip(rows, best)}
    return {i: list(spec.targets) if spec.targets else top[i] for i, spec in specs.items()}
