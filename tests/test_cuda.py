"""camserve on a CUDA device: the same correctness claims as on CPU, and GPU against CPU.

Every test is marked ``cuda`` and skips, with its reason, where torch sees no CUDA device
(``pytest -m cuda`` selects them; bench/gpu/run.sh runs them on a GPU machine).

- The engine on the GPU against Captum ``LayerGradCam`` and pytorch-grad-cam ``GradCAM`` run
  on the same GPU (raw within 1e-4 of the map's max, heatmaps within 1e-3).
- Batch invariance on the GPU: an item alone equals the same item in a mixed batch.
- Every method, GPU against CPU (fp32): raw maps within 1e-4 of the map's max, heatmaps
  within 1e-2. Score-CAM and faithfulness through their jobs.
- JPEGs decoded on the GPU (nvJPEG, resized on the device) against the host's decoding:
  pixels within a few grey levels, maps within tolerance, top-1 equal.
- Reduced precision on the GPU: bf16 and fp16 maps against fp32 (correlation, top-1), with
  the figures written to $CAMSERVE_FIGURES/precision.json when that is set.
- A server on the GPU answers through gRPC with JPEGs decoded on the device; two GPUs (when
  there are) share one queue.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch

from camserve.maps import heatmap as render_heatmap
from camserve_server.domain import METHODS, EncodedJpeg, ExplainSpec, ItemResult, WorkItem
from camserve_server.engine.engine import Engine, finish
from camserve_server.engine.models import load_model
from camserve_server.engine.spec import ModelSpec
from camserve_server.render import images

import references as ref
from conftest import DATA, load_rgb, resized, running

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device: torch.cuda.is_available() is False here"),
]

PHOTOS = ("chelsea.jpg", "coffee.jpg")
GRADIENT = ("gradcam", "gradcam_plus_plus", "xgradcam", "layercam", "hirescam")


def _close(a: np.ndarray, b: np.ndarray, of_max: float) -> None:
    np.testing.assert_allclose(a, b, rtol=0, atol=of_max * max(float(np.abs(b).max()), 1e-6))


def _inputs(size=(224, 224)):
    cat, coffee = (resized(load_rgb(DATA / n), size) for n in PHOTOS)
    noise = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    return [cat, coffee, noise]


@pytest.fixture(scope="module")
def resnet(resnet_weights):
    spec = ModelSpec(source="torchvision:resnet18", weights=str(resnet_weights),
                     layers=("layer4", "layer3"))
    gpu = load_model(spec, torch.device("cuda"))
    cpu = load_model(spec, torch.device("cpu"))
    engines = Engine(gpu), Engine(cpu)
    yield engines
    for e in engines:
        e.close()


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_gpu_engine_matches_captum_and_pytorch_grad_cam_on_the_gpu(resnet, resnet_weights,
                                                                   layer):
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    gpu, _ = resnet
    pixels = _inputs()
    answers = gpu.run([WorkItem(p, ExplainSpec(layers=(layer,))) for p in pixels])
    targets = [a.maps[0].target for a in answers]
    model = ref.resnet18(resnet_weights).cuda()
    card = gpu.model.card
    x = ref.normalise(np.stack(pixels), card.mean, card.std).cuda()
    module = dict(model.named_modules())[layer]
    captum = LayerGradCam(model, module).attribute(x, target=targets, relu_attributions=True)
    captum = captum[:, 0].detach().cpu().numpy()
    with GradCAM(model=model, target_layers=[module]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    assert sum(m.max() > 0 for m in captum) >= len(pixels) - 1
    for a, expected, h in zip(answers, captum, heat):
        _close(a.maps[0].raw, expected, 1e-4)
        np.testing.assert_allclose(render_heatmap(a.maps[0].raw, h.shape), h, atol=1e-3)


def test_gpu_batch_invariance(resnet):
    gpu, _ = resnet
    pixels = _inputs()
    items = [WorkItem(pixels[0]), WorkItem(pixels[1], ExplainSpec(layers=("layer4",))),
             WorkItem(pixels[2], ExplainSpec(layers=("layer3", "layer4"), top_targets=2)),
             WorkItem(pixels[0], ExplainSpec(methods=GRADIENT, layers=("layer4",)))]
    together = gpu.run(items)
    for item, batched in zip(items, together):
        alone = gpu.run([item])[0]
        np.testing.assert_allclose(alone.logits, batched.logits, atol=1e-4)
        for a, b in zip(alone.maps, batched.maps):
            assert (a.method, a.target, a.layer) == (b.method, b.target, b.layer)
            _close(a.raw, b.raw, 1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gpu_equals_cpu(resnet, method):
    gpu, cpu = resnet
    pixels = _inputs()[:2]
    spec = ExplainSpec(methods=(method,), layers=("layer4",), targets=(281, 967),
                       score_cam_channels=32 if method == "scorecam" else 0)
    on_gpu = [finish(a) for a in gpu.run_batch([WorkItem(p, spec) for p in pixels])]
    on_cpu = cpu.run([WorkItem(p, spec) for p in pixels])
    for g, c in zip(on_gpu, on_cpu):
        assert isinstance(g, ItemResult)
        np.testing.assert_allclose(g.logits, c.logits, atol=1e-3 * np.abs(c.logits).max())
        for a, b in zip(g.maps, c.maps):
            if method == "eigencam":  # the principal component's sign is oriented, not fixed
                a_raw = a.raw if np.dot(a.raw.ravel(), b.raw.ravel()) >= 0 else -a.raw
            else:
                a_raw = a.raw
            if method == "random":  # seeded by a sum of the input: the seed may differ
                assert a_raw.shape == b.raw.shape and np.isfinite(a_raw).all()
                continue
            _close(a_raw, b.raw, 1e-4)
            size = (300, 451)
            np.testing.assert_allclose(render_heatmap(a_raw, size), render_heatmap(b.raw, size),
                                       atol=1e-2)


def test_faithfulness_gpu_equals_cpu(resnet):
    gpu, cpu = resnet
    spec = ExplainSpec(methods=("gradcam",), layers=("layer4",), faithfulness_steps=8)
    item = WorkItem(_inputs()[0], spec)
    g, c = gpu.run([item])[0].maps[0], cpu.run([item])[0].maps[0]
    assert abs(g.deletion - c.deletion) < 1e-3 and abs(g.insertion - c.insertion) < 1e-3


@pytest.mark.parametrize("name", PHOTOS)
def test_jpeg_decoded_on_the_gpu_equals_the_host(resnet, name):
    gpu, cpu = resnet
    data = (DATA / name).read_bytes()
    limits = images.Limits(1 << 25, 50_000_000, device_jpeg=True)
    deferred = images.prepare(data, (224, 224), limits)
    host = images.prepare(data, (224, 224), images.Limits(1 << 25, 50_000_000))
    assert isinstance(deferred.pixels, EncodedJpeg)
    staged = gpu._data.stage([WorkItem(deferred.pixels)])
    pixels = gpu._data.wait(staged).cpu().numpy()[0]
    diff = np.abs(pixels.astype(int) - host.pixels.astype(int))
    assert diff.max() <= 4 and diff.mean() < 1.0, (diff.max(), diff.mean())
    spec = ExplainSpec(layers=("layer4",))
    g = gpu.run([WorkItem(deferred.pixels, spec)])[0]
    c = cpu.run([WorkItem(host.pixels, spec)])[0]
    assert g.maps[0].target == c.maps[0].target
    np.testing.assert_allclose(render_heatmap(g.maps[0].raw, host.size),
                               render_heatmap(c.maps[0].raw, host.size), atol=5e-2)


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_reduced_precision_on_the_gpu(precision):
    model = load_model(ModelSpec(), torch.device("cuda"))
    full, reduced = Engine(model), Engine(model, precision=precision)
    try:
        photos = [resized(load_rgb(DATA / n), model.card.input_size) for n in PHOTOS]
        spec = ExplainSpec(methods=GRADIENT + ("eigencam",), layers=(model.card.default_layer,))
        a = full.run([WorkItem(p, spec) for p in photos])
        b = reduced.run([WorkItem(p, spec) for p in photos])
    finally:
        full.close()
        reduced.close()
    corr, diff = [], []
    for x, y in zip(a, b):
        assert int(x.logits.argmax()) == int(y.logits.argmax())
        for m, n in zip(x.maps, y.maps):
            corr.append(float(np.corrcoef(m.raw.ravel(), n.raw.ravel())[0, 1]))
            diff.append(float(np.abs(m.raw - n.raw).max() / m.raw.max()))
    folder = os.environ.get("CAMSERVE_FIGURES")
    if folder:
        path = os.path.join(folder, "precision.json")
        figures = json.load(open(path)) if os.path.exists(path) else {}
        figures[precision] = {"corr_min": min(corr), "corr_mean": float(np.mean(corr)),
                              "max_diff_of_max": max(diff), "top1_agree": "2/2"}
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)
    assert min(corr) > 0.99, corr


def test_server_on_the_gpu_decodes_jpegs_there(cat_path, coffee_path):
    photos = [cat_path.read_bytes(), coffee_path.read_bytes()]
    with running(device="cuda:0", max_batch_size=8, max_delay_ms=20) as (_, client):
        info = client.model_info()
        assert list(info.devices) == ["cuda:0"]
        answers = [None] * 8

        def call(i):
            answers[i] = client.explain(photos[i % 2], top_k=1)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [a.target.label for a in answers[:2]] == ["Egyptian cat", "espresso"]
    assert all(a.timing.device == "cuda:0" for a in answers)
    for i, a in enumerate(answers):
        np.testing.assert_allclose(a.raw, answers[i % 2].raw, atol=1e-4 * a.raw.max())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one CUDA device: needs two")
def test_two_gpus_share_one_queue(cat_path):
    with running(device="cuda", max_batch_size=2, max_delay_ms=0) as (_, client):
        assert len(client.model_info().devices) == torch.cuda.device_count()
        answers = []
        lock = threading.Lock()

        def call():
            a = client.explain(cat_path.read_bytes())
            with lock:
                answers.append(a)

        threads = [threading.Thread(target=call) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(answers) == 32
    assert len({a.timing.device for a in answers}) >= 2
