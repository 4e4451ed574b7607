"""The methods pytorch-grad-cam 1.5.7 offers beyond the first seven, through real servers: each
map equals pytorch-grad-cam's on the same model, layer and image (raw map within 1e-4 of the
map's maximum), on a seeded resnet18 and a seeded timm ViT, and an item's map is the same alone
and in a batch with other methods (1e-5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import references as ref
from conftest import resized, running

pytest.importorskip("pytorch_grad_cam", reason="the references are pytorch-grad-cam's")


@dataclass(frozen=True)
class Reference:
    cls: str  # pytorch_grad_cam's class
    oriented: bool = False  # a principal component: equal up to its sign (ref.oriented)
    options: Dict[str, object] = field(default_factory=dict)
    vit: bool = True  # compared on the ViT too
    kinds: Tuple[str, ...] = ("logit",)  # the target kinds compared
    layers: Tuple[str, ...] = ("layer4", "layer3")  # resnet18's layers compared
    tolerance: float = 1e-4  # of the map's maximum
    images: int = 3  # of the test's images, on resnet18


# camserve's name → pytorch-grad-cam's class.
REFERENCES = {
    "eigengradcam": Reference("EigenGradCAM", oriented=True),
    "gradcam_elementwise": Reference("GradCAMElementWise"),
    "fem": Reference("FEM"),
    "kpca_cam": Reference("KPCA_CAM"),
    "finercam": Reference("FinerCAM", kinds=("finer",)),
    # On resnet18 everything above layer3 is piecewise linear: with a logit the Hessian is
    # zero; ReST (the paper's pairing) makes it count.
    "shapleycam": Reference("ShapleyCAM", kinds=("rest", "logit")),
    # layer3's 256 channels: all of them within the server's max_score_cam_channels. Token
    # layers refuse it (test_refused_on_the_vit).
    "ablationcam": Reference("AblationCAM", vit=False, layers=("layer3",), images=1),
    # Every bias layer, whatever the layer. Each channel's map is min-max scaled: a channel
    # whose |bias x gradient| is nearly constant amplifies float32 rounding, and the server
    # folds each batch norm into its convolution (the same bias and gradient, rounded
    # otherwise): measured 8.8e-4 of the maximum on the coffee photo, 4e-7 unfolded.
    "fullgrad": Reference("FullGrad", layers=("layer4",), tolerance=2e-3),
}
# Target kinds, each on Grad-CAM (and ShapleyCAM above).
TARGET_CASES = [("gradcam", kind) for kind in ("softmax", "rest", "raw_scores", "finer")]
CASES = [(name, kind) for name, case in REFERENCES.items() for kind in case.kinds] \
    + TARGET_CASES


def _their_targets(kind: str, classes):
    """pytorch-grad-cam's target for each class (None: FinerCAM's own, from its call)."""
    from pytorch_grad_cam.utils import model_targets as t

    if kind == "finer":
        return None
    if kind == "raw_scores":  # RawScoresOutputTarget, summed: a scalar per image
        return [lambda output: output.sum(dim=-1) for _ in classes]
    cls = {"logit": t.ClassifierOutputTarget, "softmax": t.ClassifierOutputSoftmaxTarget,
           "rest": t.ClassifierOutputReST}[kind]
    return [cls(int(c)) for c in classes]


def _tolerance(expected: np.ndarray, share: float = 1e-4) -> float:
    return share * max(float(np.abs(expected).max()), 1e-6)


def _compare(name, kind, explained, model, layer, x, reshape=None):
    """Each of ``explained``'s maps of ``name`` (signed) against pytorch-grad-cam's, as its
    class computes it when called."""
    case = REFERENCES.get(name, Reference("GradCAM"))
    classes = [e.map(name).target.index for e in explained]
    assert all(e.map(name).target_kind == kind for e in explained)
    cls, call = case.cls, {}
    if name == "fullgrad":  # its layers are the convolutions and batch norms: no tokens
        reshape = None
    if kind == "finer":  # FinerCAM over the method (Grad-CAM), at the class asked for
        cls, call = "FinerCAM", {"target_idx": classes[0]}
        assert len(set(classes)) == 1
    # pytorch-grad-cam's ShapleyCAM needs plain attention too (the fused kernels have no
    # second derivative), as camserve's engine runs it.
    with sdpa_kernel([SDPBackend.MATH]):
        theirs = ref.pytorch_grad_cam_called(cls, model, layer, x,
                                             _their_targets(kind, classes), reshape=reshape,
                                             options=case.options, **call)
    assert np.abs(theirs).max() > 0, f"{name}: the reference maps are all zero"
    for e, expected in zip(explained, theirs):
        got = e.map(name).raw
        if case.oriented:
            expected = ref.oriented(got, expected)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0,
                                   atol=_tolerance(expected, case.tolerance),
                                   err_msg=f"{name} {kind} at {layer}")


@pytest.fixture(scope="module")
def images(cat, coffee):
    rng = np.random.default_rng(11)
    return [resized(cat, (224, 224)), resized(coffee, (224, 224)),
            rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]


@pytest.mark.parametrize("name, kind, layer", [
    (name, kind, layer) for name, kind in CASES
    for layer in REFERENCES.get(name, Reference("")).layers])
def test_resnet18_equals_pytorch_grad_cam(resnet_server, resnet_weights, images, name, kind,
                                          layer):
    _, client = resnet_server
    card = client.model_info()
    images = images[:REFERENCES.get(name, Reference("")).images]
    explained = client.explain_many(images, method=name, layer=layer, target=285, signed=True,
                                    target_kind=kind)
    model = ref.resnet18(resnet_weights)
    x = ref.normalise(np.stack(images), card.mean, card.std)
    _compare(name, kind, explained, model, layer, x)


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


@pytest.mark.parametrize("name, kind", [c for c in CASES
                                        if REFERENCES.get(c[0], Reference("")).vit])
def test_vit_equals_pytorch_grad_cam(vit, name, kind):
    client, info, model, reshape, images = vit
    explained = client.explain_many(images, method=name, signed=True, target_kind=kind,
                                    target=3)
    x = ref.normalise(np.stack(images), info.mean, info.std)
    _compare(name, kind, explained, model, info.default_layer, x, reshape)


GUIDED = ("guided_backprop", "guided_gradcam")


def test_guided_methods_equal_pytorch_grad_cam_and_captum(resnet_server, resnet_weights,
                                                          images):
    """Guided backpropagation equals pytorch-grad-cam's GuidedBackpropReLUModel (summed over
    the colour channels); Guided Grad-CAM equals Captum's GuidedGradCam with bilinear
    upsampling, and pytorch-grad-cam's recipe (Grad-CAM's min-max scaled heatmap times guided
    backpropagation) once that scaling is undone; both at the input's resolution, signed."""
    from captum.attr import GuidedGradCam
    from pytorch_grad_cam import GradCAM, GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camserve.maps import resize_bilinear

    _, client = resnet_server
    card = client.model_info()
    assert set(GUIDED) <= set(card.methods)
    explained = client.explain_many(images, method=[*GUIDED, "gradcam"], target=285,
                                    layer="layer4", signed=True)
    model = ref.resnet18(resnet_weights)
    x = ref.normalise(np.stack(images), card.mean, card.std)
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(285)] * len(images))
    guided_gradcam = GuidedGradCam(model, model.layer4)
    for i, e in enumerate(explained):
        backprop = GuidedBackpropReLUModel(model, device="cpu")(x[i:i + 1].clone(), 285)
        backprop = backprop.sum(axis=2)  # (H, W, 3) summed over the colours
        got = e.map("guided_backprop").raw
        assert got.shape == card.input_size == backprop.shape
        np.testing.assert_allclose(got, backprop, rtol=0, atol=_tolerance(backprop))
        theirs = guided_gradcam.attribute(x[i:i + 1].clone().requires_grad_(), target=285,
                                          interpolate_mode="bilinear")[0].sum(0).detach()
        got = e.map("guided_gradcam").raw
        np.testing.assert_allclose(got, theirs.numpy(), rtol=0, atol=_tolerance(theirs.numpy()))
        up = resize_bilinear(np.maximum(e.map("gradcam").raw, 0), card.input_size)
        low, high = float(up.min()), float(up.max())
        recipe = heat[i] * backprop * (high - low + 1e-7) + low * backprop
        np.testing.assert_allclose(got, recipe, rtol=0, atol=_tolerance(recipe))


