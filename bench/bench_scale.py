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
``--workers``). Everything runs on the same machine as the server, so the
callers' own CPU counts against it; the load average before and after is printed. It reports
and never fails on a time: the exit code is 0 unless something crashed. Nothing is downloaded.

    python bench/bench_scale.py                   # the README's table (about 6 minutes)
    python bench/bench_scale.py --workers auto    # two worker processes here
    python bench/bench_scale.py --server-arg=--device=cpu,cpu   # two engines in one process
    python bench/bench_scale.py --quick           # a short smoke run (200 streams, under 2 min)

With ``--workers`` the server's memory is that of all its processes (the supervisor and its
workers), and the in-process baselines stay the engine of one process using every core: a
lone call on a worker computes on that worker's share of the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from grpc import aio
from in_process import BATCH, InProcess
from PIL import Image
from server_process import OWN_CONNECTION, Server

from camserve import AsyncClient
from camserve.v1 import camserve_pb2 as pb
from camserve.v1 import camserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "chelsea.jpg"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) of a process and its children (a server's workers), MiB."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += rss_mib(int(child))
    return total


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


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
                      warmup: float = 0.0) -> Dict:
    """Each client calls back to back; the calls that ended in the measured window (and each
    caller's p50: with --workers, callers on a busier worker wait longer)."""
    begin = time.perf_counter() + warmup
    end = begin + seconds
    latencies: List[float] = []
    batches: List[int] = []
    own: List[List[float]] = [[] for _ in clients]

    async def caller(client: AsyncClient, mine: List[float]) -> None:
        while time.perf_counter() < end:
            started = time.perf_counter()
            answer = await call(client, rpc, photo)
            done = time.perf_counter()
            if begin <= done <= end:
                latencies.append(done - started)
                mine.append(done - started)
                batches.append(answer.timing.batch_size)

    await asyncio.gather(*(caller(c, mine) for c, mine in zip(clients, own)))
    return {"rate": len(latencies) / seconds, "latencies": np.array(latencies) * 1000.0,
            "batch": float(np.mean(batches)) if batches else 0.0,
            "callers p50": [float(np.median(m)) * 1000.0 for m in own if m]}


async def single(client: AsyncClient, rpc: str, photo: bytes, calls: int) -> np.ndarray:
    for _ in range(5):
        await call(client, rpc, photo)
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await call(client, rpc, photo)
        out.append(time.perf_counter() - started)
    return np.array(out) * 1000.0


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


async def run_all(args, port: int, pid: int, inproc: InProcess, photo: bytes) -> Dict:
    out: Dict = {}
    target = f"127.0.0.1:{port}"
    one = AsyncClient(target, timeout=120)
    await one.wait_until_ready(timeout=300)

    # 1. One caller.
    for rpc in ("Predict", "Explain"):
        grpc_ms = await single(one, rpc, photo, args.single_calls)
        local_ms = np.array(inproc.one(rpc, args.single_calls)) * 1000.0
        out[f"single {rpc}"] = (float(np.median(grpc_ms)), float(np.median(local_ms)))
    print("# one caller done", file=sys.stderr, flush=True)

    # 2. Efficiency: gRPC with --callers against the engine at batch 8, in turns.
    callers = [AsyncClient(target, timeout=120, options=OWN_CONNECTION)
               for _ in range(args.callers)]  # one connection each, as bench_workers.py
    eff = {rpc: {"grpc": [], "engine": [], "batch": [], "p50": []}
           for rpc in ("Predict", "Explain")}
    for _ in range(args.rounds):
        for rpc in ("Predict", "Explain"):
            r = await closed_loop(callers, rpc, photo, args.seconds, warmup=2.0)
            eff[rpc]["grpc"].append(r["rate"])
            eff[rpc]["batch"].append(r["batch"])
            eff[rpc]["p50"].append(float(np.median(r["latencies"])))
            eff[rpc]["engine"].append(inproc.rate(rpc, args.seconds / 2))
    for c in callers:
        await c.close()
    out["efficiency"] = eff
    capacity = float(np.median(eff["Predict"]["grpc"]))
    print("# efficiency done", file=sys.stderr, flush=True)

    # 3. Unary callers alone.
    unary = [AsyncClient(target, timeout=120, options=OWN_CONNECTION)
             for _ in range(args.unary)]
    out["unary alone"] = await closed_loop(unary, "Predict", photo, args.unary_seconds, 2.0)

    # 4. Idle streams.
    channels = [aio.insecure_channel(target, options=OWN_CONNECTION)
                for _ in range(args.connections)]
    stubs = [pb_grpc.CamserveServiceStub(ch) for ch in channels]
    out["rss before"] = await _settled_rss(pid)
    stop = asyncio.Event()
    idle = [stubs[i % len(stubs)].StreamPredict(_never(stop), timeout=600)
            for i in range(args.streams)]
    idle_tasks = [asyncio.ensure_future(_drain(s)) for s in idle]
    await asyncio.sleep(3.0)
    out["rss idle"] = await _settled_rss(pid)
    out["unary idle"] = await closed_loop(unary, "Predict", photo, args.unary_seconds, 1.0)
    out["idle ended"] = sum(t.done() for t in idle_tasks)  # should be 0: all still open
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
    out["unary streams"] = await closed_loop(unary, "Predict", photo,
                                             max(1.0, stop_at - time.perf_counter()))
    out["rss streams"] = rss_mib(pid)
    window_rate = (tally.sent - sent_before) / args.window
    await asyncio.gather(*cameras)
    out["streams"] = {"tally": tally, "rate": rate, "period": period,
                      "window_rate": window_rate, "frame_bytes": len(frame)}
    for c in unary + [one]:
        await c.close()
    for ch in channels:
        await ch.close()
    return out


