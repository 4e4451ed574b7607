"""camserve on a GPU: engine, references and gRPC at batch 1 to 64, in one run.

For each model (default: ``torchvision:resnet50`` with seeded random weights, and the default
model ``efficientnet_lite0``) on one device (``--device cuda``; ``--device cpu`` runs the same
code for a smoke check):

* in this process, at each batch size of ``--batches``, on the same photo (tests/data/
  chelsea.jpg, decoded once): camserve's engine explaining (Grad-CAM, top-1) and predicting,
  Captum ``LayerGradCam`` and pytorch-grad-cam ``GradCAM`` on the same device, and a plain
  inference-mode forward; images/s and p50/p99 of a batch (CUDA synchronised after each);
  the engine explaining at each ``--precision`` beyond fp32 too;
* what reduced precision costs: per precision, the raw maps' correlation with fp32 and their
  largest difference relative to the map's maximum, over the two test photos and every
  gradient method, and the top-1 agreement;
* over gRPC, with a real server as a subprocess (``--device``, ``--max-batch-size`` the largest
  batch, JPEG decoded where the server decodes it: on the device on CUDA): Predict and Explain
  with each number of ``--callers`` (threads sharing one client, one JPEG per request),
  images/s, p50/p99 and the server's mean batch size.

Then the ratios the goals are set on: Explain over gRPC / engine explain at the batch the
server ran (>= 0.8), Explain over gRPC / plain forward at that batch (>= 0.9), engine explain /
pytorch-grad-cam at each batch (>= 3). It reports and never fails on a time. ``--markdown``
also writes the tables as Markdown (bench/gpu/run.sh puts them and the JSON in $OUT).

    python bench/bench_gpu.py --device cuda                       # the full run, a few minutes
    python bench/bench_gpu.py --device cpu --batches 1,2 --seconds 1 --callers 1,2 \\
        --model torchvision:resnet18                              # a smoke run on CPU
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import harness
import numpy as np
import torch

PHOTOS = (harness.PHOTO, harness.ROOT / "tests" / "data" / "coffee.jpg")
DEFAULT_MODELS = ("torchvision:resnet50", "efficientnet_lite0")
GRADIENT_METHODS = ("gradcam", "gradcam_plus_plus", "xgradcam", "layercam", "hirescam")
GOALS = (("Explain gRPC / engine explain", 0.8), ("Explain gRPC / forward", 0.9),
         ("engine explain / pytorch-grad-cam", 3.0))


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--model", action="append", default=None,
                   help=f"model source (repeatable; default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--batches", default="1,8,16,32,64", help="in-process batch sizes")
    p.add_argument("--callers", default="1,16,64", help="concurrent gRPC callers")
    p.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up per measurement")
    p.add_argument("--precision", default="fp32,tf32,bf16,fp16",
                   help="engine precisions to measure beside fp32 (tf32, fp16: CUDA only)")
    p.add_argument("--no-grpc", action="store_true", help="in-process rows only")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown")
    args = p.parse_args(argv)
    args.models = [m.strip() for ms in (args.model or DEFAULT_MODELS) for m in ms.split(",")
                   if m.strip()]
    args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    args.callers = sorted({int(c) for c in args.callers.split(",") if c.strip()})
    cuda = args.device.startswith("cuda")
    args.precisions = [x for x in dict.fromkeys(["fp32", *args.precision.split(",")])
                       if x and (cuda or x not in ("fp16", "tf32"))]
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    return args


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def timed(fn, batch: int, args, sync) -> dict:
    """images/s and batch latency percentiles of ``fn`` (one batch)."""
    got = harness.time_batches(fn, batch, args.seconds, args.warmup, sync)
    return {"images_per_s": got["images_per_s"], **harness.percentiles(got["latencies"]),
            "n": len(got["latencies"])}


def in_process(model: str, args) -> dict:
    """Rows by case and batch, and the precision figures."""
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camserve_server.domain import ExplainSpec, WorkItem
    from camserve_server.engine.engine import Engine
    from camserve_server.render import images

    device = torch.device(args.device)
    sync = _sync(device)
    served = harness.load_model(model, device=device)
    card = served.card
    layer = card.default_layer
    limits = images.Limits(1 << 30, 1 << 30)
    photos = [images.prepare(p.read_bytes(), card.input_size, limits).pixels for p in PHOTOS]
    engines = {p: Engine(served, precision=p) for p in args.precisions}

    def user_model():
        module = harness.load_model(model, device=device).module
        for param in module.parameters():
            param.requires_grad_(True)
        return module, dict(module.named_modules())[layer]

    mean = torch.tensor(card.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(card.std, device=device).view(1, 3, 1, 1)
    one = torch.from_numpy(photos[0].copy()).to(device).permute(2, 0, 1).float().div(255)
    captum_model, captum_layer = user_model()
    captum = LayerGradCam(captum_model, captum_layer)
    cam_model, cam_layer = user_model()
    cam = GradCAM(model=cam_model, target_layers=[cam_layer])
    rows = []
    try:
        for batch in args.batches:
            x = ((one[None] - mean) / std).repeat(batch, 1, 1, 1).contiguous()
            with torch.inference_mode():
                targets = captum_model(x).argmax(dim=1).tolist()
            cam_targets = [ClassifierOutputTarget(t) for t in targets]
            explain = [WorkItem(photos[0], ExplainSpec(layers=(layer,)))] * batch
            predict = [WorkItem(photos[0])] * batch

            def forward(x=x):
                with torch.inference_mode():
                    return captum_model(x)

            cases = [("engine explain", lambda e=explain: engines["fp32"].run(e)),
                     ("engine predict", lambda p=predict: engines["fp32"].run(p))]
            cases += [(f"engine explain {p}", lambda e=explain, p=p: engines[p].run(e))
                      for p in args.precisions if p != "fp32"]
            cases += [("captum", lambda x=x, t=targets: captum.attribute(
                          x, target=t, relu_attributions=True)),
                      ("pytorch-grad-cam", lambda x=x, t=cam_targets: cam(input_tensor=x,
                                                                          targets=t)),
                      ("forward", forward)]
            for label, fn in cases:
                row = timed(fn, batch, args, sync)
                rows.append({"case": label, "batch": batch, **row})
                print(f"  {label:24} b{batch:<3} {row['images_per_s']:9.1f} images/s  "
                      f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms", flush=True)
        figures = precision_figures(engines, photos, layer)
    finally:
        for e in engines.values():
            e.close()
        cam.activations_and_grads.release()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"layer": layer, "rows": rows, "precision": figures}


def precision_figures(engines, photos, layer) -> list:
    """Per precision: maps' correlation with fp32 (min and mean), largest difference relative
    to the map's max, top-1 agreement, over the photos and every gradient method."""
    from camserve_server.domain import ExplainSpec, WorkItem

    spec = ExplainSpec(methods=GRADIENT_METHODS, layers=(layer,))
    answers = {p: e.run([WorkItem(x, spec) for x in photos]) for p, e in engines.items()}
    out = []
    for precision, results in answers.items():
        if precision == "fp32":
            continue
        corr, diff, agree = [], [], 0
        for full, reduced in zip(answers["fp32"], results):
            agree += int(full.logits.argmax() == reduced.logits.argmax())
            for a, b in zip(full.maps, reduced.maps):
                corr.append(float(np.corrcoef(a.raw.ravel(), b.raw.ravel())[0, 1]))
                diff.append(float(np.abs(a.raw - b.raw).max() / max(a.raw.max(), 1e-12)))
        out.append({"precision": precision, "corr_min": min(corr),
                    "corr_mean": float(np.mean(corr)), "max_diff_of_max": max(diff),
                    "top1_agree": f"{agree}/{len(photos)}"})
    return out