def test_guided_methods_cost_their_own_forward_and_full_backward():
    from camserve_server.domain import ExplainSpec

    plain = ExplainSpec(methods=("gradcam",), layers=("layer4",), targets=(1, 2))
    guided = ExplainSpec(methods=("gradcam", "guided_gradcam"), layers=("layer4",),
                         targets=(1, 2))
    assert guided.cost == plain.cost + 1 + 2 * 2  # a forward, two full backwards
    assert ExplainSpec(methods=("guided_backprop",), layers=("x",)).cost == 1 + 3
    # aug_smooth: the 6 copies' explanations besides the item's own
    assert ExplainSpec(methods=("gradcam",), layers=("x",), aug_smooth=True).cost == 7 * 2
    # AblationCAM: a forward per channel, as Score-CAM
    assert ExplainSpec(methods=("ablationcam", "scorecam"), layers=("x",),
                       score_cam_channels=8).extra_cost == 2 * 8


@pytest.mark.parametrize("name, why, instead", [
    *((name, "ReLU", "CAM_METHOD_GRADCAM") for name in GUIDED),
    ("ablationcam", "blocks.11.norm1", "CAM_METHOD_SCORECAM")])
def test_refused_on_the_vit(vit, name, why, instead):
    """timm's ViT has GELUs and no ReLU: nothing to guide, so the server says what to ask for
    instead (and GetModelInfo does not offer the guided methods); its token layers have no
    convolutional channels to ablate."""
    from camserve import CamserveError

    client, info, _, _, images = vit
    assert (name in GUIDED) == (name not in info.methods) and "gradcam" in info.methods
    with pytest.raises(CamserveError) as caught:
        client.explain(images[0], method=["gradcam", name])
    error = caught.value
    assert error.code.name == "INVALID_ARGUMENT" and error.reason == "NOT_APPLICABLE"
    assert f"CAM_METHOD_{name.upper()}" in error.details and why in error.details
    assert instead in error.details and error.field_violations


