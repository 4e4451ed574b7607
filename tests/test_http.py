"""HTTP beside gRPC (api/http/): the port and its flag, TLS, mutual TLS, tokens, /metrics, the
access log, camserve's API as JSON (the same messages and errors as gRPC), multipart uploads,
overlays by Accept, the OpenAPI description, WebSocket streams, and bad input, after which the
server still serves. The Open Inference Protocol over REST is tests/test_http_oip.py."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import logging
import socket
import ssl
import threading

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc
from camserve_server.api.http import context as http_context
from camserve_server.api.http.camserve_json import kebab
from camserve_server.errors import ResourceExhausted
from camserve_server.process.settings import parse_settings

from conftest import TINY, ServerProcess, encode, running, wait_for

PLAIN = np.full((32, 32, 3), 100, np.uint8)
LIMIT = 4_000_000  # --max-message-bytes of the tiny server here


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def predict_body(image: bytes = None) -> dict:
    return {"images": [{"encoded": b64(image if image is not None else encode(PLAIN))}]}


@pytest.fixture(scope="module")
def tiny():
    with running(model=TINY, http_port=0, max_message_bytes=LIMIT, max_delay_ms=0) as (
            server, client):
        base = f"http://127.0.0.1:{server.http_port}"
        with httpx.Client(base_url=base, timeout=60) as http:
            yield server, client, http


def serves(http: httpx.Client) -> None:
    """The server still answers a good call."""
    answer = http.post("/v1/predict", json=predict_body())
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["prediction"]["top"]


def status_of(answer: httpx.Response) -> status_pb2.Status:
    """The google.rpc.Status an HTTP error answered (its JSON form)."""
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    body = answer.json()
    body.pop("error", None)  # the Open Inference Protocol's copy of the message
    return json_format.ParseDict(body, status_pb2.Status())


def detail(status: status_pb2.Status, kind):
    for any_detail in status.details:
        found = kind()
        if any_detail.Unpack(found):
            return found
    return None


# --- the port ------------------------------------------------------------------------------


def test_http_port_flag():
    assert parse_settings([], {}).http_port == 8000
    assert parse_settings(["--http-port", "off"], {}).http_port is None
    assert parse_settings([], {"CAMSERVE_HTTP_PORT": "off"}).http_port is None
    assert parse_settings(["--http-port", "0"], {}).http_port == 0
    for bad in ("eighty", "70000", "-1"):
        with pytest.raises(SystemExit):
            parse_settings(["--http-port", bad], {})


def test_the_process_prints_its_http_port_and_serves_there():
    server = ServerProcess("--model", TINY, "--http-port", "0")
    try:
        found = server.wait_line(server.stdout, r"camserve-server http on 127\.0\.0\.1:(\d+)")
        server.wait_line(server.stdout, "camserve-server serving")
        answer = httpx.get(f"http://127.0.0.1:{found.group(1)}/v2/health/live", timeout=30)
        assert answer.status_code == 200 and answer.json() == {"live": True}
    finally:
        server.close()


def test_workers_share_the_http_port():
    """With --workers 2 the supervisor holds the HTTP port and both workers serve on it;
    /metrics there counts every worker's calls."""
    server = ServerProcess("--model", TINY, "--workers", "2", "--http-port", "0")
    try:
        found = server.wait_line(server.stdout, r"camserve-server http on 127\.0\.0\.1:(\d+)")
        server.wait_line(server.stdout, "camserve-server serving")
        base = f"http://127.0.0.1:{found.group(1)}"
        seen = set()
        for _ in range(64):
            with httpx.Client(base_url=base, timeout=60) as http:  # a connection of its own
                answer = http.post("/v1/predict", json=predict_body())
            seen.add(answer.json()["results"][0]["timing"].get("worker", 0))
            if seen == {1, 2}:
                break
        assert seen == {1, 2}
        text = httpx.get(base + "/metrics", timeout=30).text
        assert 'worker="1"' in text and 'worker="2"' in text
    finally:
        server.close()


def test_http_runs_on_the_grpc_servers_event_loop(tiny):
    server, _, _ = tiny
    assert server._http._task.get_loop() is server._loop


def test_a_busy_http_port_stops_the_start_with_a_clear_error():
    from camserve_server.errors import StartupError
    from camserve_server.process.server import CamServer
    from camserve_server.process.settings import Settings

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        server = CamServer(Settings(host="127.0.0.1", port=0, http_port=port, model=TINY))
        with pytest.raises(StartupError, match=f"cannot serve HTTP on 127.0.0.1:{port}.*"
                                               "--http-port"):
            server.listen()
        server.stop(grace=0)


