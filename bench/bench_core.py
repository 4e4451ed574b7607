"""camserve core benchmark: Predict and Explain over gRPC beside in-process baselines.

For each model (default: ``torchvision:resnet18`` with seeded random weights, and the default
model ``efficientnet_lite0``) it measures, in one run:

* over gRPC, with a real server started as a subprocess on 127.0.0.1 and one JPEG photo per
  request (skimage's "chelsea", 451x300, quality 90): throughput and p50/p99 per-request latency
  of Predict and Explain at 1 and 8 concurrent callers (threads sharing one ``camserve.Client``);
* in this process, while the server sits idle, at batch 8 on the same photo decoded and resized
  once (the timed loop is model work only): camserve's Engine alone (explain and predict),
  Captum's ``LayerGradCam``, pytorch-grad-cam's ``GradCAM`` and a plain inference-mode forward,
  these three on the model as its users have it: as built, without the server's rewrites at
  load (folded batch norms, static "same" padding), which the engine runs.

Every measurement is split into ``--rounds`` slices that take turns, so that a machine whose
speed drifts (shared hosts do) skews the ratios less: images/s is the median over the rounds
(with their range), p50/p99 are over all requests (gRPC) or batches (in process), and each
ratio is the median of the per-round ratios. It prints a table per model, then the ratios the
targets are set on: Explain@8 >= 0.9 x Captum, Explain@8 >= 2.5 x pytorch-grad-cam,
Predict@8 >= 0.9 x the plain forward. It reports and never fails on a time: the exit code is 0
unless something crashed. Nothing is downloaded.

    make bench                                   # both models, a few minutes
    make bench ARGS="--quick"                    # a short smoke run
    make bench ARGS="--model torchvision:resnet18 --callers 1,4,8 --json bench.json"
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from server_process import OWN_CONNECTION

DEFAULT_MODELS = ("torchvision:resnet18", "efficientnet_lite0")
BATCH = 8
TARGETS = (("Explain", "captum b8", 0.9), ("Explain", "pytorch-grad-cam b8", 2.5),
           ("Predict", "forward b8", 0.9))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--server-flags", default="",
                   help="more camserve-server flags, e.g. '--workers 2 --torch-threads 1' "
                   "(each caller has a connection of its own, so that workers share them)")
    args = p.parse_args(argv)
    args.models = [m.strip() for ms in (args.model or DEFAULT_MODELS) for m in ms.split(",")
                   if m.strip()]
    args.callers = sorted({int(c) for c in args.callers.split(",") if c.strip()})
    if args.rounds < 1 or not args.callers or min(args.callers) < 1:
        p.error("--rounds and --callers must be at least 1")
    if args.quick:
        args.seconds, args.warmup, args.baseline_seconds, args.rounds = 2.0, 0.5, 1.0, 1
    return args


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"platform": platform.platform(), "cpu": cpu, "nproc": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "load": load()}


def load() -> str:
    """The 1/5/15-minute load averages: anything else running skews every number here."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def photo_jpeg() -> bytes:
    """A real photo (skimage's chelsea the cat, 451x300) as JPEG bytes, quality 90."""
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def seeded_weights(model: str, folder: str):
    """A state_dict file of seeded random weights for torchvision:/timm: models, else None."""
    source, _, name = model.partition(":")
    if source not in ("torchvision", "timm"):
        return None
    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision
        module = torchvision.models.get_model(name, weights=None)
    else:
        import timm
        module = timm.create_model(name, pretrained=False)
    path = os.path.join(folder, name.replace("/", "_") + ".pt")
    torch.save(module.state_dict(), path)
    return path


# --- over gRPC -------------------------------------------------------------------------------


class Server:
    """``python -m camserve_server`` on a free port of 127.0.0.1; SIGTERM on exit."""

    def __init__(self, model: str, weights, log_path: str, flags=()) -> None:
        cmd = [sys.executable, "-m", "camserve_server", "--host", "127.0.0.1", "--port", "0",
               "--model", model] + (["--weights", weights] if weights else []) + list(flags)
        self._log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.port = None

    def __enter__(self) -> Server:
        try:
            for line in self.proc.stdout:
                if line.startswith("camserve-server listening on "):
                    self.port = int(line.rsplit(":", 1)[1])
                    return self
            raise RuntimeError("the server exited before listening:\n" + self.log_tail())
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(_read(self._log_path).splitlines()[-lines:])