@pytest.mark.parametrize("kind", ["softmax", "rest", "finer"])
def test_scorecam_scores_the_target_kind(tiny_server_large, kind):
    """Score-CAM scores each masked image with the target kind, as pytorch-grad-cam's ScoreCAM
    does with that target (on the tiny model: all of its 16 channels)."""
    from camserve_server.engine.models import load_model
    from camserve_server.engine.spec import ModelSpec

    from conftest import TINY

    _, client = tiny_server_large
    info = client.model_info()
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (*info.input_size, 3), dtype=np.uint8) for _ in range(2)]
    explained = client.explain_many(images, method="scorecam", target=4, target_kind=kind,
                                    signed=True)
    model = load_model(ModelSpec(source=TINY)).module
    for p in model.parameters():
        p.requires_grad_(True)
    x = ref.normalise(np.stack(images), info.mean, info.std)
    if kind == "finer":  # the FinerWeightedTarget FinerCAM would build, given to ScoreCAM
        from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

        with torch.no_grad():
            logits = model(x).numpy()
        order = np.argsort(np.abs(logits - logits[:, 4:5]), axis=-1)
        targets = [FinerWeightedTarget(4, [int(c) for c in row[1:4]], 1.0) for row in order]
    else:
        targets = _their_targets(kind, [4, 4])
    theirs = ref.pytorch_grad_cam_called("ScoreCAM", model, "features", x, targets)
    for e, expected in zip(explained, theirs):
        assert e.map().target_kind == kind
        np.testing.assert_allclose(e.map().raw, expected, rtol=0, atol=_tolerance(expected))


def test_a_job_between_its_slices_leaves_the_grad_mode_as_it_was(resnet_weights, images):
    """A Score-CAM or AblationCAM job yields to the batcher between slices: what runs then (a
    guided pass) finds torch's grad mode as it was."""
    from camserve_server.domain import ExplainSpec, WorkItem
    from camserve_server.engine.engine import Engine
    from camserve_server.engine.models import load_model
    from camserve_server.engine.spec import ModelSpec

    engine = Engine(load_model(ModelSpec(source="torchvision:resnet18",
                                         weights=str(resnet_weights), layers=("layer4",))))
    try:
        for method in ("scorecam", "ablationcam"):
            spec = ExplainSpec(methods=(method,), layers=("layer4",), score_cam_channels=40)
            job = engine.run_batch([WorkItem(images[0], spec)])[0]
            assert next(job) == 16 and torch.is_grad_enabled(), method
            job.close()
    finally:
        engine.close()


