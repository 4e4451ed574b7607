"""The rewrites made when the model loads: batch norms folded into convolutions
(engine/fold.py), then TensorFlow "same" paddings made static (engine/same_padding.py). The
forward as built, folded, and as served (both), in one process, taking turns.

    .venv/bin/python bench/bench_fold.py                       # default model and resnet18
    .venv/bin/python bench/bench_fold.py --model torchvision:resnet50 --rounds 5
    .venv/bin/python bench/bench_fold.py --quick               # 2 rounds x 2 forwards

Prints, per model and batch size, the median milliseconds of a forward (as the engine runs it:
channels-last, inference mode) of each, the ratio as built / served, how many of each rewrite
the model got, and the largest difference in the logits between as built and served.
"""

from __future__ import annotations

import sys
import time
from typing import List, Optional

import harness


def main(argv: Optional[List[str]] = None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--model", action="append", default=None,
                   help="model source (repeatable; default efficientnet_lite0 and "
                   "torchvision:resnet18 with random weights)")
    p.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="forwards per side per round")
    p.add_argument("--quick", action="store_true", help="2 rounds x 2 forwards")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.calls = 2, 2
    results = harness.Results(__file__, argv, args)

    import torch

    def norms(module) -> int:
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())

    def dynamic_pads(module) -> int:
        return sum(type(m).__name__ == "Conv2dSame" for m in module.modules())

    results.note(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
                 f"{args.rounds} rounds x {args.calls} forwards per side, taking turns.")
    for model in args.model or ["efficientnet_lite0", "torchvision:resnet18"]:
        loaded = {name: harness.load_model(model, device=torch.device("cpu"),
                                           fold_batchnorm=fold, static_padding=static)
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
            ms = {name: harness.median(t) for name, t in times.items()}
            results.row("forward as built, folded and as served", model=model, batch=batch,
                        as_built_ms=ms["built"], folded_ms=ms["folded"], served_ms=ms["served"],
                        as_built_over_served=ms["built"] / ms["served"], norms_folded=folds,
                        paddings_made_static=pads, max_logit_difference=difference)
            print(f"# {model} batch {batch} done", file=sys.stderr, flush=True)
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
