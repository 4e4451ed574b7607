"""The Open Inference Protocol (KServe v2 gRPC) beside camserve's API, on the same port.

The first part calls the service with raw gRPC and the protocol's generated messages, against a
server in this process; it runs in the main suite. The second part drives a server process with
tritonclient, as Triton's users would; it needs tritonclient (`make test-compat`) and is skipped
without it. tritonclient registers the same ``inference.*`` messages in protobuf's default pool
as camserve's stubs, so it is imported when this module is, before any server of this process
loads camserve's stubs (which then use tritonclient's classes: ``oip.messages``), and the
servers it talks to are processes of their own.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from camserve import CamserveError, Client
from camserve_server.api import oip
from camserve_server.process.settings import parse_settings

from conftest import DATA, TESTS, TINY, load_rgb, record_levels, running, wait_for

# At collection, before any server of this process loads camserve's stubs (see above).
try:
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException
except ImportError:
    triton_grpc = None

SERVICE = "inference.GRPCInferenceService"
TOL = 1e-5


@pytest.fixture(scope="module")
def served():
    """A tiny-model server in this process, its camserve client and a gRPC channel."""
    with running(model=TINY, max_delay_ms=20) as (server, client):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, client, channel


@pytest.fixture(scope="module")
def jpegs():
    return [(DATA / name).read_bytes() for name in ("chelsea.jpg", "coffee.jpg")]


def rpc(channel, name: str, request, response_type, metadata=None):
    call = channel.unary_unary(f"/{SERVICE}/{name}",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_type.FromString)
    return call(request, timeout=60, metadata=metadata)


def infer(channel, request):
    return rpc(channel, "ModelInfer", request, oip.messages().ModelInferResponse)


def bytes_tensor(elements) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def request_of(images, *, datatype="BYTES", shape=None, model="camserve", **parameters):
    """A ModelInferRequest for encoded images (raw contents) or a UINT8 array."""
    m = oip.messages()
    request = m.ModelInferRequest(model_name=model, id="req-7")
    if datatype == "BYTES":
        request.inputs.add(name="image", datatype="BYTES",
                           shape=shape or [len(images), 1])
        request.raw_input_contents.append(bytes_tensor(images))
    else:
        request.inputs.add(name="image", datatype=datatype, shape=shape or list(images.shape))
        request.raw_input_contents.append(np.ascontiguousarray(images).tobytes())
    for key, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[key], kind, value)
    return request


def outputs(answer) -> dict:
    """Output name → NumPy array, as tritonclient reads raw_output_contents."""
    types = {"FP32": "<f4", "INT64": "<i8"}
    arrays = {}
    for tensor, raw in zip(answer.outputs, answer.raw_output_contents):
        if tensor.datatype == "BYTES":
            elements, offset = [], 0
            while offset < len(raw):
                (n,) = struct.unpack_from("<I", raw, offset)
                elements.append(raw[offset + 4:offset + 4 + n])
                offset += 4 + n
            array = np.array(elements, dtype=object)
        else:
            array = np.frombuffer(raw, types[tensor.datatype])
        arrays[tensor.name] = array.reshape(list(tensor.shape))
    return arrays


def probabilities_of(prediction, classes: int) -> np.ndarray:
    out = np.zeros(classes)
    for score in prediction.top:
        out[score.index] = score.probability
    return out


# --- raw gRPC, server in this process (main suite) --------------------------------------------


def test_health_and_metadata(served):
    server, client, channel = served
    m = oip.messages()
    assert rpc(channel, "ServerLive", m.ServerLiveRequest(), m.ServerLiveResponse).live
    assert rpc(channel, "ServerReady", m.ServerReadyRequest(), m.ServerReadyResponse).ready
    assert rpc(channel, "ModelReady", m.ModelReadyRequest(name="camserve"),
               m.ModelReadyResponse).ready
    meta = rpc(channel, "ServerMetadata", m.ServerMetadataRequest(), m.ServerMetadataResponse)
    assert meta.name == "camserve" and "model_configuration" in meta.extensions
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)  # a probe may name it
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    info = client.model_info()
    model = rpc(channel, "ModelMetadata", m.ModelMetadataRequest(name="camserve"),
                m.ModelMetadataResponse)
    assert (model.name, list(model.versions)) == ("camserve", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("image", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("probabilities", "FP32", [-1, 10]), ("top_indices", "INT64", [-1, -1]),
        ("top_labels", "BYTES", [-1, -1]), ("raw_map", "FP32", [-1, 28, 28]),
        ("target", "INT64", [-1])]
    assert len(info.labels) == 10

    from camserve_server.oip.v2 import model_config_pb2 as mc

    config = rpc(channel, "ModelConfig", mc.ModelConfigRequest(name="camserve"),
                 mc.ModelConfigResponse).config
    assert (config.name, config.max_batch_size) == ("camserve", 64)  # max_images_per_request


def test_infer_bytes_matches_predict(served, jpegs):
    server, client, channel = served
    answer = infer(channel, request_of(jpegs, top_k=3))
    assert (answer.model_name, answer.model_version, answer.id) == ("camserve", "1", "req-7")
    out = outputs(answer)
    assert list(out) == ["probabilities", "top_indices", "top_labels"]  # no explanation asked
    assert out["probabilities"].shape == (2, 10) and out["top_indices"].shape == (2, 3)
    for i, jpeg in enumerate(jpegs):
        prediction = client.predict(jpeg, top_k=10)
        np.testing.assert_allclose(out["probabilities"][i], probabilities_of(prediction, 10),
                                   atol=TOL)
        assert list(out["top_indices"][i]) == [s.index for s in prediction.top[:3]]
        assert [b.decode() for b in out["top_labels"][i]] == [
            s.label for s in prediction.top[:3]]

    # The same images as typed contents (bytes_contents), shape [N].
    typed = request_of([], shape=[2])
    del typed.raw_input_contents[:]
    typed.inputs[0].contents.bytes_contents.extend(jpegs)
    np.testing.assert_allclose(outputs(infer(channel, typed))["probabilities"],
                               out["probabilities"], atol=TOL)


def test_infer_uint8_matches_predict_of_the_same_pixels(served, cat):
    server, client, channel = served
    out = outputs(infer(channel, request_of(cat[None], datatype="UINT8")))
    prediction = client.predict(cat, top_k=10)  # an array travels as raw pixels
    np.testing.assert_allclose(out["probabilities"][0], probabilities_of(prediction, 10),
                               atol=TOL)
    assert out["top_indices"][0, 0] == prediction.best.index
    assert list(out["top_indices"][0]) == [s.index for s in prediction.top[:5]]  # top_k 5

    small = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(1, 4, 5, 3)
    typed = request_of(small, datatype="UINT8")
    del typed.raw_input_contents[:]
    typed.inputs[0].contents.uint_contents.extend(small.ravel().tolist())
    np.testing.assert_allclose(
        outputs(infer(channel, typed))["probabilities"],
        outputs(infer(channel, request_of(small, datatype="UINT8")))["probabilities"], atol=TOL)


def test_explanation_equals_explain(served, jpegs):
    server, client, channel = served
    out = outputs(infer(channel, request_of(jpegs[:1], method="gradcam", target=3,
                                            layer="features")))
    assert list(out) == ["probabilities", "top_indices", "top_labels", "raw_map", "target"]
    explanation = client.explain(jpegs[0], target=3, layer="features")
    assert out["raw_map"].shape == (1, 28, 28) and list(out["target"]) == [3]
    np.testing.assert_allclose(out["raw_map"][0], explanation.raw, atol=TOL)

    # explain: true explains the top-1 class; a target may be a label; outputs may be picked.
    top = outputs(infer(channel, request_of(jpegs[1:], explain=True)))
    best = client.predict(jpegs[1]).best
    assert list(top["target"]) == [best.index]
    np.testing.assert_allclose(top["raw_map"][0], client.explain(jpegs[1]).raw, atol=TOL)
    picked = request_of(jpegs[1:], target=best.label, method="layercam")
    picked.outputs.add(name="raw_map")
    answer = infer(channel, picked)
    assert [t.name for t in answer.outputs] == ["raw_map"]
    np.testing.assert_allclose(outputs(answer)["raw_map"][0],
                               client.explain(jpegs[1], method="layercam").raw, atol=TOL)


def _renamed_input(request):
    request.inputs[0].name = "INPUT0"
    return request


def _extra_input(request):
    request.inputs.add(name="mask", datatype="BYTES", shape=[1])
    return request


def _no_inputs(request):
    del request.inputs[:]
    del request.raw_input_contents[:]
    return request


def _truncated(request):
    request.raw_input_contents[0] = request.raw_input_contents[0][:-5]
    return request


def _classification(request):
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    return request


def _unknown_output(request):
    request.outputs.add(name="logits")
    return request


def _version(request):
    request.model_version = "2"
    return request


JPEG = (DATA / "chelsea.jpg").read_bytes()
BAD = {
    "wrong datatype": (lambda: request_of(np.zeros((1, 8, 8, 3), np.float32), datatype="FP32"),
                       "INVALID_ARGUMENT", "input image is 'FP32'; send BYTES"),
    "BYTES of a wrong shape": (lambda: request_of([JPEG], shape=[1, 2]), "INVALID_ARGUMENT",
                               "BYTES images have shape [N] or [N, 1]"),
    "UINT8 of a wrong shape": (lambda: request_of(np.zeros((1, 8, 8), np.uint8),
                                                  datatype="UINT8"),
                               "INVALID_ARGUMENT", "pixels have shape [N, H, W, 3]"),
    "UINT8 short of bytes": (lambda: request_of(np.zeros((1, 8, 8, 3), np.uint8),
                                                datatype="UINT8", shape=[2, 8, 8, 3]),
                             "INVALID_ARGUMENT", "which needs 384 bytes, but holds 192"),
    "element count": (lambda: request_of([JPEG], shape=[2, 1]), "INVALID_ARGUMENT",
                      "has shape [2, 1] but holds 1 elements"),
    "truncated raw BYTES": (lambda: _truncated(request_of([JPEG])), "INVALID_ARGUMENT",
                            "end inside an element"),
    "not an image": (lambda: request_of([b"hello"]), "INVALID_ARGUMENT",
                     "image[0] is not a JPEG, PNG"),
    "missing input": (lambda: _renamed_input(request_of([JPEG])), "INVALID_ARGUMENT",
                      "no input 'image' (its inputs are 'INPUT0')"),
    "no inputs": (lambda: _no_inputs(request_of([JPEG])), "INVALID_ARGUMENT", "it has none"),
    "two inputs": (lambda: _extra_input(request_of([JPEG])), "INVALID_ARGUMENT",
                   "this model takes one, 'image'"),
    "too many images": (lambda: request_of([JPEG] * 65), "INVALID_ARGUMENT",
                        "takes at most 64 per request"),
    "unknown model": (lambda: request_of([JPEG], model="resnet"), "NOT_FOUND",
                      "model 'resnet' is not served here; loaded: camserve:1"),
    "no model": (lambda: request_of([JPEG], model=""), "INVALID_ARGUMENT",
                 "model_name is empty"),
    "unknown version": (lambda: _version(request_of([JPEG])), "NOT_FOUND",
                        "has no version 2; it has version 1"),
    "unknown parameter": (lambda: request_of([JPEG], topk=3), "INVALID_ARGUMENT",
                          "parameter 'topk' is not one this model takes; use top_k"),
    "parameter type": (lambda: request_of([JPEG], top_k="3"), "INVALID_ARGUMENT",
                       "parameter top_k must be an int64, not string"),
    "top_k zero": (lambda: request_of([JPEG], top_k=0), "INVALID_ARGUMENT",
                   "top_k is 0; it must be at least 1"),
    "unknown method": (lambda: request_of([JPEG], method="cam9000"), "INVALID_ARGUMENT",
                       "method 'cam9000' is not a CAM method served here; choose from gradcam"),
    "unknown layer": (lambda: request_of([JPEG], layer="head"), "INVALID_ARGUMENT",
                      "layer 'head' is not a layer this server explains; choose from features"),
    "unknown label": (lambda: request_of([JPEG], target="dog"), "INVALID_ARGUMENT",
                      "parameter target: no class is labelled 'dog'"),
    "class out of range": (lambda: request_of([JPEG], target=10), "INVALID_ARGUMENT",
                           "target 10 is out of range: the model has 10 classes"),
    "explain false with a method": (lambda: request_of([JPEG], explain=False, method="gradcam"),
                                    "INVALID_ARGUMENT", "explain is false, but the request "
                                    "sets parameter method"),
    "unknown output": (lambda: _unknown_output(request_of([JPEG])), "INVALID_ARGUMENT",
                       "asks for 'logits', which this model does not have"),
    "classification output": (lambda: _classification(request_of([JPEG])), "INVALID_ARGUMENT",
                              "ask for top_indices and top_labels"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_answer_a_clear_status(served, case):
    make, code, message = BAD[case]
    with pytest.raises(grpc.RpcError) as caught:
        infer(served[2], make())
    assert caught.value.code().name == code, caught.value.details()
    assert message in caught.value.details()


def test_millions_of_elements_are_refused_uncounted(served):
    """A BYTES tensor of shape [1] holding two million zero-length elements, raw or typed:
    refused once the elements outnumber the shape, without splitting the rest."""
    _, _, channel = served
    raw = request_of([b""])
    raw.raw_input_contents[0] = b"\0\0\0\0" * 2_000_000
    with pytest.raises(grpc.RpcError) as caught:
        infer(channel, raw)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has shape [1, 1] but holds more than 1 elements" in caught.value.details()
    typed = oip.messages().ModelInferRequest(model_name="camserve")
    typed.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.extend(
        [b""] * 2_000_000)
    with pytest.raises(grpc.RpcError) as caught:
        infer(channel, typed)
    assert "has shape [1] but holds 2000000 elements" in caught.value.details()
    assert oip._split(b"\0\0\0\0" * 1000, 2) == [b""] * 3


def test_a_long_parameter_name_is_echoed_short(served):
    """A 2 MB parameter name: INVALID_ARGUMENT for a client with default options (not a
    trailer over its metadata limit), the name cut short in the field at fault as well."""
    _, _, channel = served
    request = request_of([JPEG])
    request.parameters["x" * 2_000_000].int64_param = 1
    with pytest.raises(grpc.RpcError) as caught:
        infer(channel, request)
    error = CamserveError.from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.reason == "UNKNOWN_PARAMETER"
    (field, _), = error.field_violations
    assert field.startswith("parameters[xxx") and len(field) <= 200
    assert len(caught.value.details()) <= 1000


def test_typed_pixels_count_what_they_expand_to():
    """uint_contents take 1 byte an element on the wire and 2 more once turned into pixels:
    the in-flight bound counts those too (and refuses a value over 255, chunk by chunk)."""
    request = oip.messages().ModelInferRequest(model_name="camserve")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[1, 100, 100, 3])
    tensor.contents.uint_contents.extend([7] * 30_000)
    assert oip.expanded_bytes(request) == 60_000
    assert bytes(oip._typed_pixels(tensor.contents.uint_contents)) == b"\7" * 30_000
    tensor.contents.uint_contents[-1] = 256
    with pytest.raises(Exception, match="UINT8 but holds 256"):
        oip._typed_pixels(tensor.contents.uint_contents)


def test_unknown_model_elsewhere_and_other_rpcs(served):
    channel = served[2]
    m = oip.messages()
    for name, request, response in (
            ("ModelReady", m.ModelReadyRequest(name="x"), m.ModelReadyResponse),
            ("ModelMetadata", m.ModelMetadataRequest(name="x"), m.ModelMetadataResponse)):
        with pytest.raises(grpc.RpcError) as caught:
            rpc(channel, name, request, response)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "not served here; loaded: camserve:1" in caught.value.details()
    # Triton's extensions that camserve does not serve, unary and streaming.
    with pytest.raises(grpc.RpcError) as caught:
        rpc(channel, "ModelStatistics", m.ServerLiveRequest(), m.ServerLiveResponse)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "ModelStatistics is not served by camserve; it serves ServerLive" in (
        caught.value.details())
    stream = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=m.ModelInferResponse.FromString)
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(iter([request_of([JPEG])]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Bytes that are no ModelInferRequest: INVALID_ARGUMENT, as for camserve's RPCs.
    raw = channel.unary_unary(f"/{SERVICE}/ModelInfer")
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\xff\xff\xff", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest" in caught.value.details()


def test_calls_are_logged_and_counted_like_camserve_calls(served, caplog):
    server, _, channel = served
    caplog.set_level(logging.INFO, logger="camserve_server.access")
    sample = server.metrics.registry.get_sample_value
    before = sample("camserve_requests_total", {"rpc": "ModelInfer", "code": "OK"}) or 0
    infer(channel, request_of([JPEG, JPEG, JPEG]))
    m = oip.messages()
    rpc(channel, "ServerLive", m.ServerLiveRequest(), m.ServerLiveResponse)
    wait_for(lambda: sample("camserve_requests_total",
                            {"rpc": "ModelInfer", "code": "OK"}) == before + 1)

    def items(rpc_name: str):
        return [r.items for r in caplog.records
                if r.name == "camserve_server.access" and r.rpc == rpc_name and r.code == "OK"]

    wait_for(lambda: items("ModelInfer") and items("ServerLive"))
    # The access line counts a ModelInfer's images (its batch), as Predict's; none for the rest.
    assert (items("ModelInfer")[-1], items("ServerLive")[-1]) == (3, 0)


def test_explanations_are_bounded_as_explain_is():
    """OIP explanations meet Explain's bound on one request's extra forwards."""
    with running(model=TINY, max_item_cost=17) as (server, _):  # 68 forwards at once
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:  # 16 channels x 5 images
                infer(channel, request_of([JPEG] * 5, method="scorecam"))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cost about 80 extra forwards" in caught.value.details()
            answer = infer(channel, request_of([JPEG] * 4, method="scorecam"))
            assert outputs(answer)["raw_map"].shape == (4, 28, 28)


def test_model_name_flag_and_tokens():
    assert parse_settings(["--oip-model-name", "cats"]).oip_model_name == "cats"
    assert parse_settings([]).oip_model_name == "camserve"
    with running(model=TINY, oip_model_name="cats", auth_tokens=("s3cret",)) as (server, _):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:  # the same auth as camserve's RPCs
                infer(channel, request_of([JPEG], model="cats"))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            token = [("authorization", "Bearer s3cret")]
            answer = rpc(channel, "ModelInfer", request_of([JPEG], model="cats"),
                         oip.messages().ModelInferResponse, metadata=token)
            assert answer.model_name == "cats"
            with pytest.raises(grpc.RpcError) as caught:
                rpc(channel, "ModelInfer", request_of([JPEG]), oip.messages().ModelInferResponse,
                    metadata=token)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert "loaded: cats:1" in caught.value.details()


# --- tritonclient against a server process (make test-compat) ---------------------------------


def start(*args):
    """``camserve-server`` in a process of its own (tests/ on its path); (process, port)."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, "-m", "camserve_server", "--host", "127.0.0.1",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=dict(os.environ, PYTHONPATH=path))
    line = process.stdout.readline()
    match = re.search(r"listening on [\d.]+:(\d+)", line)
    assert match, line
    return process, int(match.group(1))


