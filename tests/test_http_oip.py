"""The Open Inference Protocol over REST (api/http/oip_rest.py) on the real default model:
tritonclient.http works unchanged and gets what gRPC answers; JSON tensors, Triton's binary
extension, and errors in the form tritonclient reads."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc

from conftest import encode, running

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "camserve"


@pytest.fixture(scope="module")
def served():
    with running(http_port=0, max_delay_ms=20) as (server, client):
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base, timeout=120) as http:
            yield server, http


@pytest.fixture(scope="module")
def triton(served):
    server, _ = served
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}",
                                              network_timeout=120.0)
    yield client
    client.close()


def grpc_probabilities(server, image: bytes) -> np.ndarray:
    """Every class's probability from gRPC Predict (top_k = all classes)."""
    request = pb.PredictRequest(images=[pb.Image(encoded=image)],
                                options=pb.PredictOptions(top_k=1000))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = pb_grpc.CamserveServiceStub(channel).Predict(request, timeout=120)
    top = answer.results[0].prediction.top
    probabilities = np.zeros(len(top), np.float32)
    for score in top:
        probabilities[score.index] = score.probability
    return probabilities


def image_input(image: bytes, binary: bool = True):
    tensor = httpclient.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_), binary_data=binary)
    return tensor


def test_tritonclient_http_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert triton.get_server_metadata()["name"] == "camserve"
    metadata = triton.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]} in (
        metadata["outputs"])
    config = triton.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] == 64


def test_tritonclient_http_infers_the_probabilities_grpc_predict_answers(served, triton,
                                                                       cat_path):
    server, _ = served
    image = cat_path.read_bytes()
    expected = grpc_probabilities(server, image)
    result = triton.infer(MODEL, [image_input(image)])  # binary in, binary out
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 1000)
    np.testing.assert_allclose(probabilities[0], expected, rtol=0, atol=1e-6)
    assert result.as_numpy("top_labels")[0][0] == b"Egyptian cat"
    assert result.as_numpy("top_indices")[0][0] == int(np.argmax(expected))
    # JSON tensors both ways: the same numbers.
    outputs = [httpclient.InferRequestedOutput(name, binary_data=False)
               for name in ("probabilities", "top_labels")]
    result = triton.infer(MODEL, [image_input(image, binary=True)], outputs=outputs,
                          model_version="1")
    np.testing.assert_allclose(result.as_numpy("probabilities")[0], expected, rtol=0,
                               atol=1e-6)
    assert result.as_numpy("top_labels")[0][0] in (b"Egyptian cat", "Egyptian cat")


def test_explanation_outputs_equal_grpc_explain(served, triton, cat_path):
    server, _ = served
    image = cat_path.read_bytes()
    request = pb.ExplainRequest(images=[pb.Image(encoded=image)], options=pb.ExplainOptions(
        methods=[pb.CAM_METHOD_LAYERCAM], targets=[pb.Target(class_index=281)],
        outputs=[pb.EXPLAIN_OUTPUT_RAW_MAP]))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = pb_grpc.CamserveServiceStub(channel).Explain(request, timeout=120)
    raw = answer.results[0].maps[0].raw_map
    expected = np.array(raw.values, np.float32).reshape(raw.height, raw.width)
    result = triton.infer(MODEL, [image_input(image)], parameters={
        "method": "layercam", "target": 281})
    np.testing.assert_allclose(result.as_numpy("raw_map")[0], expected, rtol=0, atol=1e-6)
    assert result.as_numpy("target").tolist() == [281]


def test_json_tensors_by_hand(served, cat_path):
    server, http = served
    image = cat_path.read_bytes()
    body = {"id": "a-7", "parameters": {"top_k": 3},
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(image).decode()]}],
            "outputs": [{"name": "top_labels"}, {"name": "probabilities"}]}
    answer = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["id"] == "a-7" and doc["model_version"] == "1"
    assert [o["name"] for o in doc["outputs"]] == ["top_labels", "probabilities"]
    assert doc["outputs"][0]["shape"] == [1, 3] and doc["outputs"][0]["data"][0] == (
        "Egyptian cat")
    np.testing.assert_allclose(np.array(doc["outputs"][1]["data"], np.float32),
                               grpc_probabilities(server, image), rtol=0, atol=1e-6)
    # UINT8 pixels, nested as the shape says.
    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(1, 8, 8, 3)
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 3],
                        "data": pixels.tolist()}], "outputs": [{"name": "probabilities"}]}
    answer = http.post(f"/v2/models/{MODEL}/versions/1/infer", json=body)
    assert answer.status_code == 200, answer.text
    png = grpc_probabilities(server, encode(pixels[0], "PNG"))
    np.testing.assert_allclose(answer.json()["outputs"][0]["data"], png, rtol=0, atol=1e-6)