def test_tls_mutual_tls_and_tokens(tmp_path):
    from test_security import _certificates

    certs = _certificates(tmp_path)
    token = "http-token-value"
    with running(model=TINY, http_port=0, auth_tokens=(token,), tls_cert=str(
            certs / "server.pem"), tls_key=str(certs / "server.key"),
            tls_client_ca=str(certs / "ca.pem")) as (server, _):
        base = f"https://localhost:{server.http_port}"
        trusted = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
            httpx.get(base + "/v2/health/live", verify=trusted, timeout=10)
        trusted.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
        with httpx.Client(base_url=base, verify=trusted, timeout=30) as http:
            assert http.get("/v2/health/live").status_code == 200  # probes need no token
            denied = http.get("/v1/info")
            assert denied.status_code == 401
            assert denied.headers["www-authenticate"] == "Bearer"
            assert detail(status_of(denied), error_details_pb2.ErrorInfo).reason == (
                "UNAUTHENTICATED")
            assert http.get("/v1/info", headers={"Authorization": "Bearer wrong"}
                            ).status_code == 401
            good = {"Authorization": f"Bearer {token}"}
            assert http.get("/v1/info", headers=good).json()["name"] == TINY
            assert http.post("/v1/predict", json=predict_body(), headers=good
                             ).status_code == 200
            assert http.get("/metrics").status_code == 401
            assert "camserve_requests_total" in http.get("/metrics", headers=good).text
        with pytest.raises(httpx.HTTPError):  # plaintext is not answered
            httpx.get(f"http://localhost:{server.http_port}/v2/health/live", timeout=10)
        denied = server.metrics.value("camserve_requests_total", rpc="GetModelInfo",
                                      code="UNAUTHENTICATED")
        assert denied == 2


def test_metrics_and_the_access_log_count_http_calls(tiny, caplog):
    server, _, http = tiny
    caplog.set_level(logging.INFO, logger="camserve_server.access")
    before = server.metrics.value("camserve_requests_total", rpc="Predict", code="OK") or 0
    answer = http.post("/v1/predict", json=predict_body(), headers={"x-request-id": "http-7"})
    assert answer.status_code == 200
    wait_for(lambda: "id=http-7" in caplog.text, what="the access line")
    line = next(r for r in caplog.records if getattr(r, "request_id", "") == "http-7")
    assert line.rpc == "Predict" and line.code == "OK" and line.items == 1
    assert line.peer.startswith("ipv4:127.0.0.1:")
    assert server.metrics.value("camserve_requests_total", rpc="Predict",
                                code="OK") == before + 1
    scraped = http.get("/metrics")
    assert scraped.status_code == 200 and 'rpc="Predict"' in scraped.text


def test_metrics_port_still_serves_beside_http():
    with running(model=TINY, http_port=0, metrics_port=0) as (server, _):
        assert server.metrics_port != server.http_port
        for port in (server.metrics_port, server.http_port):
            assert "camserve_state" in httpx.get(f"http://127.0.0.1:{port}/metrics").text


# --- camserve's API as JSON ----------------------------------------------------------------


def _clear_timing(message) -> None:
    for result in message.results:
        result.ClearField("timing")


