"""Several models and versions in one server: the repository on disk, routing by name and
version, answers equal to single-model servers, loading and unloading while serving, the bad
inputs of model management, and CompareExplain.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from camserve import CamserveError, Client
from camserve.v1 import camserve_pb2 as pb
from camserve_server.api import oip
from camserve_server.errors import StartupError
from camserve_server.process.server import CamServer
from camserve_server.process.settings import Settings

from conftest import TINY, running, wait_for

ADMIN = "admin-secret"


def tiny_weights(path: Path, seed: int) -> Path:
    """A state_dict of the tiny CNN with its own seeded weights."""
    import torch

    import tiny_models

    model = tiny_models.tiny_cnn()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_model(repo: Path, name: str, config: str, versions=()) -> Path:
    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(config)
    for version, seed in versions:
        tiny_weights(folder / str(version) / "weights.pth", seed)
    return folder


TINY_CONFIG = f'source = "{TINY}"\nlayers = ["features"]\n'


@pytest.fixture(scope="module")
def big_repo(tmp_path_factory, resnet_weights):
    """The default model and two versions of a seeded resnet18 (v2: other weights)."""
    import torch
    import torchvision

    repo = tmp_path_factory.mktemp("repo")
    (repo / "lite" / "1").mkdir(parents=True)
    (repo / "lite" / "config.toml").write_text('source = "efficientnet_lite0"\n')
    folder = repo / "resnet"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "weights.pth").write_bytes(resnet_weights.read_bytes())
    torch.manual_seed(99)
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(resnet_weights))
    with torch.no_grad():
        model.fc.weight.mul_(-1.0)  # version 2 ranks the classes the other way round
        model.fc.bias.mul_(-1.0)
    (folder / "2").mkdir()
    torch.save(model.state_dict(), folder / "2" / "weights.pth")
    (folder / "config.toml").write_text(
        'source = "torchvision:resnet18"\nlayers = ["layer4"]\nversion_policy = "all"\n')
    return repo


@pytest.fixture(scope="module")
def big_server(big_repo):
    with running(model_repository=str(big_repo), default_model="lite",
                 max_delay_ms=20) as pair:
        yield pair


def test_answers_equal_single_model_servers(big_server, default_server, resnet_server,
                                            cat_path):
    _, client = big_server
    states = {(m.name, m.version): (m.state, m.is_default) for m in client.models()}
    assert states == {("lite", 1): ("ready", True), ("resnet", 1): ("ready", False),
                      ("resnet", 2): ("ready", False)}
    lite = client.predict(cat_path)  # no model named: the default
    alone = default_server[1].predict(cat_path)
    assert lite.top[0].label == "Egyptian cat"
    np.testing.assert_allclose([c.logit for c in lite.top], [c.logit for c in alone.top],
                               atol=1e-5)
    one = client.explain(cat_path, model="resnet:1", layer="layer4")
    single = resnet_server[1].explain(cat_path, layer="layer4")
    assert one.target.index == single.target.index
    np.testing.assert_allclose(one.raw, single.raw, atol=1e-4 * np.abs(single.raw).max())
    np.testing.assert_allclose([c.logit for c in one.prediction.top],
                               [c.logit for c in single.prediction.top],
                               atol=1e-5)
    # No version: the newest ready one. v2's last layer is v1's negated.
    newest = client.predict(cat_path, model="resnet", top_k=1000)
    first = client.predict(cat_path, model="resnet", version=1, top_k=1000)
    by_index = {c.index: c.logit for c in first.top}
    assert all(abs(c.logit + by_index[c.index]) < 1e-3 for c in newest.top)
    info = client.model_info(model="resnet:2")
    assert (info.model, info.version, info.name) == ("resnet", 2, "torchvision:resnet18")
    assert client.model_info().model == "lite"


def test_health_and_oip_per_model(big_server, cat_path):
    server, client = big_server
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("lite", "resnet"):
            answer = health.Check(health_pb2.HealthCheckRequest(
                service=f"camserve.v1.CamserveService/{name}"), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        m = oip.messages()

        def call(name, request, response):
            return channel.unary_unary(f"/inference.GRPCInferenceService/{name}",
                                       request_serializer=lambda x: x.SerializeToString(),
                                       response_deserializer=response.FromString)(
                request, timeout=60)

        request = m.ModelInferRequest(model_name="resnet", model_version="1")
        tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(cat_path.read_bytes())
        answer = call("ModelInfer", request, m.ModelInferResponse)
        assert (answer.model_name, answer.model_version) == ("resnet", "1")
        probabilities = np.frombuffer(answer.raw_output_contents[0], np.float32)
        expected = client.predict(cat_path, model="resnet:1", top_k=3)
        np.testing.assert_allclose(probabilities[[c.index for c in expected.top]],
                                   [c.probability for c in expected.top], atol=1e-6)
        for version, ready in (("1", True), ("2", True), ("", True)):
            assert call("ModelReady", m.ModelReadyRequest(name="resnet", version=version),
                        m.ModelReadyResponse).ready is ready
        metadata = call("ModelMetadata", m.ModelMetadataRequest(name="resnet"),
                        m.ModelMetadataResponse)
        assert list(metadata.versions) == ["1", "2"]
        from camserve_server.oip.v2 import repository_pb2

        index = call("RepositoryIndex", repository_pb2.RepositoryIndexRequest(),
                     repository_pb2.RepositoryIndexResponse)
        assert [(x.name, x.version, x.state) for x in index.models] == [
            ("lite", "1", "READY"), ("resnet", "1", "READY"), ("resnet", "2", "READY")]
        with pytest.raises(grpc.RpcError) as caught:  # the server's models are fixed
            call("RepositoryModelLoad", repository_pb2.RepositoryModelLoadRequest(
                model_name="resnet"), repository_pb2.RepositoryModelLoadResponse)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control explicit" in caught.value.details()


def test_compare_versions(big_server, cat_path):
    _, client = big_server
    same = client.compare(cat_path, ["resnet:1", "resnet:1"])
    assert [s.spearman for s in same.similarities] == [pytest.approx(1.0, abs=1e-6)]
    compared = client.compare(cat_path, ["resnet:1", "resnet:2"], method=["gradcam", "eigencam"])
    one, two = compared.explanations
    # The same class on both (model 0's top class), each at its default layer.
    assert one.maps[0].target.index == two.maps[0].target.index == one.prediction.top[0].index
    pairs = {s.method: s.spearman for s in compared.similarities}
    assert set(pairs) == {"gradcam", "eigencam"}
    # EigenCAM does not see the head: v2 differs only there.
    assert pairs["eigencam"] == pytest.approx(1.0, abs=1e-5)
    assert pairs["gradcam"] < 0.9
    assert len(client.compare(cat_path, ["lite", "resnet"]).explanations) == 2  # both ImageNet
    with pytest.raises(CamserveError) as caught:
        client.compare(cat_path, ["resnet:1"])
    assert caught.value.reason == "TOO_FEW_MODELS"


def test_the_default_model_and_unknown_names(big_server, cat_path):
    _, client = big_server
    for model, reason, code, words in (
            ("nope", "UNKNOWN_MODEL", "NOT_FOUND", "loaded: lite:1, resnet:1, resnet:2"),
            ("resnet:7", "UNKNOWN_VERSION", "NOT_FOUND", "has no version 7; it has version 1, 2"),
            ("../etc", "BAD_MODEL_NAME", "INVALID_ARGUMENT", "no paths")):
        with pytest.raises(CamserveError) as caught:
            client.predict(cat_path, model=model)
        assert (caught.value.code.name, caught.value.reason) == (code, reason), model
        assert words in caught.value.details
    assert client.predict(cat_path).top[0].label == "Egyptian cat"  # still serving


def test_streams_on_a_named_model(big_server, cat_path):
    _, client = big_server
    answers = list(client.stream_predict([cat_path] * 3, model="resnet:1", top_k=1))
    single = client.predict(cat_path, model="resnet:1", top_k=1)
    assert [a.result.top[0].index for a in answers] == [single.top[0].index] * 3


# --- loading and unloading ---------------------------------------------------------------------


@pytest.fixture()
def tiny_repo(tmp_path):
    write_model(tmp_path, "a", TINY_CONFIG, [(1, 1)])
    write_model(tmp_path, "b", TINY_CONFIG + 'version_policy = "latest"\n', [(1, 2), (2, 3)])
    return tmp_path


def explicit(repo: Path, **overrides):
    return running(model_repository=str(repo), model_control="explicit", load_models=("a",),
                   admin_tokens=(ADMIN,), max_delay_ms=5, **overrides)


def admin_client(server) -> Client:
    return Client(f"127.0.0.1:{server.port}", token=ADMIN, timeout=120)


def test_load_and_unload_while_serving(tiny_repo, cat_path):
    with explicit(tiny_repo) as (server, client):
        assert [(m.name, m.version, m.state) for m in client.models()] == [
            ("a", 1, "ready"), ("b", 0, "unloaded")]
        with pytest.raises(CamserveError) as caught:
            client.predict(cat_path, model="b")
        assert caught.value.reason == "MODEL_NOT_LOADED"
        with pytest.raises(CamserveError) as caught:  # no admin token
            client.load_model("b")
        assert (caught.value.code.name, caught.value.reason) == ("PERMISSION_DENIED",
                                                                 "NOT_ADMIN")
        before = client.predict(cat_path, model="a")
        with admin_client(server) as admin:
            loaded = admin.load_model("b")
            assert [(m.version, m.state) for m in loaded] == [(2, "ready")]  # latest only
            two = client.predict(cat_path, model="b")
            with pytest.raises(CamserveError) as caught:
                client.predict(cat_path, model="b:1")
            assert caught.value.reason == "UNKNOWN_VERSION"
            # The same weights in a server of their own answer the same.
            with running(model=TINY, weights=str(tiny_repo / "b" / "2" / "weights.pth"),
                         layers=("features",)) as (_, alone):
                np.testing.assert_allclose([c.logit for c in two.top],
                                           [c.logit for c in alone.predict(cat_path).top],
                                           atol=1e-5)
            unloaded = admin.unload_model("b")
            assert [(m.version, m.state) for m in unloaded] == [(2, "unloaded")]
            with pytest.raises(CamserveError) as caught:
                client.predict(cat_path, model="b")
            assert caught.value.reason == "MODEL_NOT_LOADED"
            with pytest.raises(CamserveError) as caught:
                admin.unload_model("a")
            assert caught.value.reason in ("LAST_MODEL", "DEFAULT_MODEL")
            with pytest.raises(CamserveError) as caught:
                admin.load_model("../a")
            assert caught.value.reason == "BAD_MODEL_NAME"
            with pytest.raises(CamserveError) as caught:
                admin.load_model("zzz")
            assert caught.value.reason == "UNKNOWN_MODEL"
        after = client.predict(cat_path, model="a")
        np.testing.assert_allclose([c.logit for c in after.top], [c.logit for c in before.top],
                                   atol=1e-6)


def test_failed_loads_leave_the_others_serving(tiny_repo, cat_path):
    write_model(tiny_repo, "typo", TINY_CONFIG + "max_batch_sise = 4\n", [(1, 4)])
    write_model(tiny_repo, "noweights", TINY_CONFIG)
    (tiny_repo / "noweights" / "1").mkdir()
    write_model(tiny_repo, "nolayer", f'source = "{TINY}"\nlayers = ["nowhere"]\n', [(1, 5)])
    with explicit(tiny_repo) as (server, client), admin_client(server) as admin:
        with pytest.raises(CamserveError) as caught:
            admin.load_model("typo")
        assert caught.value.reason == "BAD_MODEL_CONFIG"
        assert "unknown key max_batch_sise" in caught.value.details
        with pytest.raises(CamserveError) as caught:
            admin.load_model("noweights")
        assert "noweights/1/weights.pth does not exist" in caught.value.details
        with pytest.raises(CamserveError) as caught:
            admin.load_model("nolayer")
        assert "nowhere" in caught.value.details
        failed = {(m.name, m.version): m for m in client.models() if m.state == "failed"}
        assert set(failed) == {("typo", 0), ("noweights", 1), ("nolayer", 1)}
        assert "max_batch_sise" in failed[("typo", 0)].error
        assert client.predict(cat_path, model="a").top  # everything else serves
        with pytest.raises(CamserveError) as caught:
            client.predict(cat_path, model="nolayer")
        assert caught.value.reason == "MODEL_FAILED"
        # Fixed, and loaded again.
        (tiny_repo / "typo" / "config.toml").write_text(TINY_CONFIG)
        assert [m.state for m in admin.load_model("typo")] == ["ready"]


def test_unloading_drains_the_calls_it_accepted(tiny_repo, cat_path):
    with explicit(tiny_repo) as (server, client), admin_client(server) as admin:
        admin.load_model("b")
        results, errors = [], []

        def caller():
            try:  # a Score-CAM of many channels: sliced forwards, a while
                results.append(client.explain(cat_path, model="b", method="scorecam",
                                              score_cam_channels=16))
            except CamserveError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        admin.unload_model("b")
        for t in threads:
            t.join()
        refused = [e for e in errors if e.reason in ("MODEL_UNLOADING", "MODEL_NOT_LOADED")]
        assert len(results) + len(refused) == 4 and len(errors) == len(refused), errors
        assert results  # the calls already accepted were answered


def test_poll_loads_new_versions_and_retires_old_ones(tiny_repo, cat_path):
    with running(model_repository=str(tiny_repo), model_control="poll",
                 repository_poll_s=0.2, max_delay_ms=5) as (server, client):
        assert [(m.name, m.version) for m in client.models(ready=True)] == [("a", 1), ("b", 2)]
        tiny_weights(tiny_repo / "b" / "3" / "weights.pth", 7)
        wait_for(lambda: [(m.version, m.state) for m in client.models() if m.name == "b"] ==
                 [(2, "unloaded"), (3, "ready")], 60, "version 3 to replace version 2")
        assert client.model_info(model="b").version == 3
        with pytest.raises(CamserveError) as caught:
            Client(f"127.0.0.1:{server.port}", token=ADMIN).load_model("a")
        assert caught.value.reason == "MODEL_CONTROL"


def test_the_bound_on_loaded_bytes(tiny_repo):
    with explicit(tiny_repo, max_models_bytes=10_000) as (server, client), \
            admin_client(server) as admin:
        size = client.models()[0].bytes
        assert 0 < size <= 10_000 < 2 * size
        with pytest.raises(CamserveError) as caught:
            admin.load_model("b")
        assert (caught.value.code.name, caught.value.reason) == ("RESOURCE_EXHAUSTED",
                                                                 "MODELS_FULL")
        assert "loaded: a:1" in caught.value.details


def test_startup_errors(tmp_path):
    with pytest.raises(StartupError, match="holds no model"):
        CamServer(Settings(port=0, model_repository=str(tmp_path))).start()
    write_model(tmp_path, "a", TINY_CONFIG, [(1, 1)])
    with pytest.raises(StartupError, match="--default-model 'x'"):
        CamServer(Settings(port=0, model_repository=str(tmp_path), default_model="x")).start()
    write_model(tmp_path, "a", TINY_CONFIG + "input_size = 7\n")
    with pytest.raises(StartupError, match="input_size must be a list of 2 numbers"):
        CamServer(Settings(port=0, model_repository=str(tmp_path))).start()


def test_the_repository_of_one_is_unchanged(tiny_server, cat_path):
    _, client = tiny_server
    assert [(m.name, m.version, m.state, m.is_default) for m in client.models()] == [
        ("camserve", 1, "ready", True)]
    assert client.predict(cat_path, model="camserve:1").top == client.predict(cat_path).top


def test_model_refs_in_the_client():
    from camserve import _calls

    assert _calls.model_ref(None) is None
    assert _calls.model_ref("resnet:2") == pb.ModelRef(name="resnet", version=2)
    assert _calls.model_ref("resnet", 3) == pb.ModelRef(name="resnet", version=3)
    for bad in ("resnet:x", "resnet:0"):
        with pytest.raises(CamserveError):
            _calls.model_ref(bad)


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_models_and_compare(big_server, cat_path, tmp_path, capsys):
    from camserve import cli

    server, _ = big_server
    target = ["--target", f"127.0.0.1:{server.port}"]
    assert cli.main(target + ["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["lite:1", "ready", "default"]
    assert [line.split()[0] for line in lines] == ["lite:1", "resnet:1", "resnet:2"]
    assert cli.main(target + ["info", "--model", "resnet:2"]) == 0
    assert "model:        resnet:2 torchvision:resnet18" in capsys.readouterr().out
    assert cli.main(target + ["predict", str(cat_path), "--model", "resnet:1", "--top-k",
                              "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{cat_path}: ")
    out = tmp_path / "out"
    assert cli.main(target + ["explain", str(cat_path), "-o", str(out), "--model", "resnet:1",
                              "--model", "resnet:2", "--method", "gradcam", "--method",
                              "eigencam", "--grid"]) == 0
    printed = capsys.readouterr().out
    assert "eigencam: resnet:1 vs resnet:2: Spearman 1.000" in printed
    assert (out / "chelsea.resnet-v1.overlay.png").exists()
    assert (out / "chelsea.resnet-v2.overlay.png").exists()
    from PIL import Image

    grid = Image.open(out / "chelsea.models.grid.png")
    assert grid.size[1] > 2 * 224  # one grid per model, stacked
    assert cli.main(target + ["predict", str(cat_path), "--model", "a", "--model", "b"]) == 1
    assert "takes one --model" in capsys.readouterr().err


def test_cli_load_and_unload(tiny_repo, capsys):
    from camserve import cli

    with explicit(tiny_repo) as (server, _):
        target = ["--target", f"127.0.0.1:{server.port}"]
        assert cli.main(target + ["load", "b"]) == 1
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        assert cli.main(target + ["--token", ADMIN, "load", "b"]) == 0
        assert capsys.readouterr().out.split() == ["b:2", "ready"]
        assert cli.main(target + ["--token", ADMIN, "unload", "b:2"]) == 0
        assert capsys.readouterr().out.split() == ["b:2", "unloaded"]
        assert cli.main(target + ["models", "--json"]) == 0
        import json

        listed = json.loads(capsys.readouterr().out)
        assert [(m["name"], m["version"], m["state"]) for m in listed] == [
            ("a", 1, "ready"), ("b", 2, "unloaded")]


def test_metrics_and_access_log_name_the_model(big_server, cat_path, caplog):
    import logging

    server, client = big_server
    with caplog.at_level(logging.INFO, logger="camserve_server.access"):
        client.predict(cat_path, model="resnet:2")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Predict"))
    assert line.endswith("model=resnet:2")
    assert caplog.records[-1].model == "resnet:2"
    value = server.metrics.registry.get_sample_value(
        "camserve_model_requests_total",
        {"model": "resnet", "version": "2", "rpc": "Predict", "code": "OK"})
    assert value and value >= 1


def test_the_device_goes_to_models_in_the_order_they_asked():
    """Two models' workers on one device: each runs one batch while it holds the gate, and a
    worker that asks again queues behind the one already waiting (a busy model cannot run two
    batches while a quiet one waits)."""
    from camserve_server.batching.gate import DeviceGate

    gate, order = DeviceGate(), []
    holding = threading.Event()

    def busy():
        for i in range(3):
            with gate.turn():
                order.append(f"busy{i}")
                if i == 0:
                    holding.set()
                    wait_for(lambda: gate._next == 2, 10, "the quiet model to ask")

    def quiet():
        holding.wait()
        with gate.turn():
            order.append("quiet")

    threads = [threading.Thread(target=busy), threading.Thread(target=quiet)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order[:2] == ["busy0", "quiet"]


def test_the_docs_configs_load(tmp_path):
    """Every toml block of docs/models.md is a config the repository reads."""
    import re

    from camserve_server.engine.spec import ModelSpec
    from camserve_server.models.config import Repository, Serving

    page = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", page, re.S)
    assert len(blocks) >= 2
    serving = Serving(max_batch_size=8, max_delay_ms=0.0, max_queue=256, device="cpu",
                      precision="fp32")
    for i, block in enumerate(blocks):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "config.toml").write_text(block)
        (folder / "labels.txt").write_text("a\nb\n")
        config = Repository(tmp_path, ModelSpec(), serving, "camserve").config(folder.name)
        assert config.spec.source in block
    assert config.serving.max_batch_size == 16  # the second block's own batching


def test_the_async_client_manages_models(tiny_repo, cat_path):
    import asyncio

    from camserve import AsyncClient

    with explicit(tiny_repo) as (server, _):
        async def go():
            async with AsyncClient(f"127.0.0.1:{server.port}", token=ADMIN) as client:
                loaded = await client.load_model("b")
                answer = await client.predict_many([cat_path], model="b", priority=1)
                info = await client.model_info(model="b")
                unloaded = await client.unload_model("b")
                return loaded, answer, info, unloaded, await client.models()

        loaded, answer, info, unloaded, listed = asyncio.run(go())
        assert [m.state for m in loaded] == ["ready"] and answer[0].top
        assert (info.model, info.version) == ("b", 2)
        assert [m.state for m in unloaded] == ["unloaded"]
        assert [(m.name, m.state) for m in listed] == [("a", "ready"), ("b", "unloaded")]
