"""camserve streaming benchmark: frames/s and per-frame latency over StreamPredict.

One run, one server (a subprocess on 127.0.0.1), JPEG frames of a real photo moving across a
640x480 canvas:

1. capacity: 4 streams with policy ALL, sending as fast as the server takes frames; and, in
   this process once the server has stopped, the engine alone at batch 8 (the in-process
   baseline the ratio is taken against);
2. 1 and 4 streams at a fixed total input rate below capacity (``--load`` x capacity), policy
   ALL: frames/s answered and latency p50/p99;
3. 1 stream at twice the capacity with policy LATEST: latency must stay flat, so the table
   puts the p50 of the first and the last quarter of the run side by side; the same with
   policy ALL shows the backlog that LATEST avoids.

It only reports (exit code 0 unless something crashed); nothing is downloaded.

    python bench/bench_stream.py                      # default model, about 2 minutes
    python bench/bench_stream.py --quick              # a short smoke run (3 s per run)
    python bench/bench_stream.py --model torchvision:resnet18 --seconds 20
"""

from __future__ import annotations

import sys
import threading
import time

import harness
import numpy as np

from camserve import Client


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
    seconds = [x[1] / 1000.0 for x in rows]
    quarter = max(1, len(rows) // 4)
    return {"input_per_s": rate or "max", "answered_per_s": len(rows) / wall,
            "answered": len(rows), "skipped": int(sum(x[2] for x in rows)),
            "failed": int(sum(not x[3] for x in rows)), **harness.percentiles(seconds),
            "p50_first_quarter_ms": harness.percentiles(seconds[:quarter])["p50_ms"],
            "p50_last_quarter_ms": harness.percentiles(seconds[-quarter:])["p50_ms"]}


def main(argv=None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--model", default=harness.DEFAULT_MODEL)
    p.add_argument("--seconds", type=float, default=15.0, help="per run (default %(default)s)")
    p.add_argument("--load", type=float, default=0.6,
                   help="input rate of the below-capacity runs, x capacity (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a short smoke run (3 s per run)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = 3.0
    results = harness.Results(__file__, argv, args)
    frames = frames_jpeg()
    with harness.Server(args.model) as server:
        run_streams(server.target, frames, 4, 0, min(3.0, args.seconds), "all")  # warm-up
        runs = [("capacity: 4 streams, unpaced",
                 run_streams(server.target, frames, 4, 0, args.seconds, "all"))]
        cap = runs[0][1]["answered_per_s"]
        for streams in (1, 4):
            runs.append((f"{streams} stream{'s' * (streams > 1)} at {args.load:g}x capacity",
                         run_streams(server.target, frames, streams, args.load * cap,
                                     args.seconds, "all")))
        for policy in ("latest", "all"):
            runs.append((f"1 stream at 2x capacity, {policy.upper()}",
                         run_streams(server.target, frames, 1, 2 * cap, args.seconds, policy)))
    # In process, with no server running: the engine alone at batch 8 on one frame.
    engine = harness.InProcess(args.model, frames[0])
    try:
        engine_rate = engine.rate("Predict", 5.0)
    finally:
        engine.close()
    table = f"{args.model}: StreamPredict, 640x480 JPEG frames"
    for name, r in runs:
        results.row(table, run=name, **r)
    results.row(f"{args.model}: capacity against the engine", grpc_frames_per_s=cap,
                engine_b8_frames_per_s=engine_rate, ratio=cap / engine_rate)
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