def test_json_explain_equals_grpc_explain_field_by_field(tiny, cat_path):
    server, _, http = tiny
    image = cat_path.read_bytes()
    options = pb.ExplainOptions(
        methods=[pb.CAM_METHOD_GRADCAM, pb.CAM_METHOD_LAYERCAM], top_targets=2,
        outputs=[pb.EXPLAIN_OUTPUT_RAW_MAP, pb.EXPLAIN_OUTPUT_HEATMAP_PNG,
                 pb.EXPLAIN_OUTPUT_OVERLAY_JPEG], faithfulness_steps=4)
    request = pb.ExplainRequest(images=[pb.Image(encoded=image)], options=options)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        expected = pb_grpc.CamserveServiceStub(channel).Explain(request, timeout=60)
    answer = http.post("/v1/explain", content=json_format.MessageToJson(request),
                       headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    got = json_format.Parse(answer.content, pb.ExplainResponse())
    assert got.results[0].timing.batch_size >= 1  # timings are there, and differ per call
    _clear_timing(got)
    _clear_timing(expected)
    assert got.results[0].maps and got.results[0].maps[0].overlay
    for field in pb.ExplainResult.DESCRIPTOR.fields:
        assert getattr(got.results[0], field.name) == getattr(expected.results[0], field.name), (
            field.name)
    assert got == expected


def test_json_predict_equals_grpc_predict_and_takes_proto_field_names(tiny):
    server, _, http = tiny
    request = pb.PredictRequest(images=[pb.Image(encoded=encode(PLAIN))],
                                options=pb.PredictOptions(top_k=3))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        expected = pb_grpc.CamserveServiceStub(channel).Predict(request, timeout=60)
    _clear_timing(expected)
    for body in (json_format.MessageToJson(request),
                 json_format.MessageToJson(request, preserving_proto_field_name=True)):
        answer = http.post("/v1/predict", content=body,
                           headers={"content-type": "application/json; charset=utf-8"})
        got = json_format.Parse(answer.content, pb.PredictResponse())
        _clear_timing(got)
        assert got == expected and len(got.results[0].prediction.top) == 3


def test_multipart_upload_answers_as_json_does(tiny, cat_path):
    _, _, http = tiny
    image = cat_path.read_bytes()
    options = {"topK": 2}
    by_json = http.post("/v1/predict", json={**predict_body(image), "options": options}).json()
    by_form = http.post("/v1/predict", files=[("images", ("cat.jpg", image, "image/jpeg"))],
                        data={"options": json.dumps(options)})
    assert by_form.status_code == 200, by_form.text
    top = [c["index"] if "index" in c else 0 for c in by_form.json()["results"][0][
        "prediction"]["top"]]
    assert top == [c.get("index", 0) for c in by_json["results"][0]["prediction"]["top"]]
    two = http.post("/v1/predict", files=[("images", ("a.jpg", image)),
                                          ("images", ("b.png", encode(PLAIN, "PNG")))])
    assert len(two.json()["results"]) == 2
    bad = http.post("/v1/predict", files=[("images", ("a.jpg", image))],
                    data={"options": "top 2"})
    assert bad.status_code == 400 and "not JSON" in bad.json()["message"]


def test_accept_image_png_answers_the_overlay_alone(tiny, cat_path):
    _, _, http = tiny
    body = {**predict_body(cat_path.read_bytes()),
            "options": {"targets": [{"classIndex": 3}]}}
    answer = http.post("/v1/explain", json=body, headers={"accept": "image/png"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-camserve-class"] == "3"
    assert answer.headers["x-camserve-method"] == "CAM_METHOD_GRADCAM"
    overlay = Image.open(io.BytesIO(answer.content))
    assert overlay.format == "PNG" and overlay.size == (451, 300)
    as_json = http.post("/v1/explain", json={**body, "options": {
        **body["options"], "outputs": ["EXPLAIN_OUTPUT_OVERLAY_PNG"]}}).json()
    assert base64.b64decode(as_json["results"][0]["maps"][0]["overlay"]) == answer.content
    jpeg = http.post("/v1/explain", json=body, headers={"accept": "image/jpeg"})
    assert Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    refused = http.post("/v1/predict", json=body, headers={"accept": "image/png"})
    assert refused.status_code == 406
    assert detail(status_of(refused), error_details_pb2.ErrorInfo).reason == "NOT_ACCEPTABLE"


def test_model_info_routes_and_query_parameters(tiny):
    _, _, http = tiny
    info = http.get("/v1/info").json()
    assert info["name"] == TINY and info["state"] == "SERVER_STATE_SERVING"
    assert http.post("/v1/get-model-info", json={}).json()["labels"] == info["labels"]
    bad = http.get("/v1/info", params={"nope": "1"})
    assert bad.status_code == 400 and "nope" in bad.json()["message"]


def test_models_by_name(tiny):
    server, _, http = tiny
    if "ListModels" not in server._service.methods():
        pytest.skip("this server has no ListModels (several models: issue 22)")
    info = http.get("/v1/info").json()
    assert http.get("/v1/models").json()["models"][0]["state"] == "MODEL_STATE_READY"
    name = http.get("/v1/models").json()["models"][0]["name"]
    assert http.get(f"/v1/models/{name}").json()["labels"] == info["labels"]
    assert http.get(f"/v1/models/{name}/versions/1").json()["labels"] == info["labels"]
    missing = http.get("/v1/models/no-such-model")
    assert missing.status_code == 404, missing.text
    bad = http.get("/v1/models", params={"ready": "maybe"})
    assert bad.status_code == 400 and "ready" in bad.json()["message"]


def test_errors_carry_grpcs_status_reason_field_and_retry_hint(tiny):
    server, _, http = tiny
    request = pb.ExplainRequest(images=[pb.Image(encoded=encode(PLAIN))],
                                options=pb.ExplainOptions(layers=["no.such.layer"]))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.CamserveServiceStub(channel).Explain(request, timeout=60)
    expected = rpc_status.from_call(error.value)
    answer = http.post("/v1/explain", content=json_format.MessageToJson(request),
                       headers={"content-type": "application/json"})
    assert answer.status_code == 400
    got = status_of(answer)
    assert got == expected
    violation = detail(got, error_details_pb2.BadRequest).field_violations[0]
    assert violation.field == "options.layers[0]"


def test_http_statuses_of_grpc_codes():
    """Each code's HTTP status, and a retry hint as Retry-After (whole seconds, rounded up)."""
    from camserve_server.api import calls

    status = calls.status_of(ResourceExhausted("busy", retry_after_s=1.2))
    assert http_context.http_status(status) == 429
    assert http_context.error_headers(status) == {"Retry-After": "2"}
    assert http_context.HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503
    assert http_context.HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED] == 401
    assert http_context.HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert set(http_context.HTTP_STATUS) == set(grpc.StatusCode)


def test_a_full_queue_answers_429_with_retry_after():
    with running(model="python:tiny_models:slow_cnn", http_port=0, max_batch_size=1,
                 max_queue=1, max_delay_ms=0) as (server, _):
        async def burst():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}",
                                         timeout=60) as http:
                return await asyncio.gather(*(http.post("/v1/predict", json=predict_body())
                                              for _ in range(6)))
        answers = asyncio.run(burst())
        refused = [a for a in answers if a.status_code == 429]
        assert refused and any(a.status_code == 200 for a in answers), [
            a.status_code for a in answers]
        for answer in refused:
            assert int(answer.headers["retry-after"]) >= 1
            status = status_of(answer)
            assert detail(status, error_details_pb2.ErrorInfo).reason == "QUEUE_FULL"
            assert detail(status, error_details_pb2.RetryInfo) is not None


