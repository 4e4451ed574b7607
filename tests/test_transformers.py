"""Vision transformers: token layers (ViT, DeiT-style prefix tokens, register tokens),
channels-last layers (Swin) and Hugging Face models, against pytorch-grad-cam with the matching
``reshape_transform``, through real servers.

Every model here has seeded random weights (saved to a temporary file where the source takes
one), so nothing is downloaded. The ``python:test_transformers:FACTORY`` models are built by the
factories below (tests/ is on the path).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from camserve_server.domain import ExplainSpec, WorkItem
from camserve_server.engine import tokens
from camserve_server.engine.engine import Engine
from camserve_server.engine.models import load_model
from camserve_server.engine.spec import ModelSpec
from camserve_server.errors import StartupError

import references as ref
from conftest import resized, running

pytest.importorskip("pytorch_grad_cam", reason="the references are pytorch-grad-cam's")

REFERENCE = {"gradcam": "GradCAM", "gradcam_plus_plus": "GradCAMPlusPlus",
             "xgradcam": "XGradCAM", "layercam": "LayerCAM", "hirescam": "HiResCAM",
             "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}
GRADIENT = ("gradcam", "gradcam_plus_plus", "xgradcam", "layercam", "hirescam")
MEASURED: Dict[Tuple[str, str], float] = {}  # (model, method) → max heatmap difference


# --- models the tests build (also served as python:test_transformers:NAME) ----------------------


def vit_with_registers() -> nn.Module:
    """timm's tiny test ViT with a class token AND 4 register tokens: 5 prefix tokens."""
    import timm

    torch.manual_seed(7)
    return timm.create_model("test_vit", reg_tokens=4, num_classes=10).eval()


def torchvision_vit() -> nn.Module:
    """torchvision's VisionTransformer, small: 224x224 in 32x32 patches (7x7) + class token."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(8)
    model = VisionTransformer(image_size=224, patch_size=32, num_layers=2, num_heads=2,
                              hidden_dim=48, mlp_dim=96, num_classes=10).eval()
    with torch.no_grad():  # torchvision starts the head at zero: no gradient would flow
        nn.init.normal_(model.heads.head.weight, std=0.2)
    return model


class OddTokens(nn.Module):
    """35 tokens (a 5x7 pooling of a square image) and no patch embedding: no grid to find."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((5, 7))
        self.embed = nn.Linear(3, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.pool(x).flatten(2).transpose(1, 2)).mean(dim=1))


def odd_tokens() -> nn.Module:
    torch.manual_seed(0)
    return OddTokens()


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build().eval()
    with torch.no_grad():  # non-trivial norms and layer scales, so that maps are not degenerate
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            gamma = getattr(module, "gamma", None)  # timm's LayerScale starts at 1e-5
            if isinstance(gamma, nn.Parameter):
                gamma.uniform_(0.5, 1.5)
    return model


def _timm(name: str) -> Callable[[], nn.Module]:
    def build():
        import timm

        return timm.create_model(name, num_classes=10)
    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=10)
    return build


# --- the references ----------------------------------------------------------------------------


