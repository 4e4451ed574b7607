"""The methods pytorch-grad-cam 1.5.7 offers beyond the first seven, through real servers: each
map equals pytorch-grad-cam's on the same model, layer and image (raw map within 1e-4 of the
map's maximum), on a seeded resnet18 and a seeded timm ViT, and an item's map is the same alone
and in a batch with other methods (1e-5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import numpy as np
import pytest
import torch

import references as ref
from conftest import resized, running

pytest.importorskip("pytorch_grad_cam", reason="the references are pytorch-grad-cam's")


@dataclass(frozen=True)
class Reference:
    cls: str  # pytorch_grad_cam's class
    oriented: bool = False  # a principal component: equal up to its sign (ref.oriented)
    options: Dict[str, object] = field(default_factory=dict)
    vit: bool = True  # compared on the ViT too


# camserve's name → pytorch-grad-cam's class.
REFERENCES = {
    "eigengradcam": Reference("EigenGradCAM", oriented=True),
    "gradcam_elementwise": Reference("GradCAMElementWise"),
    "fem": Reference("FEM"),
    "kpca_cam": Reference("KPCA_CAM"),
}


def _tolerance(expected: np.ndarray) -> float:
    return 1e-4 * max(float(np.abs(expected).max()), 1e-6)


def _compare(name, explained, model, layer, x, reshape=None):
    """Each of ``explained``'s maps of ``name`` (signed) against pytorch-grad-cam's."""
    case = REFERENCES[name]
    targets = [e.map(name).target.index for e in explained]
    theirs = ref.pytorch_grad_cam_raw(case.cls, model, layer, x, targets, reshape=reshape,
                                      relu=False, **case.options)
    assert np.abs(theirs).max() > 0, f"{name}: the reference maps are all zero"
    for e, expected in zip(explained, theirs):
        got = e.map(name).raw
        if case.oriented:
            expected = ref.oriented(got, expected)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=_tolerance(expected),
                                   err_msg=f"{name} at {layer}")


@pytest.fixture(scope="module")
def images(cat, coffee):
    rng = np.random.default_rng(11)
    return [resized(cat, (224, 224)), resized(coffee, (224, 224)),
            rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_resnet18_equals_pytorch_grad_cam(resnet_server, resnet_weights, images, name, layer):
    _, client = resnet_server
    card = client.model_info()
    explained = client.explain_many(images, method=name, layer=layer, target=285, signed=True)
    model = ref.resnet18(resnet_weights)
    x = ref.normalise(np.stack(images), card.mean, card.std)
    _compare(name, explained, model, layer, x)


@pytest.fixture(scope="module")
def vit(tmp_path_factory, cat):
    """A seeded vit_tiny_patch16_224 served at its default layer (blocks.11.norm1), the same
    model built by the test, pytorch-grad-cam's reshape for it, and two images."""
    from test_transformers import _seeded, _timm, vit_reshape

    model = _seeded(_timm("vit_tiny_patch16_224"), 1234)
    weights = tmp_path_factory.mktemp("weights") / "vit_tiny.pt"
    torch.save(model.state_dict(), weights)
    with running(model="timm:vit_tiny_patch16_224", weights=str(weights), max_delay_ms=1,
                 max_batch_size=4) as (_, client):
        info = client.model_info()
        rng = np.random.default_rng(5)
        images = [resized(cat, info.input_size),
                  rng.integers(0, 256, (*info.input_size, 3), dtype=np.uint8)]
        yield client, info, model, vit_reshape(1, 14, 14), images


@pytest.mark.parametrize("name", sorted(n for n, r in REFERENCES.items() if r.vit))
def test_vit_equals_pytorch_grad_cam(vit, name):
    client, info, model, reshape, images = vit
    explained = client.explain_many(images, method=name, signed=True)
    x = ref.normalise(np.stack(images), info.mean, info.std)
    _compare(name, explained, model, info.default_layer, x, reshape)


def test_a_map_is_the_same_alone_and_batched_with_other_methods(resnet_server, images):
    _, client = resnet_server
    methods = ["gradcam", *sorted(REFERENCES)]
    together = client.explain_many(images, method=methods, target=[285, 3], layer="layer4")
    for name in sorted(REFERENCES):
        alone = client.explain(images[1], method=name, target=3, layer="layer4")
        got = together[1].map(name, 3).raw
        np.testing.assert_allclose(got, alone.raw, rtol=0,
                                   atol=1e-5 * max(float(np.abs(alone.raw).max()), 1.0),
                                   err_msg=name)
