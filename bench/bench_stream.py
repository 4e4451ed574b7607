"""camserve streaming benchmark: frames/s and per-frame latency over StreamPredict.

One run, one server (a subprocess on 127.0.0.1), JPEG frames of a real photo moving across a
640x480 canvas:

1. capacity: 4 streams with policy ALL, sending as fast as the server takes frames; and, in
   this process while the server idles, the engine alone at batch 8 (the in-process
   baseline the ratio is taken against);
2. 1 and 4 streams at a fixed total input rate below capacity (``--load`` x capacity), policy
   ALL: frames/s answered and latency p50/p99;
3. 1 stream at twice the capacity with policy LATEST: latency must stay flat, so the table
   puts the p50 of the first and the last quarter of the run side by side; the same with
   policy ALL shows the backlog that LATEST avoids.

It only reports (exit code 0 unless something crashed); nothing is downloaded.

    python bench/bench_stream.py                      # default model, about 2 minutes
    python bench/bench_stream.py --model torchvision:resnet18 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from camserve import Client  # noqa: E402

import bench_core  # noqa: E402  (the server runner, machine facts and weights helpers)


def frames_jpeg(count: int = 60) -> list:
    """JPEG frames: the cat photo moving left to right over a 640x480 canvas."""
    import io

    import skimage.data
    from PIL import Image

    cat = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((320, 213)))
    out = []
    for i in range(count):
        canvas = np.full((480, 640, 3), 40, np.uint8)
        x = i * 320 // (count - 1)
        canvas[130:343, x:x + 320] = cat
        buffer = io.BytesIO()
        Image.fromarray(canvas).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def paced(frames: list, rate: float, seconds: float):
    """Frames at ``rate`` per second (0: as fast as taken) for ``seconds``, cycling."""
    started = time.monotonic()
    n = 0
    while True:
        due = started + n / rate if rate else time.monotonic()
        if due - started >= seconds:
            return
        time.sleep(max(0.0, due - time.monotonic()))
        yield frames[n % len(frames)]
        n += 1


def run_streams(target: str, frames: list, streams: int, rate: float, seconds: float,
                policy: str) -> dict:
    """``streams`` concurrent streams, ``rate`` frames/s in total (0: unpaced)."""
    per_stream = rate / streams if rate else 0.0
    results = [[] for _ in range(streams)]
    errors = []

    def one(i):
        try:
            with Client(target, timeout=None) as client:
                for r in client.stream_predict(paced(frames, per_stream, seconds),
                                               policy=policy):
                    results[i].append((time.monotonic(), r.latency_ms, r.skipped, r.ok))
        except Exception as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    if errors:
        raise errors[0]
    rows = sorted(x for r in results for x in r)
    latencies = np.array([x[1] for x in rows])
    quarter = max(1, len(rows) // 4)
    return {"streams": streams, "policy": policy, "input_rate": rate,
            "answered": len(rows), "skipped": int(sum(x[2] for x in rows)),
            "failed": int(sum(not x[3] for x in rows)), "fps": len(rows) / wall,
            "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
            "p50_first_quarter": float(np.percentile(latencies[:quarter], 50)),
            "p50_last_quarter": float(np.percentile(latencies[-quarter:], 50))}


def engine_capacity(model: str, weights, jpeg: bytes, seconds: float) -> float:
    """In-process baseline: the engine alone at batch 8, frames/s."""
    from camserve_server.domain import WorkItem
    from camserve_server.engine.engine import Engine
    from camserve_server.engine.models import load_model
    from camserve_server.process.settings import Settings
    from camserve_server.render import images

    served = load_model(Settings(model=model, weights=weights))
    pixels = images.prepare(jpeg, served.card.input_size, images.Limits(1 << 30, 1 << 30)).pixels
    engine = Engine(served)
    batch = [WorkItem(pixels)] * 8
    return bench_core.time_batches(lambda: engine.run(batch), seconds, 1.0)["rate"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--seconds", type=float, default=15.0, help="per run (default %(default)s)")
    p.add_argument("--load", type=float, default=0.6,
                   help="input rate of the below-capacity runs, x capacity (default %(default)s)")
    args = p.parse_args(argv)
    print("machine: " + "  ".join(f"{k}={v}" for k, v in bench_core.machine().items()))
    frames = frames_jpeg()
    with tempfile.TemporaryDirectory(prefix="camserve-bench-") as folder:
        weights = bench_core.seeded_weights(args.model, folder)
        with bench_core.Server(args.model, weights, os.path.join(folder, "log")) as server:
            target = f"127.0.0.1:{server.port}"
            Client(target).wait_until_ready(300)
            run_streams(target, frames, 4, 0, 3, "all")  # warm-up
            capacity = run_streams(target, frames, 4, 0, args.seconds, "all")
            cap = capacity["fps"]
            engine = engine_capacity(args.model, weights, frames[0], 5)
            runs = [("capacity: 4 streams, unpaced", capacity)]
            for streams in (1, 4):
                runs.append((f"{streams} stream{'s' * (streams > 1)} at {args.load:g}x capacity",
                             run_streams(target, frames, streams, args.load * cap,
                                         args.seconds, "all")))
            for policy in ("latest", "all"):
                runs.append((f"1 stream at 2x capacity, {policy.upper()}",
                             run_streams(target, frames, 1, 2 * cap, args.seconds, policy)))
    print(f"\n== {args.model}: streaming, 640x480 JPEG frames; capacity {cap:.1f} frames/s over "
          f"gRPC, engine alone at batch 8 in process {engine:.1f} frames/s "
          f"(ratio {cap / engine:.2f}) ==")
    print(f"{'run':38} {'input/s':>8} {'answered/s':>10} {'skipped':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'p50 1st q':>10} {'p50 last q':>10}")
    for name, r in runs:
        rate = f"{r['input_rate']:.1f}" if r["input_rate"] else "max"
        print(f"{name:38} {rate:>8} {r['fps']:10.1f} {r['skipped']:8d} {r['p50']:8.0f} "
              f"{r['p99']:8.0f} {r['p50_first_quarter']:10.0f} {r['p50_last_quarter']:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
