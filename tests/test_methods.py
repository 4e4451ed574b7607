"""Every CAM method against pytorch-grad-cam's implementation of it, several targets and layers
from one forward, counterfactual and signed maps, faithfulness scores, and the sanity and
class-discrimination checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camserve import maps as client_maps
from camserve.methods import method_names
from camserve_server.domain import ExplainSpec, SanityPlan, WorkItem
from camserve_server.engine import sanity
from camserve_server.engine.cams import CAM_METHODS
from camserve_server.engine.engine import Engine, finish
from camserve_server.engine.faithfulness import score_slices
from camserve_server.engine.models import load_model
from camserve_server.engine.spec import ModelSpec

import references as ref
from conftest import TINY, resized

# Our name → pytorch-grad-cam's class.
REFERENCE = {"gradcam": "GradCAM", "gradcam_plus_plus": "GradCAMPlusPlus",
             "xgradcam": "XGradCAM", "layercam": "LayerCAM", "hirescam": "HiResCAM",
             "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}
GRADIENT = [m for m, method in CAM_METHODS.items() if method.needs_gradient]
CAT_CLASSES = {281, 282, 283, 284, 285}


def test_one_registry_for_enum_server_client_and_cli():
    from camserve.cli import build_parser

    assert set(method_names()) == set(CAM_METHODS)
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("explain", "evaluate"):
        choices = next(a.choices for a in commands[command]._actions if a.dest == "method")
        assert tuple(choices) == method_names()
    from test_pgc_methods import GUIDED, REFERENCES

    assert set(REFERENCE) | set(REFERENCES) | set(GUIDED) == set(CAM_METHODS) - {"random"}
    assert set(GRADIENT) == {"gradcam", "gradcam_plus_plus", "xgradcam", "layercam",
                             "hirescam", "eigengradcam", "gradcam_elementwise",
                             "guided_gradcam", "finercam", "shapleycam"}


@pytest.fixture(scope="module")
def resnet(resnet_weights):
    engine = Engine(load_model(ModelSpec(source="torchvision:resnet18",
                                         weights=str(resnet_weights),
                                         layers=("layer4", "layer3"))))
    yield engine, ref.resnet18(resnet_weights)
    engine.close()


@pytest.fixture(scope="module")
def default_engine():
    engine = Engine(load_model(ModelSpec()))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def images(cat, coffee):
    rng = np.random.default_rng(11)
    return [resized(cat, (224, 224)), resized(coffee, (224, 224)),
            rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]


def run_maps(engine, images, **spec):
    return [r.maps for r in engine.run([WorkItem(p, ExplainSpec(**spec)) for p in images])]


def _x(engine, images):
    return ref.normalise(np.stack(images), engine.model.card.mean, engine.model.card.std)


@pytest.mark.parametrize("method", sorted(set(REFERENCE) - {"scorecam", "eigencam"}))
def test_gradient_method_equals_pytorch_grad_cam(resnet, images, method):
    engine, model = resnet
    ours = run_maps(engine, images, methods=(method,), layers=("layer4",), targets=(3, 285))
    x = _x(engine, images)
    for rank, target in enumerate((3, 285)):
        theirs = ref.pytorch_grad_cam_raw(REFERENCE[method], model, "layer4", x,
                                          [target] * len(images))
        for item, expected in zip(ours, theirs):
            assert (item[rank].target, item[rank].method) == (target, method)
            np.testing.assert_allclose(item[rank].raw, expected, rtol=0,
                                       atol=1e-4 * max(float(expected.max()), 1e-6))


def test_eigencam_equals_pytorch_grad_cam_up_to_the_sign(resnet, images):
    """An SVD's sign is arbitrary: pytorch-grad-cam keeps LAPACK's; camserve orients the
    component to correlate positively with the activations' channel sum (cams.eigencam)."""
    engine, model = resnet
    ours = run_maps(engine, images, methods=("eigencam",), layers=("layer4",), signed=True)
    x = _x(engine, images)
    projections = ref.pytorch_grad_cam_eigen_projection(model, "layer4", x)
    activations = []
    handle = model.layer4.register_forward_hook(lambda m, i, o: activations.append(o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    strength = activations[0].sum(dim=1).numpy()
    for item, theirs, total in zip(ours, projections, strength):
        got = item[0].raw
        sign = 1.0 if np.abs(got - theirs).max() < np.abs(got + theirs).max() else -1.0
        np.testing.assert_allclose(got, sign * theirs, atol=1e-3 * np.abs(theirs).max())
        assert np.corrcoef(got.ravel(), total.ravel())[0, 1] > 0
    unsigned = run_maps(engine, images[:1], methods=("eigencam",), layers=("layer4",))
    np.testing.assert_allclose(unsigned[0][0].raw, np.maximum(ours[0][0].raw, 0), atol=1e-6)


def test_scorecam_equals_pytorch_grad_cam_on_all_channels():
    engine = Engine(load_model(ModelSpec(source=TINY)))
    model = load_model(ModelSpec(source=TINY)).module
    for p in model.parameters():
        p.requires_grad_(True)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    ours = run_maps(engine, images, methods=("scorecam",), layers=("features",), targets=(4,))
    theirs = ref.pytorch_grad_cam_raw("ScoreCAM", model, "features", _x(engine, images), [4, 4])
    for item, expected in zip(ours, theirs):
        np.testing.assert_allclose(item[0].raw, expected, atol=1e-4 * max(expected.max(), 1e-6))
    capped = run_maps(engine, images, methods=("scorecam",), layers=("features",),
                      targets=(4,), score_cam_channels=4)
    assert capped[0][0].raw.shape == (28, 28)
    assert not np.allclose(capped[0][0].raw, ours[0][0].raw)
    engine.close()


def test_counterfactual_and_signed_maps(resnet, images):
    """Counterfactual = Grad-CAM of the negated score; signed = Grad-CAM without its ReLU
    (both against Captum)."""
    engine, model = resnet

    class Negated(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return -self.inner(x)

    x = _x(engine, images)
    counter = run_maps(engine, images, methods=("gradcam",), layers=("layer4",), targets=(9,),
                       counterfactual=True)
    expected = ref.captum_gradcam(Negated(model), "inner.layer4", x, [9] * 3)
    signed = run_maps(engine, images, methods=("gradcam",), layers=("layer4",), targets=(9,),
                      signed=True)
    from captum.attr import LayerGradCam

    raw = LayerGradCam(model, model.layer4).attribute(x, target=[9] * 3,
                                                      relu_attributions=False)[:, 0].detach()
    for c, e, s, r in zip(counter, expected, signed, raw.numpy()):
        np.testing.assert_allclose(c[0].raw, e, atol=1e-4 * max(e.max(), 1e-6))
        np.testing.assert_allclose(s[0].raw, r, atol=1e-4 * np.abs(r).max())
        assert (s[0].raw < 0).any()


def test_several_targets_and_layers_from_one_forward(resnet, images, monkeypatch):
    """Maps for 2 methods x 2 targets x 2 layers equal the single maps; the batch runs one
    backward per target rank (2), not one per item or per map."""
    engine, _ = resnet
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = dict(methods=("gradcam", "layercam"), targets=(3, 285), layers=("layer4", "layer3"))
    several = run_maps(engine, images, **spec)
    assert len(calls) == 2
    for item in several:
        assert [(m.method, m.target, m.layer) for m in item] == [
            (method, target, layer) for method in spec["methods"] for target in spec["targets"]
            for layer in spec["layers"]]
    for m in several[1]:
        single = run_maps(engine, images[1:2], methods=(m.method,), targets=(m.target,),
                          layers=(m.layer,))[0][0]
        np.testing.assert_allclose(m.raw, single.raw, atol=1e-5)
    calls.clear()
    run_maps(engine, images, methods=("eigencam",), layers=("layer4",), top_targets=3)
    assert calls == [], "a batch of only EigenCAM items ran a backward"
    top = run_maps(engine, images[:1], methods=("gradcam",), layers=("layer4",), top_targets=3)
    assert len(top[0]) == 3 and len({m.target for m in top[0]}) == 3


def test_several_targets_and_layers_through_the_server(resnet_server, cat):
    _, client = resnet_server
    e = client.explain(cat, method=["gradcam", "hirescam"], target=[3, "tabby"],
                       layer=["layer4", "layer3"], outputs=("raw", "heatmap"))
    assert len(e.maps) == 8 and e.maps[0] is e.map() and e.raw is e.maps[0].raw
    assert {m.target.label for m in e.maps} == {e.maps[0].target.label, "tabby"}
    single = client.explain(cat, method="hirescam", target="tabby", layer="layer3")
    np.testing.assert_allclose(e.map("hirescam", "tabby", "layer3").raw, single.raw, atol=1e-5)
    combined = e.combined_heatmap("hirescam", "tabby")
    np.testing.assert_allclose(combined, (e.map("hirescam", "tabby", "layer4").heatmap
                                          + e.map("hirescam", "tabby", "layer3").heatmap) / 2,
                               atol=1e-6)
    assert len(e.combined_images) == 4 and all(png for _, _, png, _ in e.combined_images)


def test_faithfulness_matches_a_plain_reimplementation():
    """Deletion/insertion scores against a straightforward step-by-step loop."""
    engine = Engine(load_model(ModelSpec(source=TINY)))
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    raw = rng.random((28, 28)).astype(np.float32)
    steps = 8
    deletion, insertion = finish(score_slices(engine.forward, engine.normalise,
                                              torch.from_numpy(pixels), torch.from_numpy(raw),
                                              2, steps, 32))
    saliency = torch.nn.functional.interpolate(torch.from_numpy(raw)[None, None], (224, 224),
                                               mode="bilinear", align_corners=False)[0, 0]
    order = np.argsort(-saliency.numpy().ravel(), kind="stable")
    from camserve_server.engine.faithfulness import _blur

    blurred = _blur(torch.from_numpy(pixels).float()).numpy()
    curves = {"deletion": [], "insertion": []}
    for step in range(steps + 1):
        shown = np.zeros(224 * 224, bool)
        shown[order[:round(step * 224 * 224 / steps)]] = True
        shown = shown.reshape(224, 224, 1)
        for name, image in (("deletion", np.where(shown, 0.0, pixels)),
                            ("insertion", np.where(shown, pixels, blurred))):
            x = engine.normalise(torch.from_numpy(image[None].astype(np.float32)))
            curves[name].append(torch.softmax(engine.forward(x), 1)[0, 2].item())
    for name, value in (("deletion", deletion), ("insertion", insertion)):
        curve = np.array(curves[name])
        assert value == pytest.approx(np.trapezoid(curve, dx=1 / steps), abs=1e-5)
    engine.close()


def test_faithfulness_ranks_grad_cam_above_a_random_map(default_server, cat, coffee):
    """Over the two sample photos, Grad-CAM deletes the class faster and restores it faster than
    a random map does (one photo alone is noisy: on the cat, whose face fills the picture,
    random blobs delete about as fast)."""
    _, client = default_server
    deletion, insertion = {}, {}
    for image in (cat, coffee):
        e = client.explain(image, method=["gradcam", "random"], faithfulness_steps=16,
                           outputs=())
        for m in e.maps:
            assert 0 <= m.deletion <= 1 and 0 <= m.insertion <= 1
            deletion.setdefault(m.method, []).append(m.deletion)
            insertion.setdefault(m.method, []).append(m.insertion)
    assert np.mean(deletion["gradcam"]) < np.mean(deletion["random"])
    assert np.mean(insertion["gradcam"]) > np.mean(insertion["random"])


# FinerCAM explains a class against its nearest confusers (the other cat classes, for the
# cat), not against the rest of the photo: where the cat classes differ need not be the cat.
@pytest.mark.parametrize("method", [m for m in GRADIENT if m != "finercam"])
def test_class_discriminative_on_the_composite_photo(default_engine, cat, coffee, method):
    """Cat left, cup right: each class's map puts most of its mass on its own half."""
    composite = np.concatenate([resized(cat, (224, 112)), resized(coffee, (224, 112))], axis=1)
    logits = default_engine.run([WorkItem(composite)])[0].logits
    cat_class = max(CAT_CLASSES, key=lambda c: logits[c])
    item = run_maps(default_engine, [composite], methods=(method,), layers=("bn2",),
                    targets=(cat_class, 967))[0]
    left = {}
    for m in item:
        heat = client_maps.heatmap(m.raw, (224, 224))
        left[m.target] = heat[:, :112].sum() / heat.sum()
    assert left[cat_class] > 0.5 and left[967] < 0.5, left


# Methods whose maps barely change when the classifier and the explained block are
# re-initialised (measured Spearman 0.70-0.90 on the default model): EigenCAM, KPCA-CAM and FEM
# use neither the classifier nor a gradient, and the activations' first (kernel) principal
# component and their strongest positions survive a random projection of the features;
# Score-CAM's masks are the activations themselves; Grad-CAM++, LayerCAM and
# GradCAMElementWise weight by ReLU(gradient) or ReLU(gradient x activation), which under global
# average pooling follow the activations' energy; EigenGradCAM's principal component of
# gradient x activation is dominated by the activations' (0.70); guided backpropagation
# (0.997) and Guided Grad-CAM (0.59) are the very failure Adebayo et al. report: the guided
# backward reconstructs the image's edges whatever the weights above; FullGrad (0.91) sums
# bias-gradient maps of every layer, most of them below the randomised top. They fail
# Adebayo et al.'s check here; docs/methods.md says so. Strict: if one starts passing, the
# test says so.
# tests/test_sanity.py checks that CheckSanity's table through a real server agrees.
INSENSITIVE = {"eigencam", "scorecam", "gradcam_plus_plus", "layercam", "eigengradcam",
               "gradcam_elementwise", "fem", "kpca_cam", "guided_backprop", "guided_gradcam",
               "fullgrad"}


@pytest.fixture(scope="module")
def randomised(cat, coffee):
    """The server's parameter-randomisation check (engine/sanity.py), in process, on two
    photos: the classifier head re-initialised, then also the explained block (bn2,
    conv_head); the maps of the trained and the randomised copy compared."""
    images = [resized(cat, (224, 224)), resized(coffee, (224, 224))]
    plan = SanityPlan(methods=tuple(m for m in CAM_METHODS if m != "random"), layer="bn2",
                      score_cam_channels=8, contrast_rank=500, stages=2)
    return sanity.check(load_model(ModelSpec()), images, plan)


def test_randomisation_cascade_of_the_default_model(randomised):
    assert [s.name for s in randomised.stages] == ["head", "head + 2"]
    assert randomised.stages[0].modules == ("classifier",)
    assert randomised.stages[1].modules == ("classifier", "bn2", "conv_head")
    assert randomised.verdict_stage == 1
    assert [m.method for m in randomised.methods] == [m for m in CAM_METHODS if m != "random"]


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason="insensitive to the top of "
                                            "the model here; see INSENSITIVE"))
    if m in INSENSITIVE else m for m in CAM_METHODS if m != "random"])
def test_sanity_check_parameter_randomisation(randomised, method):
    """Adebayo et al. 2018: re-initialising the classifier head and the explained block must
    change the maps. Spearman's rank correlation between a 7x7 map from the trained and the
    randomised model must stay below 0.5: two unrelated maps of 49 cells correlate with a
    standard deviation of about 1/sqrt(48) = 0.14, so 0.5 is 3.5 deviations from chance, while a
    map that ignored the parameters would correlate at 1."""
    figures = randomised.method(method)
    assert figures.randomisation_pass == (figures.randomisation[1] < 0.5)
    assert figures.randomisation[1] < 0.5, figures