def test_while_the_model_loads_calls_answer_503_and_ready_says_no():
    from camserve_server.process.server import CamServer
    from camserve_server.process.settings import Settings

    server = CamServer(Settings(host="127.0.0.1", port=0, http_port=0,
                                model="python:tiny_models:slow_loading_cnn"))
    server.listen()
    loader = threading.Thread(target=server.load)
    loader.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http:
            loading = http.post("/v1/predict", json=predict_body())
            assert loading.status_code == 503, loading.text
            assert detail(status_of(loading), error_details_pb2.ErrorInfo).reason == "LOADING"
            assert http.get("/v2/health/ready").status_code == 503
            assert http.get("/v2/health/live").status_code == 200
            loader.join(120)
            assert http.get("/v2/health/ready").status_code == 200
            assert http.post("/v1/predict", json=predict_body()).status_code == 200
    finally:
        loader.join(120)
        server.stop(grace=1)


def test_openapi_describes_every_route_from_the_proto(tiny):
    server, _, http = tiny
    spec = http.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for name, (_, _, _, streaming) in server._service.methods().items():
        if not streaming:
            assert f"/v1/{kebab(name)}" in spec["paths"], name
    assert "/v2/models/{name}/infer" in spec["paths"]
    schemas = spec["components"]["schemas"]
    image = schemas["camserve.v1.Image"]["properties"]
    assert image["encoded"]["format"] == "byte"
    methods = schemas["camserve.v1.ExplainOptions"]["properties"]["methods"]
    assert "CAM_METHOD_GRADCAM" in methods["items"]["enum"]
    assert "google.rpc.Status" in schemas


# --- bad input -----------------------------------------------------------------------------


def test_malformed_json(tiny):
    _, _, http = tiny
    for body in (b"{not json", b'{"images": 3}', b'{"images": [{"encoded": 5}]}',
                 b'{"imagez": []}', b"[1, 2]", b"\xff\xfe", b"[" * 100_000):
        answer = http.post("/v1/predict", content=body,
                           headers={"content-type": "application/json"})
        assert answer.status_code == 400, body
        status = status_of(answer)
        assert detail(status, error_details_pb2.ErrorInfo).reason == "MALFORMED_REQUEST", body
        assert "camserve.v1.PredictRequest" in status.message
    serves(http)


