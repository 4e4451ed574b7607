"""Streaming: StreamPredict / StreamExplain through real servers, the client API and the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from camserve import AsyncClient, CamserveError, Client, Frame
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc
from camserve.video import read_frames

import tiny_models
from conftest import running

SLOW = "python:tiny_models:slow_cnn"
CLI = str(Path(sys.executable).parent / "camserve")


@pytest.fixture(scope="module")
def synthetic_video(tmp_path_factory, cat):
    """36 frames (320x240, 10 fps) of the cat photo moving left to right, made here."""
    path = tmp_path_factory.mktemp("video") / "moving-cat.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    small = cv2.resize(cat, (160, 106))
    for i in range(36):
        canvas = np.full((240, 320, 3), 40, np.uint8)
        x = i * 160 // 35
        canvas[60:166, x:x + 160] = small
        writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_all_policy_answers_every_frame_in_order_like_unary(default_server, synthetic_video):
    _, client = default_server
    frames = list(read_frames(str(synthetic_video)))
    assert len(frames) == 36
    results = list(client.stream_explain(frames, top_k=3))
    assert [r.frame_id for r in results] == list(range(36))
    assert all(r.ok and r.skipped == 0 for r in results)
    for frame, r in zip(frames[::5], results[::5]):  # each equals the same frame sent unary
        unary = client.explain(frame, top_k=3)
        assert r.result.target.index == unary.target.index
        np.testing.assert_allclose(r.result.raw, unary.raw, atol=1e-5)
        np.testing.assert_allclose([c.logit for c in r.result.prediction.top],
                                   [c.logit for c in unary.prediction.top], atol=1e-5)
    # The heatmap follows the cat from left to right.
    first, last = results[0].result.heatmap, results[-1].result.heatmap
    columns = np.arange(first.shape[1])
    assert (last.sum(0) @ columns) / last.sum() > (first.sum(0) @ columns) / first.sum() + 60


def test_cli_stream_writes_every_frame(default_server, synthetic_video, tmp_path):
    server, _ = default_server
    out = tmp_path / "annotated.mp4"
    done = subprocess.run([CLI, "--target", f"127.0.0.1:{server.port}", "stream",
                           str(synthetic_video), "-o", str(out), "--explain"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "frames sent 36, answered 36, skipped 0, failed 0" in done.stdout
    assert "latency p50" in done.stdout
    written = cv2.VideoCapture(str(out))
    assert int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == 36
    ok, frame = written.read()
    assert ok and frame.shape == (240, 320, 3)


def test_latest_policy_under_overload():
    """Frames sent much faster than a slow model serves them: at most one waits per stream
    (so no batch holds two of its frames), answered + skipped = sent, the last is answered."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(40)]
    with running(model=SLOW, max_batch_size=8, max_delay_ms=0) as (server, client):
        tiny_models.SlowNet.batches.clear()
        results = list(client.stream_predict(frames, policy="latest"))
        batches = list(tiny_models.SlowNet.batches)
        skipped_metric = server.metrics.value("camserve_items_dropped_total", reason="skipped")
    answered = len(results)
    skipped = sum(r.skipped for r in results)
    assert answered + skipped == 40
    assert skipped > 20, "the model kept up: the test did not overload it"
    assert results[-1].frame_id == 39
    assert [r.frame_id for r in results] == sorted(r.frame_id for r in results)
    assert max(batches) == 1, batches  # never two frames of the stream in one batch
    assert len(batches) == answered
    assert skipped_metric == skipped


def test_latest_policy_counts_the_skipped_frames_before_each_answer():
    """`skipped` counts the frames dropped since the previous answer (the proto's meaning):
    an answer's skipped is the number of frames between the previous answered frame and its
    own, so the counts sum to the frames sent minus the frames answered."""
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(30)]
    with running(model=SLOW, max_batch_size=8, max_delay_ms=0) as (_, client):
        results = list(client.stream_predict(frames, policy="latest"))
    ids = [r.frame_id for r in results]
    assert len(results) < len(frames), "the model kept up: the test did not overload it"
    assert sum(r.skipped for r in results) == len(frames) - len(results)
    previous = [-1] + ids[:-1]
    assert [r.skipped for r in results] == [i - p - 1 for i, p in zip(ids, previous)], \
        list(zip(ids, (r.skipped for r in results)))


def test_bad_frames_and_changing_options_keep_the_stream_going(tiny_server):
    _, client = tiny_server
    good = np.full((64, 64, 3), 120, np.uint8)
    frames = [good, b"not an image", Frame(good, 10, {"target": 7}), Frame(good, 11),
              Frame(good, 12, {"layer": "nope"}),
              Frame(good, 13, {"target": 2})]
    results = list(client.stream_explain(frames))
    assert [r.frame_id for r in results] == [0, 1, 10, 11, 12, 13]
    assert results[1].error.code.name == "INVALID_ARGUMENT" and "frame.image" in \
        results[1].error.details
    assert results[1].error.field_violations[0][0] == "frame.image"
    assert results[2].result.target.index == 7 and results[5].result.target.index == 2
    assert results[4].error.code.name == "INVALID_ARGUMENT" and "nope" in results[4].error.details
    assert results[3].ok and results[0].ok