@pytest.fixture(scope="module")
def triton():
    """tritonclient and camserve's client on one tiny-model server process."""
    if triton_grpc is None:
        pytest.skip("tritonclient is not installed (make test-compat runs these tests)")
    process, port = start("--port", "0", "--model", TINY, "--max-delay-ms", "20")
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        with Client(f"127.0.0.1:{port}", timeout=60) as camserve_client:
            camserve_client.wait_until_ready(60)
            yield client, camserve_client
        client.close()
    finally:
        process.kill()
        process.wait()


def test_tritonclient_health_and_metadata(triton):
    client, _ = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("camserve")
    meta = client.get_model_metadata("camserve", as_json=True)
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1", "1"]}]
    assert [o["name"] for o in meta["outputs"]] == [
        "probabilities", "top_indices", "top_labels", "raw_map", "target"]
    assert client.get_model_config("camserve", as_json=True)["config"]["max_batch_size"] == 64


def test_tritonclient_infers_bytes_and_uint8_as_predict_does(triton, cat):
    client, camserve_client = triton
    image = triton_grpc.InferInput("image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[JPEG]], dtype=object))
    result = client.infer("camserve", [image], parameters={"top_k": 3})
    prediction = camserve_client.predict(JPEG, top_k=10)
    np.testing.assert_allclose(result.as_numpy("probabilities")[0],
                               probabilities_of(prediction, 10), atol=TOL)
    assert result.as_numpy("top_indices")[0, 0] == prediction.best.index
    assert result.as_numpy("top_labels")[0, 0].decode() == prediction.best.label
    assert result.as_numpy("top_indices").shape == (1, 3)

    pixels = triton_grpc.InferInput("image", [1, *cat.shape], "UINT8")
    pixels.set_data_from_numpy(cat[None])
    result = client.infer("camserve", [pixels])
    prediction = camserve_client.predict(cat, top_k=10)
    np.testing.assert_allclose(result.as_numpy("probabilities")[0],
                               probabilities_of(prediction, 10), atol=TOL)
    assert result.as_numpy("top_indices")[0, 0] == prediction.best.index


def test_tritonclient_explanation_equals_explain(triton):
    client, camserve_client = triton
    coffee = load_rgb(DATA / "coffee.jpg")
    pixels = triton_grpc.InferInput("image", [1, *coffee.shape], "UINT8")
    pixels.set_data_from_numpy(coffee[None])
    wanted = [triton_grpc.InferRequestedOutput("raw_map"),
              triton_grpc.InferRequestedOutput("target")]
    result = client.infer("camserve", [pixels], outputs=wanted,
                          parameters={"method": "gradcam", "target": 7})
    explanation = camserve_client.explain(coffee, target=7)
    assert result.as_numpy("target").tolist() == [7]
    np.testing.assert_allclose(result.as_numpy("raw_map")[0], explanation.raw, atol=TOL)


def _status(error) -> str:
    return str(error.status())


@pytest.mark.parametrize("case", ["wrong datatype", "wrong shape", "missing input",
                                  "unknown model"])
def test_tritonclient_bad_tensors(triton, case):
    client, _ = triton
    name, datatype, shape, data, model = "image", "BYTES", [1, 1], np.array([[JPEG]], object), \
        "camserve"
    code, message = "INVALID_ARGUMENT", ""
    if case == "wrong datatype":
        datatype, shape, data = "FP32", [1, 8, 8, 3], np.zeros((1, 8, 8, 3), np.float32)
        message = "input image is 'FP32'; send BYTES"
    elif case == "wrong shape":
        shape, data = [1, 2], np.array([[JPEG, JPEG]], object)
        message = "BYTES images have shape [N] or [N, 1]"
    elif case == "missing input":
        name, message = "INPUT0", "no input 'image' (its inputs are 'INPUT0')"
    else:
        model, code = "resnet", "NOT_FOUND"
        message = "model 'resnet' is not served here; loaded: camserve:1"
    tensor = triton_grpc.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [tensor])
    assert code in _status(caught.value) and message in caught.value.message()