def test_wrong_content_type(tiny):
    _, _, http = tiny
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": kind} if kind else {}
        answer = http.post("/v1/predict", content=json.dumps(predict_body()),
                           headers=headers)
        assert answer.status_code == 415, kind
        status = status_of(answer)
        assert detail(status, error_details_pb2.ErrorInfo).reason == "UNSUPPORTED_MEDIA_TYPE"
        assert "application/json" in status.message
    serves(http)


def test_a_body_over_the_limit_is_refused_before_it_is_read(tiny):
    server, _, client = tiny
    # Content-Length over --max-message-bytes: the answer comes before the body is sent.
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    connection.putrequest("POST", "/v1/predict")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(LIMIT * 10))
    connection.endheaders(b"{")  # 1 byte of the 40 MB it announced
    refused = connection.getresponse()
    assert refused.status == 413
    body = json.loads(refused.read())
    connection.close()
    assert body["details"][0]["reason"] == "MESSAGE_TOO_LARGE"
    assert "max_message_bytes" in body["message"]

    def chunks():  # no Content-Length: refused once it grows past the limit
        for _ in range(20):
            yield b" " * (LIMIT // 8)

    answer = client.post("/v1/predict", content=chunks(),
                       headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert server.metrics.value("camserve_requests_total", rpc="Predict",
                                code="INVALID_ARGUMENT") >= 2
    serves(client)


def test_base64_that_is_not_an_image(tiny):
    _, _, http = tiny
    answer = http.post("/v1/predict", json={"images": [{"encoded": b64(b"hello, world")}]})
    assert answer.status_code == 400
    status = status_of(answer)
    assert detail(status, error_details_pb2.ErrorInfo).reason == "INVALID_IMAGE"
    assert detail(status, error_details_pb2.BadRequest).field_violations[0].field == (
        "images[0]")
    serves(http)


def test_unknown_path_and_method_not_allowed(tiny):
    _, _, http = tiny
    for path in ("/nope", "/v1/nope", "/v1", "/explorer/../../etc/passwd"):
        answer = http.get(path)
        assert answer.status_code == 404, path
        assert "/openapi.json" in status_of(answer).message
    answer = http.get("/v1/predict")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    assert detail(status_of(answer), error_details_pb2.ErrorInfo).reason == (
        "METHOD_NOT_ALLOWED")
    assert http.delete("/v2/health/live").status_code == 405
    assert "error" in http.delete("/v2/health/live").json()
    serves(http)


def test_token_missing():
    token = "the-token"
    with running(model=TINY, http_port=0, auth_tokens=(token,)) as (server, _):
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}",
                          timeout=30) as http:
            for headers in ({}, {"Authorization": token}, {"Authorization": "Basic x"}):
                answer = http.post("/v1/predict", json=predict_body(), headers=headers)
                assert answer.status_code == 401
                assert "Bearer" in status_of(answer).message
            good = {"Authorization": f"Bearer {token}"}
            assert http.post("/v1/predict", json=predict_body(), headers=good
                             ).status_code == 200


# --- WebSocket streams -----------------------------------------------------------------------


def _frames(n: int):
    yield json.dumps({"config": {"policy": "STREAM_POLICY_ALL", "options": {"topK": 2}}})
    for i in range(n):
        yield json.dumps({"frame": {"frameId": str(i + 1),
                                    "image": {"encoded": b64(encode(PLAIN))}}})


def _ws_url(server, path: str) -> str:
    return f"ws://127.0.0.1:{server.http_port}{path}"


def test_websocket_stream_predict_answers_every_frame_in_order(tiny):
    from websockets.sync.client import connect

    server, _, _ = tiny
    with connect(_ws_url(server, "/v1/stream-predict"), open_timeout=30) as ws:
        for message in _frames(3):
            ws.send(message)
        answers = [json.loads(ws.recv(timeout=60)) for _ in range(3)]
    assert [a["frameId"] for a in answers] == ["1", "2", "3"]
    assert all(len(a["result"]["prediction"]["top"]) == 2 for a in answers)


