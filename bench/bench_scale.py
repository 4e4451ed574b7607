"""Many streams, idle streams' memory, one caller's latency and serving efficiency, against a
real server.

It starts ``python -m camserve_server`` (default model, one process unless ``--workers``,
``--stream-idle-s`` long enough for the idle section) on a free port of 127.0.0.1 and
measures, in one run:

1. One caller, Predict and Explain back to back: p50 over gRPC beside the in-process engine's
   time for one image (the same photo decoded once; the timed call is model work only), and
   the difference: what the RPC, decoding and batching add.
2. Serving efficiency: ``--callers`` (16) callers, Predict then Explain, one photo per call:
   images/s over gRPC over the in-process engine's images/s at batch 8, measured in turns
   (``--rounds``); each ratio is the median of the per-round ratios.
3. ``--unary`` (4) unary Predict callers alone: their p50, mean and worst latency, and each
   caller's p50, the reference for 4 and 5. Closed-loop callers' mean is (callers) / (calls
   per second) (Little's law); with ``--workers`` the kernel spreads their connections, not
   their calls, so the callers on a busier worker wait longer than the p50 shows.
4. ``--streams`` (1,000) idle streams (opened, never sending): the server's resident memory
   before and with them open (per stream), and the unary callers' latency meanwhile.
5. ``--streams`` LATEST streams of small JPEG frames (320x213) that together send
   ``--load`` (0.5) of the capacity measured in 2 (so each stream sends a frame every few tens
   of seconds), with the unary callers alongside: frames sent, answered, skipped, failed and
   lost (sent - answered - skipped - failed; must be 0), frame latency, and the unary callers'
   latency against 3.

All callers run on one asyncio loop of this process (streams on ``--connections`` channels,
every other caller on a connection of its own: the kernel spreads connections over
``--workers``). Everything runs on the same machine as the server, so the callers' own CPU
counts against it; the results record the load average before and after. It reports and never
fails on a time: the exit code is 0 unless something crashed. Nothing is downloaded.

    python bench/bench_scale.py                   # the full run (about 6 minutes)
    python bench/bench_scale.py --workers auto    # two worker processes here
    python bench/bench_scale.py --server-arg=--device=cpu,cpu   # two engines in one process
    python bench/bench_scale.py --quick           # a short smoke run (200 streams, under 2 min)

With ``--workers`` the server's memory is that of all its processes (the supervisor and its
workers), and the in-process baselines stay the engine of one process using every core: a
lone call on a worker computes on that worker's share of the cores.
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import harness
from grpc import aio
from PIL import Image

from camserve import AsyncClient
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--model", default="efficientnet_lite0",
                   help="model source (default %(default)s; others get --weights random)")
    p.add_argument("--streams", type=int, default=1000, help="streams (default %(default)s)")
    p.add_argument("--connections", type=int, default=10,
                   help="channels the streams are spread over (default %(default)s)")
    p.add_argument("--load", type=float, default=0.5,
                   help="the streams' frames/s as a fraction of the measured capacity")
    p.add_argument("--window", type=float, default=60.0,
                   help="seconds measured with every stream open and sending")
    p.add_argument("--unary", type=int, default=4, help="unary Predict callers beside streams")
    p.add_argument("--unary-seconds", type=float, default=15.0,
                   help="unary callers' measured seconds alone and beside idle streams")
    p.add_argument("--callers", type=int, default=16, help="callers for the efficiency rows")
    p.add_argument("--seconds", type=float, default=8.0,
                   help="per efficiency slice (each round, each of Predict and Explain)")
    p.add_argument("--rounds", type=int, default=3, help="efficiency rounds (default 3)")
    p.add_argument("--single-calls", type=int, default=150,
                   help="one caller's calls per RPC (default %(default)s)")
    p.add_argument("--workers", default="1",
                   help="the server's --workers (default 1; auto: one per core here)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra server flag, e.g. --server-arg=--max-delay-ms=5")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.connections, args.window = 200, 4, 10.0
        args.unary_seconds, args.seconds, args.rounds, args.single_calls = 5.0, 4.0, 1, 30
    return args


def small_jpeg(photo: bytes) -> bytes:
    """The photo as a small camera frame: 320x213 JPEG, quality 85."""
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    image = image.resize((320, round(320 * image.height / image.width)), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


# --- over gRPC -------------------------------------------------------------------------------


async def call(client: AsyncClient, rpc: str, photo: bytes):
    if rpc == "Predict":
        return await client.predict(photo, top_k=1)
    return await client.explain(photo)


async def closed_loop(clients: List[AsyncClient], rpc: str, photo: bytes, seconds: float,
                      warmup: float = 0.0) -> harness.Calls:
    return await harness.closed_loop_async(lambda client: call(client, rpc, photo), clients,
                                           seconds, warmup)


async def single(client: AsyncClient, rpc: str, photo: bytes, calls: int) -> List[float]:
    """Seconds of each of ``calls`` calls one after the other (after 5 unmeasured)."""
    for _ in range(5):
        await call(client, rpc, photo)
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await call(client, rpc, photo)
        out.append(time.perf_counter() - started)
    return out


async def _never(stop: asyncio.Event):
    await stop.wait()
    return
    yield  # an async generator that sends nothing


@dataclass
class StreamTally:
    sent: int = 0
    answered: int = 0
    skipped: int = 0
    failed: Counter = field(default_factory=Counter)  # frames answered with an error, by code
    ended: Counter = field(default_factory=Counter)  # how each stream ended
    latencies: List[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.sent - self.answered - self.skipped - sum(self.failed.values())


async def camera(stub, tally: StreamTally, frame: bytes, opens_at: float, period: float,
                 stop_at: float) -> None:
    """One LATEST stream: opens at ``opens_at``, sends a frame at once and then every
    ``period`` seconds until ``stop_at``, then closes and reads its last answers."""
    await asyncio.sleep(max(0.0, opens_at - time.perf_counter()))
    sent_at: Dict[int, float] = {}

    async def requests():
        yield pb.StreamPredictRequest(config=pb.StreamPredictConfig(
            policy=pb.STREAM_POLICY_LATEST, options=pb.PredictOptions(top_k=1)))
        frame_id = 0
        while True:
            due = opens_at + frame_id * period
            if due >= stop_at:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent_at[frame_id] = time.perf_counter()
            tally.sent += 1
            yield pb.StreamPredictRequest(frame=pb.StreamFrame(
                frame_id=frame_id, image=pb.Image(encoded=frame)))
            frame_id += 1

    stream = stub.StreamPredict(requests(), timeout=stop_at - time.perf_counter() + 120)
    try:
        async for answer in stream:
            tally.skipped += answer.skipped
            if answer.HasField("result"):
                tally.answered += 1
                tally.latencies.append(time.perf_counter() - sent_at[answer.frame_id])
            else:
                tally.failed[answer.error.code] += 1
        tally.ended["OK"] += 1
    except aio.AioRpcError as error:
        tally.ended[error.code().name] += 1


async def run_all(args, server: harness.Server, inproc: harness.InProcess, photo: bytes,
                  results: harness.Results) -> None:
    target = server.target
    one = AsyncClient(target, timeout=120)
    await one.wait_until_ready(timeout=300)

    # 1. One caller.
    for rpc in ("Predict", "Explain"):
        grpc_s = await single(one, rpc, photo, args.single_calls)
        local_s = inproc.one(rpc, args.single_calls)
        g, e = harness.median(grpc_s) * 1000.0, harness.median(local_s) * 1000.0
        results.row("one caller", rpc=rpc, grpc_p50_ms=g, engine_1_image_p50_ms=e,
                    difference_ms=g - e)
    print("# one caller done", file=sys.stderr, flush=True)

    # 2. Efficiency: gRPC with --callers against the engine at batch 8, in turns.
    callers = [AsyncClient(target, timeout=120, options=harness.OWN_CONNECTION)
               for _ in range(args.callers)]
    eff = {rpc: [] for rpc in ("Predict", "Explain")}
    for _ in range(args.rounds):
        for rpc in eff:
            calls = await closed_loop(callers, rpc, photo, args.seconds, warmup=2.0)
            eff[rpc].append((calls, inproc.rate(rpc, args.seconds / 2)))
    for c in callers:
        await c.close()
    for rpc, runs in eff.items():
        ratios = [calls.rate / engine for calls, engine in runs]
        results.row(f"{args.callers} callers: serving efficiency", rpc=rpc,
                    grpc_images_per_s=harness.median(c.rate for c, _ in runs),
                    engine_b8_images_per_s=harness.median(e for _, e in runs),
                    ratio=harness.median(ratios), rounds=ratios,
                    mean_batch=harness.median(c.mean_of("batch_size") for c, _ in runs),
                    p50_ms=harness.median(c.percentiles()["p50_ms"] for c, _ in runs))
    capacity = harness.median(c.rate for c, _ in eff["Predict"])
    print("# efficiency done", file=sys.stderr, flush=True)

    # 3. Unary callers alone.
    unary = [AsyncClient(target, timeout=120, options=harness.OWN_CONNECTION)
             for _ in range(args.unary)]
    alone = await closed_loop(unary, "Predict", photo, args.unary_seconds, 2.0)

    # 4. Idle streams.
    loop = asyncio.get_running_loop()
    channels = [aio.insecure_channel(target, options=harness.OWN_CONNECTION)
                for _ in range(args.connections)]
    stubs = [pb_grpc.CamserveServiceStub(ch) for ch in channels]
    rss_before = await loop.run_in_executor(None, harness.settled_rss_mib, server.process.pid)
    stop = asyncio.Event()
    idle = [stubs[i % len(stubs)].StreamPredict(_never(stop), timeout=600)
            for i in range(args.streams)]
    idle_tasks = [asyncio.ensure_future(_drain(s)) for s in idle]
    await asyncio.sleep(3.0)
    rss_idle = await loop.run_in_executor(None, harness.settled_rss_mib, server.process.pid)
    beside_idle = await closed_loop(unary, "Predict", photo, args.unary_seconds, 1.0)
    idle_ended = sum(t.done() for t in idle_tasks)  # should be 0: all still open
    for s in idle:
        s.cancel()
    await asyncio.gather(*idle_tasks)
    stop.set()
    print("# idle streams done", file=sys.stderr, flush=True)

    # 5. Streams sending frames at --load of the capacity, with the unary callers.
    frame = small_jpeg(photo)
    rate = args.load * capacity
    period = args.streams / rate
    tally = StreamTally()
    start = time.perf_counter() + 1.0
    ramp_end = start + period  # every stream open (stream i opens at start + i/rate)
    stop_at = ramp_end + args.window
    cameras = [asyncio.ensure_future(camera(stubs[i % len(stubs)], tally, frame,
                                            start + i / rate, period, stop_at))
               for i in range(args.streams)]
    await asyncio.sleep(max(0.0, ramp_end - time.perf_counter()))
    sent_before = tally.sent
    beside_streams = await closed_loop(unary, "Predict", photo,
                                       max(1.0, stop_at - time.perf_counter()))
    rss_streams = server.rss_mib()
    window_rate = (tally.sent - sent_before) / args.window
    await asyncio.gather(*cameras)
    for c in unary + [one]:
        await c.close()
    for ch in channels:
        await ch.close()

    base = alone.percentiles()["p50_ms"], _mean_ms(alone)
    for label, calls in (("alone", alone), (f"beside {args.streams} idle streams", beside_idle),
                         (f"beside {args.streams} LATEST streams sending", beside_streams)):
        p = calls.percentiles()
        results.row(f"{args.unary} unary Predict callers", case=label, calls=len(calls),
                    p50_ms=p["p50_ms"], p99_ms=p["p99_ms"], mean_ms=_mean_ms(calls),
                    worst_ms=max(calls.latencies) * 1000.0, each_callers_p50_ms=calls
                    .callers_p50_ms(), p50_over_alone=p["p50_ms"] / base[0],
                    mean_over_alone=_mean_ms(calls) / base[1])

    memory = "server memory (RSS)"
    results.row(memory, state="before streams", mib=rss_before)
    # Several processes' memory moves by more than the streams add: one process measures it.
    per_stream = ((rss_idle - rss_before) * 1024.0 / args.streams if args.workers == "1"
                  else None)
    results.row(memory, state=f"{args.streams} idle streams open", mib=rss_idle,
                kib_per_stream=per_stream, streams_ended_early=idle_ended)
    results.row(memory, state=f"{args.streams} streams sending", mib=rss_streams)

    lat = harness.percentiles(tally.latencies)
    results.row(f"{args.streams} LATEST streams on {args.connections} connections",
                frame_bytes=len(frame), seconds_between_frames=period, planned_per_s=rate,
                sent_per_s_in_window=window_rate, sent=tally.sent, answered=tally.answered,
                skipped=tally.skipped, failed=dict(tally.failed) or 0, lost=tally.lost,
                p50_ms=lat["p50_ms"], p99_ms=lat["p99_ms"], streams_ended=dict(tally.ended))
    results.note(f"The streams send {args.load:g} x the Predict capacity measured with "
                 f"{args.callers} callers, each stream a frame every few seconds; lost = sent "
                 "- answered - skipped - failed, which must be 0.")


def _mean_ms(calls: harness.Calls) -> float:
    return sum(calls.latencies) / max(1, len(calls)) * 1000.0


async def _drain(stream) -> Optional[str]:
    try:
        async for _ in stream:
            pass
    except aio.AioRpcError as error:
        return error.code().name
    except asyncio.CancelledError:
        return "CANCELLED"
    return "OK"


def main(argv=None) -> int:
    args = parse_args(argv)
    results = harness.Results(__file__, argv, args)
    photo = harness.photo()
    processes = ("one server process" if args.workers == "1" else
                 f"server --workers {args.workers}")
    results.note(f"Model {args.model}, {' '.join([processes, *args.server_arg])}; the callers "
                 "run on the same machine as the server.")
    inproc = harness.InProcess(args.model, photo)
    server = harness.Server(args.model, ["--stream-idle-s", "600", "--max-streams", "4096",
                                         "--workers", args.workers, *args.server_arg])
    try:
        asyncio.run(run_all(args, server, inproc, photo, results))
    except BaseException:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
        inproc.close()
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
