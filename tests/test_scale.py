"""Many streams on one server: idle streams cost no thread and delay no unary call, a stream
that never sends a frame is ended by --stream-idle-s (DEADLINE_EXCEEDED) and gives its slot
back, streams beyond --max-streams are refused with a retry hint; --max-connection-age-s closes
connections without failing calls; automatic thread and worker counts follow the CPUs this
process may use (its affinity), not the host's."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest
from grpc import aio

from camserve import AsyncClient, CamserveError, Client
from camserve.v1 import camserve_pb2_grpc as pb_grpc
from camserve_server.process import server as server_module
from camserve_server.process import settings as settings_module
from camserve_server.process.settings import Settings, parse_settings

from conftest import TINY, running, wait_for

IDLE_STREAMS = 300


async def _silent(forever: asyncio.Event):
    """A stream's requests: none, until the test ends."""
    await forever.wait()
    return
    yield  # an async generator that never yields


async def _idle_streams_and_one_predict(port: int, server, photo: bytes):
    forever = asyncio.Event()
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CamserveServiceStub(channel)
        calls = [stub.StreamPredict(_silent(forever), timeout=120) for _ in range(IDLE_STREAMS)]
        drained = [asyncio.ensure_future(_codes(call)) for call in calls]
        await asyncio.get_running_loop().run_in_executor(
            None, wait_for, lambda: server._service.open_streams == IDLE_STREAMS, 30.0)

        # Every slot is taken: one stream more is refused at once, with a retry hint.
        extra = stub.StreamPredict(_silent(forever), timeout=30)
        with pytest.raises(aio.AioRpcError) as refused:
            async for _ in extra:
                pass
        error = CamserveError.from_rpc_error(refused.value, "test")
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "TOO_MANY_STREAMS" and error.retry_after > 0

        # A unary call is answered while all of them are open.
        async with AsyncClient(f"127.0.0.1:{port}", timeout=60) as client:
            prediction = await client.predict(photo, top_k=3)
        assert len(prediction.top) == 3 and prediction.image_size == (300, 451)
        assert server._service.open_streams == IDLE_STREAMS  # still open when it was answered

        codes = await asyncio.gather(*drained)  # ended by --stream-idle-s
        forever.set()
    return codes


async def _codes(call) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_idle_streams_do_not_delay_unary_calls_and_end_after_stream_idle_s(cat_path):
    with running(model=TINY, max_streams=IDLE_STREAMS, stream_idle_s=6.0) as (server, client):
        codes = asyncio.run(_idle_streams_and_one_predict(server.port, server,
                                                           cat_path.read_bytes()))
        assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == IDLE_STREAMS
        # Nothing is left behind: every slot is free, nothing queued, a new stream works.
        wait_for(lambda: server._service.open_streams == 0)
        assert server.batcher.depth() == 0
        answers = list(client.stream_predict([cat_path.read_bytes()] * 3, top_k=1))
        assert [a.frame_id for a in answers] == [0, 1, 2] and all(a.ok for a in answers)


def test_calls_keep_answering_across_max_connection_age(cat_path):
    photo = cat_path.read_bytes()
    with running(model=TINY, max_connection_age_s=0.5, max_connection_age_grace_s=0.5) as (
            server, _):
        with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
            answered = 0
            for _ in range(6):  # over about 3 connection ages
                answered += len(client.predict(photo, top_k=1).top)
                time.sleep(0.5)
        assert answered == 6


def test_connection_age_flags():
    s = parse_settings(["--max-connection-age-s", "300", "--max-connection-age-grace-s", "5"],
                       environ={})
    assert (s.max_connection_age_s, s.max_connection_age_grace_s) == (300.0, 5.0)
    assert parse_settings([], environ={}).max_connection_age_s == 0  # off by default
    with pytest.raises(ValueError):
        Settings(max_connection_age_s=-1)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")
def test_automatic_counts_follow_cpu_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert settings_module.usable_cpus() == 1
    assert server_module.torch_threads(Settings()) == 1
    assert server_module.decode_threads(Settings()) == 2  # at least 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert server_module.torch_threads(Settings(workers=2)) == min(
        6, settings_module.usable_cpus()) // 2
    assert server_module.torch_threads(Settings(torch_threads=5)) == 5
    cores = min(6, settings_module.usable_cpus())
    # Two CPU engines in one process (--device cpu,cpu) split the cores between them.
    assert server_module.torch_threads(Settings(device="cpu,cpu")) == max(1, cores // 2)
    assert server_module.torch_threads(Settings(workers=2, device="cpu, cpu")) == max(
        1, cores // 4)
    assert server_module.torch_threads(Settings(device="cuda:0,cuda:1")) == cores


def test_openmp_spin_is_shortened_unless_the_environment_sets_it(monkeypatch):
    # A private environment: the one this test process runs in keeps its own values.
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    monkeypatch.setattr(server_module.os, "environ", env)
    server_module.openmp_defaults()
    assert env["GOMP_SPINCOUNT"] == server_module.GOMP_SPINCOUNT == "30000"
    env["GOMP_SPINCOUNT"] = "300000"
    server_module.openmp_defaults()
    assert env["GOMP_SPINCOUNT"] == "300000"  # the operator's value stays
    del env["GOMP_SPINCOUNT"]
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    server_module.openmp_defaults()
    assert "GOMP_SPINCOUNT" not in env  # a wait policy is a choice too


def test_cpu_quota_caps_the_count(monkeypatch, tmp_path):
    real_open = open
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs: 2 threads

    def fake_open(path, *args, **kwargs):
        if path == "/sys/fs/cgroup/cpu.max":
            path = quota
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr("builtins.open", fake_open)
    assert settings_module.usable_cpus() == 2
    quota.write_text("max 100000\n")
    assert settings_module.usable_cpus() == 8