def vit_reshape(prefix: int, height: int, width: int):
    """pytorch-grad-cam's vit_reshape_transform (which drops exactly one class token),
    generalised to any number of prefix tokens and a non-square grid."""
    if prefix == 1 and height == width:
        from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

        return lambda t: vit_reshape_transform(t, height, width)

    def reshape(t):
        result = t[:, prefix:, :].reshape(t.size(0), height, width, t.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape


def swin_reshape(height: int, width: int):
    """pytorch-grad-cam's swinT_reshape_transform, written for Swin stages that returned
    (N, h*w, C) tokens; today's timm and torchvision stages return (N, h, w, C), flattened to
    those tokens first."""
    from pytorch_grad_cam.utils.reshape_transforms import swinT_reshape_transform

    return lambda t: swinT_reshape_transform(t.reshape(t.size(0), -1, t.size(-1)), height,
                                             width)


def reference_maps(model: nn.Module, layer_name: str, x: torch.Tensor, targets, reshape,
                   score_cam_channels: int = 0, score_cam: bool = True) -> Dict[str, np.ndarray]:
    """pytorch-grad-cam's raw maps (after its ReLU; EigenCAM's projection before it, as LAPACK
    signs it), (N, h, w) per method. The gradient methods share one forward and one backward
    recorded by pytorch-grad-cam's ActivationsAndGradients; each method's own get_cam_image
    turns them into its map. Score-CAM limited to the N most active channels (as camserve's
    score_cam_channels) is pytorch-grad-cam's ScoreCAM on those channels, one image at a time."""
    import pytorch_grad_cam
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    layer = model.get_submodule(layer_name)
    wanted = [ClassifierOutputTarget(int(t)) for t in targets]
    # Gradients are needed from the layer's output up only: let only the layer's own
    # parameters (or else the input) require them, which keeps the backward short.
    for p in model.parameters():
        p.requires_grad_(False)
    own = list(layer.parameters())
    for p in own:
        p.requires_grad_(True)
    inputs = x if own else x.clone().requires_grad_(True)
    record = ActivationsAndGradients(model, [layer], reshape)
    try:
        outputs = record(inputs)
        sum(t(o) for t, o in zip(wanted, outputs)).backward()
        activations = record.activations[0].numpy()
        gradients = record.gradients[0].numpy()
    finally:
        record.release()
    out = {}
    for method in GRADIENT:
        cam = getattr(pytorch_grad_cam, REFERENCE[method])(model=model, target_layers=[layer],
                                                           reshape_transform=reshape)
        cam.activations_and_grads.release()
        out[method] = np.maximum(cam.get_cam_image(x, layer, wanted, activations, gradients,
                                                   False), 0)
    out["eigencam"] = get_2d_projection(activations)
    scored = []
    for i in range(x.shape[0] if score_cam else 0):
        channels = None
        if score_cam_channels:
            means = torch.from_numpy(activations[i]).mean(dim=(1, 2))
            channels = torch.topk(means, score_cam_channels).indices

        def limited(t, channels=channels):
            grid = reshape(t)
            return grid if channels is None else grid[:, channels]
        with torch.no_grad(), pytorch_grad_cam.ScoreCAM(model=model, target_layers=[layer],
                                                        reshape_transform=limited) as cam:
            cam.batch_size = 64
            cam.activations_and_grads(x[i:i + 1])
            acts = cam.activations_and_grads.activations[0].numpy()
            scored.append(np.maximum(cam.get_cam_image(x[i:i + 1], layer, wanted[i:i + 1], acts,
                                                       None, False), 0)[0])
    if score_cam:
        out["scorecam"] = np.stack(scored)
    return out


def their_heatmap(raw: np.ndarray, size) -> np.ndarray:
    """pytorch-grad-cam's heatmap of one layer's map: scale_cam_image at the input size, then
    aggregate_multi_layers' scale_cam_image again."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    return scale_cam_image(scale_cam_image(raw[None], (size[1], size[0])))[0]


# --- the models served -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    model: str  # --model; "{weights}" is replaced by the weights file
    build: Callable[[], nn.Module]  # the same model, built by the test
    layer: str  # the default layer the server must pick
    layout: str
    prefix: int
    grid: Tuple[int, int]
    reshape: Callable
    weights: bool = True  # save build()'s weights to a file for --weights
    score_cam_channels: int = 0  # 0: all channels
    images: int = 2


CASES = {
    # A class token (pytorch-grad-cam's own vit_reshape_transform).
    "vit_tiny": Case("timm:vit_tiny_patch16_224", _timm("vit_tiny_patch16_224"),
                     "blocks.11.norm1", "tokens", 1, (14, 14), vit_reshape(1, 14, 14),
                     score_cam_channels=8),
    # A class token and 4 register tokens (timm's num_prefix_tokens = 5).
    "vit_registers": Case("python:test_transformers:vit_with_registers", vit_with_registers,
                          "blocks.5.norm1", "tokens", 5, (14, 14), vit_reshape(5, 14, 14),
                          weights=False),  # python: serves 224x224 (timm's default is 160)
    # One register token and no class token (average pooling).
    "test_vit2": Case("timm:test_vit2", _timm("test_vit2"), "blocks.7.norm1", "tokens", 1,
                      (10, 10), vit_reshape(1, 10, 10)),
    # Channels-last: the first norm of the last block of the last stage, (N, 7, 7, 768), as
    # pytorch-grad-cam recommends (layers[-1].blocks[-1].norm1).
    "swin_tiny": Case("timm:swin_tiny_patch4_window7_224",
                      _timm("swin_tiny_patch4_window7_224"), "layers.3.blocks.1.norm1", "nhwc",
                      0, (7, 7),
                      swin_reshape(7, 7), score_cam_channels=4, images=1),
    "torchvision_swin_t": Case("torchvision:swin_t", _torchvision("swin_t"),
                               "features.7.1.norm1", "nhwc", 0, (7, 7), swin_reshape(7, 7),
                               score_cam_channels=4, images=1),
    "torchvision_vit": Case("python:test_transformers:torchvision_vit", torchvision_vit,
                            "encoder.layers.encoder_layer_1.ln_1", "tokens", 1, (7, 7),
                            vit_reshape(1, 7, 7), weights=False),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def served(request, tmp_path_factory, cat):
    """A server for one case, the same model built by the test, and the images to explain."""
    case = CASES[request.param]
    model = _seeded(case.build, 1234) if case.weights else case.build()
    weights = None
    if case.weights:
        weights = tmp_path_factory.mktemp("weights") / f"{request.param}.pt"
        torch.save(model.state_dict(), weights)
    started = time.perf_counter()
    # Batches of 1: the server's warm-up runs full batches, costly on 2 cores for Swin.
    with running(model=case.model, weights=None if weights is None else str(weights),
                 max_delay_ms=1, max_batch_size=1) as (server, client):
        info = client.model_info()
        size = info.input_size
        rng = np.random.default_rng(5)
        images = [resized(cat, size)] + [rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                                         for _ in range(case.images - 1)]
        yield request.param, case, model, client, info, images
    print(f"\n{request.param}: server up and tests done in {time.perf_counter() - started:.1f}s")


def test_default_layer_and_layout(served):
    name, case, _, client, info, _ = served
    assert info.default_layer == case.layer
    card = client.model_info().layers[0]
    assert (card.name, card.height, card.width) == (case.layer, *case.grid)
    # GetModelInfo (camserve info) says why: the rule that chose the layer.
    assert card.reason.startswith("the first norm of the last") and "pytorch-grad-cam" in \
        card.reason


def test_every_method_equals_pytorch_grad_cam(served):
    """Raw maps within 1e-4 of the map's maximum, heatmaps within 1e-3; EigenCAM up to the sign
    of its principal component."""
    name, case, model, client, info, images = served
    options = {"score_cam_channels": case.score_cam_channels} if case.score_cam_channels else {}
    ours = [client.explain(image, method=list(REFERENCE), **options) for image in images]
    eigen = [client.explain(image, method="eigencam", signed=True) for image in images]
    targets = [e.maps[0].target.index for e in ours]
    x = ref.normalise(np.stack(images), info.mean, info.std)
    theirs = reference_maps(model, case.layer, x, targets, case.reshape,
                            case.score_cam_channels)
    assert sum(theirs["gradcam"][i].max() > 0 for i in range(len(images))) >= 1, \
        "the reference maps are all zero: the test would prove nothing"
    for i, (explained, signed) in enumerate(zip(ours, eigen)):
        got, projection = signed.maps[0].raw, theirs["eigencam"][i]
        sign = 1.0 if np.abs(got - projection).max() < np.abs(got + projection).max() else -1.0
        np.testing.assert_allclose(got, sign * projection, rtol=0,
                                   atol=1e-3 * np.abs(projection).max(), err_msg=name)
        theirs["eigencam"][i] = np.maximum(sign * projection, 0)  # oriented, after the ReLU
        assert [m.method for m in explained.maps] == list(REFERENCE)
        for m in explained.maps:
            assert m.layer == case.layer and m.target.index == targets[i]
            expected = theirs[m.method][i]
            assert m.raw.shape == case.grid == expected.shape
            _heatmaps_agree(name, m.method, m.heatmap, their_heatmap(expected, info.input_size),
                            expected)
            np.testing.assert_allclose(m.raw, expected, rtol=0, atol=_raw_tolerance(
                m.method, expected, projection), err_msg=f"{name} {m.method}")


def _raw_tolerance(method: str, expected: np.ndarray, projection: np.ndarray) -> float:
    """1e-4 of the map's maximum, as for conv layers; EigenCAM 1e-3 of the projection's (an
    SVD's float32 rounding, as in test_methods).

    XGrad-CAM divides by each channel's sum of activations, which after a ReLU (CNNs) sums
    non-negative numbers; a transformer's activations have both signs, and at a layer where a
    channel's sum nearly cancels, float32 rounding of it is amplified in that channel's weight
    (at a Swin stage's output we measured 0.5% between the two libraries; at ViT-tiny's default
    layer 2.4e-4 of the maximum, with torch 2.14 on 2 threads): 1e-3 of the maximum for it."""
    if method == "eigencam":
        return 1e-3 * float(np.abs(projection).max())
    if method == "xgradcam":
        return 1e-3 * max(float(expected.max()), 1e-6)
    return 1e-4 * max(float(expected.max()), 1e-6)


def _heatmaps_agree(name, method, ours, theirs, raw=None):
    """Within 1e-3, plus what the 1e-7 guard accounts for: camserve scales the resized map once,
    (x - min) / (1e-7 + range); pytorch-grad-cam scales it a second time after resizing, which
    undoes the guard on a map whose range is near 1e-7, so the two differ by up to
    1e-7 / range."""
    difference = float(np.abs(ours - theirs).max())
    MEASURED[(name, method)] = max(MEASURED.get((name, method), 0.0), difference)
    spread = float(np.ptp(raw)) if raw is not None and raw.size else 0.0
    guard = 1e-7 / spread if spread > 0 else 0.0
    assert difference <= 1e-3 + guard, (name, method, difference)


def test_report_measured_agreement(served):
    """Not a check: prints the largest heatmap difference per method (run with -s)."""
    name = served[0]
    row = {m: d for (n, m), d in MEASURED.items() if n == name}
    print(f"\n{name}: max |heatmap - pytorch-grad-cam| " +
          ", ".join(f"{m} {d:.1e}" for m, d in sorted(row.items())))


# --- an explicit --layer, batch invariance ------------------------------------------------------


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pt"
    torch.save(_seeded(_timm("vit_tiny_patch16_224"), 1234).state_dict(), path)
    return str(path)


def test_explicit_token_layers(vit_weights, cat):
    """--layer on any token layer works: a block's output, and attention's qkv projection
    (576 channels); the first is the default."""
    spec = ModelSpec(source="timm:vit_tiny_patch16_224", weights=vit_weights,
                     layers=("blocks.9", "blocks.10.attn.qkv"))
    engine = Engine(load_model(spec))
    try:
        layers = engine.model.card.layers
        assert [(i.name, i.channels, i.layout, i.prefix_tokens, i.height) for i in layers] == [
            ("blocks.9", 192, "tokens", 1, 14), ("blocks.10.attn.qkv", 576, "tokens", 1, 14)]
        model = _seeded(_timm("vit_tiny_patch16_224"), 1234)
        image = resized(cat, (224, 224))
        spec = ExplainSpec(methods=("gradcam", "layercam"), layers=("blocks.9",
                                                                    "blocks.10.attn.qkv"),
                           targets=(3,))
        maps = engine.run([WorkItem(image, spec)])[0].maps
        x = ref.normalise(image[None], engine.model.card.mean, engine.model.card.std)
        for layer in spec.layers:
            theirs = reference_maps(model, layer, x, [3], vit_reshape(1, 14, 14),
                                    score_cam=False)
            for m in maps:
                if m.layer == layer:
                    expected = theirs[m.method][0]
                    np.testing.assert_allclose(m.raw, expected, rtol=0,
                                               atol=1e-4 * max(float(expected.max()), 1e-6))
    finally:
        engine.close()


def small_swin() -> nn.Module:
    """timm's Swin-T layout (4 stages, 7x7 windows, 224x224) with one narrow block a stage."""
    import timm

    torch.manual_seed(9)
    return timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1), num_classes=10).eval()


