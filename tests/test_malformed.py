"""Malformed requests answer INVALID_ARGUMENT with a message a person can act on, and the server
keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from camserve import CamserveError
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc

from conftest import encode

JPEG = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
GOOD = pb.Image(encoded=JPEG)


def _raw(pixels: bytes, h: int, w: int, c: int) -> pb.Image:
    return pb.Image(raw=pb.RawImage(pixels=pixels, height=h, width=w, channels=c))


CASES = [
    # (name, rpc, request, words the message must contain)
    ("no images", "Predict", pb.PredictRequest(), "no images"),
    ("empty image message", "Predict", pb.PredictRequest(images=[pb.Image()]), "image 0 is empty"),
    ("empty bytes", "Predict", pb.PredictRequest(images=[GOOD, pb.Image(encoded=b"")]),
     "image 1 is empty"),
    ("random bytes", "Predict",
     pb.PredictRequest(images=[pb.Image(encoded=np.random.default_rng(1).bytes(5000))]),
     "not a JPEG, PNG, WebP, BMP or GIF"),
    ("truncated JPEG", "Explain",
     pb.ExplainRequest(images=[pb.Image(encoded=JPEG[: len(JPEG) // 2])]), "truncated"),
    ("raw length mismatch", "Predict",
     pb.PredictRequest(images=[_raw(b"\0" * 100, 10, 10, 3)]), "needs 300"),
    ("raw zero size", "Predict", pb.PredictRequest(images=[_raw(b"", 0, 10, 3)]),
     "at least 1"),
    ("raw channels", "Predict", pb.PredictRequest(images=[_raw(b"\0" * 200, 10, 10, 2)]),
     "2 channels"),
    ("raw too many pixels", "Predict",
     pb.PredictRequest(images=[_raw(b"", 100_000, 100_000, 3)]), "max_image_pixels"),
    ("image over the byte limit", "Predict",
     pb.PredictRequest(images=[pb.Image(encoded=b"\xff\xd8" + b"\0" * 300_000)]),
     "max_image_bytes"),
    ("too many images", "Predict", pb.PredictRequest(images=[GOOD] * 11),
     "max_images_per_request"),
    ("unknown layer", "Explain", pb.ExplainRequest(images=[GOOD], layer="layer9"),
     "choose from features"),
    ("class index out of range", "Explain",
     pb.ExplainRequest(images=[GOOD], target=pb.Target(class_index=10)), "out of range"),
    ("unknown label", "Explain",
     pb.ExplainRequest(images=[GOOD], target=pb.Target(label="giraffe")), "no class is labelled"),
    ("unknown method", "Explain", pb.ExplainRequest(images=[GOOD], method=99),
     "not a CamMethod"),
    ("unknown output", "Explain", pb.ExplainRequest(images=[GOOD], outputs=[42]),
     "not an ExplainOutput"),
    ("faithfulness steps out of range", "Explain",
     pb.ExplainRequest(images=[GOOD], faithfulness_steps=1000), "faithfulness_steps"),
    ("targets and top_targets", "Explain",
     pb.ExplainRequest(images=[GOOD], targets=[pb.Target(class_index=1)], top_targets=3),
     "not both"),
    ("too many maps", "Explain",
     pb.ExplainRequest(images=[GOOD], methods=range(1, 9), top_targets=10), "at most 64"),
    ("Score-CAM over the channel limit", "Explain",
     pb.ExplainRequest(images=[GOOD], method=pb.CAM_METHOD_SCORECAM), "max_score_cam_channels"),
    ("unknown method in the list", "Explain", pb.ExplainRequest(images=[GOOD], methods=[1, 77]),
     "not a CamMethod"),
    ("unknown layer in the list", "Explain",
     pb.ExplainRequest(images=[GOOD], layers=["features", "stem.9"]), "choose from features"),
    ("two overlay formats", "Explain",
     pb.ExplainRequest(images=[GOOD], outputs=[pb.EXPLAIN_OUTPUT_OVERLAY_JPEG,
                                               pb.EXPLAIN_OUTPUT_OVERLAY_PNG]),
     "one overlay format"),
]


@pytest.mark.parametrize("name, rpc, request_message, words", CASES, ids=[c[0] for c in CASES])
def test_invalid_argument_and_still_serving(tiny_server, name, rpc, request_message, words):
    server, client = tiny_server
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.CamserveStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            getattr(stub, rpc)(request_message, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert words in error.value.details()
    assert client.predict(JPEG).top  # still serving


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
