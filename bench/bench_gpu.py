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
writes the tables as Markdown (bench/gpu/run.sh puts them in $OUT).

    python bench/bench_gpu.py --device cuda                       # the full run, a few minutes
    python bench/bench_gpu.py --device cpu --batches 1,2 --seconds 1 --callers 1,2 \\
        --model torchvision:resnet18                              # a smoke run on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import Server, drive, load, machine, seeded_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = (ROOT / "tests" / "data" / "chelsea.jpg", ROOT / "tests" / "data" / "coffee.jpg")
DEFAULT_MODELS = ("torchvision:resnet50", "efficientnet_lite0")
GRADIENT_METHODS = ("gradcam", "gradcam_plus_plus", "xgradcam", "layercam", "hirescam")
GOALS = (("Explain gRPC / engine explain", 0.8), ("Explain gRPC / forward", 0.9),
         ("engine explain / pytorch-grad-cam", 3.0))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
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


def time_batches(fn, batch: int, seconds: float, warmup: float, sync) -> dict:
    """Run ``fn`` (one batch) for ``seconds`` after ``warmup``: images/s, batch latencies."""
    fn()
    sync()
    warm_until = time.perf_counter() + warmup
    while time.perf_counter() < warm_until:
        fn()
    sync()
    latencies = []
    started = time.perf_counter()
    while len(latencies) < 3 or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000.0
    return {"images_per_s": batch * len(latencies) / wall, "p50_ms": float(np.median(ms)),
            "p99_ms": float(np.percentile(ms, 99)), "n": len(latencies)}


def in_process(model: str, weights, args) -> dict:
    """Rows by case and batch, and the precision figures."""
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camserve_server.domain import ExplainSpec, WorkItem
    from camserve_server.engine.engine import Engine
    from camserve_server.engine.models import load_model
    from camserve_server.process.settings import Settings
    from camserve_server.render import images

    device = torch.device(args.device)
    sync = _sync(device)
    settings = Settings(model=model, weights=weights, device=args.device)
    served = load_model(settings, device)
    card = served.card
    layer = card.default_layer
    limits = images.Limits(1 << 30, 1 << 30)
    photos = [images.prepare(p.read_bytes(), card.input_size, limits).pixels for p in PHOTOS]
    engines = {p: Engine(served, precision=p) for p in args.precisions}

    def user_model():
        module = load_model(settings, device).module
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
                row = time_batches(fn, batch, args.seconds, args.warmup, sync)
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


class GpuServer(Server):
    """bench_core's server subprocess, on ``device`` with the given batch size."""

    def __init__(self, model: str, weights, log_path: str, device: str, batch: int) -> None:
        cmd = [sys.executable, "-m", "camserve_server", "--host", "127.0.0.1", "--port", "0",
               "--model", model, "--device", device, "--max-batch-size", str(batch),
               "--max-delay-ms", "2", "--max-queue", "1024"]
        cmd += ["--weights", weights] if weights else []
        self._log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.port = None


def over_grpc(model: str, weights, args, log_path: str) -> list:
    from camserve import Client

    jpeg = PHOTOS[0].read_bytes()
    rows = []
    with GpuServer(model, weights, log_path, args.device, max(args.batches)) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        client.wait_until_ready(timeout=300)
        for rpc, call in (("Predict", lambda: client.predict(jpeg)),
                          ("Explain", lambda: client.explain(jpeg))):
            for n in args.callers:
                drive(call, n, args.warmup)
                got = drive(call, n, args.seconds)
                ms = np.array(got["latencies"]) * 1000.0
                batch = float(np.mean([t.batch_size for t in got["timings"]]))
                rows.append({"case": f"gRPC {rpc}", "callers": n,
                             "images_per_s": got["rate"], "p50_ms": float(np.median(ms)),
                             "p99_ms": float(np.percentile(ms, 99)), "n": int(ms.size),
                             "server_batch": batch})
                print(f"  gRPC {rpc:8} {n:3} callers {got['rate']:9.1f} images/s  p50 "
                      f"{rows[-1]['p50_ms']:7.1f} ms  p99 {rows[-1]['p99_ms']:7.1f} ms  "
                      f"server batch {batch:.1f}", flush=True)
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


def markdown(results: dict) -> str:
    lines = [f"machine: {results['machine']}", ""]
    for model, r in results["models"].items():
        lines += [f"### {model} (layer {r['layer']}, device {results['device']})", "",
                  "| case | batch / callers | images/s | p50 ms | p99 ms |",
                  "|---|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['case']} | b{row['batch']} | {row['images_per_s']:.1f} | "
                         f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} |")
        for row in r.get("grpc", []):
            lines.append(f"| {row['case']} (server batch {row['server_batch']:.1f}) | "
                         f"{row['callers']} callers | {row['images_per_s']:.1f} | "
                         f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} |")
        lines += ["", "| ratio | callers | value | goal | |", "|---|---:|---:|---:|---|"]
        for o in r.get("ratios", []):
            lines.append(f"| {o['name']} | {o['callers'] or ''} | {o['ratio']:.2f} | "
                         f">= {o['goal']:.1f} | {'pass' if o['pass'] else 'miss'} |")
        if r["precision"]:
            lines += ["", "| precision | map correlation with fp32 (min / mean) | largest "
                      "difference / map max | top-1 agrees |", "|---|---:|---:|---:|"]
            for f in r["precision"]:
                lines.append(f"| {f['precision']} | {f['corr_min']:.4f} / {f['corr_mean']:.4f}"
                             f" | {f['max_diff_of_max']:.4f} | {f['top1_agree']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print("machine: " + "  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    results = {"machine": info, "device": args.device, "args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory(prefix="camserve-bench-gpu-") as folder:
        for model in args.models:
            print(f"\n== {model} on {args.device} (load average {load()}) ==", flush=True)
            weights = seeded_weights(model, folder)
            result = in_process(model, weights, args)
            for f in result["precision"]:
                print(f"  {f['precision']}: map correlation with fp32 min {f['corr_min']:.4f} "
                      f"mean {f['corr_mean']:.4f}, largest difference "
                      f"{f['max_diff_of_max']:.4f} of the max, top-1 {f['top1_agree']}")
            if not args.no_grpc:
                result["grpc"] = over_grpc(model, weights, args,
                                           os.path.join(folder, "server.log"))
                result["ratios"] = ratios(result["rows"], result["grpc"], args.batches)
                for o in result["ratios"]:
                    callers = f" ({o['callers']} callers)" if o["callers"] else ""
                    print(f"  {o['name'] + callers:52} {o['ratio']:6.2f}  goal >= "
                          f"{o['goal']:.1f}  {'PASS' if o['pass'] else 'MISS'}")
            results["models"][model] = result
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(results))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
