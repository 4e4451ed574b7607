"""A zoo of classifier families, each at a small seeded configuration (``zoo_models.py``: no
download, batch norms calibrated on noise): each loads through its model source, picks the
default layer that docs/server.md lists for its family, gives the Grad-CAM that pytorch-grad-cam
gives on that layer (Captum where pytorch-grad-cam is wrong: DenseNet, whose in-place ReLU after
``features`` overwrites the activations pytorch-grad-cam keeps), within 1e-4 of the map's
maximum, and is batch invariant (1e-5). In-process, with the engine: the claim is about loading
and the engine, and a server per model would cost more than the models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import pytest
import torch
import zoo_models

from camserve_server.domain import ExplainSpec, WorkItem
from camserve_server.engine.engine import Engine
from camserve_server.engine.models import load_model
from camserve_server.engine.spec import ModelSpec

import references as ref
from conftest import resized

pytest.importorskip("pytorch_grad_cam", reason="the references are pytorch-grad-cam's")


@dataclass(frozen=True)
class Family:
    factory: str  # zoo_models' function that builds the test's copy
    layer: str  # the default layer docs/server.md gives for the family
    source: Optional[str] = None  # torchvision:/timm:NAME served with the factory's weights
    size: Tuple[int, int] = (224, 224)  # the input size the source gives
    reference: str = "pgc"  # or "captum"


FAMILIES = {
    "torchvision resnet": Family("tv_resnet", "layer4"),
    "torchvision densenet": Family("tv_densenet", "features", reference="captum"),
    "torchvision vgg": Family("tv_vgg", "features"),
    "torchvision squeezenet": Family("tv_squeezenet", "features", "torchvision:squeezenet1_1"),
    "torchvision mobilenet_v2": Family("tv_mobilenet_v2", "features"),
    "torchvision mobilenet_v3": Family("tv_mobilenet_v3", "features"),
    "torchvision shufflenet": Family("tv_shufflenet", "conv5", "torchvision:shufflenet_v2_x0_5"),
    "torchvision mnasnet": Family("tv_mnasnet", "layers", "torchvision:mnasnet0_5"),
    "torchvision regnet": Family("tv_regnet", "trunk_output"),
    "torchvision efficientnet": Family("tv_efficientnet", "features"),
    "torchvision convnext": Family("tv_convnext", "features"),
    "torchvision vit": Family("tv_vit", "encoder.layers.encoder_layer_1.ln_1"),
    "torchvision swin": Family("tv_swin", "features.7.0.norm1"),
    "torchvision maxvit": Family("tv_maxvit", "blocks.3"),
    "timm resnet": Family("timm_resnet", "layer4", "timm:resnet10t", (176, 176)),
    "timm mobilenetv3": Family("timm_mobilenetv3", "blocks", "timm:mobilenetv3_small_050"),
    "timm convnext": Family("timm_convnext", "stages"),
    "timm regnetx": Family("timm_regnet", "s4", "timm:regnetx_002"),
    "timm regnetz": Family("timm_regnetz", "s4"),
    "timm vit": Family("timm_vit", "blocks.1.norm1"),
    "timm deit": Family("timm_deit", "blocks.1.norm1"),
    "timm swin": Family("timm_swin", "layers.3.blocks.1.norm1"),
    "timm coat": Family("timm_coat", "parallel_blocks.1.norm14"),
    "timm mobilevit": Family("timm_mobilevit", "stages", "timm:mobilevit_xxs", (256, 256)),
}


def _reshape(info):
    """pytorch-grad-cam's reshape_transform for the layer's layout (its vit_ and
    swinT_reshape_transform, for any prefix and grid)."""
    if info.layout == "tokens":
        return lambda t: t[:, info.prefix_tokens:].reshape(
            t.size(0), info.height, info.width, t.size(2)).permute(0, 3, 1, 2)
    if info.layout == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    return None


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """The family, the test's own copy of the model, and the engine serving it."""
    case = FAMILIES[request.param]
    model = getattr(zoo_models, case.factory)()
    if case.source is None:
        spec = ModelSpec(source=f"python:zoo_models:{case.factory}")
    else:
        weights = tmp_path_factory.mktemp("zoo") / f"{case.factory}.pt"
        torch.save(model.state_dict(), weights)
        spec = ModelSpec(source=case.source, weights=str(weights))
    engine = Engine(load_model(spec))
    try:
        yield request.param, case, model, engine
    finally:
        engine.close()


def test_family_serves_its_documented_layer_as_the_references_explain_it(family, cat, coffee):
    name, case, model, engine = family
    card = engine.model.card
    assert card.input_size == case.size, name
    assert card.default_layer == case.layer, (name, card.layers[0].reason)
    info = card.layers[0]
    assert info.reason
    images = [resized(cat, case.size), resized(coffee, case.size)]
    spec = ExplainSpec(methods=("gradcam",), layers=(case.layer,))
    together = engine.run([WorkItem(image, spec) for image in images])
    targets = [r.maps[0].target for r in together]
    x = ref.normalise(np.stack(images), card.mean, card.std)
    if case.reference == "captum":
        expected = ref.captum_gradcam(model, case.layer, x, targets)
    else:
        expected = ref.pytorch_grad_cam_raw("GradCAM", model, case.layer, x, targets,
                                            reshape=_reshape(info))
    assert expected.max() > 0, f"{name}: the reference maps are all zero: nothing is shown"
    for i, result in enumerate(together):
        got = result.maps[0].raw
        assert got.shape == (info.height, info.width) == expected[i].shape
        peak = float(np.abs(expected[i]).max())
        np.testing.assert_allclose(got, expected[i], rtol=0, atol=1e-4 * max(peak, 1e-6),
                                   err_msg=name)
        alone = engine.run([WorkItem(images[i], spec)])[0]
        scale = max(float(np.abs(result.logits).max()), 1.0)
        np.testing.assert_allclose(alone.logits, result.logits, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(alone.maps[0].raw, got, rtol=0,
                                   atol=1e-5 * max(float(np.abs(got).max()), 1.0), err_msg=name)
