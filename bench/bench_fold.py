"""Batch norms folded into convolutions (engine/fold.py): the served model's forward with and
without the fold, in one process, taking turns.

    .venv/bin/python bench/bench_fold.py                       # default model and resnet18
    .venv/bin/python bench/bench_fold.py --model torchvision:resnet50 --rounds 5

Prints, per model and batch size, the median milliseconds of a forward (as the engine runs it:
channels-last, inference mode), the ratio unfolded / folded, and the largest difference in the
logits between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None,
                   help="model source (repeatable; default efficientnet_lite0 and "
                   "torchvision:resnet18 with random weights)")
    p.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="forwards per side per round")
    args = p.parse_args(argv)

    import torch

    from camserve_server.engine.models import load_model
    from camserve_server.process.settings import Settings

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.rounds} rounds x {args.calls} forwards per side, taking turns")
    print("| model | batch | unfolded ms | folded ms | unfolded / folded | norms folded | "
          "max logit difference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in args.model or ["efficientnet_lite0", "torchvision:resnet18"]:
        weights = None if model == "efficientnet_lite0" else "random"
        folded = load_model(Settings(model=model, weights=weights, device="cpu"))
        plain = load_model(Settings(model=model, weights=weights, device="cpu",
                                    fold_batchnorm=False))
        norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.module.modules()) - sum(
            isinstance(m, torch.nn.BatchNorm2d) for m in folded.module.modules())
        for batch in (int(b) for b in args.batch.split(",")):
            x = torch.randn(batch, 3, *folded.card.input_size,
                            generator=torch.Generator().manual_seed(0))
            x = x.contiguous(memory_format=torch.channels_last)
            times = {"plain": [], "folded": []}
            with torch.inference_mode():
                difference = (plain.module(x) - folded.module(x)).abs().max().item()
                for _ in range(args.rounds):
                    for side, module in (("plain", plain.module), ("folded", folded.module)):
                        module(x)
                        for _ in range(args.calls):
                            started = time.perf_counter()
                            module(x)
                            times[side].append((time.perf_counter() - started) * 1000)
            a, b = statistics.median(times["plain"]), statistics.median(times["folded"])
            print(f"| {model} | {batch} | {a:.1f} | {b:.1f} | {a / b:.2f} | {norms} | "
                  f"{difference:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
