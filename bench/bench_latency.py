"""One caller's latency: a Predict or Explain over gRPC against the same work done in process.

The server runs in this process (on its own threads, as `camserve-server` does), and the
in-process side runs the server's engine on the server's own worker thread (through its batcher,
with nothing else queued), so that both sides use the same torch threads and one CPU budget:
the difference is what the RPC, the event loop, the decode pool and the answer cost. (Running
the engine on this script's main thread instead would not compare like with like: torch's
OpenMP threads belong to the thread that calls them, see bench_threads.py.) The in-process side
does what the server does for one image: decode and resize the JPEG and run the engine
(Explain: Grad-CAM of the top class, the raw map, as the client asks by default). Rounds
alternate the two sides.

Last, the floor any gRPC call pays here: an empty call (grpc.health.v1 Health/Check) back to
back, and after an idle pause as long as the in-process Predict, as a Predict's answer comes
after the forward.

    .venv/bin/python bench/bench_latency.py                 # default model, the cat photo
    .venv/bin/python bench/bench_latency.py --model torchvision:resnet18 --weights random
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "chelsea.jpg"


def timed(call: Callable[[], object], n: int) -> List[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default=None)
    p.add_argument("--calls", type=int, default=20, help="calls per side per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from camserve import Client
    from camserve_server.domain import ExplainSpec, WorkItem
    from camserve_server.process.server import CamServer
    from camserve_server.process.settings import Settings
    from camserve_server.render import images

    jpeg = PHOTO.read_bytes()
    server = CamServer(Settings(host="127.0.0.1", port=0, model=args.model,
                                weights=args.weights))
    port = server.start()
    try:
        batcher, card = server._batcher, server.model.card
        limits = images.Limits(server.settings.max_image_bytes, server.settings.max_image_pixels)
        spec = ExplainSpec(methods=("gradcam",), layers=(card.layers[0].name,), top_targets=1)

        def in_process(explain: bool) -> None:
            decoded = images.prepare(jpeg, card.input_size, limits, None)
            batcher.submit(WorkItem(decoded.pixels, spec if explain else None)).result()

        rows = []
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            for rpc in ("predict", "explain"):
                remote = partial(getattr(client, rpc), jpeg)
                local = partial(in_process, rpc == "explain")
                grpc_ms, local_ms = [], []
                timed(remote, 3)  # warm both paths
                timed(local, 3)
                for _ in range(args.rounds):
                    grpc_ms += timed(remote, args.calls)
                    local_ms += timed(local, args.calls)
                rows.append((rpc, statistics.median(grpc_ms), statistics.median(local_ms)))
        pause_s = rows[0][2] / 1000.0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = partial(health_pb2_grpc.HealthStub(channel).Check,
                            health_pb2.HealthCheckRequest(), timeout=60)

            back_ms, paused_ms = [], []
            timed(check, 10)
            for _ in range(args.rounds):
                back_ms += timed(check, args.calls)
                for _ in range(args.calls):
                    time.sleep(pause_s)
                    paused_ms += timed(check, 1)
    finally:
        server.stop(grace=1)
    print(f"{args.model}, {PHOTO.name} ({len(jpeg) // 1024} KB JPEG), one caller, "
          f"{args.rounds} rounds x {args.calls} calls per side")
    print("| one caller | p50 over gRPC ms | p50 in process ms | difference ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for rpc, remote, local in rows:
        print(f"| {rpc} | {remote:.1f} | {local:.1f} | {remote - local:+.1f} | "
              f"{remote / local:.2f} |")
    print(f"An empty call (Health/Check): p50 {statistics.median(back_ms):.2f} ms back to back, "
          f"{statistics.median(paused_ms):.2f} ms after {pause_s * 1000:.0f} ms idle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
