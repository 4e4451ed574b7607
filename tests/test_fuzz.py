"""Property-based fuzzing (hypothesis) of the decode path and of request messages: no crash, no
hang, only INVALID_ARGUMENT or an answer, and the server keeps serving."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc
from camserve_server.errors import InvalidArgument
from camserve_server.render import images

LIMITS = images.Limits(max_image_bytes=1 << 20, max_image_pixels=4_000_000)
SMALL = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(SMALL).save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [_encoded(f) for f in ("JPEG", "PNG", "WEBP", "BMP", "GIF")]


@st.composite
def mutated(draw):
    """A valid image of one format with bytes flipped, cut, or inserted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.binary(max_size=2048)))
def test_decode_never_fails_otherwise(data):
    try:
        decoded = images.prepare(data, (32, 32), LIMITS)
    except InvalidArgument as exc:
        assert exc.message
        return
    assert decoded.pixels.shape == (32, 32, 3) and decoded.pixels.dtype == np.uint8


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 70_000), st.integers(0, 70_000), st.integers(0, 6),
       st.binary(max_size=4096))
def test_raw_pixels_never_fail_otherwise(height, width, channels, pixels):
    try:
        decoded = images.prepare(images.RawPixels(pixels, height, width, channels), (16, 16),
                                 LIMITS)
    except InvalidArgument:
        return
    assert decoded.pixels.shape == (16, 16, 3)


UINT32 = st.integers(0, 2**32 - 1)
ENUM = st.integers(-(2**31), 2**31 - 1)


@st.composite
def an_image(draw):
    if draw(st.booleans()):
        return pb.Image(encoded=draw(st.one_of(mutated(), st.binary(max_size=256))))
    h, w, c = draw(st.integers(0, 40)), draw(st.integers(0, 40)), draw(st.integers(0, 5))
    size = h * w * c if draw(st.booleans()) else draw(st.integers(0, 5000))
    return pb.Image(raw=pb.RawImage(pixels=bytes(size), height=h, width=w, channels=c))


@st.composite
def a_request(draw):
    images_ = draw(st.lists(an_image(), max_size=12))
    if draw(st.integers(0, 9)) == 0:  # now and then, a huge repeated field
        images_ = images_ * 500
    top_k = draw(UINT32)
    if draw(st.booleans()):
        return "Predict", pb.PredictRequest(images=images_,
                                            options=pb.PredictOptions(top_k=top_k))
    targets = draw(st.lists(st.one_of(UINT32.map(lambda i: pb.Target(class_index=i)),
                                      st.text(max_size=30).map(lambda t: pb.Target(label=t)),
                                      st.just(pb.Target())), max_size=3))
    return "Explain", pb.ExplainRequest(images=images_, options=pb.ExplainOptions(
        top_k=top_k, targets=targets, methods=draw(st.lists(ENUM, max_size=4)),
        layers=draw(st.lists(st.one_of(st.sampled_from(["features", "stem", ""]),
                                       st.text(max_size=20)), max_size=3)),
        outputs=draw(st.lists(ENUM, max_size=6)),
        top_targets=draw(st.one_of(st.integers(0, 3), UINT32)),
        counterfactual=draw(st.booleans()), keep_sign=draw(st.booleans()),
        score_cam_channels=draw(st.integers(0, 4)),
        faithfulness_steps=draw(st.sampled_from([0, 0, 1, 2, 300]))))


@pytest.fixture(scope="module")
def stub(tiny_server):
    server, _ = tiny_server
    with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                               options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield pb_grpc.CamserveServiceStub(channel)


@settings(max_examples=150, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(a_request())
def test_requests_answer_or_invalid_argument(stub, tiny_server, call):
    rpc, request = call
    try:
        getattr(stub, rpc)(request, timeout=60)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert error.details()
    _, client = tiny_server
    assert client.predict(SMALL).top
