"""Soak/load test: N callers x M mixed requests against a server, for a bounded time.

Each caller sends a mix of Predict, Explain (raw map, or rendered overlay), multi-image
Predict, malformed requests and calls with very short deadlines, and records how every call
ended. It reports sent / answered / rejected by status / lost; "lost" counts calls that never
ended (a hang) and must be 0; the exit status is 1 if any was lost.

    python bench/soak.py                           # starts its own server (tiny queue)
    python bench/soak.py --target host:port        # or loads a running one
    python bench/soak.py --callers 32 --requests 200 --seconds 120
    python bench/soak.py --quick                   # 8 callers x 10 requests
    python bench/soak.py --sigterm-after 10        # SIGTERM the started server mid-run:
                                                   # calls end OK, UNAVAILABLE or CANCELLED
"""

from __future__ import annotations

import io
import random
import signal
import sys
import threading
from collections import Counter
from typing import Optional

import harness
import numpy as np
from PIL import Image

from camserve import CamserveError, Client

HANG_S = 120.0  # a call still open this long after the run is "lost"
KINDS = ["predict"] * 4 + ["explain"] * 3 + ["predict_many", "overlay", "malformed",
                                             "short_deadline"]


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
    client = Client(target, timeout=60)
    rngs = [random.Random(seed * 1000 + n) for n in range(callers)]

    def one(caller: int):
        kind = rngs[caller].choice(KINDS)
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
            return kind, "OK"
        except CamserveError as exc:
            return kind, exc.code.name

    def going_away(answer) -> bool:
        return until_unavailable and answer[1] in ("UNAVAILABLE", "CANCELLED")

    running = harness.Callers(one, callers, calls_each=requests, until=going_away).start()
    running.wait(seconds)
    calls = running.stop(HANG_S)
    client.close()
    ended = Counter(call.answer for call in calls.calls)
    by_status = Counter()
    for (_, status), count in ended.items():
        by_status[status] += count
    return {"sent": calls.started, "answered": by_status.pop("OK", 0),
            "rejected": dict(by_status), "lost": calls.started - len(calls),
            "by_kind": {f"{k} {s}": c for (k, s), c in ended.items()}}


def main(argv: Optional[list] = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--target", help="a running server (default: start one)")
    p.add_argument("--model", default=harness.DEFAULT_MODEL,
                   help="model for the started server")
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--requests", type=int, default=100, help="per caller")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--sigterm-after", type=float, metavar="S",
                   help="send SIGTERM to the started server S seconds into the run")
    p.add_argument("--quick", action="store_true", help="8 callers x 10 requests")
    args = p.parse_args(argv)
    if args.sigterm_after is not None and args.target is not None:
        p.error("--sigterm-after needs the server this script starts (no --target)")
    if args.quick:
        args.callers, args.requests = 8, 10
    results = harness.Results(__file__, argv, args)
    server = None if args.target else harness.Server(args.model, ["--max-queue", "16"])
    target = args.target or server.target
    signalled = []
    if args.sigterm_after is not None:
        def sigterm() -> None:
            signalled.append(True)
            server.process.send_signal(signal.SIGTERM)
        timer = threading.Timer(args.sigterm_after, sigterm)
        timer.start()
    try:
        result = run(target, args.callers, args.requests, args.seconds,
                     until_unavailable=args.sigterm_after is not None)
    finally:
        if args.sigterm_after is not None:
            timer.cancel()
        if server is not None:
            code = server.process.wait(60) if signalled else server.stop()
    results.row("calls", sent=result["sent"], answered=result["answered"],
                rejected=dict(sorted(result["rejected"].items())) or "none",
                lost=result["lost"], **({"server_exit_status": code} if server else {}))
    for key, count in sorted(result["by_kind"].items()):
        kind, status = key.split(" ")
        results.row("by kind", kind=kind, status=status, calls=count)
    results.finish(args.json)
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
