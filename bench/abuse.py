"""Abuse: what a hostile or careless caller can make one server hold or wait for.

Starts a server on the default model with default settings, keeps 2 background callers
sending Predict, and runs each case below against it, one after the other. For each case it
reports the server's memory (RSS before, peak, after), the background callers' latency during
the case, the codes the abusive calls got, and whether the server still answers. Goals on a
2-core machine: no case raises memory by more than 1 GB, no background call waits more than
2 s, the server serves after every case, and every call is answered; the exit status is 1 if
a case misses one.

    .venv/bin/python bench/abuse.py              # every case
    .venv/bin/python bench/abuse.py --quick      # smaller sizes, for a try-out
    .venv/bin/python bench/abuse.py --case unread_latest --case sigterm
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional

import grpc
import harness
import numpy as np
from PIL import Image

from camserve import CamserveError, Client
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc

GOAL_MEMORY_MB = 1024
GOAL_WAIT_S = 2.0
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def jpeg(height: int, width: int, quality: int = 90, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), np.uint8)
    picture = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def serving(target: str) -> bool:
    """Whether the server still answers a small Predict."""
    try:
        with Client(target, timeout=30, retries=0) as client:
            return bool(client.predict(np.full((64, 64, 3), 90, np.uint8)).top)
    except CamserveError:
        return False


def background(target: str) -> harness.Callers:
    """Two callers sending Predict in a loop, 50 ms apart, each on its own client."""
    image = jpeg(480, 640, seed=3)
    clients = [Client(target, timeout=120) for _ in range(2)]
    return harness.Callers(lambda i: clients[i].predict(image), 2, pause=0.05,
                           errors=(CamserveError,))


@dataclass
class Outcome:
    codes: Counter = field(default_factory=Counter)

    def record(self, call: Callable[[], object]) -> None:
        try:
            call()
            self.codes["OK"] += 1
        except CamserveError as exc:
            self.codes[exc.code.name] += 1
        except grpc.RpcError as exc:
            self.codes[exc.code().name] += 1


def _stub(target: str, channel_options=()) -> pb_grpc.CamserveServiceStub:
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30),
        *channel_options])
    return pb_grpc.CamserveServiceStub(channel)


def _unread_stream(target: str, frame: pb.Image, count: int, seconds: float, out: Outcome,
                   what: str) -> None:
    """A LATEST stream sending ``count`` frames; its answers are never read; cancelled after
    ``seconds``."""
    sent = [0]

    def requests():
        yield pb.StreamPredictRequest(config=pb.StreamPredictConfig(
            policy=pb.STREAM_POLICY_LATEST))
        for i in range(count):
            yield pb.StreamPredictRequest(frame=pb.StreamFrame(frame_id=i, image=frame))
            sent[0] = i + 1

    answers = _stub(target).StreamPredict(requests(), timeout=600)
    ends = time.monotonic() + seconds
    while sent[0] < count and time.monotonic() < ends:
        time.sleep(0.1)
    time.sleep(2)  # the last frames reach the server
    answers.cancel()
    out.codes[f"{sent[0]} of {count} {what} sent in {seconds:g} s or less, then CANCELLED "
              "by the caller"] += 1


def unread_latest(target: str, quick: bool, out: Outcome) -> None:
    """A LATEST stream of large frames whose answers are never read."""
    frame = pb.Image(encoded=jpeg(1080, 1920, quality=95))  # about 280 KB
    _unread_stream(target, frame, 500 if quick else 10_000, 5 if quick else 40, out, "frames")


def failed_frames(target: str, quick: bool, out: Outcome) -> None:
    """A LATEST stream of frames that all fail validation, answers never read."""
    _unread_stream(target, pb.Image(encoded=b"not an image at all"),
                   20_000 if quick else 300_000, 5 if quick else 30, out, "bad frames")


def long_work_abandoned(target: str, quick: bool, out: Outcome) -> None:
    """4 maps of Score-CAM on 256 channels with 256 faithfulness steps; gives up after 2 s."""
    image = jpeg(480, 640, seed=5)
    with Client(target, retries=0) as client:
        for _ in range(2 if quick else 4):
            out.record(lambda: client.explain(
                image, method="scorecam", score_cam_channels=256, faithfulness_steps=256,
                timeout=2.0))


def many_maps_full_size(target: str, quick: bool, out: Outcome) -> None:
    """A 50-megapixel image with 3 maps and heatmap PNGs (the most whose PNGs' upper bound, 1
    byte per rendered pixel, fits the 32 MiB message limit; 16 are refused before any work),
    then with 16 maps."""
    image = jpeg(2000, 2500) if quick else jpeg(5773, 8660)
    methods = ["gradcam", "xgradcam", "layercam"]
    with Client(target, retries=0, timeout=600) as client:
        out.record(lambda: client.explain(image, method=methods, top_targets=1,
                                          outputs=("raw", "heatmap")))
        out.record(lambda: client.explain(image, method=[*methods, "hirescam"], top_targets=4,
                                          outputs=("raw", "heatmap")))


def answer_too_large(target: str, quick: bool, out: Outcome) -> None:
    """64 images of 4000x4000 with PNG overlays: an answer that could never be sent."""
    image = jpeg(4000, 4000)
    with Client(target, retries=0, timeout=600) as client:
        out.record(lambda: client.explain_many([image] * (16 if quick else 64),
                                               outputs=("overlay_png",)))


def _raw_in_parallel(target: str, height: int, width: int, calls: int, out: Outcome) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), np.uint8)
    request = pb.PredictRequest(images=[pb.Image(raw=pb.RawImage(
        pixels=pixels.tobytes(), height=height, width=width, channels=3))])
    stub = _stub(target)
    futures = [stub.Predict.future(request, timeout=600) for _ in range(calls)]
    for future in futures:
        out.record(future.result)


def large_in_parallel(target: str, quick: bool, out: Outcome) -> None:
    """Sixteen 60 MB requests at once (raw pixels), over the message limit."""
    _raw_in_parallel(target, 4000, 5000, 4 if quick else 16, out)


def at_limit_in_parallel(target: str, quick: bool, out: Outcome) -> None:
    """Sixteen requests at once just under the default message limit (33.3 MB of raw pixels
    each, 32 MiB allowed)."""
    _raw_in_parallel(target, 3000, 3700, 4 if quick else 16, out)


def hostile_messages(target: str, quick: bool, out: Outcome) -> None:
    """Bytes that are not protobuf, a 1 MB label, a 7 KB request id (about the most that
    gRPC's 8 KB metadata limit lets through)."""
    channel = grpc.insecure_channel(target)
    raw = channel.unary_unary("/camserve.v1.CamserveService/Predict")
    out.record(lambda: raw(b"\xff\xfe definitely not protobuf", timeout=30))
    stub = _stub(target)
    image = pb.Image(encoded=jpeg(64, 64))
    out.record(lambda: stub.Explain(pb.ExplainRequest(images=[image], options=pb.ExplainOptions(
        targets=[pb.Target(label="x" * (1 << 20))])), timeout=30))
    out.record(lambda: stub.Predict(pb.PredictRequest(images=[image]), timeout=30,
                                    metadata=[("x-request-id", "r" * 7_000)]))


def _raw_image(height: int, width: int) -> pb.Image:
    pixels = np.full((height, width, 3), 90, np.uint8)
    return pb.Image(raw=pb.RawImage(pixels=pixels.tobytes(), height=height, width=width,
                                    channels=3))


def sanity_outlives_caller(target: str, quick: bool, out: Outcome) -> None:
    """A CheckSanity of 64 images (16 quick) with a 10 s deadline (3 s quick), then at once a
    one-image check, retried each 0.5 s while it answers RESOURCE_EXHAUSTED: the slot frees
    at the expired check's next slice."""
    stub = _stub(target)
    request = pb.CheckSanityRequest(images=[_raw_image(224, 224)] * (16 if quick else 64))
    out.record(lambda: stub.CheckSanity(request, timeout=3 if quick else 10))
    expired = time.monotonic()
    cheap = pb.CheckSanityRequest(images=[_raw_image(224, 224)],
                                  methods=[pb.CAM_METHOD_GRADCAM], stages=1)
    for _ in range(120):
        try:
            stub.CheckSanity(cheap, timeout=60)
            out.codes[f"next check OK {time.monotonic() - expired:.1f} s after the "
                      "deadline"] += 1
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                out.codes[f"next check {exc.code().name}"] += 1
                return
            out.codes["next check RESOURCE_EXHAUSTED"] += 1
            time.sleep(0.5)


def _infer(target: str):
    from camserve_server.api import oip

    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 1 << 30)])
    return oip, channel.unary_unary(
        f"/{oip.SERVICE}/ModelInfer", request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=oip.messages().ModelInferResponse.FromString)


