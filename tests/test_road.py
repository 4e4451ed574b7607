"""ROAD (engine/road.py) against pytorch-grad-cam 1.5.7's ROAD metrics: the imputer equals
NoisyLinearImputer's (noiseless within 1e-5; with noise, the same noise after
torch.manual_seed); the removal masks equal RemoveMostRelevantFirst's and
RemoveLeastRelevantFirst's; on a seeded resnet18, two photos and pytorch-grad-cam's Grad-CAM,
MoRF, LeRF, their averages and the combined score at percentiles 20, 40, 60, 80 equal
ROADMostRelevantFirst's, ROADLeastRelevantFirst's, their Average classes' and ROADCombined's
with a noiseless imputer, within 1e-4 of the scores' scale. Without pytorch-grad-cam: the
imputation is each removed pixel's neighbour mean, the noise is seeded, and the generators
yield and count their chunks as the batcher needs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from camserve_server.engine import road

import references as ref
from conftest import resized
from tiny_models import tiny_cnn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PERCENTILES = [20, 40, 60, 80]
WEIGHTS = np.array(road.NEIGHBOUR_WEIGHTS)
_SOLVED: dict = {}  # pytorch-grad-cam's imputations, by image and mask (_pgc_scores)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The solver runs many small tensor operations: on a loaded machine, threads waiting for
    each other in every one of them cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet(resnet_weights):
    return ref.resnet18(resnet_weights)


@pytest.fixture(scope="module")
def photos(cat, coffee) -> torch.Tensor:
    """The two photos at 224x224, normalised: (2, 3, 224, 224)."""
    return ref.normalise(np.stack([resized(p, (224, 224)) for p in (cat, coffee)]), MEAN, STD)


@pytest.fixture(scope="module")
def gradcam(resnet, photos):
    """pytorch-grad-cam's Grad-CAM at layer4 for each photo's top class: (classes, maps)."""
    pytest.importorskip("pytorch_grad_cam", reason="the references are pytorch-grad-cam's")
    with torch.no_grad():
        classes = resnet(photos).argmax(1).tolist()
    return classes, ref.pytorch_grad_cam(resnet, "layer4", photos, classes)


def _neighbour_mean_residual(image: np.ndarray, removed: np.ndarray) -> float:
    """The largest |pixel - weighted mean of its neighbours inside the image| over the
    removed pixels of (C, H, W)."""
    height, width = removed.shape
    padded = np.pad(image.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    inside = np.pad(np.ones((height, width)), 1)
    total = np.zeros_like(image, dtype=np.float64)
    weight = np.zeros((height, width))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            w = WEIGHTS[dy + 1, dx + 1]
            total += w * padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
            weight += w * inside[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
    return float(np.abs(image - total / weight)[:, removed].max())


def _masks(cam: torch.Tensor):
    g = torch.Generator().manual_seed(0)
    height, width = cam.shape
    row = torch.ones(height, width, dtype=torch.bool)
    row[0] = False
    return {"morf20": road.removal_mask(cam, 20, "morf"),
            "lerf60": road.removal_mask(cam, 60, "lerf"),
            "random90": torch.rand(height, width, generator=g) < 0.9,
            "all but the top row": row}


def test_solution_is_the_neighbour_mean():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 37, 53, generator=g)  # odd, unequal sides: the coarse levels pad
    box = torch.zeros(37, 53, dtype=torch.bool)
    box[3:13, 40:] = True  # solved within its box, which meets the right edge
    for removed in [*(torch.rand(37, 53, generator=g) < p for p in (0.3, 0.9, 0.999)), box]:
        removed[5, 7] = False
        filled = road.impute(image, removed, noise=0)
        assert torch.equal(filled[:, ~removed], image[:, ~removed])
        assert _neighbour_mean_residual(filled.double().numpy(), removed.numpy()) < 1e-5
        solved = road.solve(image[None], removed[None])[0].numpy()
        assert _neighbour_mean_residual(solved, removed.numpy()) < 1e-9
    # Nothing kept: nothing to spread (pytorch-grad-cam's singular system gives NaN).
    everything = road.impute(image, torch.ones(37, 53, dtype=torch.bool), noise=0)
    assert torch.equal(everything, torch.zeros_like(image))


def test_imputer_equals_pgcs(photos, gradcam):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    imputer = NoisyLinearImputer(noise=0)
    _, cams = gradcam
    cases = [(photos[0], removed) for removed in _masks(torch.from_numpy(cams[0])).values()]
    g = torch.Generator().manual_seed(2)
    cases.append((torch.randn(3, 37, 53, generator=g), torch.rand(37, 53, generator=g) < 0.7))
    box = torch.zeros(37, 53, dtype=torch.bool)
    box[3:13, 40:] = True
    box[20:30, 10:15] = True
    cases.append((torch.randn(3, 37, 53, generator=g), box))
    cases.append((photos[1], road.removal_mask(torch.from_numpy(cams[1]), 40, "morf")))
    for image, removed in cases:
        theirs = imputer(image, (~removed).float())
        ours = road.impute(image, removed, noise=0)
        assert float((ours - theirs).abs().max()) < 1e-5


def test_noise_is_pgcs(photos, gradcam):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    removed = road.removal_mask(torch.from_numpy(gradcam[1][0]), 80, "morf")
    with torch.random.fork_rng():
        torch.manual_seed(7)
        theirs = NoisyLinearImputer(noise=0.01)(photos[0], (~removed).float())
    ours = road.impute(photos[0], removed, noise=0.01, seed=7)
    assert float((ours - theirs).abs().max()) < 1e-5
    quiet = road.impute(photos[0], removed, noise=0)
    assert torch.equal(ours[:, ~removed], photos[0][:, ~removed])
    assert 0.005 < float((ours - quiet)[:, removed].std()) < 0.02


def test_masks_equal_pgcs(gradcam):
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )

    class Grab:
        def __call__(self, image, mask):
            self.mask = mask
            return image

    original = gradcam[1][0]
    # Quantised, so that many pixels tie at each threshold.
    for cam in (original, np.float32(np.round(original * 8) / 8)):
        for order, remove in (("morf", RemoveMostRelevantFirst),
                              ("lerf", RemoveLeastRelevantFirst)):
            for p in [10, *PERCENTILES, 90, 100]:
                grab = Grab()
                remove(p, grab)(torch.zeros(3, *cam.shape), torch.from_numpy(cam))
                ours = road.removal_mask(torch.from_numpy(cam), p, order)
                assert torch.equal(ours, grab.mask == 0), (order, p)


def _pgc_scores(model, photos, cams, targets):
    """pytorch-grad-cam's ROAD classes, each with a noiseless imputer (one that remembers its
    solutions, so the averages and the combined score do not solve the same systems again):
    per percentile, (MoRF, LeRF) per photo; then the averages and the combined score."""
    from pytorch_grad_cam.metrics.road import (
        NoisyLinearImputer,
        ROADCombined,
        ROADLeastRelevantFirst,
        ROADLeastRelevantFirstAverage,
        ROADMostRelevantFirst,
        ROADMostRelevantFirstAverage,
    )

    solved = _SOLVED

    class Remembering(NoisyLinearImputer):
        def __call__(self, image, mask):
            key = hashlib.sha256(image.numpy().tobytes() + mask.numpy().tobytes()).digest()
            if key not in solved:
                solved[key] = super().__call__(image, mask)
            return solved[key].clone()

    imputer = Remembering(noise=0)

    def quiet(metric):
        metric.perturbation.imputer = imputer
        return metric

    def morf(p):
        return quiet(ROADMostRelevantFirst(p))

    def lerf(p):
        return quiet(ROADLeastRelevantFirst(p))

    def run(metric):
        return metric(photos, cams, targets, model)

    scores = {"morf": np.stack([run(morf(p)) for p in PERCENTILES], axis=1),
              "lerf": np.stack([run(lerf(p)) for p in PERCENTILES], axis=1)}
    averages = {"morf": ROADMostRelevantFirstAverage(PERCENTILES),
                "lerf": ROADLeastRelevantFirstAverage(PERCENTILES)}
    averages["morf"].imputer, averages["lerf"].imputer = morf, lerf
    combined = ROADCombined(PERCENTILES)
    combined.morf_averager.imputer, combined.lerf_averager.imputer = morf, lerf
    scores["morf_average"] = run(averages["morf"])
    scores["lerf_average"] = run(averages["lerf"])
    scores["combined"] = run(combined)
    return scores


@pytest.mark.parametrize("kind", ["softmax", "logit"])
def test_road_equals_pgcs(resnet, photos, gradcam, kind):
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputSoftmaxTarget,
        ClassifierOutputTarget,
    )

    classes, cams = gradcam
    theirs_target, ours_target = {
        "softmax": (ClassifierOutputSoftmaxTarget, road.softmax_target),
        "logit": (ClassifierOutputTarget, road.logit_target)}[kind]
    rows = [0, 1] if kind == "softmax" else [1]  # the logit: one photo (the same imputations)
    theirs = _pgc_scores(resnet, photos[rows], cams[rows],
                         [theirs_target(classes[i]) for i in rows])
    with torch.no_grad():
        before = torch.stack([ours_target(c)(row) for c, row in
                              zip(classes, resnet(photos))]).numpy()
    for k, i in enumerate(rows):
        ours = road.road_scores(resnet, photos[i], torch.from_numpy(cams[i]),
                                ours_target(classes[i]), PERCENTILES, noise=0)
        scale = max(abs(float(before[i])), float(np.abs(theirs["morf"][k]).max()),
                    float(np.abs(theirs["lerf"][k]).max()))
        np.testing.assert_allclose(ours.morf, theirs["morf"][k], rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(ours.lerf, theirs["lerf"][k], rtol=0, atol=1e-4 * scale)
        for name in ("morf_average", "lerf_average", "combined"):
            assert abs(getattr(ours, name) - float(theirs[name][k])) <= 1e-4 * scale, name
        assert ours.percentiles == tuple(PERCENTILES)


@pytest.fixture(scope="module")
def tiny():
    """The tiny CNN, a 64x64 input and a smooth map (no pytorch-grad-cam needed)."""
    model = tiny_cnn().eval()
    g = torch.Generator().manual_seed(3)
    image = torch.randn(3, 64, 64, generator=g)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    cam = torch.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / 200) + 0.05 * torch.rand(
        64, 64, generator=g)
    return model, image, cam


def test_noise_is_seeded(tiny):
    model, image, cam = tiny
    target = road.softmax_target(3)

    def scores(**options):
        return road.road_scores(model, image, cam, target, PERCENTILES, **options)

    first, again, other = scores(seed=3), scores(seed=3), scores(seed=4)
    assert first == again
    assert first.morf != other.morf and first.lerf != other.lerf
    assert first != scores(noise=0)
    # An image's noise depends on the seed, its order and its percentile only.
    alone = road.road_scores(model, image, cam, target, [60], orders=("lerf",), seed=3)
    assert alone.morf is None and alone.lerf == (first.lerf[2],)
    with pytest.raises(ValueError):
        _ = alone.combined


def test_chunks_and_slices(tiny):
    model, image, cam = tiny
    target = road.logit_target(5)
    options = dict(seed=1, chunk=3)
    expected = road.road_scores(model, image, cam, target, PERCENTILES, **options)
    assert expected.combined == pytest.approx((expected.lerf_average - expected.morf_average)
                                              / 2, abs=1e-6)
    assert expected.morf_average == pytest.approx(np.mean(expected.morf), abs=1e-6)

    chunks = road.road_chunks(image, cam, target, PERCENTILES, **options)
    sizes, batch = [], next(chunks)
    assert torch.equal(batch[0], image)  # the input itself first: its output is the baseline
    while True:
        sizes.append(batch.shape[0])
        assert batch.shape[1:] == image.shape
        with torch.no_grad():
            outputs = model(batch)
        try:
            batch = chunks.send(outputs)
        except StopIteration as done:
            assert done.value == expected
            break
    assert sizes == [3, 3, 3] and sum(sizes) == road.forwards(PERCENTILES)

    slices = road.road_slices(model, image, cam, target, PERCENTILES, **options)
    counts = []
    while True:
        try:
            counts.append(next(slices))
        except StopIteration as done:
            assert done.value == expected
            break
    assert counts == sizes

    # The input's output given: one forward fewer, the same scores.
    with torch.no_grad():
        original = model(image[None])[0]
    known = road.road_chunks(image, cam, target, PERCENTILES, original=original, **options)
    sizes = []
    batch = next(known)
    while True:
        sizes.append(batch.shape[0])
        with torch.no_grad():
            outputs = model(batch)
        try:
            batch = known.send(outputs)
        except StopIteration as done:
            given = done.value
            break
    assert sum(sizes) == road.forwards(PERCENTILES, original=True) == 8
    np.testing.assert_allclose(given.morf, expected.morf, atol=1e-5)
    np.testing.assert_allclose(given.lerf, expected.lerf, atol=1e-5)

    broken = road.road_chunks(image, cam, target, PERCENTILES, **options)
    next(broken)
    with pytest.raises(TypeError):
        next(broken)  # it must be sent the chunk's outputs


def test_map_resized_to_the_input(tiny):
    model, image, cam = tiny
    small = F.interpolate(cam[None, None], size=(8, 8), mode="area")[0, 0]
    resized_map = F.interpolate(small[None, None], size=(64, 64), mode="bilinear",
                                align_corners=False)[0, 0]
    target = road.softmax_target(0)
    assert road.road_scores(model, image, small, target, [30, 70], seed=2) == \
        road.road_scores(model, image, resized_map, target, [30, 70], seed=2)


def test_road_through_a_real_server(cat, coffee):
    """road_percentiles through the server: each map's scores are road.py's on the map the
    server answered (its seeded noise included), the same alone and batched; bad percentiles
    and ROAD of a similarity answer INVALID_ARGUMENT."""
    from camserve import CamserveError

    from conftest import TINY, running

    photos = [resized(p, (224, 224)) for p in (cat, coffee)]
    with running(model=TINY, max_delay_ms=20) as (_, client):
        info = client.model_info()
        explained = client.explain_many(photos, road_percentiles=PERCENTILES)
        alone = client.explain(photos[1], road_percentiles=PERCENTILES)
        model = tiny_cnn().eval()
        for image, e in zip(photos, explained):
            m = e.map()
            x = ref.normalise(image[None], info.mean, info.std)[0]
            scores = road.road_scores(model, x, torch.from_numpy(m.raw),
                                      road.softmax_target(m.target.index), PERCENTILES)
            assert (m.road_morf, m.road_lerf, m.road_combined) == pytest.approx(
                (scores.morf_average, scores.lerf_average, scores.combined), abs=1e-5)
            assert m.deletion is None  # ROAD alone: no deletion or insertion asked for
        a, b = alone.map(), explained[1].map()
        assert (a.road_morf, a.road_lerf) == pytest.approx((b.road_morf, b.road_lerf), abs=1e-6)
        for options, says in (({"road_percentiles": [0, 50]}, "1..99"),
                              ({"road_percentiles": [50, 50]}, "each once"),
                              ({"road_percentiles": [50], "similar_to": [1.0] * 10},
                               "road_percentiles")):
            with pytest.raises(CamserveError) as caught:
                client.explain(photos[0], **options)
            assert caught.value.code.name == "INVALID_ARGUMENT" and says in caught.value.details