def test_swin_stage_layers_and_why_the_default_is_not_the_stage(cat):
    """--layer on a Swin stage (channels last) equals pytorch-grad-cam there; and at the stage,
    which feeds a per-position LayerNorm, the gradient is orthogonal to the activations at every
    position (the norm ignores scale and shift), so HiResCAM's sum_k g_k A_k vanishes: the
    reason the default is the last block's first norm (pytorch-grad-cam's choice), not the
    stage."""
    spec = ModelSpec(source="python:test_transformers:small_swin",
                     layers=("layers.3", "norm", "layers.2"))
    assert load_model(replace(spec, layers=())).card.default_layer == "layers.3.blocks.0.norm1"
    engine = Engine(load_model(spec))
    try:
        card = engine.model.card
        assert [(i.name, i.layout, i.channels, i.height) for i in card.layers] == [
            ("layers.3", "nhwc", 192, 7), ("norm", "nhwc", 192, 7), ("layers.2", "nhwc", 96, 14)]
        image = resized(cat, (224, 224))
        spec = ExplainSpec(methods=("gradcam", "hirescam", "layercam"),
                           layers=("layers.3", "norm", "layers.2"), targets=(4,), signed=True)
        maps = {(m.method, m.layer): m.raw for m in engine.run([WorkItem(image, spec)])[0].maps}
        model = small_swin()
        x = ref.normalise(image[None], card.mean, card.std)
        for layer, size in (("layers.3", 7), ("layers.2", 14)):
            theirs = reference_maps(model, layer, x, [4], swin_reshape(size, size),
                                    score_cam=False)
            for method in ("gradcam", "layercam"):
                expected = theirs[method][0]
                np.testing.assert_allclose(np.maximum(maps[(method, layer)], 0), expected,
                                           rtol=0, atol=1e-4 * max(float(expected.max()), 1e-6))
        # |sum_k g A| against sum_k |g A|: the gradient x activation terms cancel at the stage.
        stage = np.abs(maps[("hirescam", "layers.3")]).max()
        final = np.abs(maps[("hirescam", "norm")]).max()
        assert stage < 1e-4 * final, (stage, final)
    finally:
        engine.close()