def test_tritonclient_unimplemented_rpc(triton):
    client, _ = triton
    with pytest.raises(InferenceServerException) as caught:
        client.get_inference_statistics("camserve")
    assert "UNIMPLEMENTED" in _status(caught.value)
    assert "ModelStatistics is not served by camserve" in caught.value.message()


@pytest.mark.parametrize("parameters, options", [
    ({"layer": "head"}, {"layer": "head"}),
    ({"target": "dog"}, {"target": "dog"}),
    ({"target": 10}, {"target": 10}),
    ({"method": "scorecam", "target": 3}, {"method": "scorecam", "target": 3,
                                            "score_cam_channels": 100000}),
])
def test_both_protocols_check_a_request_alike(served, parameters, options):
    """One pipeline under both protocols: the same mistake gets the same reason and the same
    message from ModelInfer as from Explain, only in the request's own terms."""
    _, client, channel = served
    if "score_cam_channels" in options:  # the OIP cannot ask for it: compare another check
        parameters = dict(parameters, layer="head")
        options = dict(options, layer="head")
        options.pop("score_cam_channels")
    with pytest.raises(grpc.RpcError) as oip_error:
        infer(channel, request_of([JPEG], **parameters))
    with pytest.raises(CamserveError) as camserve_error:
        client.explain(JPEG, **{"target" if k == "target" else k: v
                                for k, v in options.items()})
    theirs = camserve_error.value
    ours = oip_error.value.details()
    renamed = theirs.details
    for field in ("options.targets[0].class_index", "options.targets[0].label",
                  "options.layers[0]", "options.methods[0]"):
        renamed = renamed.replace(field, "parameter " + field.split(".")[1].split("[")[0]
                                  .rstrip("s").replace("target", "target"))
    assert ours == renamed
    assert theirs.reason and theirs.reason in _reasons(oip_error.value)


