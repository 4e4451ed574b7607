"""Worker processes against torch threads: ``--workers W --torch-threads T`` for each W x T,
and each against camserve's engine in this process (serving efficiency).

For each model and each configuration it starts ``python -m camserve_server`` on a free port
of 127.0.0.1, waits until it serves, then ``--callers`` callers (asyncio, one connection each,
so that the kernel spreads them over the workers) send one JPEG per call back to back, Predict
and then Explain (the top class's Grad-CAM, raw map): ``--warmup`` seconds unmeasured, then a
slice of ``--seconds`` measured, each. After the configurations of a round, with no server
running, the engine runs in this process at batch 8 on the same photo decoded once (torch on
every core, as one server process has it; in_process.py), Predict and Explain, for half a
slice each. Configurations and engine take turns in ``--rounds`` rounds (a fresh server each
time), so a machine whose speed drifts skews the comparison less.

It prints one table: images/s (all answers over all measured time, and per round), the ratio
to the engine's images/s (the median of the per-round ratios: the issue's serving
efficiency), p50/p99 latency over every measured call, the mean batch size, and how many
answers each worker gave. Nothing is downloaded: models other than the default get
``--weights random``.

    python bench/bench_workers.py                                  # the README's table
    python bench/bench_workers.py --model torchvision:resnet18 --configs 1x2,2x1,2x2 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from in_process import BATCH, InProcess
from server_process import OWN_CONNECTION, Server

from camserve import AsyncClient

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "chelsea.jpg"
DEFAULT_MODELS = ("efficientnet_lite0", "torchvision:resnet18")
RPCS = ("Predict", "Explain")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=None,
                   help=f"model source (repeatable; default: {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--configs", default="1x2,2x1",
                   help="WORKERSxTORCH_THREADS, comma-separated (default %(default)s)")
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--seconds", type=float, default=24.0,
                   help="measured seconds per configuration and RPC, over all rounds")
    p.add_argument("--warmup", type=float, default=4.0,
                   help="unmeasured seconds before each measured slice")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for every server, e.g. --server-arg=--max-batch-size=16")
    return p.parse_args(argv)


def configs(text: str):
    out = []
    for part in text.split(","):
        workers, threads = part.lower().split("x")
        out.append((int(workers), int(threads)))
    return out


async def load(port: int, rpc: str, callers: int, warmup: float, seconds: float,
               photo: bytes):
    """Callers back to back; the calls that ended within the measured window (after the
    warm-up): (latency s, worker, batch size) each."""
    clients = [AsyncClient(f"127.0.0.1:{port}", timeout=60, options=OWN_CONNECTION)
               for _ in range(callers)]
    begin = time.perf_counter() + warmup
    end = begin + seconds
    calls = []

    async def caller(client: AsyncClient) -> None:
        while True:
            started = time.perf_counter()
            if started >= end:
                return
            if rpc == "Predict":
                answer = await client.predict(photo, top_k=1)
            else:
                answer = await client.explain(photo)
            done = time.perf_counter()
            if begin <= done <= end:
                calls.append((done - started, answer.timing.worker, answer.timing.batch_size))

    try:
        await asyncio.gather(*(caller(c) for c in clients))
    finally:
        for c in clients:
            await c.close()
    return calls


def main(argv=None) -> int:
    args = parse_args(argv)
    models = args.model or list(DEFAULT_MODELS)
    grid = configs(args.configs)
    photo = PHOTO.read_bytes()
    slice_s = args.seconds / args.rounds
    results = {(m, c, rpc): {"calls": [], "rates": []}
               for m in models for c in grid for rpc in RPCS}
    engine = {(m, rpc): [] for m in models for rpc in RPCS}
    load_before = os.getloadavg()
    for model in models:
        in_process = InProcess(model, photo)
        try:
            for round_ in range(args.rounds):
                for workers, threads in grid:
                    server = Server(model, ["--workers", str(workers), "--torch-threads",
                                            str(threads), *args.server_arg])
                    try:
                        for rpc in RPCS:
                            calls = asyncio.run(load(server.port, rpc, args.callers,
                                                     args.warmup, slice_s, photo))
                            r = results[(model, (workers, threads), rpc)]
                            r["calls"] += calls
                            r["rates"].append(len(calls) / slice_s)
                            print(f"# {model} {workers}x{threads} {rpc} round {round_ + 1}: "
                                  f"{len(calls) / slice_s:.1f} images/s", file=sys.stderr,
                                  flush=True)
                    finally:
                        server.stop()
                for rpc in RPCS:
                    engine[(model, rpc)].append(in_process.rate(rpc, slice_s / 2))
        finally:
            in_process.close()
    print(f"\n{args.callers} callers, one {PHOTO.name} ({len(photo):,} bytes) per call, "
          f"{args.seconds:g} s measured per row in {args.rounds} rounds, each after a "
          f"{args.warmup:g} s warm-up; {len(os.sched_getaffinity(0))} CPUs; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print(f"| model | RPC | workers x torch threads | images/s (rounds) | engine b{BATCH} "
          "images/s | ratio (rounds) | p50 ms | p99 ms | mean batch | answers per worker |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for model in models:
        for rpc in RPCS:
            base = engine[(model, rpc)]
            for workers, threads in grid:
                r = results[(model, (workers, threads), rpc)]
                latencies = np.array([c[0] for c in r["calls"]]) * 1000.0
                per_worker = Counter(c[1] for c in r["calls"])
                batch = np.mean([c[2] for c in r["calls"]]) if r["calls"] else 0.0
                ratios = [g / e for g, e in zip(r["rates"], base)]
                p50, p99 = (np.percentile(latencies, (50, 99)) if latencies.size
                            else (0.0, 0.0))
                print(f"| {model} | {rpc} | {workers} x {threads} | "
                      f"{len(r['calls']) / args.seconds:.1f} "
                      f"({', '.join(f'{x:.1f}' for x in r['rates'])}) | {np.median(base):.1f} | "
                      f"{np.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) | "
                      f"{p50:.0f} | {p99:.0f} | {batch:.1f} | "
                      f"{' / '.join(f'{w}: {n}' for w, n in sorted(per_worker.items()))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
