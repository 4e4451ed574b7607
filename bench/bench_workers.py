"""Worker processes against torch threads: ``--workers W --torch-threads T`` for each W x T.

For each model and each configuration it starts ``python -m camserve_server`` on a free port
of 127.0.0.1, waits until it serves, then ``--callers`` callers (asyncio, one connection each,
so that the kernel spreads them over the workers) send one JPEG per Predict back to back:
``--warmup`` seconds unmeasured, then ``--seconds`` measured. Configurations take turns in
``--rounds`` rounds (each round a fresh server and a slice of the seconds), so a machine whose
speed drifts skews the comparison less. It prints one table: images/s (all answers over all
measured time, and the range over rounds), p50/p99 latency over every measured call, the mean
batch size, and how many answers each worker gave. Nothing is downloaded: models other than the
default get ``--weights random``.

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
from server_process import OWN_CONNECTION, Server

from camserve import AsyncClient

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "chelsea.jpg"
DEFAULT_MODELS = ("efficientnet_lite0", "torchvision:resnet18")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=None,
                   help=f"model source (repeatable; default: {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--configs", default="1x2,2x1",
                   help="WORKERSxTORCH_THREADS, comma-separated (default %(default)s)")
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0,
                   help="measured seconds per configuration, over all rounds")
    p.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for every server, e.g. --server-arg=--max-batch-size=16")
    return p.parse_args(argv)


def configs(text: str):
    out = []
    for part in text.split(","):
        workers, threads = part.lower().split("x")
        out.append((int(workers), int(threads)))
    return out


async def load(port: int, callers: int, warmup: float, seconds: float, photo: bytes):
    """Callers back to back; the calls that ended within the measured window (after the
    warm-up): (latency s, worker, batch size) each, and the window's length."""
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
            prediction = await client.predict(photo, top_k=1)
            done = time.perf_counter()
            if begin <= done <= end:
                calls.append((done - started, prediction.timing.worker,
                              prediction.timing.batch_size))

    try:
        await asyncio.gather(*(caller(c) for c in clients))
    finally:
        for c in clients:
            await c.close()
    return calls, seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    models = args.model or list(DEFAULT_MODELS)
    grid = configs(args.configs)
    photo = PHOTO.read_bytes()
    slice_s = args.seconds / args.rounds
    results = {(m, c): {"calls": [], "seconds": 0.0, "rates": []} for m in models for c in grid}
    load_before = os.getloadavg()
    for model in models:
        for round_ in range(args.rounds):
            for workers, threads in grid:
                server = Server(model, ["--workers", str(workers), "--torch-threads", str(threads),
                                         *args.server_arg])
                try:
                    calls, seconds = asyncio.run(load(server.port, args.callers, args.warmup,
                                                      slice_s, photo))
                finally:
                    server.stop()
                r = results[(model, (workers, threads))]
                r["calls"] += calls
                r["seconds"] += seconds
                r["rates"].append(len(calls) / seconds)
                print(f"# {model} {workers}x{threads} round {round_ + 1}: "
                      f"{len(calls) / seconds:.1f} images/s", file=sys.stderr, flush=True)
    print(f"\n{args.callers} callers, one {PHOTO.name} ({len(photo):,} bytes) per Predict, "
          f"{args.seconds:g} s measured per row in {args.rounds} rounds after {args.warmup:g} s "
          f"warm-ups; {os.cpu_count()} cores; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    print("| model | workers x torch threads | images/s (rounds) | p50 ms | p99 ms | "
          "mean batch | answers per worker |")
    print("|---|---|---:|---:|---:|---:|---|")
    for model in models:
        for workers, threads in grid:
            r = results[(model, (workers, threads))]
            latencies = np.array([c[0] for c in r["calls"]]) * 1000.0
            per_worker = Counter(c[1] for c in r["calls"])
            batch = np.mean([c[2] for c in r["calls"]]) if r["calls"] else 0.0
            rounds = ", ".join(f"{x:.1f}" for x in r["rates"])
            p50, p99 = (np.percentile(latencies, (50, 99)) if latencies.size else (0.0, 0.0))
            print(f"| {model} | {workers} x {threads} | {len(r['calls']) / r['seconds']:.1f} "
                  f"({rounds}) | {p50:.0f} | {p99:.0f} | {batch:.1f} | "
                  f"{' / '.join(f'{w}: {n}' for w, n in sorted(per_worker.items()))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