# eigen_smooth: the methods whose map is a sum over channels, and pytorch-grad-cam's class
# (Score-CAM and AblationCAM, a forward per channel, are left to their own tests' cost).
SMOOTHED = {"gradcam": "GradCAM", "gradcam_plus_plus": "GradCAMPlusPlus",
            "xgradcam": "XGradCAM", "layercam": "LayerCAM", "hirescam": "HiResCAM",
            "gradcam_elementwise": "GradCAMElementWise", "finercam": "FinerCAM",
            "shapleycam": "ShapleyCAM"}


def _compare_smoothed(explained, model, layer, x, target, reshape=None, share=1e-4):
    """``share``: the tolerance as a share of the map's largest value; a principal component
    in float32 is only as exact as the gap between the first two singular values allows."""
    for name, cls in SMOOTHED.items():
        options = {"target_idx": target} if name == "finercam" else {}
        targets = None if name == "finercam" else [target] * len(x)
        with sdpa_kernel([SDPBackend.MATH]):
            theirs = ref.pytorch_grad_cam_called(cls, model, layer, x, targets,
                                                 reshape=reshape, eigen_smooth=True, **options)
        for e, expected in zip(explained, theirs):
            got = e.map(name).raw
            expected = ref.oriented(got, expected)
            np.testing.assert_allclose(got, expected, rtol=0,
                                       atol=_tolerance(expected, share),
                                       err_msg=f"{name} eigen_smooth at {layer}")


def test_eigen_smooth_equals_pytorch_grad_cam(resnet_server, resnet_weights, images):
    """pytorch-grad-cam's eigen_smooth=True, up to the principal component's sign (camserve's
    correlates with the unsmoothed map)."""
    _, client = resnet_server
    card = client.model_info()
    explained = client.explain_many(images, method=list(SMOOTHED), layer="layer4", target=285,
                                    signed=True, eigen_smooth=True)
    x = ref.normalise(np.stack(images), card.mean, card.std)
    _compare_smoothed(explained, ref.resnet18(resnet_weights), "layer4", x, 285)
    plain = client.explain(images[0], method="hirescam", layer="layer4", target=285)
    assert np.corrcoef(plain.raw.ravel(), explained[0].map("hirescam").raw.ravel())[0, 1] > 0


def test_eigen_smooth_on_the_vit(vit):
    client, info, model, reshape, images = vit
    explained = client.explain_many(images, method=list(SMOOTHED), target=3, signed=True,
                                    eigen_smooth=True)
    x = ref.normalise(np.stack(images), info.mean, info.std)
    # 196 tokens of 768 channels: the components are closer than a CNN's, and their float32
    # SVDs differ by up to 2e-4 of the map's largest value with the threads' summation order.
    _compare_smoothed(explained, model, info.default_layer, x, 3, reshape, share=1e-3)


# aug_smooth, against pytorch-grad-cam's aug_smooth=True (its final heatmaps): the methods
# whose sign is no principal component's (EigenCAM's and EigenGradCAM's are LAPACK's there).
AUGMENTED = {"gradcam": "GradCAM", "gradcam_plus_plus": "GradCAMPlusPlus",
             "layercam": "LayerCAM", "hirescam": "HiResCAM",
             "gradcam_elementwise": "GradCAMElementWise", "fem": "FEM", "kpca_cam": "KPCA_CAM"}


def _compare_augmented(explained, model, layer, x, target, reshape=None):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    for name, cls in AUGMENTED.items():
        module = model.get_submodule(layer)
        with getattr(pytorch_grad_cam, cls)(model, [module], reshape_transform=reshape) as cam:
            theirs = cam(x.clone(), [ClassifierOutputTarget(target)] * len(x), aug_smooth=True)
        for e, expected in zip(explained, theirs):
            got = e.map(name).raw
            assert got.shape == expected.shape == x.shape[-2:]
            np.testing.assert_allclose(got, expected, rtol=0, atol=_tolerance(expected),
                                       err_msg=f"{name} aug_smooth at {layer}")


