"""Sanity checks of the CAM methods on the served model: how far to trust their maps.

Two checks, measured with Spearman's rank correlation between two maps at the layer's grid:

- **Parameter randomisation** (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018,
  section 3, cascading randomisation): re-initialise the top of the model, stage by stage from
  the logits down, and compare each image's maps from the trained and the randomised model.
  A map that explains the model's decision must change when the parameters that make the
  decision are replaced by random ones. A method passes when its mean absolute correlation at
  the verdict stage (the head and the explained layer's own block: the figures the README and
  tests/test_methods.py quote) is below the threshold.
- **Class discrimination** (Selvaraju et al. 2017, section 5): the map of each image's top
  class and that of a different class (the one at ``contrast_rank`` in the image's ranking)
  must differ. A method passes when their mean correlation is below the threshold.

The randomised model is a copy: the parameters it re-initialises are copied, everything else
is shared with the served module read-only, and the served module is never written to. The copy
runs on its own Engine (hooks of its own; the served engine's hooks are not copied), on a thread
of this module's, one check at a time, so the served model's batches go on meanwhile.

Why 0.5: two unrelated maps of 49 cells correlate with a standard deviation of about
1/sqrt(48) = 0.14, so 0.5 is 3.5 deviations from chance, while a map that ignores what changed
correlates at 1.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Generator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..domain import (
    SANITY_STAGES,
    ExplainSpec,
    MethodSanity,
    SanityPlan,
    SanityReport,
    SanityStage,
    WorkItem,
)
from ..errors import BatchFailed, ResourceExhausted, ServiceError, Unavailable
from .engine import Engine
from .models import LoadedModel

VERDICT_EXTRA = 2  # the verdict stage: the head and the explained layer's own block (2 modules)
CASCADE_EXTRA = (2, 4, 8)  # stages below the head: this many more modules at or below the layer
assert 1 + len(CASCADE_EXTRA) == SANITY_STAGES


# --- the figures -------------------------------------------------------------------------------


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (ties get their average rank, as in
    scipy.stats.spearmanr). A constant map has no ranking: two equal ones correlate at 1 (the
    map did not change), otherwise 0."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


# --- which parameters to randomise -----------------------------------------------------------


def stages(module: nn.Module, layer: str, input_size: Tuple[int, int],
           device: torch.device) -> List[SanityStage]:
    """The cascade, from the logits down: the head (every module with parameters that runs
    after the explained layer), then the head and the 2, 4, 8 modules with parameters that run
    last at or before it: modules that hold parameters of their own, in the order one forward
    finishes them (the model's root does not count: a ViT's position embedding stays trained)."""
    leaves = {name: m for name, m in module.named_modules()
              if name and any(True for _ in m.parameters(recurse=False))}
    finished: List[str] = []
    named = dict(module.named_modules())

    def record(name: str):
        def hook(_module, _inputs, _output):
            if name in finished:
                finished.remove(name)
            finished.append(name)
        return hook

    watched = set(leaves) | {layer}
    handles = [named[name].register_forward_hook(record(name)) for name in watched]
    try:
        with torch.inference_mode():
            module(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    at = finished.index(layer)
    head = tuple(name for name in finished[at + 1:] if name in leaves)
    below = [name for name in reversed(finished[:at + 1]) if name in leaves]
    cascade = [SanityStage("head", head)] if head else []
    for extra in CASCADE_EXTRA:
        if extra > len(below):
            break
        cascade.append(SanityStage(f"head + {extra}", head + tuple(below[:extra])))
    return cascade


def verdict_stage(cascade: Sequence[SanityStage]) -> int:
    """The stage whose figures decide the randomisation verdict: the head and the explained
    layer's block, or the deepest stage there is when the model is too shallow for that."""
    for i, stage in enumerate(cascade):
        if stage.name == f"head + {VERDICT_EXTRA}":
            return i
    return len(cascade) - 1


def randomised_copy(model: LoadedModel, modules: Sequence[str]) -> LoadedModel:
    """A copy of the model whose ``modules`` own fresh parameters (still the trained values:
    ``randomise`` re-initialises them); every other parameter and buffer is the served
    module's own tensor, shared read-only. The served engine's hooks are not copied."""
    served = model.module
    fresh = set(modules)
    shared: Dict[int, object] = {}
    for name, m in served.named_modules():
        if name in fresh:
            continue
        for tensor in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            shared[id(tensor)] = tensor
    clone = copy.deepcopy(served, memo=shared)
    for m in clone.modules():
        for key, hook in list(m._forward_hooks.items()):
            if getattr(hook, "__qualname__", "").startswith(f"{Engine.__qualname__}."):
                del m._forward_hooks[key]
    return LoadedModel(module=clone, device=model.device, card=model.card, load_seconds=0.0)


