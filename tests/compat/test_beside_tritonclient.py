"""camserve beside tritonclient[grpc] in one process: both import, and a real camserve server
answers camserve.Client while tritonclient's gRPC stubs share the same grpcio and protobuf.

`make test-compat` runs this at the oldest supported versions; without tritonclient (.venv, whose
protobuf is newer than any tritonclient allows) it is skipped."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from conftest import TINY, running

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")


def test_camserve_and_tritonclient_in_one_process():
    import google.protobuf
    from tritonclient.grpc import service_pb2 as triton_pb2
    from tritonclient.utils import InferenceServerException

    import camserve
    from camserve.v1 import camserve_pb2

    # Both sets of generated messages live in the same default descriptor pool.
    request = triton_pb2.ModelInferRequest(model_name="tiny", id="7")
    assert triton_pb2.ModelInferRequest.FromString(request.SerializeToString()).id == "7"
    assert camserve_pb2.DESCRIPTOR.services_by_name

    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    with running(model=TINY) as (server, client):
        assert isinstance(client, camserve.Client)
        prediction = client.predict(pixels, top_k=2)
        assert len(prediction.top) == 2
        assert 0.0 <= prediction.best.probability <= 1.0

        # tritonclient's stub reaches the same server over the same grpcio: camserve serves the
        # inference protocol on the same port (tests/test_oip.py tests it in depth).
        triton = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            assert triton.is_server_live() is True and triton.is_model_ready("camserve") is True
            with pytest.raises(InferenceServerException) as caught:
                triton.is_model_ready("no-such-model")
            assert "NOT_FOUND" in str(caught.value.status()), caught.value
        finally:
            triton.close()
        assert client.predict(pixels).top  # camserve still answers
    print("protobuf", google.protobuf.__version__, "grpcio", grpc.__version__)


HEALTH_NAMES = ("", "camserve.v1.CamserveService", "inference.GRPCInferenceService")


def test_health_at_this_grpcio():
    """The health service answers Check for the server and each API at every supported
    grpcio-health-checking."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with running(model=TINY) as (server, client):
        client.wait_until_ready(60)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            statuses = {name: health.Check(health_pb2.HealthCheckRequest(service=name),
                                           timeout=10).status for name in HEALTH_NAMES}
    assert statuses == dict.fromkeys(HEALTH_NAMES, health_pb2.HealthCheckResponse.SERVING)


def test_health_list_where_the_protocol_has_it():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not hasattr(health_pb2, "HealthListRequest"):
        pytest.skip("this grpcio-health-checking (1.81 or older) has no Health.List; camserve "
                    "serves Check and Watch there")
    with running(model=TINY) as (server, client):
        client.wait_until_ready(60)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(),
                                                              timeout=10).statuses
    # The server, each API, and each model (the repository of one's: camserve).
    assert {name: s.status for name, s in listed.items()} == dict.fromkeys(
        (*HEALTH_NAMES, "camserve.v1.CamserveService/camserve"),
        health_pb2.HealthCheckResponse.SERVING)