def test_aug_smooth_equals_pytorch_grad_cam(resnet_server, resnet_weights, images):
    _, client = resnet_server
    card = client.model_info()
    explained = client.explain_many(images, method=list(AUGMENTED), layer="layer4",
                                    target=285, aug_smooth=True)
    x = ref.normalise(np.stack(images), card.mean, card.std)
    _compare_augmented(explained, ref.resnet18(resnet_weights), "layer4", x, 285)


def test_aug_smooth_on_the_vit(vit):
    client, info, model, reshape, images = vit
    explained = client.explain_many(images, method=list(AUGMENTED), target=3, aug_smooth=True)
    x = ref.normalise(np.stack(images), info.mean, info.std)
    _compare_augmented(explained, model, info.default_layer, x, 3, reshape)


@pytest.mark.parametrize("option, name", [
    *(("eigen_smooth", n) for n in ("eigencam", "guided_gradcam", "fullgrad", "kpca_cam")),
    *(("aug_smooth", n) for n in ("scorecam", "ablationcam", "guided_backprop", "fullgrad"))])
def test_smoothing_refused_where_it_does_not_apply(resnet_server, images, option, name):
    from camserve import CamserveError

    _, client = resnet_server
    with pytest.raises(CamserveError) as caught:
        client.explain(images[0], method=["gradcam", name], **{option: True})
    error = caught.value
    assert error.code.name == "INVALID_ARGUMENT" and error.reason == "NOT_APPLICABLE"
    assert f"CAM_METHOD_{name.upper()}" in error.details
    assert f"unset options.{option}" in error.details


def tiny_multilabel():
    """The tiny model as a multi-label classifier (served as python:test_pgc_methods:
    tiny_multilabel): its output_activation says so."""
    from tiny_models import tiny_cnn

    model = tiny_cnn()
    model.output_activation = "sigmoid"
    return model


def test_a_multilabel_model_answers_sigmoids_and_explains_them(images):
    """Predict's probabilities are a sigmoid per class (they need not sum to 1); the sigmoid
    target's Grad-CAM equals pytorch-grad-cam's with sigmoid(logit) as its target; the softmax
    kinds are refused there, and the sigmoid kind on a softmax model."""
    from camserve import CamserveError

    model = tiny_multilabel().eval()
    with running(model="python:test_pgc_methods:tiny_multilabel", max_delay_ms=1) as (_, client):
        info = client.model_info()
        x = ref.normalise(np.stack(images), info.mean, info.std)
        with torch.no_grad():
            expected = torch.sigmoid(model(x)).numpy()
        predicted = client.predict_many(images, top_k=len(info.labels))
        for p, probabilities in zip(predicted, expected):
            for c in p.top:
                assert c.probability == pytest.approx(float(probabilities[c.index]), abs=1e-5)
            assert sum(c.probability for c in p.top) != pytest.approx(1.0, abs=1e-3)
        explained = client.explain_many(images, method="gradcam", target=4,
                                        target_kind="sigmoid", signed=True)
        targets = [lambda output: torch.sigmoid(output[..., 4])] * len(images)
        theirs = ref.pytorch_grad_cam_called("GradCAM", model, "features", x, targets)
        for e, want in zip(explained, theirs):
            assert e.map().target_kind == "sigmoid"
            np.testing.assert_allclose(e.map().raw, want, rtol=0, atol=_tolerance(want))
        with pytest.raises(CamserveError) as caught:
            client.explain(images[0], target_kind="softmax")
        assert caught.value.reason == "NOT_APPLICABLE"
        assert "TARGET_KIND_SIGMOID" in caught.value.details
    with running(model="python:tiny_models:tiny_cnn", max_delay_ms=1) as (_, client):
        with pytest.raises(CamserveError) as caught:
            client.explain(images[0], target_kind="sigmoid")
        assert caught.value.reason == "NOT_APPLICABLE"
        assert "TARGET_KIND_SOFTMAX" in caught.value.details


def test_the_output_activation_flag_makes_a_model_multilabel(images):
    """--output-activation sigmoid on a model that does not say so: per-class sigmoids."""
    from tiny_models import tiny_cnn

    model = tiny_cnn().eval()
    with running(model="python:tiny_models:tiny_cnn", output_activation="sigmoid",
                 max_delay_ms=1) as (_, client):
        info = client.model_info()
        assert info.output_activation == "sigmoid"
        x = ref.normalise(np.stack(images[:1]), info.mean, info.std)
        with torch.no_grad():
            expected = torch.sigmoid(model(x)).numpy()[0]
        top = client.predict(images[0], top_k=len(info.labels)).top
        assert {c.index: c.probability for c in top} == pytest.approx(
            dict(enumerate(expected.tolist())), abs=1e-5)
        assert client.explain(images[0], target_kind="sigmoid").map().target_kind == "sigmoid"