def test_batch_invariance_on_a_vit(vit_weights):
    """An item's maps and logits do not depend on its batch mates (within 1e-5)."""
    engine = Engine(load_model(ModelSpec(source="timm:vit_tiny_patch16_224", weights=vit_weights)))
    try:
        assert engine.model.card.default_layer == "blocks.11.norm1"
        rng = np.random.default_rng(2)
        pixels = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(5)]
        every = ("gradcam", "gradcam_plus_plus", "xgradcam", "layercam", "hirescam", "eigencam",
                 "random")
        layer = ("blocks.11.norm1",)
        items = [WorkItem(pixels[0], ExplainSpec(methods=every, layers=layer)),
                 WorkItem(pixels[1]),
                 WorkItem(pixels[2], ExplainSpec(methods=("gradcam",), targets=(5, 7),
                                                 layers=layer)),
                 WorkItem(pixels[3], ExplainSpec(methods=("scorecam",), score_cam_channels=4,
                                                 layers=layer)),
                 WorkItem(pixels[4], ExplainSpec(methods=("hirescam",), counterfactual=True,
                                                 layers=layer))]
        batch = engine.run(items)
        for item, together in zip(items, batch):
            alone = engine.run([item])[0]
            np.testing.assert_allclose(together.logits, alone.logits, atol=1e-5)
            assert len(together.maps) == len(alone.maps) == (
                0 if item.explain is None else len(item.explain.methods)
                * max(len(item.explain.targets), 1))
            for a, b in zip(together.maps, alone.maps):
                assert (a.method, a.target, a.layer) == (b.method, b.target, b.layer)
                assert a.raw.shape == (14, 14)
                np.testing.assert_allclose(a.raw, b.raw, atol=1e-5)
    finally:
        engine.close()


