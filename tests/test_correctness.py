"""Maps through a real server equal independent references.

Raw maps equal Captum's LayerGradCam(relu_attributions=True) within 1e-4 of the map's max;
heatmaps equal pytorch-grad-cam's GradCAM within 1e-3. Images are sent as raw pixels at the
model's input size, so the references see exactly the server's input; a second check uses an
image at another size to test the resize to the original size.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import references as ref
from conftest import resized


def _inputs(cat, coffee, rng):
    noise = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    blend = ((resized(cat, (224, 224)).astype(np.uint16) + resized(coffee, (224, 224))) // 2)
    return [resized(cat, (224, 224)), resized(coffee, (224, 224)), noise,
            blend.astype(np.uint8)]


def _check(client, model, layer, images, targets, mean, std):
    explanations = [client.explain(image, target=target, layer=layer)
                    for image, target in zip(images, targets)]
    explained = [e.target.index for e in explanations]
    for e, asked in zip(explanations, targets):
        if asked is not None:
            assert e.target.index == asked
    x = ref.normalise(np.stack(images), mean, std)
    captum = ref.captum_gradcam(model, layer, x, explained)
    grad_cam = ref.pytorch_grad_cam(model, layer, x, explained)
    assert sum(m.max() > 0 for m in captum) >= len(images) - 1, \
        "the reference maps are all zero: the test would prove nothing"
    for e, expected, heat in zip(explanations, captum, grad_cam):
        assert e.layer == layer and e.method == "gradcam"
        assert e.raw.shape == expected.shape
        np.testing.assert_allclose(e.raw, expected, rtol=0, atol=1e-4 * max(expected.max(), 1e-6))
        assert e.heatmap.shape == heat.shape
        np.testing.assert_allclose(e.heatmap, heat, rtol=0, atol=1e-3)
    return explanations


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_resnet18_matches_captum_and_pytorch_grad_cam(resnet_server, resnet_weights, cat, coffee,
                                                      layer):
    _, client = resnet_server
    model = ref.resnet18(resnet_weights)
    images = _inputs(cat, coffee, np.random.default_rng(0))
    info = client.model_info()
    _check(client, model, layer, images, [None, 3, None, 999], info.mean, info.std)


def test_default_model_matches_captum_and_pytorch_grad_cam(default_server, cat, coffee):
    _, client = default_server
    model = ref.efficientnet_lite0()
    images = _inputs(cat, coffee, np.random.default_rng(1))
    info = client.model_info()
    assert (info.mean, info.std) == ((0.5,) * 3, (0.5,) * 3)
    _check(client, model, "bn2", images, [None, None, 967, 285], info.mean, info.std)


def test_heatmap_at_original_size_is_the_resized_normalised_map(default_server, cat):
    """For an image that is not at the model's size the heatmap has the image's size: the raw
    map resized with cv2.resize (INTER_LINEAR), then min-max scaled."""
    _, client = default_server
    e = client.explain(cat, outputs=("raw", "heatmap"))
    assert e.image_size == cat.shape[:2]
    big = cv2.resize(e.raw, (cat.shape[1], cat.shape[0]), interpolation=cv2.INTER_LINEAR)
    expected = (big - big.min()) / (big.max() - big.min())
    np.testing.assert_allclose(e.heatmap, expected, atol=1e-5)
    # The server's 8-bit PNG is the same heatmap, quantised.
    png = cv2.imdecode(np.frombuffer(e.heatmap_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert png.shape == cat.shape[:2]
    assert np.abs(png / 255.0 - expected).max() <= 0.5 / 255 + 1e-5


def test_all_zero_map_gives_all_zero_heatmap():
    from camserve import maps

    heat = maps.heatmap(np.zeros((7, 7), np.float32), (30, 40))
    assert heat.shape == (30, 40) and not heat.any() and np.isfinite(heat).all()


def test_references_agree_with_each_other(resnet_weights):
    """A guard for the guards: Captum's map, resized and min-max scaled, is pytorch-grad-cam's."""
    model = ref.resnet18(resnet_weights)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    captum = ref.captum_gradcam(model, "layer4", x, [1, 2])
    grad_cam = ref.pytorch_grad_cam(model, "layer4", x, [1, 2])
    for c, g in zip(captum, grad_cam):
        big = cv2.resize(c, (224, 224))
        np.testing.assert_allclose((big - big.min()) / (big.max() - big.min()), g, atol=1e-3)