def test_target_kinds_are_one_list():
    from camserve import target_kind_names
    from camserve_server.domain import TARGET_KINDS
    from camserve_server.engine.targets import TARGETS

    assert target_kind_names() == TARGET_KINDS == tuple(TARGETS)


def test_finercam_refuses_another_target_kind(resnet_server, images):
    from camserve import CamserveError

    _, client = resnet_server
    with pytest.raises(CamserveError) as caught:
        client.explain(images[0], method=["gradcam", "finercam"], target_kind="softmax")
    error = caught.value
    assert error.code.name == "INVALID_ARGUMENT" and error.reason == "NOT_APPLICABLE"
    assert "CAM_METHOD_FINERCAM" in error.details and "TARGET_KIND_FINER" in error.details
    assert "options.target_kind" in error.details
    e = client.explain(images[0], method=["gradcam", "finercam"], target_kind="finer")
    assert [m.target_kind for m in e.maps] == ["finer", "finer"]
    np.testing.assert_allclose(e.maps[0].raw, e.maps[1].raw, atol=1e-6)


def test_items_of_other_target_kinds_share_a_batch(resnet_weights, images):
    """In one batch, items asking for other target kinds and methods: each map equals the
    item's own alone (1e-5), though the batch runs one backward per (rank, finer) and
    ShapleyCAM's rows one of their own."""
    from camserve_server.domain import ExplainSpec, WorkItem
    from camserve_server.engine.engine import Engine
    from camserve_server.engine.models import load_model
    from camserve_server.engine.spec import ModelSpec

    engine = Engine(load_model(ModelSpec(source="torchvision:resnet18",
                                         weights=str(resnet_weights), layers=("layer4",))))
    try:
        specs = [ExplainSpec(methods=("gradcam", "shapleycam"), layers=("layer4",),
                             targets=(285, 3), target_kind="rest"),
                 ExplainSpec(methods=("finercam", "hirescam", "guided_gradcam"),
                             layers=("layer4",), target_kind="logit", top_targets=2),
                 ExplainSpec(methods=("gradcam", "eigengradcam"), layers=("layer4",),
                             targets=(3,), target_kind="softmax", counterfactual=True),
                 ExplainSpec(methods=("gradcam", "layercam"), layers=("layer4",),
                             targets=(3,), eigen_smooth=True),
                 ExplainSpec(methods=("gradcam", "fem"), layers=("layer4",),
                             top_targets=2, aug_smooth=True, target_kind="rest")]
        pixels = [*images, images[0], images[1]]
        together = engine.run([WorkItem(p, s) for p, s in zip(pixels, specs)])
        for image, spec, result in zip(pixels, specs, together):
            alone = engine.run([WorkItem(image, spec)])[0]
            assert [(m.method, m.target, m.target_kind) for m in alone.maps] == [
                (m.method, m.target, m.target_kind) for m in result.maps]
            for a, b in zip(alone.maps, result.maps):
                np.testing.assert_allclose(b.raw, a.raw, rtol=0, atol=1e-5 * max(
                    float(np.abs(a.raw).max()), 1.0), err_msg=f"{a.method} {a.target_kind}")
    finally:
        engine.close()


def test_a_map_is_the_same_alone_and_batched_with_other_methods(resnet_server, images):
    _, client = resnet_server
    methods = ["gradcam", *sorted(REFERENCES), *GUIDED]
    cheap = dict(score_cam_channels=16)  # AblationCAM: a forward per channel
    together = client.explain_many(images, method=methods, target=[285, 3], layer="layer4",
                                   **cheap)
    for name in [*sorted(REFERENCES), *GUIDED]:
        alone = client.explain(images[1], method=name, target=3, layer="layer4", **cheap)
        got = together[1].map(name, 3).raw
        np.testing.assert_allclose(got, alone.raw, rtol=0,
                                   atol=1e-5 * max(float(np.abs(alone.raw).max()), 1.0),
                                   err_msg=name)
