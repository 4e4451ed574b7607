"""Two models in one server: each alone against both together, a quiet model beside a saturated
one, and a version swapped (and loaded and unloaded many times) while another model serves.

It writes a model repository to a temporary folder (the default model as ``lite``; ``resnet``,
a torchvision resnet18 with seeded random weights, versions 1 and 2) and starts
``python -m camserve_server --model-repository`` on it, on a free port of 127.0.0.1. In one run:

1. Together against alone: ``--callers`` closed-loop Predict callers on each model, first on a
   server of that model alone, then on both at once in one server (each model's own callers):
   each model's images/s, and what the two together give over the mean of the two alone (1.0:
   sharing the device costs nothing).
2. Fairness: one quiet caller on ``resnet`` (a Predict every ``--quiet-pause-s``), alone and
   beside ``--callers`` unpaced callers on ``lite``: the quiet caller's p50 and p90, and their
   ratio (the device goes to the models in turn: the quiet model waits for at most one of the
   busy model's batches).
3. A swap under load (``--model-control explicit``): ``--callers`` callers on ``lite`` and a
   light one on ``resnet`` (no version named), a window before and a window in which version 2
   of ``resnet`` is loaded and version 1 unloaded (the policy serves the latest): calls failed
   (must be 0), ``lite``'s images/s in each window and their ratio, how long the load took.
4. Memory over ``--cycles`` loads and unloads of ``resnet``: the server's resident memory with
   ``resnet`` unloaded before and after them.

Everything runs on this machine beside the server, so the callers' own CPU counts against it;
the results record the load average before and after. It reports and never fails on a time.

    .venv/bin/python bench/bench_models.py              # the full run (about 5 minutes)
    .venv/bin/python bench/bench_models.py --quick      # a short smoke run
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import harness

from camserve import CamserveError, Client

ADMIN = "bench-admin"


def write_repository(root: Path) -> None:
    import torch
    import torchvision

    (root / "lite" / "1").mkdir(parents=True)
    (root / "lite" / "config.toml").write_text('source = "efficientnet_lite0"\n')
    (root / "resnet").mkdir()
    (root / "resnet" / "config.toml").write_text(
        'source = "torchvision:resnet18"\nversion_policy = "latest"\n')
    for version, seed in ((1, 1), (2, 2)):
        torch.manual_seed(seed)
        folder = root / "resnet" / str(version)
        folder.mkdir()
        torch.save(torchvision.models.resnet18().state_dict(), folder / "weights.pth")
    # Version 2 is on disk from the start and hidden until the swap: only version 1 serves.
    (root / "resnet" / "2").rename(root / "resnet.v2")


def clients(server: harness.Server, n: int, token: Optional[str] = None):
    return [Client(server.target, timeout=120, token=token, options=harness.OWN_CONNECTION)
            for _ in range(n)]


def predictor(pool, model: str):
    photo = harness.photo()
    return lambda i: pool[i].predict(photo, model=model, top_k=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--callers", type=int, default=8, help="busy callers per model (default 8)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per window (default 10)")
    p.add_argument("--quiet-pause-s", type=float, default=0.1,
                   help="the quiet caller's pause between calls (default 0.1)")
    p.add_argument("--cycles", type=int, default=20, help="load/unload cycles (default 20)")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.cycles, args.callers = 2.0, 2, 2
    results = harness.Results(__file__, argv, args)
    root = Path(tempfile.mkdtemp(prefix="camserve-repo-"))
    try:
        write_repository(root)
        run(args, results, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results.finish(args.json)
    return 0


def window(call, callers: int, seconds: float) -> harness.Calls:
    return harness.closed_loop(call, callers, seconds, warmup=min(2.0, seconds / 2),
                               errors=(CamserveError,))


def run(args, results: harness.Results, root: Path) -> None:
    n, seconds = args.callers, args.seconds
    repo = ["--model-repository", str(root)]
    alone = {}
    for model in ("lite", "resnet"):
        with harness.Server(flags=repo + ["--load-model", model]) as server:
            pool = clients(server, n)
            alone[model] = window(predictor(pool, model), n, seconds)
    quiet_alone = None
    with harness.Server(flags=repo + ["--load-model", "resnet"]) as server:
        pool = clients(server, 1)
        quiet_alone = harness.closed_loop(predictor(pool, "resnet"), 1, seconds,
                                          warmup=1.0, pause=args.quiet_pause_s)
    with harness.Server(flags=repo) as server:
        lite, resnet = clients(server, n), clients(server, n)
        photo = harness.photo()
        both = window(lambda i: (lite if i < n else resnet)[i % n].predict(
            photo, model="lite" if i < n else "resnet", top_k=1), 2 * n, seconds)
        quiet = clients(server, 1)
        with harness.Callers(predictor(lite, "lite"), n, errors=(CamserveError,)):
            time.sleep(min(2.0, seconds / 2))
            beside = harness.closed_loop(predictor(quiet, "resnet"), 1, seconds, warmup=1.0,
                                         pause=args.quiet_pause_s)
    together = {"lite": [c for c in both.calls if c.caller < n],
                "resnet": [c for c in both.calls if c.caller >= n]}
    for model in ("lite", "resnet"):
        mine = harness.Calls(together[model], both.seconds)
        results.row("Two models: each alone and both together (Predict images/s)", model=model,
                    callers=n, alone=alone[model].rate, together=mine.rate,
                    errors=sum(c.code != "OK" for c in together[model]))
    mean_alone = (alone["lite"].rate + alone["resnet"].rate) / 2
    results.row("Two models: each alone and both together (Predict images/s)", model="both",
                callers=2 * n, alone=mean_alone, together=both.rate,
                errors=sum(c.code != "OK" for c in both.calls))
    results.note(f"Together over the mean alone: {both.rate / mean_alone:.2f} (1.0: sharing "
                 "the device costs nothing).")
    a, b = quiet_alone.percentiles(), beside.percentiles()
    results.row("Fairness: a quiet caller on resnet beside busy lite callers",
                beside="nothing", quiet_p50_ms=a["p50_ms"], quiet_p90_ms=a["p90_ms"],
                calls=len(quiet_alone))
    results.row("Fairness: a quiet caller on resnet beside busy lite callers",
                beside=f"{n} lite callers", quiet_p50_ms=b["p50_ms"], quiet_p90_ms=b["p90_ms"],
                calls=len(beside))
    results.note(f"The quiet caller's p50 beside the busy model over alone: "
                 f"{b['p50_ms'] / a['p50_ms']:.2f}.")
    swap_and_cycles(args, results, root)


def swap_and_cycles(args, results: harness.Results, root: Path) -> None:
    n, seconds = args.callers, args.seconds
    flags = ["--model-repository", str(root), "--model-control", "explicit", "--admin-token",
             ADMIN, "--default-model", "lite"]
    with harness.Server(flags=flags) as server:
        admin = Client(server.target, timeout=600, token=ADMIN)
        lite, resnet = clients(server, n), clients(server, 1)
        photo = harness.photo()
        took = []

        def swap() -> None:
            (root / "resnet.v2").rename(root / "resnet" / "2")
            started = time.perf_counter()
            admin.load_model("resnet")  # loads v2, then unloads v1 (the policy: latest)
            took.append(time.perf_counter() - started)

        def call(i: int):
            if i < n:
                return lite[i].predict(photo, model="lite", top_k=1)
            time.sleep(args.quiet_pause_s)  # a light caller on resnet throughout
            return resnet[0].predict(photo, model="resnet", top_k=1)

        with harness.Callers(call, n + 1, errors=(CamserveError,)) as running:
            time.sleep(2.0)
            running.take()
            time.sleep(seconds)
            before = running.take()
            thread = threading.Thread(target=swap)
            thread.start()
            time.sleep(seconds)
            thread.join()
            during = running.take()
        versions = [(m.version, m.state) for m in admin.models() if m.name == "resnet"]
        rates = [harness.Calls([c for c in w.calls if c.caller < n], w.seconds).rate
                 for w in (before, during)]
        failed = before.codes + during.codes
        failed.pop("OK", None)
        results.row("A version swapped under load", window="before", lite_images_per_s=rates[0],
                    ratio=1.0, calls=len(before), failed=sum(before.codes.values()) -
                    before.codes["OK"], load_s=None, resnet="v1 ready")
        results.row("A version swapped under load", window="with the swap",
                    lite_images_per_s=rates[1], ratio=rates[1] / rates[0] if rates[0] else None,
                    calls=len(during), failed=sum(during.codes.values()) - during.codes["OK"],
                    load_s=took[0] if took else None,
                    resnet=", ".join(f"v{v} {s}" for v, s in versions))
        results.note("The swap: version 2 of resnet loaded and version 1 unloaded during the "
                     f"second {seconds:g} s window; failed calls: "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(failed.items())) or 'none'}.")
        # Memory over load/unload cycles, resnet unloaded before and after.
        admin.unload_model("resnet")
        before = harness.settled_rss_mib(server.process.pid)
        started = time.perf_counter()
        for _ in range(args.cycles):
            admin.load_model("resnet")
            admin.unload_model("resnet")
        cycle_s = (time.perf_counter() - started) / max(1, args.cycles)
        after = harness.settled_rss_mib(server.process.pid)
        results.row("Memory over load/unload cycles of resnet", cycles=args.cycles,
                    rss_before_mib=before, rss_after_mib=after, ratio=after / before,
                    seconds_per_cycle=cycle_s)
        (root / "resnet" / "2").rename(root / "resnet.v2")


if __name__ == "__main__":
    sys.exit(main())