# --- Hugging Face ------------------------------------------------------------------------------


LABELS = ("cat", "dog", "cup", "car", "sky")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny transformers ViT (32x48 images in 8x8 patches: a 4x6 grid and a class token)
    saved with save_pretrained, with an image processor of its own size, mean and std."""
    transformers = pytest.importorskip("transformers", reason="hf: models need transformers")
    folder = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(3)
    config = transformers.ViTConfig(
        image_size=[32, 48], patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 48}, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.3, 0.4]).save_pretrained(folder)
    return folder


class Logits(nn.Module):
    """The Hugging Face model as pytorch-grad-cam needs it: forward(x) returns the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def test_hugging_face_model(hf_folder, cat):
    """Labels from the config's id2label, input size, mean and std from the image processor; the
    maps equal pytorch-grad-cam's on the same module."""
    from transformers import AutoModelForImageClassification

    hf = AutoModelForImageClassification.from_pretrained(hf_folder, local_files_only=True).eval()
    layer = next(n for n, _ in hf.named_modules() if n.endswith("1.layernorm_before"))
    with running(model=f"hf:{hf_folder}", max_delay_ms=1, max_batch_size=1) as (_, client):
        info = client.model_info()
        assert info.labels == LABELS and info.input_size == (32, 48)
        np.testing.assert_allclose(info.mean, (0.4, 0.5, 0.6), atol=1e-6)
        np.testing.assert_allclose(info.std, (0.2, 0.3, 0.4), atol=1e-6)
        assert info.default_layer == layer  # the last block's first norm, by its own name
        assert (info.layers[0].height, info.layers[0].width) == (4, 6)
        rng = np.random.default_rng(4)
        images = [resized(cat, (32, 48)), rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)]
        methods = [m for m in REFERENCE if m != "eigencam"]
        ours = [client.explain(image, method=methods) for image in images]
        pred = client.predict(images[0])
    x = ref.normalise(np.stack(images), info.mean, info.std)
    with torch.no_grad():
        logits = hf(pixel_values=x).logits
    assert pred.best.label == LABELS[int(logits[0].argmax())]
    targets = [e.maps[0].target.index for e in ours]
    theirs = reference_maps(Logits(hf), "model." + layer, x, targets, vit_reshape(1, 4, 6))
    for i, explained in enumerate(ours):
        for m in explained.maps:
            expected = theirs[m.method][i]
            np.testing.assert_allclose(m.raw, expected, rtol=0,
                                       atol=1e-4 * max(float(expected.max()), 1e-6))
            _heatmaps_agree("hf_vit", m.method, m.heatmap, their_heatmap(expected, (32, 48)),
                            expected)