def test_websocket_stream_explain_and_a_bad_frame(tiny):
    from websockets.sync.client import connect

    server, _, _ = tiny
    with connect(_ws_url(server, "/v1/stream-explain"), open_timeout=30) as ws:
        ws.send(json.dumps({"frame": {"frameId": "1", "image": {"encoded": b64(b"nope")}}}))
        ws.send(json.dumps({"frame": {"frameId": "2",
                                      "image": {"encoded": b64(encode(PLAIN))}}}))
        bad, good = json.loads(ws.recv(timeout=60)), json.loads(ws.recv(timeout=60))
    assert bad["frameId"] == "1" and bad["error"]["code"] == 3
    assert good["frameId"] == "2" and good["result"]["maps"]


def test_websocket_message_that_is_not_a_request_ends_the_stream(tiny):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    server, _, http = tiny
    with connect(_ws_url(server, "/v1/stream-predict"), open_timeout=30) as ws:
        ws.send("{not json")
        last = json.loads(ws.recv(timeout=60))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
    assert last["error"]["code"] == 3 and "StreamPredictRequest" in last["error"]["message"]
    assert closed.value.rcvd.code == 1008
    serves(http)


def test_websocket_token_by_header_or_query():
    from websockets.sync.client import connect

    token = "ws-token"
    with running(model=TINY, http_port=0, auth_tokens=(token,)) as (server, _):
        url = _ws_url(server, "/v1/stream-predict")
        with connect(url, open_timeout=30) as ws:
            denied = json.loads(ws.recv(timeout=30))
        assert denied["error"]["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        for where in ({"additional_headers": {"Authorization": f"Bearer {token}"}},
                      {"uri": url + f"?access_token={token}"}):
            with connect(where.pop("uri", url), open_timeout=30, **where) as ws:
                for message in _frames(1):
                    ws.send(message)
                assert json.loads(ws.recv(timeout=60))["frameId"] == "1"



# --- large bodies, callers that leave, shutdown ------------------------------------------------


def test_a_body_over_1_mib_is_parsed_and_answers(tiny):
    _, _, http = tiny
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    image = encode(noise, "PNG")
    assert len(image) > 1 << 20
    answer = http.post("/v1/predict", json=predict_body(image))
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["imageSize"] == {"height": 700, "width": 700}


def test_a_client_that_goes_away_cancels_its_call(caplog):
    caplog.set_level(logging.INFO, logger="camserve_server.access")
    with running(model="python:tiny_models:slow_cnn", http_port=0, max_batch_size=1,
                 max_delay_ms=0) as (server, client):
        busy = threading.Thread(target=lambda: client.predict(PLAIN))
        busy.start()  # holds the worker for 0.3 s
        body = json.dumps(predict_body()).encode()
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nx-request-id: gone-1\r\nContent-Length: %d\r\n"
                         b"\r\n%s" % (len(body), body))
        busy.join(60)
        wait_for(lambda: "id=gone-1" in caplog.text, what="the access line")
        line = next(r for r in caplog.records if getattr(r, "request_id", "") == "gone-1")
        assert line.code == "CANCELLED"


def test_draining_lets_http_calls_in_flight_finish():
    from camserve_server.process.server import CamServer
    from camserve_server.process.settings import Settings

    server = CamServer(Settings(host="127.0.0.1", port=0, http_port=0,
                                model="python:tiny_models:slow_cnn", max_batch_size=1))
    server.start()
    answers = []

    def call():
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60) as h:
            answers.append(h.post("/v1/predict", json=predict_body()).status_code)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for caller in callers:
        caller.start()
    wait_for(lambda: server._recorder is not None and len(server._recorder.running) == 2,
             what="both calls running")
    server.stop(grace=10)
    for caller in callers:
        caller.join(60)
    assert answers == [200, 200]
    with pytest.raises(httpx.HTTPError):  # the port is closed
        httpx.get(f"http://127.0.0.1:{server.http_port}/v2/health/live", timeout=5)


def test_websocket_streams_share_max_streams_with_grpc():
    from websockets.sync.client import connect

    with running(model=TINY, http_port=0, max_streams=1) as (server, _):
        url = _ws_url(server, "/v1/stream-predict")
        with connect(url, open_timeout=30) as first:
            wait_for(lambda: server._service.open_streams == 1, what="the first stream open")
            with connect(url, open_timeout=30) as second:
                refused = json.loads(second.recv(timeout=30))["error"]
            assert refused["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            reasons = [d.get("reason") for d in refused["details"]]
            assert "TOO_MANY_STREAMS" in reasons
            assert any("retryDelay" in d for d in refused["details"])
            for message in _frames(1):  # the first stream still serves
                first.send(message)
            assert json.loads(first.recv(timeout=60))["frameId"] == "1"
