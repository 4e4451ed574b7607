"""The rewrites made when the model loads: batch norms folded into convolutions
(engine/fold.py), then TensorFlow "same" paddings made static (engine/same_padding.py). The
forward as built, folded, and as served (both), in one process, taking turns.

    .venv/bin/python bench/bench_fold.py                       # default model and resnet18
    .venv/bin/python bench/bench_fold.py --model torchvision:resnet50 --rounds 5

Prints, per model and batch size, the median milliseconds of a forward (as the engine runs it:
channels-last, inference mode) of each, the ratio as built / served, how many of each rewrite
the model got, and the largest difference in the logits between as built and served.
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

    def norms(module) -> int:
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())

    def dynamic_pads(module) -> int:
        return sum(type(m).__name__ == "Conv2dSame" for m in module.modules())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.rounds} rounds x {args.calls} forwards per side, taking turns")
    print("| model | batch | as built ms | folded ms | served ms | as built / served | "
          "norms folded | paddings made static | max logit difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.model or ["efficientnet_lite0", "torchvision:resnet18"]:
        weights = None if model == "efficientnet_lite0" else "random"
        loaded = {name: load_model(Settings(model=model, weights=weights, device="cpu",
                                            fold_batchnorm=fold, static_padding=static))
                  for name, fold, static in (("built", False, False), ("folded", True, False),
                                             ("served", True, True))}
        sides = {name: m.module for name, m in loaded.items()}
        size = loaded["served"].card.input_size
        folds = norms(sides["built"]) - norms(sides["served"])
        pads = dynamic_pads(sides["built"]) - dynamic_pads(sides["served"])
        for batch in (int(b) for b in args.batch.split(",")):
            x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
            x = x.contiguous(memory_format=torch.channels_last)
            times = {name: [] for name in sides}
            with torch.inference_mode():
                difference = (sides["built"](x) - sides["served"](x)).abs().max().item()
                for _ in range(args.rounds):
                    for name, module in sides.items():
                        module(x)
                        for _ in range(args.calls):
                            started = time.perf_counter()
                            module(x)
                            times[name].append((time.perf_counter() - started) * 1000)
            ms = {name: statistics.median(t) for name, t in times.items()}
            print(f"| {model} | {batch} | {ms['built']:.1f} | {ms['folded']:.1f} | "
                  f"{ms['served']:.1f} | {ms['built'] / ms['served']:.2f} | {folds} | {pads} | "
                  f"{difference:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