def _reasons(error) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return str(value)
    return ""


def test_tritonclient_repository_load_and_unload(tmp_path):
    """Triton's repository extension as tritonclient calls it: the index, a load (with the admin
    token), an inference on the loaded model, an unload."""
    if triton_grpc is None:
        pytest.skip("tritonclient is not installed (make test-compat runs these tests)")
    import torch

    import tiny_models

    for name in ("a", "b"):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "config.toml").write_text(f'source = "{TINY}"\n')
        torch.save(tiny_models.tiny_cnn().state_dict(), tmp_path / name / "1" / "weights.pth")
    process, port = start("--port", "0", "--model-repository", str(tmp_path),
                          "--model-control", "explicit", "--load-model", "a",
                          "--admin-token", "root")
    admin = {"authorization": "Bearer root"}
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        with Client(f"127.0.0.1:{port}", timeout=60) as camserve_client:
            camserve_client.wait_until_ready(60)
        index = client.get_model_repository_index(as_json=True)["models"]
        assert [(m["name"], m.get("state")) for m in index] == [("a", "READY"),
                                                                 ("b", "UNAVAILABLE")]
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("b")
        assert "PERMISSION_DENIED" in _status(caught.value)
        client.load_model("b", headers=admin)
        assert client.is_model_ready("b") and client.is_model_ready("b", "1")
        image = triton_grpc.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([JPEG], dtype=object))
        result = client.infer("b", [image], model_version="1")
        assert result.get_response().model_version == "1"
        assert result.as_numpy("probabilities").shape == (1, 10)
        client.unload_model("b", headers=admin)
        assert not client.is_model_ready("b")
        client.close()
    finally:
        process.kill()
        process.wait()


def test_the_priority_parameter_sets_the_queue_level(served, monkeypatch):
    """Triton's priority parameter (tritonclient sends a uint64, others an int64): 1 the
    highest, 0 the default; out of range INVALID_ARGUMENT."""
    from camserve_server.batching.levels import EXPENSIVE, INTERACTIVE, STREAM

    server, _, channel = served
    levels = record_levels(server.batcher, monkeypatch)
    infer(channel, request_of([JPEG], priority=0))
    infer(channel, request_of([JPEG], priority=3))
    request = request_of([JPEG])
    request.parameters["priority"].uint64_param = 2
    infer(channel, request)
    assert levels == [INTERACTIVE, EXPENSIVE, STREAM]
    with pytest.raises(grpc.RpcError) as caught:
        infer(channel, request_of([JPEG], priority=9))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters[priority] is 9; this server has priorities 1" in caught.value.details()
