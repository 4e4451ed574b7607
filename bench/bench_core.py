"""Predict and Explain over gRPC beside in-process baselines (camserve's engine, Captum,
pytorch-grad-cam, a plain forward), per model, with the ratios the targets are set on.

For each model (default: ``torchvision:resnet18`` with seeded random weights, and the default
model ``efficientnet_lite0``) it measures, in one run:

* over gRPC, with a real server started as a subprocess on 127.0.0.1 and one JPEG photo per
  request (tests/data/chelsea.jpg): images/s and per-request latency of Predict and Explain at
  each number of ``--callers`` (threads, a connection each);
* in this process, while the server sits idle, at batch 8 on the same photo decoded and resized
  once (the timed loop is model work only), on one thread with the server's torch thread count:
  camserve's engine (explain and predict), Captum's ``LayerGradCam``, pytorch-grad-cam's
  ``GradCAM`` and a plain inference-mode forward, these three on the model as its users have it:
  as built, without the server's rewrites at load (folded batch norms, static "same" padding).

Every measurement is split into ``--rounds`` slices that take turns, so that a machine whose
speed drifts skews the ratios less: images/s is the median over the rounds (each round's
figure is listed), latencies are over all requests (gRPC) or batches (in process), and each
ratio is the median of the per-round ratios. The targets: Explain@N >= 0.9 x Captum,
Explain@N >= 2.5 x pytorch-grad-cam, Predict@N >= 0.9 x the plain forward (N: the most
callers). It reports and never fails on a time. Nothing is downloaded.

    make bench                                   # both models, a few minutes
    make bench ARGS="--quick"                    # a short smoke run
    make bench ARGS="--model torchvision:resnet18 --callers 1,4,8 --json bench.json"
"""

from __future__ import annotations

import contextlib
import shlex
import sys

import harness

DEFAULT_MODELS = ("torchvision:resnet18", "efficientnet_lite0")
TARGETS = (("Explain", "captum b8", 0.9), ("Explain", "pytorch-grad-cam b8", 2.5),
           ("Predict", "forward b8", 0.9))
SERVER_MEANS = ("batch_size", "queue_ms", "compute_ms", "decode_ms", "respond_ms")


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--model", action="append", default=None,
                   help="model source (repeatable or comma list; default: "
                   f"{','.join(DEFAULT_MODELS)})")
    p.add_argument("--seconds", type=float, default=12.0,
                   help="per gRPC measurement, over all rounds (default %(default)s)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="warm-up seconds before each gRPC slice (default %(default)s)")
    p.add_argument("--baseline-seconds", type=float, default=6.0,
                   help="per in-process baseline, over all rounds (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--callers", default="1,8", help="concurrent gRPC callers (default 1,8)")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--server-flags", default="",
                   help="more camserve-server flags, e.g. '--workers 2 --torch-threads 1'")
    args = p.parse_args(argv)
    args.models = [m.strip() for ms in (args.model or DEFAULT_MODELS) for m in ms.split(",")
                   if m.strip()]
    args.callers = sorted({int(c) for c in args.callers.split(",") if c.strip()})
    if args.rounds < 1 or not args.callers or min(args.callers) < 1:
        p.error("--rounds and --callers must be at least 1")
    if args.quick:
        args.seconds, args.warmup, args.baseline_seconds, args.rounds = 2.0, 0.5, 1.0, 1
    return args