def test_binary_extension_by_hand(served, cat_path):
    _, http = served
    image = cat_path.read_bytes()
    element = len(image).to_bytes(4, "little") + image
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                   "parameters": {"binary_data_size": len(element)}}],
                       "outputs": [{"name": "top_indices", "parameters": {"binary_data": True}},
                                   {"name": "top_labels"}]}).encode()
    answer = http.post(f"/v2/models/{MODEL}/infer", content=head + element,
                       headers={"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"})
    assert answer.status_code == 200, answer.text
    size = int(answer.headers["inference-header-content-length"])
    doc = json.loads(answer.content[:size])
    indices = np.frombuffer(answer.content[size:], "<i8")
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == len(indices) * 8
    assert indices[0] == 285 and doc["outputs"][1]["data"][0] == "Egyptian cat"


@pytest.mark.parametrize("case", ["header_longer_than_body", "bytes_left_over", "not_base64",
                                  "unknown_input", "float_parameter", "not_json"])
def test_bad_requests_answer_400_with_an_error(served, case):
    _, http = served
    url = f"/v2/models/{MODEL}/infer"
    good = {"name": "image", "datatype": "BYTES", "shape": [1],
            "data": [base64.b64encode(encode(np.zeros((8, 8, 3), np.uint8))).decode()]}
    head = json.dumps({"inputs": [good]}).encode()
    if case == "header_longer_than_body":
        answer = http.post(url, content=head, headers={
            "Inference-Header-Content-Length": str(len(head) + 10)})
    elif case == "bytes_left_over":
        answer = http.post(url, content=head + b"xx", headers={
            "Inference-Header-Content-Length": str(len(head))})
    elif case == "not_base64":
        answer = http.post(url, json={"inputs": [{**good, "data": ["***"]}]})
    elif case == "unknown_input":
        answer = http.post(url, json={"inputs": [{**good, "name": "picture"}]})
    elif case == "float_parameter":
        answer = http.post(url, json={"inputs": [good], "parameters": {"top_k": 2.5}})
    else:
        answer = http.post(url, content=b"{oops")
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["error"] and error["error"] == error["message"]
    assert error["details"][0]["reason"]
    assert http.get("/v2/health/ready").status_code == 200


def test_unknown_model_and_version(served, triton):
    _, http = served
    answer = http.get("/v2/models/resnet")
    assert answer.status_code == 404 and "camserve" in answer.json()["error"]
    assert http.get(f"/v2/models/{MODEL}/versions/7").status_code == 404
    assert http.get("/v2/models/resnet/ready").status_code == 404
    with pytest.raises(InferenceServerException, match="not served here"):
        triton.infer("resnet", [image_input(b"x")])


def test_repository_extension(served, triton):
    server, http = served
    from camserve_server.api import oip

    if "RepositoryIndex" not in oip.OipService(server._service, MODEL).methods():
        pytest.skip("this server has no model repository (several models: issue 22)")
    index = triton.get_model_repository_index()
    assert {"name": MODEL, "version": "1", "state": "READY"}.items() <= index[0].items()
    assert http.post("/v2/repository/index", json={"ready": True}).json() == index
    refused = http.post(f"/v2/repository/models/{MODEL}/load")
    assert refused.status_code == 400 and "model-control" in refused.json()["error"]
    with pytest.raises(InferenceServerException, match="model-control"):
        triton.unload_model(MODEL)
    assert http.post("/v2/repository/index", content=b"[1]").status_code == 400
    assert triton.is_model_ready(MODEL)


PERF_ANALYZER = Path(__file__).resolve().parents[1] / "build" / "perf_analyzer" / "perf_analyzer"


def test_perf_analyzer_over_http(served, tmp_path):
    """Triton's perf_analyzer, unchanged, drives the Open Inference Protocol over HTTP (its
    JSON input file holds one BYTES image, as bench/perf_analyzer/run.sh writes it)."""
    import struct
    import subprocess

    if not PERF_ANALYZER.exists():
        pytest.skip("perf_analyzer is not set up: bash bench/perf_analyzer/setup.sh fetches it "
                    "into build/perf_analyzer/")
    server, _ = served
    data = (Path(__file__).parent / "data" / "chelsea.jpg").read_bytes()
    element = base64.b64encode(struct.pack("<I", len(data)) + data).decode()
    inputs = tmp_path / "input.json"
    inputs.write_text(json.dumps(
        {"data": [{"image": {"content": {"b64": element}, "shape": [1]}}]}))
    done = subprocess.run(
        [str(PERF_ANALYZER), "-m", "camserve", "-i", "http", "-u",
         f"127.0.0.1:{server.http_port}", "--input-data", str(inputs),
         "--measurement-interval", "2000", "--stability-percentage", "90", "--max-trials", "3",
         "--concurrency-range", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Concurrency: 2, throughput:" in done.stdout