def test_hugging_face_preprocessing_without_a_processor(hf_folder, tmp_path):
    """Without preprocessor_config.json the model config gives the size; a processor that does
    not rescale to [0, 1] gets its mean and std scaled to camserve's 0..1 normalisation."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(hf_folder, bare)
    (bare / "preprocessor_config.json").unlink()
    card = load_model(ModelSpec(source=f"hf:{bare}")).card
    assert card.input_size == (32, 48) and card.labels == LABELS
    (bare / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 40}, "do_center_crop": True,
        "crop_size": {"height": 32, "width": 48}, "do_rescale": False,
        "image_mean": [127.5, 127.5, 127.5], "image_std": [63.75, 63.75, 63.75]}))
    card = load_model(ModelSpec(source=f"hf:{bare}")).card
    assert card.input_size == (32, 48)
    np.testing.assert_allclose(card.mean, (0.5,) * 3)
    np.testing.assert_allclose(card.std, (0.25,) * 3)


def test_hugging_face_errors(tmp_path, monkeypatch, hf_folder):
    with pytest.raises(StartupError, match="no config.json"):
        load_model(ModelSpec(source=f"hf:{tmp_path}"))
    with pytest.raises(StartupError, match="holds its own weights; drop --weights"):
        load_model(ModelSpec(source=f"hf:{hf_folder}", weights="random"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(StartupError, match=r"pip install 'camserve\[hf\]'"):
        load_model(ModelSpec(source=f"hf:{hf_folder}"))


# --- start-up errors, tokens.py ------------------------------------------------------------------


def test_layers_with_no_grid_are_refused_clearly():
    model = "python:test_transformers:odd_tokens"
    with pytest.raises(StartupError, match=r"--layer 'embed' cannot be explained: it has output "
                       r"shape \(2, 35, 8\): 35 tokens, .*no patch grid known"):
        load_model(ModelSpec(source=model, layers=("embed",)))
    with pytest.raises(StartupError, match=r"'head' cannot be explained: it has output shape "
                       r"\(2, 4\), not \(batch, channels, height, width\), \(batch, tokens"):
        load_model(ModelSpec(source=model, layers=("head",)))
    # No layer tiles the square image (pool's 5x7 grid does not): Explain is off by default,
    # and --layer pool is refused: its map could not be laid over the image.
    assert load_model(ModelSpec(source=model)).card.layers == ()
    with pytest.raises(StartupError, match=r"'pool' cannot be explained: .*neither 5x7"):
        load_model(ModelSpec(source=model, layers=("pool",)))


def test_tokens_to_nchw_drops_the_prefix_and_lays_patches_row_by_row():
    n, prefix, h, w, c = 2, 3, 2, 4, 5
    x = torch.arange(n * (prefix + h * w) * c, dtype=torch.float32).reshape(n, prefix + h * w, c)
    grid = tokens.to_nchw(x, "tokens", prefix, h, w)
    assert grid.shape == (n, c, h, w)
    for row in range(h):
        for col in range(w):
            assert torch.equal(grid[:, :, row, col], x[:, prefix + row * w + col, :])
    nhwc = torch.randn(2, 3, 4, 6)
    assert torch.equal(tokens.to_nchw(nhwc, "nhwc"), nhwc.permute(0, 3, 1, 2))
    nchw = torch.randn(2, 6, 3, 4)
    assert tokens.to_nchw(nchw, "nchw") is nchw
    with pytest.raises(ValueError, match="unknown layout"):
        tokens.to_nchw(nchw, "nwhc")


@pytest.mark.parametrize("shape, size, hints, expected", [
    ((1, 197, 192), (224, 224), None, ("tokens", 192, 14, 14, 1)),  # class token
    ((1, 196, 192), (224, 224), None, ("tokens", 192, 14, 14, 0)),  # no prefix
    ((1, 198, 192), (224, 224), None, ("tokens", 192, 14, 14, 2)),  # DeiT: class + distillation
    ((1, 201, 64), (224, 224), None, ("tokens", 64, 14, 14, 5)),  # class + 4 registers
    ((1, 12 * 16 + 1, 8), (96, 128), None, ("tokens", 8, 12, 16, 1)),  # non-square image
    # The model's own counts win over the smallest prefix: 4 + 8x8 = 68 could also be 4 + 64.
    ((1, 68, 8), (128, 128), tokens.Hints(patch_grid=(8, 8), prefix_tokens=4),
     ("tokens", 8, 8, 8, 4)),
    ((1, 17 + 100, 8), (160, 160), tokens.Hints(patch_grid=(10, 10), prefix_tokens=17),
     ("tokens", 8, 10, 10, 17)),  # more prefix tokens than a shape alone would allow
    ((1, 7, 7, 768), (224, 224), None, ("nhwc", 768, 7, 7, 0)),
    ((1, 768, 7, 7), (224, 224), None, ("nchw", 768, 7, 7, 0)),
    ((1, 12, 16, 96), (96, 128), None, ("nhwc", 96, 12, 16, 0)),
    ((1, 96, 12, 16), (96, 128), None, ("nchw", 96, 12, 16, 0)),
    ((1, 14, 14, 14), (224, 224), None, ("nchw", 14, 14, 14, 0)),  # ambiguous: PyTorch's way
    ((1, 14, 14, 14), (224, 224), tokens.Hints(channels_last=True), ("nhwc", 14, 14, 14, 0)),
])
def test_find_grid(shape, size, hints, expected):
    grid = tokens.find_grid(shape, size, hints)
    assert (grid.layout, grid.channels, grid.height, grid.width, grid.prefix_tokens) == expected


def test_find_grid_uses_the_module_type_when_shapes_are_ambiguous():
    shape = (1, 14, 14, 14)
    assert tokens.find_grid(shape, (224, 224), None, nn.LayerNorm(14)).layout == "nhwc"
    assert tokens.find_grid(shape, (224, 224), None, nn.Linear(14, 14)).layout == "nhwc"
    swin = tokens.Hints(channels_last=True)
    assert tokens.find_grid(shape, (224, 224), swin, nn.Conv2d(14, 14, 1)).layout == "nchw"
    assert tokens.find_grid(shape, (224, 224), swin, nn.BatchNorm2d(14)).layout == "nchw"


@pytest.mark.parametrize("shape, message", [
    ((1, 35, 8), "35 tokens, which after 0 to 8 prefix tokens form no grid"),
    ((1, 17 + 196, 8), "213 tokens"),  # 17 prefix tokens: only when the model says so
    ((1, 1, 64), "1 tokens"),
    ((1, 512, 1, 1), "a 1x1 grid"),
    ((1, 1, 1, 512), "a 1x1 grid"),
    ((1, 1000), r"not \(batch, channels, height, width\)"),
    ((1, 3, 197, 64), "neither 197x64"),  # attention's (batch, heads, tokens, dim)
    (None, "does not return a tensor"),
])
def test_find_grid_says_why_not(shape, message):
    with pytest.raises(ValueError, match=message):
        tokens.find_grid(shape, (224, 224))


def test_model_hints():
    import timm

    def hints(model, size):
        shapes, order = {}, []

        def record(name):
            def hook(_module, _inputs, output):
                shapes[name] = tuple(output.shape) if torch.is_tensor(output) else None
                order.append(name)
            return hook
        handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
        for handle in handles:
            handle.remove()
        return tokens.model_hints(model, shapes, order)

    assert hints(vit_with_registers(), (160, 160)) == tokens.Hints((10, 10), 5, False)
    assert hints(torchvision_vit(), (224, 224)) == tokens.Hints((7, 7), 1, False)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    assert hints(swin, (224, 224)) == tokens.Hints((56, 56), None, True)


def test_fits_and_grid_for():
    assert tokens.fits(7, 7, (224, 224)) and tokens.fits(8, 10, (240, 320))  # 7.5 rounds up
    assert not tokens.fits(7, 768, (224, 224)) and not tokens.fits(300, 300, (224, 224))
    assert tokens.grid_for(196, (224, 224)) == (14, 14)
    assert tokens.grid_for(192, (96, 128)) == (12, 16)
    assert tokens.grid_for(35, (224, 224)) is None


# --- windowed attention ---------------------------------------------------------------------------


def test_windowed_attention_layers_are_refused_naming_a_layer_that_works():
    """timm Swin's window attention returns (batch x windows, 49, C): its first dimension is
    not the batch, so an image's map would depend on its batch mates; torchvision MaxViT's
    returns (batch, windows, 49, C), no grid of the image. Both are refused at start-up, and the
    message names the module around them, which explains."""
    with pytest.raises(StartupError, match=r"--layer 'layers.0.blocks.0.attn' cannot be "
                       r"explained: it returns \(128, 49, 24\) for a batch of 2 images: its "
                       r"first dimension is not the batch .*explain 'layers.0.blocks.0' "
                       r"instead"):
        load_model(ModelSpec(source="python:test_transformers:small_swin",
                             layers=("layers.0.blocks.0.attn",)))
    layer = "blocks.1.layers.0.layers.window_attention.attn_layer.0"
    with pytest.raises(StartupError, match=rf"--layer '{layer}' cannot be explained: .*neither"
                       r" .*explain 'blocks.1.layers.0.layers.window_attention' instead"):
        load_model(ModelSpec(source="python:zoo_models:tv_maxvit", layers=(layer,)))
    # The layer named instead serves: a batch-first grid of the image.
    ok = load_model(ModelSpec(source="python:test_transformers:small_swin",
                              layers=("layers.0.blocks.0",))).card.layers[0]
    assert (ok.layout, ok.height, ok.width) == ("nhwc", 56, 56)


def test_the_final_norm_of_a_vit_says_its_patches_get_no_gradient(vit_weights):
    """At ViT's final norm only the class token reaches the logits: the gradient at the patch
    tokens is zero, and the all-zero note says that instead of blaming the class."""
    from camserve.v1 import camserve_pb2 as pb
    from camserve_server.api import response

    engine = Engine(load_model(ModelSpec(source="timm:vit_tiny_patch16_224", weights=vit_weights,
                                         layers=("norm", "blocks.11.norm1"))))
    try:
        rng = np.random.default_rng(1)
        spec = ExplainSpec(methods=("gradcam",), layers=("norm", "blocks.11.norm1"))
        maps = engine.run([WorkItem(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                                    spec)])[0].maps
    finally:
        engine.close()
    final, block = maps
    assert final.layer == "norm" and not final.raw.any() and final.no_gradient
    assert block.raw.any() and not block.no_gradient
    answer = pb.ClassMap(layer="norm", target=pb.ClassScore(index=0, label="tench"))
    plan = type("Plan", (), {"spec": spec})()
    response._notes(answer, final.raw, 0.5, "gradcam", plan, final.no_gradient)
    message = answer.notes[0].message
    assert answer.notes[0].kind == pb.NOTE_KIND_ALL_ZERO
    assert "the gradient at layer norm is" in message and "patch tokens get no gradient" in \
        message and "nothing at layer" not in message
