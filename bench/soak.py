"""Soak/load test: N callers x M mixed requests against a server, for a bounded time.

Each caller sends a mix of Predict, Explain (raw map, or rendered overlay), multi-image
Predict, malformed requests and calls with very short deadlines, and records how every call
ended. It prints sent / answered / rejected by status / lost; "lost" counts calls that never
ended (a hang) and must be 0.

    python bench/soak.py                           # starts its own server (tiny queue)
    python bench/soak.py --target host:port        # or loads a running one
    python bench/soak.py --callers 32 --requests 200 --seconds 120
    python bench/soak.py --sigterm-after 10        # SIGTERM the started server mid-run:
                                                   # calls end OK, UNAVAILABLE or CANCELLED
"""

from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Optional

import numpy as np
from PIL import Image

from camserve import CamserveError, Client

HANG_S = 120.0  # a call still open this long after the run is "lost"


def photo() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def run(target: str, callers: int, requests: int, seconds: float, seed: int = 0,
        until_unavailable: bool = False) -> dict:
    """Drive the server; returns counts: sent, answered, by status, lost. With
    ``until_unavailable`` a caller stops once the server says it is going away."""
    jpeg = photo()
    array = np.full((120, 160, 3), 77, np.uint8)
    ended: Counter = Counter()
    started = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    client = Client(target, timeout=60)

    def one(kind: str) -> str:
        try:
            if kind == "predict":
                client.predict(jpeg)
            elif kind == "predict_many":
                client.predict_many([jpeg, array, array])
            elif kind == "explain":
                client.explain(array)
            elif kind == "overlay":
                client.explain(jpeg, outputs=("overlay_jpeg",))
            elif kind == "malformed":
                client.predict(b"\xff\xd8 not really a jpeg")
            elif kind == "short_deadline":
                client.predict(jpeg, timeout=0.001)
            return "OK"
        except CamserveError as exc:
            return exc.code.name

    kinds = ["predict"] * 4 + ["explain"] * 3 + ["predict_many", "overlay", "malformed",
                                                 "short_deadline"]

    def caller(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        for _ in range(requests):
            if time.monotonic() >= stop_at:
                return
            kind = rng.choice(kinds)
            with lock:
                started[kind] += 1
            status = one(kind)
            with lock:
                ended[(kind, status)] += 1
            if until_unavailable and status in ("UNAVAILABLE", "CANCELLED"):
                return

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + HANG_S)
    client.close()
    with lock:
        sent = sum(started.values())
        done = sum(ended.values())
        by_status = Counter()
        for (_, status), count in ended.items():
            by_status[status] += count
        return {"sent": sent, "answered": by_status.pop("OK", 0), "rejected": dict(by_status),
                "lost": sent - done, "by_kind": {f"{k} {s}": c for (k, s), c in ended.items()}}


def report(result: dict) -> None:
    print(f"sent {result['sent']}  answered {result['answered']}  lost {result['lost']}")
    for status, count in sorted(result["rejected"].items()):
        print(f"  rejected {status}: {count}")
    for key, count in sorted(result["by_kind"].items()):
        print(f"    {key}: {count}")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="a running server (default: start one)")
    p.add_argument("--model", default="efficientnet_lite0", help="model for the started server")
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--requests", type=int, default=100, help="per caller")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--sigterm-after", type=float, metavar="S",
                   help="send SIGTERM to the started server S seconds into the run")
    args = p.parse_args(argv)
    if args.sigterm_after is not None and args.target is not None:
        p.error("--sigterm-after needs the server this script starts (no --target)")
    server = None
    target = args.target
    if target is None:
        server = subprocess.Popen(
            [sys.executable, "-m", "camserve_server", "--host", "127.0.0.1", "--port", "0",
             "--model", args.model, "--max-queue", "16", "--log-level", "WARNING"],
            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        line = server.stdout.readline()
        target = "127.0.0.1:" + line.rsplit(":", 1)[1].strip()
        Client(target).wait_until_ready(300)
    if args.sigterm_after is not None:
        threading.Timer(args.sigterm_after, server.terminate).start()
    try:
        result = run(target, args.callers, args.requests, args.seconds,
                     until_unavailable=args.sigterm_after is not None)
    finally:
        if server is not None:
            server.terminate()
            code = server.wait(60)
            print(f"server exit status: {code}")
    report(result)
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
