"""What one caller can make the server hold or do (issue: abuse bounds). Expensive explanations
run in slices between batches; a gone caller's work stops at the next slice; an unread LATEST
stream holds a few frames; SIGTERM during long work exits 0. Asserted by codes, counts and
order, never by wall-clock times."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from test_server_process import start

from camserve import CamserveError, Client
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc
from camserve_server.batching.batcher import Batcher
from camserve_server.domain import ExplainSpec, ItemResult, WorkItem
from camserve_server.errors import Cancelled, DeadlineExceeded, QueueFull, Unavailable

import tiny_models
from conftest import running, wait_for

SLOW = "python:tiny_models:slow_cnn"
PLAIN = np.full((32, 32, 3), 100, np.uint8)


# --- the batcher's job lane, with a fake engine -----------------------------------------------

def _result() -> ItemResult:
    return ItemResult(np.zeros(2, np.float32), np.full(2, 0.5, np.float32), ())


class FakeEngine:
    """Items with an explain spec become jobs of ``slices`` slices; every step is logged."""

    def __init__(self, slices: int = 5, gate: threading.Event = None,
                 pause_s: float = 0.0) -> None:
        self.slices, self.log, self.gate, self.pause_s = slices, [], gate, pause_s

    def run_batch(self, works):
        self.log.append(("batch", len(works)))
        return [self._job(w) if w.explain is not None else _result() for w in works]

    def _job(self, work):
        for i in range(self.slices):
            if self.gate is not None:
                self.gate.wait(30)
            time.sleep(self.pause_s)
            self.log.append(("slice", int(work.pixels[0, 0, 0]), i))
            yield 16
        return _result()


def _item(mark: int, expensive: bool) -> WorkItem:
    spec = ExplainSpec(methods=("gradcam",), layers=("x",), faithfulness_steps=15) \
        if expensive else None  # 32 extra forwards: 2 slices' worth
    return WorkItem(np.full((4, 4, 3), mark, np.uint8), spec)


def _batcher(engine: FakeEngine, **kwargs) -> Batcher:
    options = dict(max_batch_size=4, max_delay_ms=0, max_queue=16)
    options.update(kwargs)
    batcher = Batcher(engine.run_batch, **options)
    batcher.start()
    return batcher


def test_a_batch_runs_between_the_slices_of_an_expensive_item():
    gate = threading.Event()
    engine = FakeEngine(slices=6, gate=gate)
    batcher = _batcher(engine)
    try:
        expensive = batcher.submit(_item(1, True))
        while not engine.log:  # its batch ran; its first slice waits for the gate
            time.sleep(0.01)
        cheap = batcher.submit(_item(2, False))
        gate.set()
        assert cheap.result(30).result is not None
        assert expensive.result(30).result is not None
    finally:
        batcher.stop(10)
    slices = [i for i, step in enumerate(engine.log) if step[0] == "slice"]
    second_batch = engine.log.index(("batch", 1), 1)
    # The cheap item's batch ran after the first slice and before the last one.
    assert slices[0] < second_batch < slices[-1], engine.log


def test_a_withdrawn_job_stops_at_its_next_slice():
    gate = threading.Event()
    engine = FakeEngine(slices=50, gate=gate)
    batcher = _batcher(engine)
    try:
        ticket = batcher.submit(_item(1, True))
        while not engine.log:
            time.sleep(0.01)
        assert not ticket.withdraw()  # it runs: it cannot leave the queue, it is abandoned
        gate.set()
        with pytest.raises(Cancelled):
            ticket.result(30)
    finally:
        batcher.stop(10)
    assert sum(step[0] == "slice" for step in engine.log) <= 1


def test_a_job_whose_deadline_passes_stops_and_says_so():
    engine = FakeEngine(slices=100, pause_s=0.05)
    batcher = _batcher(engine, batch_seconds=0.001)
    try:
        ticket = batcher.submit(_item(1, True), deadline=time.monotonic() + 0.5)
        with pytest.raises(DeadlineExceeded):
            ticket.result(30)
    finally:
        batcher.stop(10)
    assert sum(step[0] == "slice" for step in engine.log) < 100


def test_stopping_abandons_jobs_with_unavailable():
    gate = threading.Event()
    engine = FakeEngine(slices=50, gate=gate)
    batcher = _batcher(engine)
    ticket = batcher.submit(_item(1, True))
    while not engine.log:
        time.sleep(0.01)
    stopper = threading.Thread(target=batcher.stop, args=(10,))
    stopper.start()
    gate.set()
    stopper.join(30)
    with pytest.raises(Unavailable):
        ticket.result(1)
    assert sum(step[0] == "slice" for step in engine.log) <= 1


def test_the_expensive_work_queued_at_once_is_bounded():
    engine = FakeEngine(slices=2, gate=threading.Event())  # never finishes until released
    batcher = _batcher(engine, max_job_forwards=70)  # two items of 32 extra forwards
    try:
        first, second = batcher.submit(_item(1, True)), batcher.submit(_item(2, True))
        with pytest.raises(QueueFull) as refused:
            batcher.submit(_item(3, True))
        assert refused.value.reason == "EXPENSIVE_WORK_FULL" and refused.value.retry_after_s > 0
        assert batcher.submit(_item(4, False))  # cheap items still queue
        assert batcher.expected_wait(32) > batcher.expected_wait()
        engine.gate.set()
        first.result(30), second.result(30)
    finally:
        engine.gate.set()
        batcher.stop(10)


# --- through a real server --------------------------------------------------------------------

def _explain_request(steps: int) -> pb.ExplainRequest:
    return pb.ExplainRequest(
        images=[pb.Image(raw=pb.RawImage(pixels=PLAIN.tobytes(), height=32, width=32,
                                         channels=3))],
        options=pb.ExplainOptions(faithfulness_steps=steps))


def _slices_started(before: int, count: int, call) -> None:
    while len(tiny_models.SlowNet.batches) < before + count:
        if call.done():
            raise AssertionError(f"the call ended before its slices: {call.exception()}")
        time.sleep(0.01)


def test_predict_is_answered_before_expensive_work_ends_and_cancelling_stops_it():
    # SlowNet takes 0.3 s a forward: 64 steps are 130 forwards, 9 slices of 16 images.
    with running(model=SLOW, max_delay_ms=0) as (server, client):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.CamserveServiceStub(channel)
            before = len(tiny_models.SlowNet.batches)
            expensive = stub.Explain.future(_explain_request(64))
            _slices_started(before, 2, expensive)  # its batch and a first slice
            assert client.predict(PLAIN).top
            assert not expensive.done(), "the Predict waited for the whole explanation"
            answer = expensive.result(timeout=120)
            assert answer.results[0].maps[0].HasField("faithfulness")

            before = len(tiny_models.SlowNet.batches)
            doomed = stub.Explain.future(_explain_request(256))  # 34 slices
            _slices_started(before, 2, doomed)
            doomed.cancel()
            assert client.predict(PLAIN).top  # queued behind at most one more slice
            ran = len(tiny_models.SlowNet.batches) - before
        assert ran <= 5, f"{ran} forwards ran for a call cancelled after 2"
        # Counted at the job's next slice, which may run just after the Predict is answered.
        wait_for(lambda: server.metrics.value("camserve_items_dropped_total",
                                              reason="cancelled") >= 1, what="the count")


def test_an_unread_latest_stream_holds_a_few_frames():
    """A sender that never reads its answers, faster than the model (0.3 s a frame): the
    server reads all 2000 frames, skips the overtaken ones and holds at most
    max_stream_frames_in_flight at any time."""
    with running(model=SLOW, max_delay_ms=0) as (server, _):
        frame = pb.Image(raw=pb.RawImage(pixels=PLAIN.tobytes(), height=32, width=32,
                                         channels=3))

        def requests():
            yield pb.StreamPredictRequest(config=pb.StreamPredictConfig(
                policy=pb.STREAM_POLICY_LATEST))
            for i in range(2000):
                yield pb.StreamPredictRequest(frame=pb.StreamFrame(frame_id=i, image=frame))

        held = []
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            answers = pb_grpc.CamserveServiceStub(channel).StreamPredict(requests())
            def skipped() -> float:
                return server.metrics.value("camserve_items_dropped_total", reason="skipped")

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the server reads all 2000; nobody answers
                held.append(server._service.stream_frames.frames)
                if skipped() >= 1900:
                    break
                time.sleep(0.02)
            held.append(server._service.stream_frames.frames)
            assert skipped() >= 1900
            answers.cancel()
        limit = server.settings.max_stream_frames_in_flight
        assert max(held) <= limit, held
        while server._service.open_streams:
            time.sleep(0.02)
        assert server._service.stream_frames.frames == 0


@pytest.mark.parametrize("caller", ["waiting", "gone"])
def test_sigterm_during_long_work_exits_0_and_logs_what_the_caller_saw(caller):
    process, port = start("--port", "0", "--grace-s", "2", "--model", SLOW, "--max-delay-ms",
                          "0")
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=0, timeout=120) as client:
            client.wait_until_ready(60)
            outcome = {}

            def call():
                try:
                    outcome["answer"] = client.explain(PLAIN, faithfulness_steps=256)
                except CamserveError as exc:
                    outcome["error"] = exc

            caller_thread = threading.Thread(target=call)
            caller_thread.start()
            time.sleep(1.5)  # its batch and a few slices ran (0.3 s each)
            if caller == "gone":
                client.close()
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, "".join(lines)
            caller_thread.join(30)
        reader.join(10)
    finally:
        if process.poll() is None:
            process.kill()
    log = "".join(lines)
    assert "Explain OK" not in log and "terminate called" not in log, log
    if caller == "waiting":  # cut off at the end of the grace, with a status of its own
        error = outcome["error"]
        assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "DRAINING", error
        assert "shutting down" in error.details


def test_sigterm_while_a_sanity_check_outlives_its_caller_exits_0():
    """A CheckSanity whose deadline passed stops at its next slice (another check is taken at
    once), and SIGTERM meanwhile ends the process with 0, never an abort."""
    process, port = start("--port", "0", "--grace-s", "1")
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=0) as client:
            client.wait_until_ready(120)
            stub = client._stub
            raw = pb.Image(raw=pb.RawImage(pixels=np.full((224, 224, 3), 90, np.uint8).tobytes(),
                                           height=224, width=224, channels=3))
            many = pb.CheckSanityRequest(images=[raw] * 16, methods=[pb.CAM_METHOD_SCORECAM])
            with pytest.raises(grpc.RpcError) as caught:
                stub.CheckSanity(many, timeout=1.0)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The slot frees at the next slice: a cheap check is taken (with retries for the
            # slice still running), and answers.
            cheap = pb.CheckSanityRequest(images=[raw], methods=[pb.CAM_METHOD_GRADCAM],
                                          stages=1)
            codes = []
            for _ in range(20):
                try:
                    stub.CheckSanity(cheap, timeout=60)
                    codes.append("OK")
                    break
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        break
                    time.sleep(0.5)
            assert codes[-1] == "OK", codes
            with pytest.raises(grpc.RpcError):
                stub.CheckSanity(many, timeout=1.0)  # and one more outlives its caller
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, "".join(lines)
        reader.join(10)
    finally:
        if process.poll() is None:
            process.kill()
    assert "terminate called" not in "".join(lines)


def test_large_requests_beyond_the_inflight_bytes_are_refused_with_a_retry_hint():
    """Two 2.4 MB requests and a 3 MiB budget: while the first computes, the second is refused
    (before it is parsed) with RESOURCE_EXHAUSTED and a retry hint; small requests pass."""
    big = np.zeros((800, 1000, 3), np.uint8)
    request = pb.PredictRequest(images=[pb.Image(raw=pb.RawImage(
        pixels=big.tobytes(), height=800, width=1000, channels=3))])
    with running(model=SLOW, max_delay_ms=0, max_inflight_bytes=3 << 20) as (server, client):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.CamserveServiceStub(channel)
            before = len(tiny_models.SlowNet.batches)
            first = stub.Predict.future(request, timeout=60)
            _slices_started(before, 1, first)  # it is being computed: its bytes are held
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(request, timeout=60)
            error = CamserveError.from_rpc_error(refused.value)
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.reason == "BUSY_WITH_LARGE" and error.retry_after > 0
            assert "max_inflight_bytes" in error.details
            assert client.predict(PLAIN).top  # small requests are always admitted
            assert first.result(60).results[0].prediction.top


def test_typed_tensor_contents_count_what_they_expand_to():
    """An Open Inference Protocol request of 1.2 million typed uint_contents (1.2 MB on the
    wire, 3.6 MB once they are pixels) and a 3 MiB budget: while one computes, a second is
    refused BUSY_WITH_LARGE (counted by wire bytes, both would fit)."""
    from camserve_server.api import oip

    request = oip.messages().ModelInferRequest(model_name="camserve")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[1, 400, 1000, 3])
    tensor.contents.uint_contents.extend(np.zeros(1_200_000, np.uint8).tolist())
    with running(model=SLOW, max_delay_ms=0, max_inflight_bytes=3 << 20) as (server, client):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            infer = channel.unary_unary(
                f"/{oip.SERVICE}/ModelInfer", request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=oip.messages().ModelInferResponse.FromString)
            before = len(tiny_models.SlowNet.batches)
            first = infer.future(request, timeout=60)
            _slices_started(before, 1, first)
            with pytest.raises(grpc.RpcError) as refused:
                infer(request, timeout=60)
            error = CamserveError.from_rpc_error(refused.value)
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert error.reason == "BUSY_WITH_LARGE"
            assert first.result(60).outputs


def test_a_cancelled_stream_of_bad_frames_leaves_the_server_serving():
    """A LATEST stream of 20,000 frames that all fail validation, answers unread, cancelled by
    its caller: the server process lives on (it used to crash reading the ended call's peer
    for the access log) and serves the next call."""
    process, port = start("--port", "0", "--model", "python:tiny_models:tiny_cnn")
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_ready(60)
            sent = []

            def requests():
                yield pb.StreamPredictRequest(config=pb.StreamPredictConfig(
                    policy=pb.STREAM_POLICY_LATEST))
                for i in range(20_000):
                    yield pb.StreamPredictRequest(frame=pb.StreamFrame(
                        frame_id=i, image=pb.Image(encoded=b"not an image")))
                    sent.append(i)

            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                answers = pb_grpc.CamserveServiceStub(channel).StreamPredict(requests())
                while len(sent) < 20_000:
                    time.sleep(0.05)
                time.sleep(1)
                answers.cancel()
            time.sleep(1)
            assert process.poll() is None, f"the server exited with {process.poll()}"
            assert client.predict(PLAIN).top
    finally:
        process.terminate()
        assert process.wait(60) == 0
