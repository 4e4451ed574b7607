"""camserve beside tritonclient[grpc] in one process: both import, and a real camserve server
answers camserve.Client while tritonclient's gRPC stubs share the same grpcio and protobuf.

`make test-compat` runs this at the oldest supported versions; without tritonclient (.venv, whose
protobuf is newer than any tritonclient allows) it is skipped."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY, running

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")


def test_camserve_and_tritonclient_in_one_process():
    import google.protobuf
    import grpc
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

        # tritonclient's stub reaches the same server over the same grpcio: it gets an answer at
        # the gRPC level (UNIMPLEMENTED until camserve serves the inference protocol).
        triton = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            assert triton.is_server_live() in (True, False)
        except InferenceServerException as error:
            assert "UNIMPLEMENTED" in str(error.status()), error
        finally:
            triton.close()
        assert client.predict(pixels).top  # camserve still answers
    print("protobuf", google.protobuf.__version__, "grpcio", grpc.__version__)