def randomise(module: nn.Module, names: Sequence[str]) -> None:
    """Re-initialise these modules' parameters in place, as a fresh model would have them:
    ``reset_parameters`` (Kaiming-uniform convolutions and linear layers), and for
    normalisation layers, whose reset is the identity, weights ~ N(1, 0.5) and biases
    ~ N(0, 0.5) (and BatchNorm's running statistics reset), so that they too scramble
    their input. A parameter of a module without reset_parameters gets N(0, its own std)."""
    named = dict(module.named_modules())
    with torch.no_grad():
        for name in names:
            m = named[name]
            norm = isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            else:
                for p in m.parameters(recurse=False):
                    p.normal_(0.0, float(p.float().std()) if p.numel() > 1 else 1.0)
            if norm:
                if getattr(m, "weight", None) is not None:
                    nn.init.normal_(m.weight, 1.0, 0.5)
                if getattr(m, "bias", None) is not None:
                    nn.init.normal_(m.bias, 0.0, 0.5)


# --- the checks --------------------------------------------------------------------------------

SANITY_BATCH = 8  # images per forward and backward of a check: a slice, as a job's is


def check(model: LoadedModel, pixels: Sequence[np.ndarray], plan: SanityPlan,
          stop: Callable[[], Optional[ServiceError]] = lambda: None) -> SanityReport:
    """Both checks on these images (uint8 at the model's input size). ``stop`` is asked before
    each slice (a batch of SANITY_BATCH images, or one slice of a Score-CAM job: at most
    SLICE_FORWARDS images forwarded); an error it returns ends the check there (a cancelled
    call, a passed deadline, the server's shutdown)."""
    slices = check_slices(model, pixels, plan)
    try:
        while True:
            _stop(stop)
            next(slices)
    except StopIteration as finished:
        return finished.value
    finally:
        slices.close()


def check_slices(model: LoadedModel, pixels: Sequence[np.ndarray],
                 plan: SanityPlan) -> Generator[None, None, SanityReport]:
    """The check as a generator: it yields before each slice and returns the report. Closing
    it ends the check there, its engines' hooks removed."""
    # Everything runs on copies (the trained one shares every tensor): hooks on the served
    # module would also fire in the batcher's worker thread, in the served model's forwards.
    shared = randomised_copy(model, ())
    cascade = stages(shared.module, plan.layer, model.card.input_size, model.device)
    cascade = cascade[:plan.stages]
    trained = Engine(shared)
    try:
        ranked = [r.logits for r in (yield from _run([WorkItem(p) for p in pixels], trained))]
        classes = tuple((int(np.argmax(logits)), int(np.argsort(-logits)[plan.contrast_rank]))
                        for logits in ranked)
        before = yield from _maps(trained, pixels, plan, classes)
    finally:
        trained.close()
    discrimination = {m: [spearman(*before[i][m]) for i in range(len(pixels))]
                      for m in plan.methods}
    randomisation: Dict[str, List[float]] = {m: [] for m in plan.methods}
    if cascade:
        copy_ = randomised_copy(model, cascade[-1].modules)
        engine = Engine(copy_)
        done: List[str] = []
        rng = _Rng(plan.seed, model.device)  # the check's own random state, stage to stage
        try:
            for stage in cascade:
                added = [name for name in stage.modules if name not in done]
                with rng:
                    randomise(copy_.module, added)
                done += added
                after = yield from _maps(engine, pixels, plan, classes)
                for m in plan.methods:
                    randomisation[m].append(float(np.mean([
                        abs(spearman(b, a)) for i in range(len(pixels))
                        for b, a in zip(before[i][m], after[i][m])])))
        finally:
            engine.close()
    verdict = verdict_stage(cascade)
    methods = tuple(MethodSanity(
        method=m, randomisation=tuple(randomisation[m]),
        randomisation_pass=bool(cascade) and randomisation[m][verdict] < plan.threshold,
        discrimination=float(np.mean(discrimination[m])),
        discrimination_pass=float(np.mean(discrimination[m])) < plan.threshold)
        for m in plan.methods)
    return SanityReport(layer=plan.layer, stages=tuple(cascade), verdict_stage=verdict,
                        threshold=plan.threshold, classes=classes, methods=methods,
                        seed=plan.seed)