def _at_once(call: Callable[[], object], calls: int, out: Outcome) -> None:
    threads = [threading.Thread(target=out.record, args=(call,)) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def oip_empty_elements(target: str, quick: bool, out: Outcome) -> None:
    """4 Open Inference Protocol requests at once, each a BYTES tensor of shape [1] whose raw
    contents are 8 million zero-length elements (32 MB)."""
    oip, infer = _infer(target)
    request = oip.messages().ModelInferRequest(model_name="camserve")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(b"\0\0\0\0" * (2_000_000 if quick else 8_000_000))
    _at_once(lambda: infer(request, timeout=60), 4, out)


def oip_long_parameter_name(target: str, quick: bool, out: Outcome) -> None:
    """8 requests at once, 12 rounds (3 quick), each with a 10 MB parameter name, by a client
    with gRPC's default options (its 16 KiB metadata limit)."""
    oip, _ = _infer(target)
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 1 << 30)])
    infer = channel.unary_unary(f"/{oip.SERVICE}/ModelInfer",
                                request_serializer=lambda m: m.SerializeToString())
    request = oip.messages().ModelInferRequest(model_name="camserve")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(b"\0\0\0\0")
    request.parameters["p" * 10_000_000].int64_param = 1
    for _ in range(3 if quick else 12):
        _at_once(lambda: infer(request, timeout=60), 8, out)