def test_policy_can_only_be_set_on_the_first_frame(tiny_server):
    server, _ = tiny_server
    raw = pb.Image(raw=pb.RawImage(pixels=bytes(48), height=4, width=4, channels=3))

    def config(policy):
        return pb.StreamPredictRequest(config=pb.StreamPredictConfig(policy=policy))

    def frame(n):
        return pb.StreamPredictRequest(frame=pb.StreamFrame(frame_id=n, image=raw))

    requests = [config(pb.STREAM_POLICY_ALL), frame(0), config(pb.STREAM_POLICY_LATEST), frame(1),
                config(pb.STREAM_POLICY_UNSPECIFIED), frame(2)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answers = list(pb_grpc.CamserveServiceStub(channel).StreamPredict(iter(requests),
                                                                          timeout=60))
    assert [a.WhichOneof("outcome") for a in answers] == ["result", "error", "result"]
    assert "policy" in answers[1].error.message
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_eight_streams_and_unary_load_stay_apart(resnet_server):
    server, client = resnet_server
    rng = np.random.default_rng(5)
    streams = [[rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(6)]
               for _ in range(8)]
    expected = {(s, i): client.predict(frame, top_k=3)
                for s, frames in enumerate(streams) for i, frame in enumerate(frames)}
    got, errors = {}, []
    stop = threading.Event()

    def stream(s):
        try:
            with Client(f"127.0.0.1:{server.port}") as c:
                for r in c.stream_predict(streams[s], top_k=3):
                    got[(s, r.frame_id)] = r
        except Exception as exc:  # reported below
            errors.append(exc)

    def unary():
        with Client(f"127.0.0.1:{server.port}") as c:
            while not stop.is_set():
                assert c.explain(streams[0][0]).raw is not None

    loaders = [threading.Thread(target=unary) for _ in range(3)]
    threads = [threading.Thread(target=stream, args=(s,)) for s in range(8)]
    for t in loaders + threads:
        t.start()
    for t in threads:
        t.join(600)
    stop.set()
    for t in loaders:
        t.join(600)
    assert not errors, errors
    assert set(got) == set(expected)
    for key, r in got.items():
        assert r.ok and [c.index for c in r.result.top] == [c.index for c in expected[key].top]
        np.testing.assert_allclose([c.logit for c in r.result.top],
                                   [c.logit for c in expected[key].top], atol=1e-5)


def test_client_killed_mid_stream_frees_its_frames(tmp_path):
    """A client process streaming to a slow model is killed; the server withdraws its queued
    frames at once and keeps serving another caller."""
    with running(model=SLOW, max_batch_size=1, max_delay_ms=0,
                 max_stream_frames_in_flight=8) as (server, client):
        script = textwrap.dedent(f"""
            import numpy as np, sys
            from camserve import Client
            frames = (np.full((224, 224, 3), i % 250, np.uint8) for i in range(1000))
            with Client("127.0.0.1:{server.port}") as c:
                for r in c.stream_predict(frames):
                    print(r.frame_id, flush=True)
        """)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 text=True, env=dict(os.environ))
        assert child.stdout.readline().strip() == "0"
        tiny_models.SlowNet.batches.clear()
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        deadline = time.monotonic() + 30
        while server.metrics.value("camserve_items_dropped_total", reason="cancelled") == 0 and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metrics.value("camserve_items_dropped_total", reason="cancelled") >= 1
        ran_after_kill = len(tiny_models.SlowNet.batches)
        assert client.predict(np.full((224, 224, 3), 9, np.uint8)).top  # others are served
        # At most the frames already running or admitted when the kill was noticed ran.
        assert ran_after_kill <= 2, tiny_models.SlowNet.batches


def test_async_streams(tiny_server):
    server, _ = tiny_server
    frames = [np.full((32, 32, 3), v, np.uint8) for v in (10, 80, 160, 240)]

    async def produce():
        for frame in frames:
            yield frame
            await asyncio.sleep(0)

    async def main():
        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            predicted = [r async for r in client.stream_predict(produce())]
            explained = [r async for r in client.stream_explain(frames, target=1)]
            return predicted, explained

    predicted, explained = asyncio.run(main())
    assert [r.frame_id for r in predicted] == [0, 1, 2, 3] and all(r.ok for r in predicted)
    assert all(r.result.target.index == 1 for r in explained)


def test_stream_options_are_checked_before_sending(tiny_server):
    _, client = tiny_server
    with pytest.raises(CamserveError):
        list(client.stream_predict([np.zeros((4, 4, 3), np.uint8)], policy="sometimes"))
    with pytest.raises(CamserveError):
        list(client.stream_explain([np.zeros((4, 4, 3), np.uint8)], method="nope"))
