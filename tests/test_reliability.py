"""Load shedding, deadlines, cancellation, faults, worker restarts and readiness, through real
servers. Asserted by statuses and counts, never by wall-clock times."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from camserve import CamserveError, Client
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc
from camserve_server.process.server import CamServer
from camserve_server.process.settings import Settings

import tiny_models
from conftest import running

FAULTY = "python:tiny_models:faulty_cnn"
SLOW = "python:tiny_models:slow_cnn"
PLAIN = np.full((224, 224, 3), 128, np.uint8)


def dropped(server, reason):
    return server.metrics.value("camserve_items_dropped_total", reason=reason)


def concurrently(calls):
    """Run the calls at once; each result is its return value or the CamserveError raised."""
    results = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except CamserveError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_full_queue_answers_resource_exhausted_with_a_retry_hint():
    with running(model=SLOW, max_batch_size=1, max_queue=2, max_delay_ms=0) as (server, client):
        with Client(f"127.0.0.1:{server.port}", retries=0) as once:
            results = concurrently([lambda: once.predict(PLAIN)] * 8)
        refused = [r for r in results if isinstance(r, CamserveError)]
        answered = [r for r in results if not isinstance(r, CamserveError)]
        assert refused and answered and len(refused) + len(answered) == 8
        for error in refused:
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.retry_after is not None and error.retry_after > 0
            assert error.reason == "QUEUE_FULL" and "retry in" in error.details
        # The default client retries after the server's hint, within the call's deadline.
        retried = concurrently([lambda: client.predict(PLAIN, timeout=60)] * 6)
        assert not [r for r in retried if isinstance(r, CamserveError)], retried


def test_deadline_too_short_is_refused_before_compute():
    with running(model=SLOW) as (server, client):
        before = len(tiny_models.SlowNet.batches)
        with pytest.raises(CamserveError) as error:
            client.predict(PLAIN, timeout=0.2)  # reaches the queue, less than a batch left
        assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert dropped(server, "deadline") == 1
        assert len(tiny_models.SlowNet.batches) == before, "the refused item was computed"
        assert client.predict(PLAIN, timeout=30).top


def test_items_of_a_cancelled_call_are_dropped_before_compute():
    with running(model=SLOW, max_batch_size=1, max_delay_ms=0) as (server, client):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.CamserveServiceStub(channel)
            request = pb.PredictRequest(images=[pb.Image(raw=pb.RawImage(
                pixels=PLAIN.tobytes(), height=224, width=224, channels=3))])
            busy = stub.Predict.future(request)  # occupies the worker for 0.3 s
            time.sleep(0.05)
            before = len(tiny_models.SlowNet.batches)
            waiting = stub.Predict.future(request)
            time.sleep(0.05)
            waiting.cancel()
            busy.result(timeout=30)
            assert client.predict(PLAIN).top  # served after the cancelled one would have been
        assert dropped(server, "cancelled") == 1
        assert len(tiny_models.SlowNet.batches) == before + 1  # the next call only


def test_exception_fails_only_its_own_batch():
    with running(model=FAULTY, max_batch_size=4, max_delay_ms=2000) as (server, client):
        batch = concurrently([lambda: client.predict(tiny_models.marked(tiny_models.RAISE))]
                             + [lambda: client.predict(PLAIN)] * 3)
        for result in batch:
            assert isinstance(result, CamserveError)
            assert result.code == grpc.StatusCode.INTERNAL
            assert "RuntimeError: marked input" in result.details
        assert client.predict(PLAIN).top  # the next batch is served
        assert server.metrics.value("camserve_batch_failures_total", reason="exception") == 1


def test_non_finite_output_fails_only_its_item():
    with running(model=FAULTY, max_batch_size=3, max_delay_ms=2000) as (server, client):
        results = concurrently([lambda: client.predict(tiny_models.marked(tiny_models.NAN)),
                                lambda: client.predict(PLAIN), lambda: client.explain(PLAIN)])
    assert isinstance(results[0], CamserveError)
    assert results[0].code == grpc.StatusCode.INTERNAL and "not finite" in results[0].details
    assert results[1].top and results[2].raw is not None
    assert results[1].timing.batch_size == 3


def test_out_of_memory_splits_the_batch_and_answers_everything():
    tiny_models.FaultyNet.batches.clear()
    with running(model=FAULTY, max_batch_size=4, max_delay_ms=2000) as (server, client):
        tiny_models.FaultyNet.batches.clear()
        results = concurrently([lambda: client.explain(tiny_models.marked(tiny_models.OOM))]
                               + [lambda: client.predict(PLAIN)] * 3)
        assert not [r for r in results if isinstance(r, CamserveError)], results
        assert server.metrics.value("camserve_oom_splits_total") >= 2  # 4 -> 2 + 2 -> 1 + 1 + 2
    assert tiny_models.FaultyNet.batches[0] == 4 and 1 in tiny_models.FaultyNet.batches
    assert sorted(r.timing.batch_size for r in results)[0] == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_worker_that_dies_is_restarted_and_health_follows():
    with running(model=FAULTY) as (server, client):
        statuses = []
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="camserve.v1.CamserveService"))

        def follow():
            try:
                for answer in watch:
                    statuses.append(answer.status)
            except grpc.RpcError:
                pass  # cancelled at the end of the test

        follower = threading.Thread(target=follow)
        follower.start()
        with pytest.raises(CamserveError) as error:
            client.predict(tiny_models.marked(tiny_models.DIE))
        assert error.value.code == grpc.StatusCode.INTERNAL
        assert "worker died" in error.value.details
        assert client.predict(PLAIN).top  # a new worker serves
        assert server.metrics.value("camserve_worker_restarts_total") == 1
        deadline = time.monotonic() + 10
        while statuses[-1:] != [health_pb2.HealthCheckResponse.SERVING] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        watch.cancel()
        follower.join(10)
        channel.close()
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    assert statuses[0] == serving and not_serving in statuses and statuses[-1] == serving


def test_readiness_loading_serving_draining():
    server = CamServer(Settings(host="127.0.0.1", port=0, http_port=None,
                                model="python:tiny_models:"
                                "slow_loading_cnn"))
    port = server.listen()
    loader = threading.Thread(target=server.load)
    loader.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            assert client.model_info().state == "loading"
            with pytest.raises(CamserveError) as error:
                client.predict(PLAIN)
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
                info = client.wait_until_ready(60)
                assert info.state == "serving" and info.labels
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            server._on_loop(server._set_state(pb.SERVER_STATE_DRAINING))  # stop() does this
            assert client.model_info().state == "draining"
            with pytest.raises(CamserveError) as error:
                client.predict(PLAIN)
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        loader.join()
        server.stop(grace=1)
