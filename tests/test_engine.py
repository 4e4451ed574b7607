"""The engine in-process: one forward, one partial backward, hooks that stay quiet, independent
items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camserve_server.domain import ExplainSpec, WorkItem
from camserve_server.engine.engine import Engine
from camserve_server.engine.models import load_model
from camserve_server.engine.spec import ModelSpec

import references as ref


@pytest.fixture(scope="module")
def resnet_engine(resnet_weights):
    engine = Engine(load_model(ModelSpec(source="torchvision:resnet18", weights=str(resnet_weights),
                                         layers=("layer4", "layer3", "layer4.1.bn2"))))
    yield engine
    engine.close()


def spec(layer, target=None):
    return ExplainSpec(layers=(layer,), targets=() if target is None else (target,))


def _pixels(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def test_mixed_batch_matches_references_and_single_runs(resnet_engine, resnet_weights):
    """Predict and Explain items on two layers in one batch: each item equals its own run and
    Captum's map."""
    pixels = _pixels(6)
    items = [WorkItem(pixels[0]), WorkItem(pixels[1], spec("layer4")),
             WorkItem(pixels[2], spec("layer3", 7)), WorkItem(pixels[3]),
             WorkItem(pixels[4], spec("layer4", 999)),
             WorkItem(pixels[5], spec("layer3"))]
    batch = resnet_engine.run(items)
    model = ref.resnet18(resnet_weights)
    x = ref.normalise(np.stack(pixels), resnet_engine.model.card.mean, resnet_engine.model.card.std)
    with torch.no_grad():
        logits = model(x).numpy()
    for i, (item, result) in enumerate(zip(items, batch)):
        alone = resnet_engine.run([item])[0]
        np.testing.assert_allclose(result.logits, alone.logits, atol=1e-5)
        np.testing.assert_allclose(result.logits, logits[i], atol=1e-4)
        np.testing.assert_allclose(result.probabilities.sum(), 1.0, atol=1e-5)
        if item.explain is None:
            assert result.maps == ()
            continue
        (got,), (single,) = result.maps, alone.maps
        assert got.target == (item.explain.targets[0] if item.explain.targets
                              else int(np.argmax(logits[i])))
        np.testing.assert_allclose(got.raw, single.raw, atol=1e-5)
        expected = ref.captum_gradcam(model, got.layer, x[i:i + 1], [got.target])[0]
        np.testing.assert_allclose(got.raw, expected, atol=1e-4 * max(expected.max(), 1e-6))


def test_no_parameter_gradients_and_nothing_below_the_layer(resnet_engine):
    pixels = _pixels(2, seed=1)
    seen = []
    handle = resnet_engine.model.module.layer3.register_full_backward_hook(
        lambda *args: seen.append("layer3"))
    try:
        resnet_engine.run([WorkItem(p, spec("layer4")) for p in pixels])
    finally:
        handle.remove()
    assert seen == [], "the backward pass reached below the explained layer"
    assert all(p.grad is None for p in resnet_engine.model.module.parameters())


def test_hooks_record_only_inside_the_engine(resnet_engine):
    """A plain forward outside the engine is untouched: same output, no recorded state."""
    module = resnet_engine.model.module
    x = ref.normalise(np.stack(_pixels(1, seed=2)), resnet_engine.model.card.mean,
                      resnet_engine.model.card.std)
    with torch.no_grad():
        before = module(x)
    resnet_engine.run([WorkItem(_pixels(1, seed=3)[0], spec("layer4"))])
    with torch.enable_grad():
        after = module(x)
    assert torch.equal(before, after)
    assert not after.requires_grad, "a hook turned a plain forward into a differentiable one"
    assert resnet_engine._activations == {}


def test_layer_followed_by_in_place_ops(resnet_engine, resnet_weights):
    """layer4.1.bn2's output is modified in place (+= identity, ReLU(inplace)) by the block: the
    map must use the layer's own output and its gradient."""
    pixel = _pixels(1, seed=4)[0]
    result = resnet_engine.run([WorkItem(pixel, spec("layer4.1.bn2"))])[0].maps[0]
    model = ref.resnet18(resnet_weights)
    x = ref.normalise(pixel[None], resnet_engine.model.card.mean, resnet_engine.model.card.std)
    # Reference by hand: the block's tail written out without in-place ops.
    block = model.layer4[1]
    with torch.no_grad():
        features = model.layer4[0](model.layer3(model.layer2(model.layer1(model.maxpool(
            model.relu(model.bn1(model.conv1(x))))))))
        acts = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(features)))))
    acts.requires_grad_(True)
    out = torch.relu(acts + features)
    logits = model.fc(torch.flatten(model.avgpool(out), 1))
    assert int(logits.argmax()) == result.target
    grad, = torch.autograd.grad(logits[0, result.target], acts)
    expected = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * acts).sum(1))[0].detach()
    np.testing.assert_allclose(result.raw, expected.numpy(), atol=1e-4 * float(expected.max()))


def test_all_zero_map_is_finite(resnet_engine):
    """A class with negative evidence everywhere gives an all-zero map, not NaN."""
    pixel = _pixels(1, seed=5)[0]
    results = resnet_engine.run([WorkItem(pixel, spec("layer4", t))
                                 for t in range(40)])
    maps = [r.maps[0].raw for r in results]
    assert all(np.isfinite(m).all() and (m >= 0).all() for m in maps)
    assert any(not m.any() for m in maps), "no all-zero map among 40 classes"