def references(inproc: harness.InProcess):
    """[(label, one batch of 8)] run on the engine's thread: camserve's engine, then Captum,
    pytorch-grad-cam and a plain forward on the model as its users build it; and a cleanup."""
    import torch
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    card, layer, batch = inproc.served.card, inproc.layer, harness.BATCH

    def user_model():
        """The same architecture and weights, as built (without the server's rewrites at
        load), in eval mode, with parameters that require grad. One each: GradCAM's hooks
        stay put."""
        module = harness.load_model(inproc.model, inproc.weights, inproc.served.device,
                                    fold_batchnorm=False, static_padding=False).module
        for param in module.parameters():
            param.requires_grad_(True)
        return module, dict(module.named_modules())[layer]

    mean = torch.tensor(card.mean).view(1, 3, 1, 1)
    std = torch.tensor(card.std).view(1, 3, 1, 1)
    one = torch.from_numpy(inproc.pixels.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    x = ((one - mean) / std).repeat(batch, 1, 1, 1).contiguous().to(inproc.served.device)
    captum_model, captum_layer = user_model()
    with torch.inference_mode():
        targets = captum_model(x).argmax(dim=1).tolist()  # top-1, as the server explains
    captum = LayerGradCam(captum_model, captum_layer)
    cam_model, cam_layer = user_model()
    cam = GradCAM(model=cam_model, target_layers=[cam_layer])
    cam_targets = [ClassifierOutputTarget(t) for t in targets]

    def forward():
        with torch.inference_mode():
            return captum_model(x)

    engine, items = inproc.engine, inproc.items
    return [
        ("engine explain b8", lambda: engine.run([items["Explain"]] * batch)),
        ("engine predict b8", lambda: engine.run([items["Predict"]] * batch)),
        ("captum b8", lambda: captum.attribute(x, target=targets, relu_attributions=True)),
        ("pytorch-grad-cam b8", lambda: cam(input_tensor=x, targets=cam_targets)),
        ("forward b8", forward),
    ], cam.activations_and_grads.release


def measure(model: str, args, results: harness.Results) -> None:
    """Every row of one model: gRPC and in-process slices taking turns, ``args.rounds`` times."""
    from camserve import Client

    jpeg = harness.photo()
    inproc = harness.InProcess(model, jpeg)
    local, release = inproc.run_here(references, inproc)
    with harness.Server(model, shlex.split(args.server_flags)) as server, \
            contextlib.ExitStack() as stack:
        clients = [stack.enter_context(Client(server.target, options=harness.OWN_CONNECTION))
                   for _ in range(max(args.callers))]
        device = clients[0].wait_until_ready(timeout=300).device
        calls = {"Predict": lambda i: clients[i].predict(jpeg),
                 "Explain": lambda i: clients[i].explain(jpeg)}
        remote = [(f"gRPC {rpc} {n} caller{'s' if n > 1 else ''}", rpc, n)
                  for rpc in calls for n in args.callers]
        grpc = {label: [] for label, *_ in remote}
        baseline = {label: [] for label, _ in local}
        try:
            for _ in range(args.rounds):
                for label, rpc, n in remote:
                    grpc[label].append(harness.closed_loop(calls[rpc], n, args.seconds /
                                                           args.rounds, warmup=args.warmup))
                # The server is idle while these run in this process.
                for label, fn in local:
                    baseline[label].append(inproc.run_here(
                        harness.time_batches, fn, harness.BATCH,
                        args.baseline_seconds / args.rounds, args.warmup / 2))
        finally:
            inproc.run_here(release)
            inproc.close()
    table = f"{model} (device {device}, layer {inproc.layer})"
    rates = {}
    for label, *_ in remote:
        runs = grpc[label]
        rates[label] = [r.rate for r in runs]
        every = harness.Calls([c for r in runs for c in r.calls], sum(r.seconds for r in runs))
        results.row(table, case=label, images_per_s=harness.median(rates[label]),
                    rounds=rates[label], **every.percentiles(), n=len(every),
                    **{f"server_{k}": every.mean_of(k) for k in SERVER_MEANS})
    for label, _ in local:
        runs = baseline[label]
        rates[label] = [r["images_per_s"] for r in runs]
        results.row(table, case=label, images_per_s=harness.median(rates[label]),
                    rounds=rates[label],
                    **harness.percentiles(s for r in runs for s in r["latencies"]),
                    n=sum(len(r["latencies"]) for r in runs))
    most = max(args.callers)
    for rpc, base, target in TARGETS:
        label = next(label for label, r, n in remote if r == rpc and n == most)
        per_round = [g / b for g, b in zip(rates[label], rates[base])]
        ratio = harness.median(per_round)
        results.row(f"{model}: ratios", ratio=f"{rpc}@{most} / {base}", value=ratio,
                    rounds=per_round, target=f">= {target}",
                    result="PASS" if ratio >= target else "MISS")


def main(argv=None) -> int:
    args = parse_args(argv)
    results = harness.Results(__file__, argv, args)
    results.note(f"gRPC: {args.seconds:g} s per row after {args.warmup:g} s warm-ups; in "
                 f"process: {args.baseline_seconds:g} s per row at batch {harness.BATCH}; "
                 f"{args.rounds} round(s); callers {', '.join(map(str, args.callers))}, a "
                 "connection each; server means are per answer (batch size, then ms)" +
                 (f"; server flags: {args.server_flags}" if args.server_flags else "") + ".")
    for model in args.models:
        measure(model, args, results)
    results.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