def oip_typed_contents(target: str, quick: bool, out: Outcome) -> None:
    """8 requests at once of 27 million typed uint_contents each (3000x3000 RGB; 27 MB on
    the wire), 2 quick."""
    oip, infer = _infer(target)
    request = oip.messages().ModelInferRequest(model_name="camserve")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[1, 3000, 3000, 3])
    tensor.contents.uint_contents.extend(np.full(27_000_000, 90, np.uint8).tolist())
    _at_once(lambda: infer(request, timeout=120), 2 if quick else 8, out)


def _flood(target: str, seconds: float, opened) -> None:
    """In a process of its own (the flood's CPU and GIL are not the background callers'):
    bursts of 4,000 calls opened and cancelled at once on one connection."""
    request = pb.PredictRequest(images=[pb.Image(encoded=jpeg(64, 64))])
    stub = _stub(target, [("grpc.use_local_subchannel_pool", 1)])
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        calls = [stub.Predict.future(request, timeout=30) for _ in range(4000)]
        for call in calls:
            call.cancel()
        with opened.get_lock():
            opened.value += len(calls)


def rapid_reset(target: str, quick: bool, out: Outcome) -> None:
    """Calls opened and cancelled at once, in bursts of 4,000 a connection, from 4 processes
    on 4 connections, for 20 s (5 s quick): the background callers must not be CANCELLED."""
    spawn = multiprocessing.get_context("spawn")
    opened = spawn.Value("q", 0)
    floods = [spawn.Process(target=_flood, args=(target, 5 if quick else 20, opened))
              for _ in range(4)]
    for flood in floods:
        flood.start()
    for flood in floods:
        flood.join()
    out.codes[f"{opened.value} calls opened and cancelled at once"] += 1