def drive(call, callers: int, seconds: float) -> dict:
    """``callers`` threads call ``call()`` back to back for ``seconds``.

    Returns completed requests / wall seconds, per-request latencies (s) and the answers' timings.
    """
    latencies = [[] for _ in range(callers)]
    timings = [[] for _ in range(callers)]
    errors = []
    stop_at = time.perf_counter() + seconds

    def caller(i: int) -> None:
        try:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                answer = call(i)
                latencies[i].append(time.perf_counter() - started)
                timings[i].append(answer.timing)
        except BaseException as exc:  # re-raised by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    done = [x for xs in latencies for x in xs]
    return {"rate": len(done) / wall, "latencies": done,
            "timings": [t for ts in timings for t in ts]}


def grpc_cases(clients, jpeg: bytes, callers) -> list:
    """(label, rpc, callers, call(caller)) for every gRPC measurement: caller i uses
    ``clients[i]``."""
    calls = (("Predict", lambda i: clients[i].predict(jpeg)),
             ("Explain", lambda i: clients[i].explain(jpeg)))
    return [(f"gRPC {rpc} {n} caller{'s' if n > 1 else ''}", rpc, n, call)
            for rpc, call in calls for n in callers]


# --- in process ------------------------------------------------------------------------------


def time_batches(fn, seconds: float, warmup: float) -> dict:
    """Run ``fn`` (one batch of 8) for ``seconds`` after ``warmup``; images/s, batch latencies."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    warm_until = time.perf_counter() + warmup
    fn()
    while time.perf_counter() < warm_until:
        fn()
    sync()
    latencies = []
    started = time.perf_counter()
    while len(latencies) < 2 or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        latencies.append(time.perf_counter() - t0)
    return {"rate": BATCH * len(latencies) / (time.perf_counter() - started),
            "latencies": latencies}


def in_process_cases(model: str, weights, jpeg: bytes):
    """([(label, one-batch function)], the explained layer, a cleanup function)."""
    from dataclasses import replace

    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camserve_server.domain import ExplainSpec, WorkItem
    from camserve_server.engine.engine import Engine
    from camserve_server.engine.models import load_model
    from camserve_server.process.settings import Settings
    from camserve_server.render import images

    settings = Settings(model=model, weights=weights)
    served = load_model(settings)
    layer = served.card.default_layer
    pixels = images.prepare(jpeg, served.card.input_size, images.Limits(1 << 30, 1 << 30)).pixels
    engine = Engine(served)
    explain = [WorkItem(pixels, ExplainSpec(layers=(layer,)))] * BATCH
    predict = [WorkItem(pixels)] * BATCH

    def user_model():
        """How a user runs Captum or pytorch-grad-cam: the same architecture and weights, as
        built (without the server's rewrites at load: folded batch norms, static padding), in
        eval mode, with parameters that require grad. One each: GradCAM's hooks stay put."""
        module = load_model(replace(settings, fold_batchnorm=False,
                                    static_padding=False)).module
        for param in module.parameters():
            param.requires_grad_(True)
        return module, dict(module.named_modules())[layer]

    mean = torch.tensor(served.card.mean).view(1, 3, 1, 1)
    std = torch.tensor(served.card.std).view(1, 3, 1, 1)
    one = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    x = ((one - mean) / std).repeat(BATCH, 1, 1, 1).contiguous().to(served.device)
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

    def close():
        engine.close()
        cam.activations_and_grads.release()

    return [
        ("engine explain b8", lambda: engine.run(explain)),
        ("engine predict b8", lambda: engine.run(predict)),
        ("captum b8", lambda: captum.attribute(x, target=targets, relu_attributions=True)),
        ("pytorch-grad-cam b8", lambda: cam(input_tensor=x, targets=cam_targets)),
        ("forward b8", forward),
    ], layer, close


# --- the run and the report ------------------------------------------------------------------


def measure(model: str, weights, jpeg: bytes, args, log_path: str) -> dict:
    """Every row for one model: gRPC and in-process slices taking turns, ``args.rounds`` times."""
    from camserve import Client

    with Server(model, weights, log_path, shlex.split(args.server_flags)) as server, \
            contextlib.ExitStack() as stack:
        clients = [stack.enter_context(Client(f"127.0.0.1:{server.port}", options=OWN_CONNECTION))
                   for _ in range(max(args.callers))]
        device = clients[0].wait_until_ready(timeout=300).device
        for client in clients[1:]:
            client.wait_until_ready(timeout=300)
        remote = grpc_cases(clients, jpeg, args.callers)
        local, layer, close = in_process_cases(model, weights, jpeg)
        slices = {label: [] for label, *_ in remote + local}
        try:
            for _ in range(args.rounds):
                for label, _rpc, n, call in remote:
                    drive(call, n, args.warmup)
                    slices[label].append(drive(call, n, args.seconds / args.rounds))
                # The server is idle while these run in this process.
                for label, fn in local:
                    slices[label].append(time_batches(fn, args.baseline_seconds / args.rounds,
                                                      args.warmup / 2))
        finally:
            close()
    rows = [_row(label, slices[label], rpc=rpc, callers=n) for label, rpc, n, _ in remote]
    rows += [_row(label, slices[label]) for label, _ in local]
    return {"device": device, "layer": layer, "rows": rows,
            "ratios": ratios(rows, slices, remote, max(args.callers), args.rounds)}


def _row(label: str, slices: list, **extra) -> dict:
    rates = [s["rate"] for s in slices]
    ms = np.concatenate([s["latencies"] for s in slices]) * 1000.0
    row = {"label": label, "images_per_s": float(np.median(rates)), "rates": rates,
           "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
           "n": int(ms.size), **extra}
    timings = [t for s in slices for t in s.get("timings", ())]
    if timings:
        row["server_means"] = {f: float(np.mean([getattr(t, f) for t in timings])) for f in
                               ("batch_size", "queue_ms", "compute_ms", "decode_ms",
                                "respond_ms")}
    return row


def ratios(rows, slices, remote, callers: int, rounds: int) -> list:
    out = []
    for rpc, baseline, target in TARGETS:
        label = next(label for label, r, n, _ in remote if r == rpc and n == callers)
        per_round = [slices[label][i]["rate"] / slices[baseline][i]["rate"]
                     for i in range(rounds)]
        ratio = float(np.median(per_round))
        out.append({"name": f"{rpc}@{callers} / {baseline}", "ratio": ratio,
                    "per_round": per_round, "target": target, "pass": ratio >= target})
    return out


def print_report(model: str, result: dict, loads) -> None:
    print(f"\n== {model}  (device {result['device']}, layer {result['layer']}; "
          f"load average {loads[0]} before, {loads[1]} after) ==")
    print(f"{'':22} {'images/s':>8} {'(range)':>13} {'p50 ms':>7} {'p99 ms':>7} {'n':>5}"
          "   server means: batch, queue/compute/decode/respond ms")
    for r in result["rows"]:
        spread = f"({min(r['rates']):.1f}-{max(r['rates']):.1f})"
        note = ""
        if "server_means" in r:
            s = r["server_means"]
            note = (f"{s['batch_size']:.1f}, {s['queue_ms']:.0f}/{s['compute_ms']:.0f}/"
                    f"{s['decode_ms']:.1f}/{s['respond_ms']:.1f}")
        print(f"{r['label']:22} {r['images_per_s']:8.1f} {spread:>13} {r['p50_ms']:7.1f} "
              f"{r['p99_ms']:7.1f} {r['n']:5d}   {note}")
    for c in result["ratios"]:
        rounds = ", ".join(f"{x:.2f}" for x in c["per_round"])
        print(f"  {c['name']:34} {c['ratio']:5.2f}  target >= {c['target']:.1f}  "
              f"{'PASS' if c['pass'] else 'MISS'}   (rounds: {rounds})")


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine()
    print("machine: " + "  ".join(f"{k}={v}" for k, v in info.items()))
    print(f"gRPC: {args.seconds:g} s per row after {args.warmup:g} s warm-ups; in process: "
          f"{args.baseline_seconds:g} s per row at batch {BATCH}; {args.rounds} rounds; "
          f"callers {args.callers}, a connection each" +
          (f"; server flags: {args.server_flags}" if args.server_flags else ""))
    jpeg = photo_jpeg()
    results = {"machine": info, "jpeg_bytes": len(jpeg), "args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory(prefix="camserve-bench-") as folder:
        for model in args.models:
            weights = seeded_weights(model, folder)
            before = load()
            result = measure(model, weights, jpeg, args, os.path.join(folder, "server.log"))
            result["load_average"] = (before, load())
            print_report(model, result, result["load_average"])
            results["models"][model] = result
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