class _Rng:
    """A random state of the check's own, seeded once: inside ``with`` it is torch's (the CPU's
    and the device's), outside torch's own is as it was. The check yields between stages, so
    its state is carried from one to the next instead of forked around the whole loop."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self._devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=self._devices):
            torch.manual_seed(seed)
            self._states = self._get()
        self._fork = None

    def _get(self):
        return (torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in self._devices))

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self._devices)
        self._fork.__enter__()
        torch.set_rng_state(self._states[0])
        for d, state in zip(self._devices, self._states[1:]):
            torch.cuda.set_rng_state(state, d)

    def __exit__(self, *exc) -> None:
        self._states = self._get()
        self._fork.__exit__(*exc)


def _run(items: Sequence[WorkItem], engine: Engine) -> Generator[None, None, list]:
    """Each item's ItemResult, SANITY_BATCH items per batch and each Score-CAM job a slice at a
    time, yielding before every batch and every slice."""
    results = []
    for start in range(0, len(items), SANITY_BATCH):
        yield
        for answer in engine.run_batch(items[start:start + SANITY_BATCH]):
            if isinstance(answer, Generator):
                job, answer = answer, None
                try:
                    while answer is None:
                        yield
                        try:
                            next(job)
                        except StopIteration as finished:
                            answer = finished.value
                finally:
                    job.close()
            results.append(_ok(answer))
    return results


def _maps(engine: Engine, pixels, plan: SanityPlan,
          classes) -> Generator[None, None, List[Dict[str, list]]]:
    """Per image, per method: the raw maps of its (top, contrast) classes."""
    spec = ExplainSpec(methods=plan.methods, layers=(plan.layer,),
                       score_cam_channels=plan.score_cam_channels)
    items = [WorkItem(p, ExplainSpec(**{**vars(spec), "targets": c}))
             for p, c in zip(pixels, classes)]
    out = []
    for result in (yield from _run(items, engine)):
        maps: Dict[str, list] = {}
        for m in result.maps:
            maps.setdefault(m.method, []).append(m.raw)
        out.append(maps)
    return out


def _ok(result):
    if isinstance(result, ServiceError):
        raise result
    return result


def _stop(stop: Callable[[], Optional[ServiceError]]) -> None:
    error = stop()
    if error is not None:
        raise error


class SanityChecker:
    """Runs checks for the handlers, one at a time, each on a thread of its own (so neither
    the event loop nor the batcher's worker waits for it), a slice at a time: a check whose
    caller has gone or whose deadline has passed ends at its next slice and frees the slot.
    Thread-safe."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._busy = threading.Lock()
        self._closing = threading.Event()  # set by close(): checks end at their next slice
        self._thread: Optional[threading.Thread] = None

    def busy(self) -> bool:
        """A check runs now (its slot is taken)."""
        return self._busy.locked()

    def start(self, pixels: Sequence[np.ndarray], plan: SanityPlan,
              stop: Callable[[], Optional[ServiceError]], done: Callable[[object], None]) -> None:
        """Start a check; ``done`` gets its SanityReport or its ServiceError, on the check's
        thread. Raises ResourceExhausted at once while another check runs, and Unavailable
        once the checker is closed."""
        if self._closing.is_set():
            raise Unavailable("the server is shutting down", reason="DRAINING")
        if not self._busy.acquire(blocking=False):
            raise ResourceExhausted("another sanity check is running on this server; retry in "
                                    "a few seconds", retry_after_s=5.0, reason="SANITY_BUSY")

        def asked() -> Optional[ServiceError]:
            if self._closing.is_set():
                return Unavailable("the server shut down before this sanity check was "
                                   "finished; send it to another replica", reason="DRAINING")
            return stop()

        def work() -> None:
            try:
                answer: object = check(self.model, pixels, plan, asked)
            except ServiceError as exc:
                answer = exc
            except Exception as exc:  # a bug or the model failing: this call only
                answer = BatchFailed(f"the sanity check failed: {type(exc).__name__}: "
                                     f"{str(exc)[:200]}")
            finally:
                self._busy.release()
            done(answer)

        self._thread = threading.Thread(target=work, name="camserve-sanity", daemon=True)
        self._thread.start()

    def close(self, timeout: Optional[float] = None) -> bool:
        """End the running check at its next slice and wait for its thread (its torch work must
        not outlive the interpreter); False when it did not end within ``timeout``."""
        self._closing.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()
