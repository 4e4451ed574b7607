"""Torch on the thread that serves: a forward on a second thread once the first thread has run
parallel work, against the two ways that avoid it (torch's OpenMP keeps the first thread's
team, and the second thread's team then waits for its threads instead of keeping them spinning
between the many small parallel regions of a forward). The server's loading thread runs torch
on one thread for this reason.

    .venv/bin/python bench/bench_threads.py            # default model, batch 1 and 8
    .venv/bin/python bench/bench_threads.py --quick    # 5 forwards each

Each way runs in a fresh process (OpenMP's state is per process) and gives the median forward
time in milliseconds on the thread that serves, as the server's batcher worker does:

- main: the forward on the main thread (what a script does);
- worker, main went parallel: the main thread ran one forward first, then a second thread
  (a model loaded and warmed up on the main thread);
- worker, main on 1 thread: the main thread loads on one torch thread, the second thread sets
  its own count (what the server does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import List, Optional

import harness

WAYS = ("main", "worker, main went parallel", "worker, main on 1 thread")


def measure(way: str, batch: int, calls: int) -> float:
    import torch

    threads = torch.get_num_threads()
    if way == WAYS[2]:
        torch.set_num_threads(1)
    model = harness.load_model(device=torch.device("cpu")).module
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def timed() -> float:
        torch.set_num_threads(threads)
        times = []
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            for _ in range(calls):
                started = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - started) * 1000)
        return harness.median(times)

    if way == WAYS[0]:
        return timed()
    if way == WAYS[1]:
        with torch.inference_mode():
            model(x)
    result: List[float] = []
    worker = threading.Thread(target=lambda: result.append(timed()))
    worker.start()
    worker.join()
    return result[0]


def main(argv: Optional[List[str]] = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="5 forwards each")
    p.add_argument("--way", help=argparse.SUPPRESS)  # one measurement, in this process
    args = p.parse_args(argv)
    if args.way:
        print(json.dumps(measure(args.way, int(args.batch), args.calls)))
        return 0
    if args.quick:
        args.calls = 5
    results = harness.Results(__file__, argv, args)
    import torch

    results.note(f"Default model, torch {torch.__version__}, {torch.get_num_threads()} "
                 f"threads; median of {args.calls} forwards, each way in a fresh process.")
    for batch in args.batch.split(","):
        ms = {}
        for way in WAYS:
            out = subprocess.run([sys.executable, __file__, "--way", way, "--batch", batch,
                                  "--calls", str(args.calls)], capture_output=True, text=True,
                                 check=True).stdout
            ms[f"{way}_ms"] = json.loads(out.strip().splitlines()[-1])
        results.row("forward on the thread that serves", batch=int(batch), **ms)
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
