"""ROAD scores of a map (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022: RemOve And Debias), as pytorch-grad-cam 1.5.7 computes them
(``pytorch_grad_cam.metrics.road``).

For a percentile ``p`` the map, at the model's input size, splits the pixels in two. MoRF
(``ROADMostRelevantFirst(p)``) keeps the pixels whose map value is below the map's ``p``-th
percentile (``np.percentile``, linear interpolation) and removes the rest: the ``100 - p``
percent most relevant pixels, more where values tie at the threshold. LeRF
(``ROADLeastRelevantFirst(p)``) does the same with ``1 - map`` (in float32), so it removes the
``100 - p`` percent least relevant. The removed pixels are imputed (:func:`impute`) in the
model's normalised input, and the score is the target's value for the imputed input minus its
value for the input itself. The averages are the mean over the percentiles of each order, and
the combined score is (LeRF average - MoRF average) / 2.

The imputation (pytorch-grad-cam's NoisyLinearImputer) sets each removed pixel to the weighted
mean of its 8 neighbours, solving for all of them at once (:func:`solve`: conjugate gradient
with a multigrid preconditioner, in float64, where pytorch-grad-cam calls scipy's spsolve), and
adds Gaussian noise to them, from a generator seeded per image.

The imputed inputs go through the model in chunks (:func:`road_chunks`, a generator that yields
each chunk and is sent its outputs; :func:`road_slices` runs it with a forward function the way
``faithfulness.score_slices`` does, for the batcher; :func:`road_scores` runs it to its end).
Each chunk's images are imputed when the chunk is built.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Generator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # pytorch-grad-cam's default
NOISE = 0.01  # std of the noise added to imputed pixels, in normalised input units
TOLERANCE = 1e-10  # stop at |residual| <= TOLERANCE |right-hand side|, per channel
ORDERS = ("morf", "lerf")
ITERATIONS = 200  # the conjugate gradient's bound (see solve)
OMEGA = 0.8  # the multigrid's damped Jacobi smoothing
OVERCORRECT = 1.8  # the multigrid's coarse corrections are scaled by this (below 2)
# Each removed pixel is the weighted mean of its 8 neighbours inside the image, with these
# weights (pytorch-grad-cam's neighbors_weights): 1/6 beside it, 1/12 diagonally. The 3x3
# stencil is [1, 2, 1] (x) [1, 2, 1] / 12 less its centre 1/3, which _smooth computes.
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))

Target = Callable[[torch.Tensor], torch.Tensor]  # a model's output row → its score


def softmax_target(category: int) -> Target:
    """The class's softmax probability (pytorch-grad-cam's ClassifierOutputSoftmaxTarget)."""
    return lambda row: torch.softmax(row.float(), dim=-1)[category]


def logit_target(category: int) -> Target:
    """The class's logit (pytorch-grad-cam's ClassifierOutputTarget)."""
    return lambda row: row.float()[category]


def _smooth(z: torch.Tensor) -> torch.Tensor:
    """[1, 2, 1] (x) [1, 2, 1] over the last two dims, zero outside."""
    p = F.pad(z, (1, 1, 1, 1))
    v = (p[..., :-2, :] + p[..., 2:, :]).add_(p[..., 1:-1, :], alpha=2)
    return (v[..., :-2] + v[..., 2:]).add_(v[..., 1:-1], alpha=2)


def _stencil(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The sum over the 9 offsets k of c[:, k] times u shifted by k, for coefficients
    (n, 9, h, w) and u (n, C, h, w), zero outside."""
    height, width = u.shape[-2:]
    p = F.pad(u, (1, 1, 1, 1))
    out = c[:, 4:5] * u
    for k, (dy, dx) in enumerate(_OFFSETS):
        if k != 4:
            out.addcmul_(c[:, k:k + 1], p[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width])
    return out