async def _drain(stream) -> Optional[str]:
    try:
        async for _ in stream:
            pass
    except aio.AioRpcError as error:
        return error.code().name
    except asyncio.CancelledError:
        return "CANCELLED"
    return "OK"


async def _settled_rss(pid: int) -> float:
    """RSS once it stops growing (streams are still being set up a moment after opening)."""
    previous = rss_mib(pid)
    for _ in range(20):
        await asyncio.sleep(1.0)
        now = rss_mib(pid)
        if abs(now - previous) < 0.5:
            return now
        previous = now
    return previous


# --- the report ------------------------------------------------------------------------------


def report(args, out: Dict, load_before: str, photo_bytes: int) -> None:
    processes = ("one server process" if args.workers == "1" else
                 f"server --workers {args.workers}")
    if args.server_arg:
        processes += " " + " ".join(args.server_arg)
    print(f"\nmodel {args.model}, {processes}; {len(os.sched_getaffinity(0))} CPUs "
          f"shared with these callers; load average {load_before} before, {load_average()} "
          f"after\n")
    print("| one caller | p50 over gRPC ms | in-process engine, 1 image ms | difference ms |")
    print("|---|---:|---:|---:|")
    for rpc in ("Predict", "Explain"):
        g, e = out[f"single {rpc}"]
        print(f"| {rpc} | {g:.1f} | {e:.1f} | {g - e:+.1f} |")

    print(f"\n| {args.callers} callers | gRPC images/s | engine b{BATCH} images/s | ratio "
          "(rounds) | mean batch | p50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for rpc, e in out["efficiency"].items():
        ratios = [g / b for g, b in zip(e["grpc"], e["engine"])]
        print(f"| {rpc} | {np.median(e['grpc']):.1f} | {np.median(e['engine']):.1f} | "
              f"{np.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}) | "
              f"{np.mean(e['batch']):.1f} | {np.median(e['p50']):.0f} |")

    s = out["streams"]
    t: StreamTally = s["tally"]
    lat = np.array(t.latencies) * 1000.0 if t.latencies else np.zeros(1)
    base = out["unary alone"]["latencies"]
    print(f"\n| {args.unary} unary Predict callers | calls | p50 ms | mean ms | worst ms | "
          "each caller's p50 ms | p50 / alone | mean / alone |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for key, label in (("unary alone", "alone"),
                       ("unary idle", f"beside {args.streams} idle streams"),
                       ("unary streams", f"beside {args.streams} LATEST streams sending")):
        r = out[key]["latencies"]
        each = ", ".join(f"{p:.0f}" for p in sorted(out[key]["callers p50"]))
        print(f"| {label} | {r.size} | {np.median(r):.0f} | {r.mean():.0f} | {r.max():.0f} | "
              f"{each} | {np.median(r) / np.median(base):.2f} | {r.mean() / base.mean():.2f} |")

    per_stream_kib = (out["rss idle"] - out["rss before"]) * 1024.0 / args.streams
    # Several processes' memory moves by more than the streams add: one process measures it.
    per_stream = (f"{per_stream_kib:.1f} KiB a stream" if args.workers == "1" else
                  "a stream's cost is below how much the workers' memory moves")
    print(f"\n| server memory (RSS) | MiB |\n|---|---:|\n| before streams | "
          f"{out['rss before']:.0f} |\n| {args.streams} idle streams open | {out['rss idle']:.0f}"
          f" ({per_stream}; {out['idle ended']} ended early) |\n"
          f"| {args.streams} streams sending | {out['rss streams']:.0f} |")

    failed = ", ".join(f"{n} code {c}" for c, n in sorted(t.failed.items())) or "0"
    ended = ", ".join(f"{n} {c}" for c, n in sorted(t.ended.items()))
    print(f"\n{args.streams} LATEST streams on {args.connections} connections, "
          f"{s['frame_bytes']:,}-byte JPEG frames, one every {s['period']:.1f} s per stream "
          f"({s['rate']:.1f} frames/s planned = {args.load:g} x the Predict capacity above; "
          f"{s['window_rate']:.1f} sent/s in the {args.window:g} s window):")
    print("| frames sent | answered | skipped | failed | lost | p50 ms | p99 ms | streams ended |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {t.sent} | {t.answered} | {t.skipped} | {failed} | {t.lost} | "
          f"{np.median(lat):.0f} | {np.percentile(lat, 99):.0f} | {ended} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    photo = PHOTO.read_bytes()
    load_before = load_average()
    inproc = InProcess(args.model, photo)
    server = Server(args.model, ["--stream-idle-s", "600", "--max-streams", "4096",
                                 "--workers", args.workers, *args.server_arg])
    try:
        out = asyncio.run(run_all(args, server.port, server.process.pid, inproc, photo))
    except BaseException:
        print(server.tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
        inproc.close()
    report(args, out, load_before, len(photo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