def _streams(target: str, streams: int, connections: int, period: float, seconds: float,
             out: Outcome) -> None:
    """``streams`` ALL streams over ``connections`` connections, from a process of their own
    (their CPU and GIL are not the background callers'), each sending a small JPEG every
    ``period`` seconds for ``seconds`` and reading its answers; each frame's answer (OK or its
    error's code) and each stream's end are counted."""
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        out.codes.update(pool.apply(_stream_client, (target, streams, connections, period,
                                                     seconds)))


def _stream_client(target: str, streams: int, connections: int, period: float,
                   seconds: float) -> Counter:
    out = Outcome()
    frame = pb.Image(encoded=jpeg(120, 160))

    async def one(stub, index: int) -> None:
        async def requests():
            yield pb.StreamPredictRequest(config=pb.StreamPredictConfig(
                policy=pb.STREAM_POLICY_ALL))
            ends = time.monotonic() + seconds
            i = 0
            while time.monotonic() < ends:
                yield pb.StreamPredictRequest(frame=pb.StreamFrame(frame_id=i, image=frame))
                i += 1
                await asyncio.sleep(period)

        try:
            async for answer in stub.StreamPredict(requests(), timeout=seconds + 120):
                out.codes["frame " + (CODE_NAMES[answer.error.code]
                                      if answer.HasField("error") else "OK")] += 1
            out.codes["stream OK"] += 1
        except grpc.aio.AioRpcError as exc:
            out.codes[f"stream {exc.code().name}"] += 1

    async def run() -> None:
        channels = [grpc.aio.insecure_channel(target, options=[
            ("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)]
        stubs = [pb_grpc.CamserveServiceStub(c) for c in channels]
        await asyncio.gather(*(one(stubs[i % connections], i) for i in range(streams)))
        for channel in channels:
            await channel.close()

    asyncio.run(run())
    return out.codes


def many_streams(target: str, quick: bool, out: Outcome) -> None:
    """4,096 streams (4 x the --max-streams default; 512 quick) opened at once on 8 connections,
    each sending a frame a second for 20 s."""
    _streams(target, 512 if quick else 4096, 8, 1.0, 20.0, out)


def slow_streams(target: str, quick: bool, out: Outcome) -> None:
    """200 streams on 4 connections, each sending a frame every 10 s for 40 s (20 s quick)."""
    _streams(target, 200, 4, 10.0, 20.0 if quick else 40.0, out)


CASES: Dict[str, Callable[[str, bool, Outcome], None]] = {
    "unread_latest": unread_latest,
    "failed_frames": failed_frames,
    "long_work_abandoned": long_work_abandoned,
    "many_maps_full_size": many_maps_full_size,
    "answer_too_large": answer_too_large,
    "large_in_parallel": large_in_parallel,
    "at_limit_in_parallel": at_limit_in_parallel,
    "hostile_messages": hostile_messages,
    "sanity_outlives_caller": sanity_outlives_caller,
    "oip_empty_elements": oip_empty_elements,
    "oip_long_parameter_name": oip_long_parameter_name,
    "oip_typed_contents": oip_typed_contents,
    "rapid_reset": rapid_reset,
    "many_streams": many_streams,
    "slow_streams": slow_streams,
}


def sigterm_during_long_work(quick: bool, model: str) -> Dict[str, object]:
    """SIGTERM while a long explanation runs (caller waiting, then caller gone): the exit
    status and the seconds from the signal to the exit (grace 10 s)."""
    rows = {}
    for caller in ("waiting", "gone"):
        server = harness.Server(model)
        client = Client(server.target, retries=0, timeout=600)
        outcome = Outcome()
        long_call = partial(client.explain, jpeg(480, 640), method="scorecam",
                            score_cam_channels=256, faithfulness_steps=256)
        thread = threading.Thread(target=outcome.record, args=(long_call,), daemon=True)
        thread.start()
        time.sleep(3)
        if caller == "gone":
            client.close()
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(120)
        rows[caller] = (code, time.monotonic() - signalled, dict(outcome.codes) or "-")
        thread.join(30)
        server.stop()
    return rows


def worker_faults(quick: bool, model: str) -> Dict[str, Dict[str, object]]:
    """``--workers 2``, 8 callers each on its own connection sending Predict (10 s deadline, no
    retries); worker 2 killed with SIGKILL, later stopped with SIGSTOP (hung): per fault, the
    seconds until the supervisor killed it (a hang) and until its successor served, and the
    callers' codes and worst wait from the fault until then."""
    server = harness.Server(model, flags=["--workers", "2"], log_level="INFO")
    image = jpeg(480, 640, seed=3)
    clients = [Client(server.target, timeout=10, retries=0,
                      options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
    callers = harness.Callers(lambda i: clients[i].predict(image), 8, pause=0.02,
                              errors=(CamserveError,)).start()
    rows = {}
    try:
        for fault in (signal.SIGKILL, signal.SIGSTOP):
            time.sleep(3 if quick else 10)
            pid = int(re.findall(r"worker 2 started \(pid (\d+)\)", server.tail(10**8))[-1])
            callers.take()
            faulted = time.monotonic()
            os.kill(pid, fault)
            killed_s = serves_s = None
            while serves_s is None and time.monotonic() - faulted < 120:
                log = server.tail(10**8)
                if killed_s is None and f"(pid {pid}) has not beaten" in log:
                    killed_s = time.monotonic() - faulted
                served = re.findall(r"worker 2 serves \(pid (\d+)\)", log)
                if served and int(served[-1]) != pid:
                    serves_s = time.monotonic() - faulted
                time.sleep(0.05)
            calls = callers.take()
            rows[fault.name] = dict(
                supervisor_killed_it_s=killed_s if fault == signal.SIGSTOP else "-",
                serving_again_s=serves_s, calls=len(calls),
                codes=dict(calls.codes),
                worst_wait_ms=max(calls.latencies, default=0.0) * 1000.0)
    finally:
        callers.stop()
        for client in clients:
            client.close()
        server.stop(120)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a try-out")
    p.add_argument("--case", action="append", choices=[*CASES, "sigterm", "workers"],
                   help="run only these cases (repeatable; default: all)")
    p.add_argument("--model", default=harness.DEFAULT_MODEL)
    args = p.parse_args(argv)
    results = harness.Results(__file__, argv, args)
    chosen = args.case or [*CASES, "sigterm", "workers"]
    failures = 0
    server = harness.Server(args.model)
    memory = harness.MemorySampler(server.process.pid)
    callers = background(server.target).start()
    try:
        for name in [c for c in chosen if c in CASES]:
            time.sleep(1)
            callers.take()
            before = memory.reset()
            outcome = Outcome()
            CASES[name](server.target, args.quick, outcome)
            time.sleep(2)
            after = server.rss_mib()
            calls = callers.take()
            answers = serving(server.target)
            worst = max(calls.latencies, default=0.0)
            bad = bool(memory.peak - before > GOAL_MEMORY_MB or worst > GOAL_WAIT_S
                       or not answers or set(calls.codes) - {"OK"})
            failures += bad
            results.row("cases", case=name, mib_before=before, peak_mib=memory.peak,
                        mib_after=after, background_p50_ms=calls.percentiles()["p50_ms"],
                        background_worst_ms=worst * 1000.0,
                        background_codes=dict(calls.codes), serving=answers,
                        abusive_calls=dict(outcome.codes), meets_the_goals=not bad)
            print(f"# {name} done", file=sys.stderr, flush=True)
    finally:
        callers.stop()
        memory.stop()
        server.stop(120)
    if "sigterm" in chosen:
        for caller, (code, seconds, codes) in sigterm_during_long_work(args.quick,
                                                                       args.model).items():
            bad = code != 0 or seconds > 10 + 5
            failures += bad
            results.row("SIGTERM during a long explanation (grace 10 s)", caller=caller,
                        exit_status=code, seconds_to_exit=seconds, the_call=codes,
                        meets_the_goals=not bad)
    if "workers" in chosen:
        for fault, row in worker_faults(args.quick, args.model).items():
            bad = row["serving_again_s"] is None
            failures += bad
            results.row("A worker killed, then hung (--workers 2, 8 callers)", fault=fault,
                        **row, meets_the_goals=not bad)
    results.finish(args.json)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