def _coarsen(c: torch.Tensor) -> torch.Tensor:
    """The Galerkin operator P^T A P of a 9-point operator's coefficients (n, 9, h, w), for P
    the aggregation of 2x2 blocks (an odd size padded with empty rows): (n, 9, h/2, w/2)."""
    c = F.pad(c, (0, c.shape[-1] % 2, 0, c.shape[-2] % 2))
    coarse = c.new_zeros(c.shape[0], 9, c.shape[-2] // 2, c.shape[-1] // 2)
    for k, (dy, dx) in enumerate(_OFFSETS):
        for py in (0, 1):
            for px in (0, 1):
                to = ((py + dy) // 2 + 1) * 3 + (px + dx) // 2 + 1
                coarse[:, to] += c[:, k, py::2, px::2]
    return coarse


def _restrict(r: torch.Tensor) -> torch.Tensor:
    """P^T: the sums of 2x2 blocks (an odd size padded with zeros)."""
    r = F.pad(r, (0, r.shape[-1] % 2, 0, r.shape[-2] % 2))
    return r[..., 0::2, 0::2] + r[..., 0::2, 1::2] + r[..., 1::2, 0::2] + r[..., 1::2, 1::2]


def _prolong(e: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """P: each coarse value on its 2x2 block."""
    n, channels, h, w = e.shape
    block = e[:, :, :, None, :, None].expand(n, channels, h, 2, w, 2)
    return block.reshape(n, channels, 2 * h, 2 * w)[..., :height, :width]


class _System:
    """The removed pixels' equations of n images of one size, an operator on (n, C, H, W)
    fields that are zero at the kept pixels, with a multigrid V-cycle as its preconditioner."""

    def __init__(self, removed: torch.Tensor, dtype: torch.dtype) -> None:
        n, height, width = removed.shape
        self.mask = removed.to(dtype)[:, None]  # (n, 1, H, W)
        ones = torch.ones(1, 1, height, width, dtype=dtype, device=removed.device)
        self.s = _smooth(ones) / 12  # each pixel's D + 1/3 (the stencil's centre)
        d = self.s - 1 / 3
        self.jacobi = OMEGA * self.mask / d  # the smoothing's step
        self.correct = OVERCORRECT * self.mask
        # The operator's 9-point coefficients (zero at kept pixels), to build the coarse levels.
        padded = F.pad(self.mask[:, 0], (1, 1, 1, 1))
        c = torch.empty(n, 9, height, width, dtype=dtype, device=removed.device)
        for k, (dy, dx) in enumerate(_OFFSETS):
            if k == 4:
                c[:, 4] = self.mask[:, 0] * d[:, 0]
            else:
                c[:, k] = -NEIGHBOUR_WEIGHTS[dy + 1][dx + 1] * self.mask[:, 0] * padded[
                    :, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        # Each level's coefficients, its smoothing's step (OMEGA / its diagonal, 0 for a row
        # of kept pixels only), and the coarse correction's scale on it (0 on those rows).
        self.levels: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        while max(c.shape[-2:]) > 1:
            c = _coarsen(c)
            diagonal = c[:, 4:5]
            inverse = torch.where(diagonal > 0, 1 / diagonal.clamp_min(1e-300),
                                  torch.zeros_like(diagonal))
            self.levels.append((c, OMEGA * inverse, OVERCORRECT * (diagonal > 0).to(dtype)))

    def keep(self, rows: torch.Tensor) -> None:
        """Only these images' systems from now on."""
        self.mask, self.jacobi, self.correct = (t[rows] for t in (self.mask, self.jacobi,
                                                                  self.correct))
        self.levels = [tuple(t[rows] for t in level) for level in self.levels]

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """(D - W_rr) z on the removed pixels, for z zero at the kept ones."""
        return (self.s * z).sub_(_smooth(z), alpha=1 / 12).mul_(self.mask)

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        """One V-cycle from zero: a Jacobi sweep, the coarse correction, a Jacobi sweep; a
        symmetric positive definite operator, as conjugate gradient needs."""
        e = self.jacobi * r
        coarse = self._cycle(0, _restrict(r - self.apply(e)))
        e.addcmul_(self.correct, _prolong(coarse, *r.shape[-2:]))
        return e.addcmul_(self.jacobi, r - self.apply(e))

    def _cycle(self, level: int, r: torch.Tensor) -> torch.Tensor:
        c, jacobi, correct = self.levels[level]
        if level == len(self.levels) - 1:  # 1x1: solved exactly
            return jacobi * r / OMEGA
        e = jacobi * r
        coarse = self._cycle(level + 1, _restrict(r - _stencil(c, e)))
        e.addcmul_(correct, _prolong(coarse, *r.shape[-2:]))
        return e.addcmul_(jacobi, r - _stencil(c, e))


def solve(images: torch.Tensor, removed: torch.Tensor, tolerance: float = TOLERANCE,
          iterations: int = ITERATIONS) -> torch.Tensor:
    """The noiseless imputation of ``images`` (n, C, H, W) where ``removed`` (n, H, W) is true:
    each removed pixel equals the weighted mean of its neighbours inside the image
    (``NEIGHBOUR_WEIGHTS``, renormalised at the edges), the kept pixels fixed; the kept pixels
    are returned as they are (float64, on the images' device).

    Per image and channel the removed pixels' values x solve (D - W_rr) x = W_rk v (D: each
    pixel's neighbour weights inside the image; W: the weights between pixels, r removed, k
    kept; v the kept values): a principal submatrix of a connected graph's Laplacian, so
    symmetric positive definite unless every pixel is removed. Conjugate gradient solves them
    in float64, preconditioned by one multigrid V-cycle (2x2 aggregation, Galerkin coarse
    operators down to 1x1, damped Jacobi smoothing), each image until every channel's
    residual is at most ``tolerance`` times its right-hand side's norm, or for ``iterations``
    iterations (224x224 masks of every kind take at most about 40, 896x896 ones 60). An image
    with every pixel removed has no kept value to spread: its pixels become 0."""
    v = images.to(torch.float64)
    removed = removed.to(images.device).bool()
    out = v.clone()
    # On the CPU one image at a time (its fields stay in the caches), elsewhere all at once;
    # each solved within the box around its removed pixels and one pixel more (the box's
    # border pixels inside the image are kept, so the equations are the same).
    step = 1 if images.device.type == "cpu" else max(1, images.shape[0])
    for start in range(0, images.shape[0], step):
        rows = slice(start, start + step)
        inside = removed[rows].any(dim=0)
        if not bool(inside.any()):
            continue
        ys, xs = inside.any(dim=1).nonzero()[:, 0], inside.any(dim=0).nonzero()[:, 0]
        top, left = max(int(ys[0]) - 1, 0), max(int(xs[0]) - 1, 0)
        bottom, right = int(ys[-1]) + 2, int(xs[-1]) + 2
        out[rows, :, top:bottom, left:right] = _solve_box(
            v[rows, :, top:bottom, left:right], removed[rows, top:bottom, left:right],
            tolerance, iterations)
    return out


def _solve_box(v: torch.Tensor, removed: torch.Tensor, tolerance: float,
               iterations: int) -> torch.Tensor:
    """solve's conjugate gradient, on float64 (n, C, h, w) images."""
    n = v.shape[0]
    system = _System(removed, v.dtype)
    b = system.mask * _smooth((1 - system.mask) * v) / 12
    solution = torch.zeros_like(b)
    # The images still iterating, and their conjugate gradient state.
    active = torch.arange(n, device=v.device)
    x, r = torch.zeros_like(b), b
    limit = tolerance * b.flatten(2).norm(dim=2)
    p = z = system.precondition(r)
    rz = (r * z).sum((2, 3), keepdim=True)
    for step in range(iterations + 1):
        going = (r.flatten(2).norm(dim=2) > limit).any(dim=1)
        if step == iterations or not bool(going.any()):
            solution[active] = x
            break
        if not bool(going.all()):  # store the converged, iterate the rest
            solution[active[~going]] = x[~going]
            active, x, r, p, rz, limit = (t[going] for t in (active, x, r, p, rz, limit))
            system.keep(going.nonzero()[:, 0])
        ap = system.apply(p)
        pap = (p * ap).sum((2, 3), keepdim=True)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-300), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        z = system.precondition(r)
        rz_next = (r * z).sum((2, 3), keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p = z.addcmul_(beta, p)
        rz = rz_next
    return torch.where(removed[:, None], solution, v)


def impute(image: torch.Tensor, removed: torch.Tensor, noise: float = NOISE,
           seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
           tolerance: float = TOLERANCE) -> torch.Tensor:
    """pytorch-grad-cam's NoisyLinearImputer: ``image`` (C, H, W) with the pixels where
    ``removed`` (H, W, bool) is true replaced by :func:`solve`'s values plus Gaussian noise of
    std ``noise`` (the kept pixels are returned unchanged). The noise comes from
    ``generator`` (a CPU one), or a CPU generator seeded with ``seed`` (0 when neither is
    given), drawn as pytorch-grad-cam draws it (a (C, removed) ``randn``), so after
    ``torch.manual_seed(seed)`` pytorch-grad-cam's imputer adds the same noise."""
    filled = solve(image[None], removed[None].bool(), tolerance)[0].to(image.dtype)
    if noise:
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        filled = _add_noise(filled, removed.bool().to(image.device), noise, generator)
    return filled


def _add_noise(filled: torch.Tensor, removed: torch.Tensor, noise: float,
               generator: torch.Generator) -> torch.Tensor:
    channels = filled.shape[0]
    count = int(removed.sum())
    # As pytorch-grad-cam draws them: randn_like of its solution's transpose, which is a
    # contiguous (C, count) tensor (spsolve answers in Fortran order).
    draws = torch.randn((channels, count), generator=generator, dtype=filled.dtype)
    flat = filled.reshape(channels, -1).clone()
    index = removed.flatten().nonzero()[:, 0]
    flat[:, index] += noise * draws.to(filled.device)
    return flat.reshape_as(filled)


def removal_mask(cam: torch.Tensor, percentile: float, order: str) -> torch.Tensor:
    """The pixels ``order``'s ROAD removes at ``percentile`` (bool (H, W), on the CPU), as
    pytorch-grad-cam's RemoveMostRelevantFirst / RemoveLeastRelevantFirst threshold ``cam``
    (float32 (H, W)): it keeps the pixels below the ``percentile``-th percentile of ``cam``
    ("morf") or of ``1 - cam`` ("lerf") and removes the rest."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    cam = cam.detach().float().cpu()
    ranked = cam if order == "morf" else 1 - cam
    threshold = np.percentile(ranked.numpy(), percentile)
    return ~(ranked < threshold)


def _cam_at(cam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The map as float32 (H, W) on the CPU; bilinearly resized (half-pixel centres) when its
    size is not the input's."""
    cam = torch.as_tensor(cam).detach().float().cpu()
    if tuple(cam.shape) != (height, width):
        cam = F.interpolate(cam[None, None], size=(height, width), mode="bilinear",
                            align_corners=False)[0, 0]
    return cam


def image_seed(seed: int, order: str, percentile: float) -> int:
    """The seed of one imputed image's noise: a function of the caller's seed, the order and
    the percentile only, so an image's noise does not depend on what else is computed."""
    digest = hashlib.blake2b(f"{int(seed)}:{order}:{float(percentile)!r}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class RoadScores:
    """One map's ROAD scores: per percentile, in ``percentiles``' order, the target's value
    after imputation minus before; ``None`` for an order not computed."""

    percentiles: Tuple[float, ...]
    morf: Optional[Tuple[float, ...]]
    lerf: Optional[Tuple[float, ...]]

    @property
    def morf_average(self) -> float:
        """pytorch-grad-cam's ROADMostRelevantFirstAverage."""
        return _mean(self.morf, "morf")

    @property
    def lerf_average(self) -> float:
        """pytorch-grad-cam's ROADLeastRelevantFirstAverage."""
        return _mean(self.lerf, "lerf")

    @property
    def combined(self) -> float:
        """pytorch-grad-cam's ROADCombined: (LeRF average - MoRF average) / 2."""
        return float((np.float32(self.lerf_average) - np.float32(self.morf_average)) / 2)


def _mean(scores: Optional[Tuple[float, ...]], order: str) -> float:
    if scores is None:
        raise ValueError(f"{order} was not computed")
    return float(np.mean(np.float32(scores)))


def forwards(percentiles: Sequence[float] = PERCENTILES, orders: Sequence[str] = ORDERS,
             original: bool = False) -> int:
    """The images :func:`road_chunks` forwards: one per percentile and order, and the input
    itself unless its output (``original``) is given."""
    return len(percentiles) * len(orders) + (0 if original else 1)


def road_chunks(inputs: torch.Tensor, cam: torch.Tensor, target: Target,
                percentiles: Sequence[float] = PERCENTILES, *, orders: Sequence[str] = ORDERS,
                seed: int = 0, noise: float = NOISE, chunk: int = 16,
                original: Optional[torch.Tensor] = None,
                tolerance: float = TOLERANCE) -> Generator[torch.Tensor, torch.Tensor,
                                                           RoadScores]:
    """One map's ROAD scores, a chunk of forwards at a time: yields (m, C, H, W) float model
    inputs, at most ``chunk`` of them, and must be sent the model's outputs for them (m rows);
    returns the :class:`RoadScores`.

    ``inputs``: the image's normalised model input (C, H, W); ``cam``: its map, at the input's
    size (any other size is resized bilinearly); ``target``: the score of one output row (see
    :func:`softmax_target`, :func:`logit_target`); ``orders``: "morf", "lerf" or both;
    ``seed``: the noise's (each image's generator is seeded with :func:`image_seed`);
    ``original``: the model's output row for ``inputs``, when known; otherwise the first image
    forwarded is ``inputs`` itself. The chunks hold, in order, ``inputs`` (unless
    ``original``), then each order's images by percentile."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    if not percentiles or not orders:
        raise ValueError("ROAD needs a percentile and an order at least")
    for order in orders:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    _, height, width = inputs.shape
    saliency = _cam_at(cam, height, width)
    percentiles = tuple(percentiles)
    images: List[Optional[Tuple[str, float]]] = [] if original is not None else [None]
    images += [(order, p) for order in orders for p in percentiles]
    values: List[float] = []
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        batch = _build(inputs, saliency, part, seed, noise, tolerance)
        outputs = yield batch
        if outputs is None or len(outputs) != len(part):
            raise TypeError(f"road_chunks must be sent the model's {len(part)} output rows "
                            "for the chunk it yielded")
        with torch.inference_mode():
            values += [float(target(row).float()) for row in outputs]
    if original is not None:
        with torch.inference_mode():
            before = np.float32(float(target(original.reshape(-1)).float()))
    else:
        before, values = np.float32(values[0]), values[1:]
    differences = [float(np.float32(v) - before) for v in values]
    scores = {order: tuple(differences[k * len(percentiles):(k + 1) * len(percentiles)])
              for k, order in enumerate(orders)}
    return RoadScores(percentiles, scores.get("morf"), scores.get("lerf"))


def _build(inputs: torch.Tensor, cam: torch.Tensor, part, seed: int, noise: float,
           tolerance: float) -> torch.Tensor:
    """The chunk's images: ``inputs`` for None, else that (order, percentile)'s imputation."""
    with torch.inference_mode():
        x = inputs.detach().float()
        specs = [s for s in part if s is not None]
        filled = iter(())
        if specs:
            removed = torch.stack([removal_mask(cam, p, order) for order, p in specs])
            solved = solve(x[None].expand(len(specs), *x.shape), removed, tolerance).float()
            if noise:
                solved = torch.stack([
                    _add_noise(image, r.to(x.device), noise,
                               torch.Generator().manual_seed(image_seed(seed, order, p)))
                    for image, r, (order, p) in zip(solved, removed, specs)])
            filled = iter(solved)
        return torch.stack([x if s is None else next(filled) for s in part])


def road_slices(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                cam: torch.Tensor, target: Target, percentiles: Sequence[float] = PERCENTILES,
                **options) -> Generator[int, None, RoadScores]:
    """:func:`road_chunks` with ``forward`` (normalised inputs → outputs) running its chunks:
    yields the number of images each chunk forwarded (as ``faithfulness.score_slices`` does)
    and returns the :class:`RoadScores`. ``options``: road_chunks' keywords."""
    chunks = road_chunks(inputs, cam, target, percentiles, **options)
    batch = next(chunks)
    while True:
        with torch.inference_mode():
            outputs = forward(batch)
        yield batch.shape[0]
        try:
            batch = chunks.send(outputs)
        except StopIteration as done:
            return done.value


def road_scores(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                cam: torch.Tensor, target: Target, percentiles: Sequence[float] = PERCENTILES,
                **options) -> RoadScores:
    """:func:`road_slices` run to its end."""
    slices = road_slices(forward, inputs, cam, target, percentiles, **options)
    while True:
        try:
            next(slices)
        except StopIteration as done:
            return done.value
