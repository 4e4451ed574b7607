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
    .venv/bin/python bench/bench_latency.py --quick         # a short smoke run
    .venv/bin/python bench/bench_latency.py --model torchvision:resnet18 --weights random
"""

from __future__ import annotations

import sys
import time
from functools import partial
from typing import Callable, List, Optional

import harness


def timed(call: Callable[[], object], n: int) -> List[float]:
    """Seconds of each of ``n`` calls one after the other."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def main(argv: Optional[List[str]] = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--model", default=harness.DEFAULT_MODEL)
    p.add_argument("--weights", default="default",
                   help="the server's --weights (default: the default model's own, else random)")
    p.add_argument("--calls", type=int, default=20, help="calls per side per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a short smoke run (2 rounds of 5)")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.rounds = 5, 2
    results = harness.Results(__file__, argv, args)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from camserve import Client
    from camserve_server.domain import ExplainSpec, WorkItem
    from camserve_server.process.server import CamServer
    from camserve_server.render import images

    jpeg = harness.photo()
    server = CamServer(harness.settings(args.model, args.weights, host="127.0.0.1", port=0))
    port = server.start()
    try:
        batcher, card = server.batcher, server.model.card
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
                grpc_s, local_s = [], []
                timed(remote, 3)  # warm both paths
                timed(local, 3)
                for _ in range(args.rounds):
                    grpc_s += timed(remote, args.calls)
                    local_s += timed(local, args.calls)
                rows.append((rpc, harness.median(grpc_s), harness.median(local_s)))
        pause_s = rows[0][2]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = partial(health_pb2_grpc.HealthStub(channel).Check,
                            health_pb2.HealthCheckRequest(), timeout=60)

            back_s, paused_s = [], []
            timed(check, 10)
            for _ in range(args.rounds):
                back_s += timed(check, args.calls)
                for _ in range(args.calls):
                    time.sleep(pause_s)
                    paused_s += timed(check, 1)
    finally:
        server.stop(grace=1)
    for rpc, remote, local in rows:
        results.row("one caller", rpc=rpc, grpc_p50_ms=remote * 1000.0,
                    in_process_p50_ms=local * 1000.0, difference_ms=(remote - local) * 1000.0,
                    ratio=remote / local)
    results.row("an empty call (Health/Check)", back_to_back_p50_ms=harness.median(back_s) *
                1000.0, after_idle_p50_ms=harness.median(paused_s) * 1000.0,
                idle_ms=pause_s * 1000.0)
    results.note(f"{args.model}, {harness.PHOTO.name} ({len(jpeg) // 1024} KB JPEG), one caller, "
                 f"{args.rounds} rounds x {args.calls} calls per side.")
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
