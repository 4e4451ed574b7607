"""Worker processes against torch threads: ``--workers W --torch-threads T`` for each W x T,
and each against camserve's engine in this process (serving efficiency).

For each model and each configuration it starts ``python -m camserve_server`` on a free port
of 127.0.0.1, waits until it serves, then ``--callers`` callers (asyncio, one connection each,
so that the kernel spreads them over the workers) send one JPEG per call back to back, Predict
and then Explain (the top class's Grad-CAM, raw map): ``--warmup`` seconds unmeasured, then a
slice of ``--seconds`` measured, each. After the configurations of a round, with no server
running, the engine runs in this process at batch 8 on the same photo decoded once (torch on
every core, as one server process has it: harness.InProcess), Predict and Explain, for half a
slice each. Configurations and engine take turns in ``--rounds`` rounds (a fresh server each
time), so a machine whose speed drifts skews the comparison less.

It prints one table: images/s (all answers over all measured time, and per round), the ratio
to the engine's images/s (the median of the per-round ratios: serving efficiency), latency
percentiles over every measured call, the mean batch size, and how many answers each worker
gave. Nothing is downloaded: models other than the default get
``--weights random``.

    python bench/bench_workers.py                                  # both models, 1x2 and 2x1
    python bench/bench_workers.py --quick                          # a short smoke run
    python bench/bench_workers.py --model torchvision:resnet18 --configs 1x2,2x1,2x2 --seconds 10
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

import harness

from camserve import AsyncClient

DEFAULT_MODELS = ("efficientnet_lite0", "torchvision:resnet18")
RPCS = ("Predict", "Explain")


def parse_args(argv=None):
    p = harness.parser(__doc__)
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
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run: the default model, 8 callers, 1 round of 3 s")
    args = p.parse_args(argv)
    if args.quick:
        args.model = args.model or [harness.DEFAULT_MODEL]
        args.callers, args.seconds, args.warmup, args.rounds = 8, 3.0, 1.0, 1
    return args


def configs(text: str):
    out = []
    for part in text.split(","):
        workers, threads = part.lower().split("x")
        out.append((int(workers), int(threads)))
    return out


async def load(target: str, rpc: str, callers: int, warmup: float, seconds: float,
               photo: bytes) -> harness.Calls:
    """Callers back to back, a connection each; the calls that ended within the measured
    window (after the warm-up)."""
    clients = [AsyncClient(target, timeout=60, options=harness.OWN_CONNECTION)
               for _ in range(callers)]

    def call(client):
        return client.predict(photo, top_k=1) if rpc == "Predict" else client.explain(photo)

    try:
        return await harness.closed_loop_async(call, clients, seconds, warmup)
    finally:
        for c in clients:
            await c.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    results = harness.Results(__file__, argv, args)
    models = args.model or list(DEFAULT_MODELS)
    grid = configs(args.configs)
    photo = harness.photo()
    slice_s = args.seconds / args.rounds
    runs = {(m, c, rpc): [] for m in models for c in grid for rpc in RPCS}
    engine = {(m, rpc): [] for m in models for rpc in RPCS}
    for model in models:
        in_process = harness.InProcess(model, photo)
        try:
            for round_ in range(args.rounds):
                for workers, threads in grid:
                    with harness.Server(model, ["--workers", str(workers), "--torch-threads",
                                                str(threads), *args.server_arg]) as server:
                        for rpc in RPCS:
                            calls = asyncio.run(load(server.target, rpc, args.callers,
                                                     args.warmup, slice_s, photo))
                            runs[(model, (workers, threads), rpc)].append(calls)
                            print(f"# {model} {workers}x{threads} {rpc} round {round_ + 1}: "
                                  f"{calls.rate:.1f} images/s", file=sys.stderr, flush=True)
                for rpc in RPCS:
                    engine[(model, rpc)].append(in_process.rate(rpc, slice_s / 2))
        finally:
            in_process.close()
    for model in models:
        for rpc in RPCS:
            base = engine[(model, rpc)]
            for workers, threads in grid:
                rounds = runs[(model, (workers, threads), rpc)]
                every = harness.Calls([c for r in rounds for c in r.calls], args.seconds)
                ratios = [r.rate / e for r, e in zip(rounds, base)]
                per_worker = Counter(a.timing.worker for a in every.answers)
                results.row(f"{args.callers} callers", model=model, rpc=rpc,
                            workers_x_torch_threads=f"{workers} x {threads}",
                            images_per_s=every.rate, rounds=[r.rate for r in rounds],
                            engine_b8_images_per_s=harness.median(base),
                            ratio=harness.median(ratios), ratio_rounds=ratios,
                            **every.percentiles(), mean_batch=every.mean_of("batch_size"),
                            answers_per_worker=dict(sorted(per_worker.items())))
    results.note(f"One {harness.PHOTO.name} ({len(photo):,} bytes) per call, "
                 f"{args.seconds:g} s measured per row in {args.rounds} round(s), each after a "
                 f"{args.warmup:g} s warm-up.")
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
