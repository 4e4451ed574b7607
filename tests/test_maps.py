"""The client's NumPy rendering equals OpenCV's and has the documented edge cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camserve import maps


@pytest.mark.parametrize("grid, size", [((7, 7), (224, 224)), ((7, 7), (300, 451)),
                                        ((14, 9), (1080, 1920)), ((56, 56), (17, 23)),
                                        ((1, 5), (4, 9)), ((7, 7), (7, 7))])
def test_resize_equals_cv2_inter_linear(grid, size):
    values = np.random.default_rng(0).random(grid).astype(np.float32)
    expected = cv2.resize(values, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(maps.resize_bilinear(values, size), expected, atol=1e-6)


def test_heatmap_is_resized_then_scaled():
    raw = np.random.default_rng(1).random((7, 7)).astype(np.float32) * 5
    heat = maps.heatmap(raw, (100, 80))
    big = cv2.resize(raw, (80, 100), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(heat, (big - big.min()) / (big.max() - big.min()), atol=1e-6)
    assert heat.dtype == np.float32 and heat.min() == 0 and heat.max() == pytest.approx(1)


@pytest.mark.parametrize("raw", [np.zeros((7, 7)), np.full((7, 7), 3.0),
                                 np.full((7, 7), np.nan)])
def test_degenerate_maps_give_zero_heatmaps(raw):
    heat = maps.heatmap(raw.astype(np.float32), (20, 30))
    assert heat.shape == (20, 30) and not heat.any()


def test_a_near_zero_map_gives_a_blank_heatmap_as_pytorch_grad_cam_does():
    """A map whose range is rounding noise (3e-15) stays blank: the range gets
    pytorch-grad-cam's 1e-7 guard before scaling, and the heatmap equals its
    scale_cam_image."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    raw = (np.random.default_rng(2).random((7, 7)) * 3e-15).astype(np.float32)
    heat = maps.heatmap(raw, (28, 28))
    assert heat.max() < 1e-6
    big = maps.resize_bilinear(raw, (28, 28))
    np.testing.assert_allclose(heat, scale_cam_image(big[None] - big.min())[0], atol=1e-9)
    signal = maps.heatmap(raw * 1e12, (28, 28))  # the same map, a range of 3e-3: not noise
    assert signal.max() == pytest.approx(1, abs=1e-4)


def test_colorize_and_overlay():
    ramp = np.linspace(0, 1, 256, dtype=np.float32)[None, :]
    colours = maps.colorize(ramp)
    assert colours.dtype == np.uint8 and colours.shape == (1, 256, 3)
    assert colours[0, 0, 2] > 100 and colours[0, 0, 0] == 0  # low: blue
    assert colours[0, -1, 0] > 100 and colours[0, -1, 2] == 0  # high: red
    image = np.full((1, 256, 3), 200, np.uint8)
    blended = maps.overlay(image, ramp[0][None, :], alpha=0.5)
    np.testing.assert_allclose(blended, np.round(0.5 * 200 + 0.5 * colours.astype(float)),
                               atol=1)
    with pytest.raises(ValueError, match="sizes differ"):
        maps.overlay(image, np.zeros((2, 2), np.float32))