def over_grpc(model: str, args) -> list:
    from camserve import Client

    jpeg = PHOTOS[0].read_bytes()
    rows = []
    flags = ["--device", args.device, "--max-batch-size", str(max(args.batches)),
             "--max-delay-ms", "2", "--max-queue", "1024"]
    with harness.Server(model, flags) as server, \
            Client(server.target, timeout=120) as client:
        client.wait_until_ready(timeout=300)
        for rpc, call in (("Predict", lambda i: client.predict(jpeg)),
                          ("Explain", lambda i: client.explain(jpeg))):
            for n in args.callers:
                got = harness.closed_loop(call, n, args.seconds, args.warmup)
                rows.append({"case": f"gRPC {rpc}", "callers": n, "images_per_s": got.rate,
                             **got.percentiles(), "n": len(got),
                             "server_batch": got.mean_of("batch_size")})
                print(f"  gRPC {rpc:8} {n:3} callers {got.rate:9.1f} images/s  p50 "
                      f"{rows[-1]['p50_ms']:7.1f} ms  p99 {rows[-1]['p99_ms']:7.1f} ms  "
                      f"server batch {rows[-1]['server_batch']:.1f}", flush=True)
    return rows


def ratios(local: list, remote: list, batches) -> list:
    """The goals' ratios: gRPC against in-process at the batch the server ran."""
    rate = {(r["case"], r["batch"]): r["images_per_s"] for r in local}
    out = []
    for r in remote:
        if r["case"] != "gRPC Explain":
            continue
        batch = min(batches, key=lambda b: abs(b - r["server_batch"]))
        for name, base in (("Explain gRPC / engine explain", "engine explain"),
                           ("Explain gRPC / forward", "forward")):
            value = r["images_per_s"] / rate[(base, batch)]
            out.append({"name": f"{name} b{batch}", "callers": r["callers"], "ratio": value,
                        "goal": dict(GOALS)[name]})
    for batch in batches:
        value = rate[("engine explain", batch)] / rate[("pytorch-grad-cam", batch)]
        out.append({"name": f"engine explain / pytorch-grad-cam b{batch}", "callers": 0,
                    "ratio": value, "goal": 3.0})
    for o in out:
        o["pass"] = o["ratio"] >= o["goal"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    results = harness.Results(__file__, argv, args)
    if args.device.startswith("cuda"):
        results.machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    for model in args.models:
        print(f"\n== {model} on {args.device} (load average {harness.load_average()}) ==",
              flush=True)
        result = in_process(model, args)
        table = f"{model} on {args.device} (layer {result['layer']})"
        for row in result["rows"]:
            results.row(f"{table}: in process", **row)
        for f in result["precision"]:
            results.row(f"{table}: reduced precision against fp32", **f)
        if not args.no_grpc:
            remote = over_grpc(model, args)
            for row in remote:
                results.row(f"{table}: over gRPC", **row)
            for o in ratios(result["rows"], remote, args.batches):
                results.row(f"{table}: ratios", ratio=o["name"], callers=o["callers"] or None,
                            value=o["ratio"], goal=f">= {o['goal']}",
                            result="PASS" if o["pass"] else "MISS")
    results.finish(args.json)
    if args.markdown:
        Path(args.markdown).write_text(harness.render(results.doc))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
