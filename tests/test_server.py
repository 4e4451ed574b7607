"""End to end through a real server on port 0: every RPC, health, reflection, image forms."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from camserve import AsyncClient, CamserveError, Client

from conftest import encode, resized


def test_model_info(default_server):
    server, client = default_server
    info = client.model_info()
    assert info.name == "efficientnet_lite0"
    assert len(info.labels) == 1000 and info.labels[967] == "espresso"
    assert info.input_size == (224, 224)
    assert [layer.name for layer in info.layers] == ["bn2", "blocks.4"]
    assert info.default_layer == "bn2"
    assert [(layer.channels, layer.height, layer.width) for layer in info.layers] == [
        (1280, 7, 7), (112, 14, 14)]
    from camserve_server.engine.cams import CAM_METHODS

    # The default model has ReLUs and convolutional layers: every method applies to it.
    assert sorted(info.methods) == sorted(CAM_METHODS) and info.methods[0] == "gradcam"
    assert info.max_batch_size == server.settings.max_batch_size
    assert info.max_delay_ms == pytest.approx(server.settings.max_delay_ms)
    assert info.device == "cpu" or info.device.startswith("cuda")


def test_predict_every_image_form_gives_the_same_answer(default_server, cat, cat_path):
    _, client = default_server
    png = encode(cat, "PNG")
    forms = [cat, png, Image.open(io.BytesIO(png)), str(cat_path)]
    predictions = [client.predict(form, top_k=3) for form in forms]
    for p in predictions:
        assert len(p.top) == 3 and p.image_size == (300, 451)
        assert p.top[0].probability >= p.top[1].probability >= p.top[2].probability
        assert p.timing.batch_size >= 1 and p.timing.compute_ms > 0
    # Lossless forms carry the same pixels; the JPEG file is close but not identical.
    for p in predictions[1:3]:
        np.testing.assert_allclose([c.logit for c in p.top], [c.logit for c in predictions[0].top],
                                   atol=1e-5)
    assert predictions[3].best.index == predictions[0].best.index


def test_predict_many_and_top_k(default_server, cat, coffee):
    _, client = default_server
    answers = client.predict_many([cat, coffee, cat], top_k=1000)
    assert [a.best.label for a in answers] == [answers[0].best.label, "espresso",
                                               answers[0].best.label]
    assert len(answers[0].top) == 1000
    assert sum(c.probability for c in answers[0].top) == pytest.approx(1.0, abs=1e-4)
    indices = [c.index for c in answers[0].top]
    assert sorted(indices) == list(range(1000))


def test_explain_outputs(default_server, cat):
    _, client = default_server
    e = client.explain(cat, outputs=("raw", "heatmap", "overlay_jpeg"), top_k=2)
    assert e.raw.shape == (7, 7) and e.raw.dtype == np.float32
    assert e.prediction.best == e.target  # default target: the top-1 class
    assert len(e.prediction.top) == 2
    heat = np.asarray(Image.open(io.BytesIO(e.heatmap_png)))
    assert heat.shape == (300, 451) and heat.dtype == np.uint8
    assert e.overlay_format == "jpeg"
    overlay = np.asarray(Image.open(io.BytesIO(e.overlay_image)))
    assert overlay.shape == (300, 451, 3)
    local = e.overlay()
    assert local.shape == (300, 451, 3) and local.dtype == np.uint8
    assert np.abs(local.astype(int) - overlay).mean() < 3  # the same picture, JPEG-compressed
    assert e.heatmap.min() == 0.0 and e.heatmap.max() == pytest.approx(1.0)
    only_png = client.explain(cat, outputs=("overlay_png",))
    assert only_png.raw is None and only_png.heatmap_png is None
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(only_png.overlay_image))),
                                  local)


def test_explain_target_by_index_and_label(default_server, cat):
    _, client = default_server
    by_index = client.explain(cat, target=967)
    by_label = client.explain(cat, target="Espresso")
    assert by_index.target.index == by_label.target.index == 967
    assert by_index.target.label == "espresso"
    np.testing.assert_allclose(by_index.raw, by_label.raw, atol=1e-6)


def test_explain_a_layer_by_name(resnet_server, cat):
    _, client = resnet_server
    assert client.explain(cat, layer="layer3").raw.shape == (14, 14)
    assert client.explain(cat).layer == "layer4"


def test_raw_1080p_frame_is_over_the_grpc_default_message_size(tiny_server):
    server, _ = tiny_server
    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    assert frame.nbytes > 4 * 1024 * 1024
    with Client(f"127.0.0.1:{server.port}") as client:
        answer = client.explain(frame, outputs=("raw", "heatmap"))
    assert answer.image_size == (1080, 1920) and answer.heatmap.shape == (1080, 1920)


def test_gray_and_rgba_arrays(tiny_server):
    _, client = tiny_server
    gray = np.random.default_rng(1).integers(0, 256, (50, 60), dtype=np.uint8)
    rgba = np.dstack([np.repeat(gray[:, :, None], 3, axis=2), np.full((50, 60), 7, np.uint8)])
    a, b = client.predict(gray), client.predict(rgba)
    assert a.image_size == (50, 60)
    np.testing.assert_allclose([c.logit for c in a.top], [c.logit for c in b.top], atol=1e-6)


def test_health_and_reflection(default_server):
    server, _ = default_server
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # The server as a whole, each API, and each model (the repository of one: "camserve").
        for service in ("", "camserve.v1.CamserveService", "camserve.v1.CamserveService/camserve"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        listed = health.List(health_pb2.HealthListRequest(), timeout=10).statuses
        assert {name: s.status for name, s in listed.items()} == {
            "": health_pb2.HealthCheckResponse.SERVING,
            "camserve.v1.CamserveService": health_pb2.HealthCheckResponse.SERVING,
            "camserve.v1.CamserveService/camserve": health_pb2.HealthCheckResponse.SERVING,
            "inference.GRPCInferenceService": health_pb2.HealthCheckResponse.SERVING}
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        services = {s.name for r in stub.ServerReflectionInfo(iter([request]), timeout=10)
                    for s in r.list_services_response.service}
    assert {"camserve.v1.CamserveService", "grpc.health.v1.Health"} <= services


def test_async_client(default_server, cat, coffee):
    server, client = default_server
    expected = client.explain(cat)

    async def main():
        async with AsyncClient(f"127.0.0.1:{server.port}") as aclient:
            info = await aclient.model_info()
            predictions = await asyncio.gather(*(aclient.predict(i) for i in (cat, coffee)))
            explanation = await aclient.explain(cat)
            with pytest.raises(CamserveError) as error:
                await aclient.explain(cat, layer="nope")
            return info, predictions, explanation, error.value

    info, predictions, explanation, error = asyncio.run(main())
    assert info.default_layer == "bn2"
    assert predictions[1].best.label == "espresso"
    np.testing.assert_allclose(explanation.raw, expected.raw, atol=1e-5)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_timing_is_reported(default_server, coffee):
    _, client = default_server
    e = client.explain(encode(resized(coffee, (480, 640))))
    t = e.timing
    assert t.batch_size >= 1 and t.compute_ms > 0 and t.decode_ms > 0 and t.queue_ms >= 0
    assert t.respond_ms >= 0
