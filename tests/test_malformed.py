"""Malformed requests answer INVALID_ARGUMENT with a message a person can act on, and the server
keeps serving."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from camserve import CamserveError
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc

from conftest import encode, wait_for

JPEG = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
GOOD = pb.Image(encoded=JPEG)


def _raw(pixels: bytes, h: int, w: int, c: int) -> pb.Image:
    return pb.Image(raw=pb.RawImage(pixels=pixels, height=h, width=w, channels=c))


def _explain(**options) -> pb.ExplainRequest:
    return pb.ExplainRequest(images=[GOOD], options=pb.ExplainOptions(**options))


CASES = [
    # (name, rpc, request, words the message must contain, the field it must name)
    ("no images", "Predict", pb.PredictRequest(), "no images", "images"),
    ("empty image message", "Predict", pb.PredictRequest(images=[pb.Image()]),
     "images[0] is empty", "images[0]"),
    ("empty bytes", "Predict", pb.PredictRequest(images=[GOOD, pb.Image(encoded=b"")]),
     "images[1] is empty", "images[1]"),
    ("random bytes", "Predict",
     pb.PredictRequest(images=[pb.Image(encoded=np.random.default_rng(1).bytes(5000))]),
     "not a JPEG, PNG, WebP, BMP or GIF", "images[0]"),
    ("truncated JPEG", "Explain",
     pb.ExplainRequest(images=[pb.Image(encoded=JPEG[: len(JPEG) // 2])]), "truncated",
     "images[0]"),
    ("raw length mismatch", "Predict",
     pb.PredictRequest(images=[_raw(b"\0" * 100, 10, 10, 3)]), "needs 300", "images[0]"),
    ("raw zero size", "Predict", pb.PredictRequest(images=[_raw(b"", 0, 10, 3)]),
     "at least 1", "images[0]"),
    ("raw channels", "Predict", pb.PredictRequest(images=[_raw(b"\0" * 200, 10, 10, 2)]),
     "2 channels", "images[0]"),
    ("raw too many pixels", "Predict",
     pb.PredictRequest(images=[_raw(b"", 100_000, 100_000, 3)]), "max_image_pixels",
     "images[0]"),
    ("image over the byte limit", "Predict",
     pb.PredictRequest(images=[pb.Image(encoded=b"\xff\xd8" + b"\0" * 300_000)]),
     "max_image_bytes", "images[0]"),
    ("too many images", "Predict", pb.PredictRequest(images=[GOOD] * 11),
     "max_images_per_request", "images"),
    ("unknown layer", "Explain", _explain(layers=["layer9"]), "choose from features",
     "options.layers[0]"),
    ("class index out of range", "Explain", _explain(targets=[pb.Target(class_index=10)]),
     "out of range", "options.targets[0].class_index"),
    ("unknown label", "Explain", _explain(targets=[pb.Target(label="giraffe")]),
     "no class is labelled", "options.targets[0].label"),
    ("empty target", "Explain", _explain(targets=[pb.Target()]), "set class_index or label",
     "options.targets[0]"),
    ("unknown method", "Explain", _explain(methods=[99]), "CAM_METHOD_GRADCAM",
     "options.methods[0]"),
    ("unknown output", "Explain", _explain(outputs=[42]), "EXPLAIN_OUTPUT_HEATMAP_PNG",
     "options.outputs[0]"),
    ("faithfulness steps out of range", "Explain", _explain(faithfulness_steps=1000),
     "2..256", "options.faithfulness_steps"),
    ("targets and top_targets", "Explain",
     _explain(targets=[pb.Target(class_index=1)], top_targets=3), "not both",
     "options.top_targets"),
    ("too many maps", "Explain", _explain(methods=range(1, 9), top_targets=10), "at most 64",
     "options.methods"),
    ("Score-CAM over the channel limit", "Explain",
     _explain(methods=[pb.CAM_METHOD_SCORECAM], score_cam_channels=12),
     "max_score_cam_channels", "options.score_cam_channels"),
    ("explanation over the item cost", "Explain",
     _explain(methods=[pb.CAM_METHOD_GRADCAM, pb.CAM_METHOD_XGRADCAM, pb.CAM_METHOD_LAYERCAM],
              top_targets=3, faithfulness_steps=256), "max_item_cost",
     "options.faithfulness_steps"),
    ("request over the queued forwards", "Explain",
     pb.ExplainRequest(images=[GOOD] * 10, options=pb.ExplainOptions(
         methods=[pb.CAM_METHOD_GRADCAM, pb.CAM_METHOD_XGRADCAM], top_targets=3,
         faithfulness_steps=256)),
     "send fewer images per call", "images"),
    ("unknown method in the list", "Explain", _explain(methods=[1, 77]), "not a CamMethod",
     "options.methods[1]"),
    ("unknown layer in the list", "Explain", _explain(layers=["features", "stem.9"]),
     "choose from features", "options.layers[1]"),
    ("two overlay formats", "Explain",
     _explain(outputs=[pb.EXPLAIN_OUTPUT_OVERLAY_JPEG, pb.EXPLAIN_OUTPUT_OVERLAY_PNG]),
     "two overlay formats", "options.outputs"),
]


def _violations(error: grpc.RpcError):
    from camserve import CamserveError

    return CamserveError.from_rpc_error(error)


@pytest.mark.parametrize("name, rpc, request_message, words, field", CASES,
                         ids=[c[0] for c in CASES])
def test_invalid_argument_and_still_serving(tiny_server, name, rpc, request_message, words,
                                            field):
    server, client = tiny_server
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.CamserveServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            getattr(stub, rpc)(request_message, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert words in error.value.details()
        parsed = _violations(error.value)
        assert [f for f, _ in parsed.field_violations] == [field]
        assert parsed.reason  # every error names its cause
    assert client.predict(JPEG).top  # still serving


@pytest.mark.parametrize("payload", [b"\xff" * 64, b"\x0a\x10\x0a\x03",
                                     # a label (field 2 of Target) with invalid UTF-8
                                     pb.ExplainRequest(images=[GOOD]).SerializeToString()
                                     + b"\x12\x05\x12\x03\x12\x01\xff"],
                         ids=["garbage", "truncated field", "invalid utf-8"])
def test_bytes_that_are_not_a_request_answer_invalid_argument(tiny_server, caplog, payload):
    """Not INTERNAL "Exception deserializing request!": an answer, an access line, a metric."""
    import logging

    server, client = tiny_server
    caplog.set_level(logging.INFO, logger="camserve_server.access")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary("/camserve.v1.CamserveService/Explain",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as error:
            call(payload, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid camserve.v1.ExplainRequest" in error.value.details()
    wait_for(lambda: any("Explain INVALID_ARGUMENT" in r.getMessage() for r in caplog.records))
    assert client.predict(JPEG).top


def test_message_over_the_limit_is_invalid_argument_not_resource_exhausted():
    from conftest import TINY, running

    with running(model=TINY, max_message_bytes=100_000) as (server, client):
        big = pb.PredictRequest(images=[pb.Image(encoded=b"\xff\xd8" + b"\0" * 150_000)])
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.CamserveServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Predict(big, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_message_bytes" in error.value.details()
        # Over the limit by more than the slack (1 MiB), gRPC refuses from the length prefix,
        # without reading the message, and the server serves on.
        huge = pb.PredictRequest(images=[pb.Image(encoded=b"\xff\xd8" + b"\0" * 3_000_000)])
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[
                ("grpc.max_send_message_length", -1)]) as channel:
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.CamserveServiceStub(channel).Predict(huge, timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in error.value.details()
        assert client.predict(np.zeros((64, 64, 3), np.uint8)).top
        # The client refuses what it cannot send, before gRPC's own RESOURCE_EXHAUSTED.
        with pytest.raises(CamserveError) as refused:
            client.predict(np.zeros((6000, 6000, 3), np.uint8))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "encoded files" in refused.value.details


def test_long_caller_input_is_quoted_short(tiny_server):
    _, client = tiny_server
    with pytest.raises(CamserveError) as error:
        client.explain(JPEG, target="x" * 1_000_000)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.value.details) < 500


def test_client_side_errors_are_camserve_errors(tiny_server):
    _, client = tiny_server
    for call in (lambda: client.predict(np.zeros((4, 4, 3), np.float32)),
                 lambda: client.predict(object()),
                 lambda: client.predict("/no/such/image.jpg"),
                 lambda: client.explain(JPEG, method="nope"),
                 lambda: client.predict(JPEG, top_k=0),
                 lambda: client.explain(JPEG, target=-1)):
        with pytest.raises(CamserveError) as error:
            call()
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_label_that_names_two_classes(tmp_path):
    from conftest import TINY, running

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(["crane"] + [f"c{i}" for i in range(1, 9)] + ["Crane"]))
    with running(model=TINY, labels=str(labels)) as (_, client):
        with pytest.raises(CamserveError, match=r"names classes \[0, 9\]"):
            client.explain(JPEG, target="crane")
        assert client.explain(JPEG, target=9).target.label == "Crane"


def test_torchscript_model_refuses_explain_clearly(tmp_path):
    import torch

    import tiny_models
    from conftest import running

    path = tmp_path / "tiny.pt"
    torch.jit.script(tiny_models.tiny_cnn().eval()).save(str(path))
    with running(model=f"torchscript:{path}") as (_, client):
        assert client.model_info().layers == ()
        assert len(client.predict(JPEG).top) == 5
        with pytest.raises(CamserveError) as error:
            client.explain(JPEG)
        assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "Predict only" in error.value.details


def _batches(server) -> float:
    return server.metrics.registry.get_sample_value("camserve_device_batches_total",
                                                    {"device": "cpu"}) or 0.0


def test_an_answer_too_large_to_send_is_refused_before_any_work():
    """Heatmap PNGs of a large image are bounded at 1 byte per rendered pixel: over the message
    limit, the call is refused before decoding or computing anything; raw maps of the same
    image are answered."""
    from conftest import TINY, running

    big = pb.Image(encoded=encode(np.full((800, 1000, 3), 128, np.uint8)))
    with running(model=TINY, max_message_bytes=1_000_000) as (server, client):
        before = _batches(server)
        request = pb.ExplainRequest(images=[big], options=pb.ExplainOptions(
            methods=[pb.CAM_METHOD_GRADCAM, pb.CAM_METHOD_XGRADCAM],
            outputs=[pb.EXPLAIN_OUTPUT_HEATMAP_PNG]))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.CamserveServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Explain(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_message_bytes" in error.value.details()
            assert "fewer maps" in error.value.details()
            assert _batches(server) == before  # nothing was computed
            raw = stub.Explain(pb.ExplainRequest(images=[big], options=pb.ExplainOptions(
                methods=[pb.CAM_METHOD_GRADCAM, pb.CAM_METHOD_XGRADCAM],
                outputs=[pb.EXPLAIN_OUTPUT_RAW_MAP])), timeout=30)
            assert len(raw.results[0].maps) == 2 and _batches(server) == before + 1


def test_heatmaps_of_a_large_image_are_rendered_downscaled_and_say_so():
    from conftest import TINY, running

    big = pb.Image(encoded=encode(np.full((600, 800, 3), 90, np.uint8)))
    with running(model=TINY, max_render_pixels=120_000) as (server, _client):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            answer = pb_grpc.CamserveServiceStub(channel).Explain(pb.ExplainRequest(
                images=[big], options=pb.ExplainOptions(
                    outputs=[pb.EXPLAIN_OUTPUT_HEATMAP_PNG])), timeout=30).results[0]
    shown = answer.rendered_size
    assert (answer.image_size.height, answer.image_size.width) == (600, 800)
    assert shown.height * shown.width <= 120_000 and shown.height / shown.width == 0.75
    assert [n.kind for n in answer.notes] == [pb.NOTE_KIND_RENDER_DOWNSCALED]
    assert "max_render_pixels" in answer.notes[0].message
    png = Image.open(io.BytesIO(answer.maps[0].heatmap_png))
    assert png.size == (shown.width, shown.height)
