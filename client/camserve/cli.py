"""``camserve``: the command line for a camserve server.

    camserve info
    camserve predict IMAGE... [--top-k N] [--json]
    camserve explain IMAGE... -o DIR [--class N|LABEL]... [--layer NAME]... [--method NAME]...
                                    [--grid] [--counterfactual]
    camserve evaluate FOLDER [--method NAME]... [--steps N]
    camserve stream VIDEO|--camera N [-o OUT.mp4] [--explain] [--policy all|latest]

The server address comes from ``--target`` or ``CAMSERVE_TARGET`` (default localhost:50051).
Exit status: 0 when every image was answered, 1 when any failed, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import grpc

from .client import Client
from .errors import CamserveError
from .methods import method_names
from .results import Explanation, Prediction

CHUNK = 8  # images per RPC, so the server can batch them


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.enabled = enabled and total > 1 and sys.stderr.isatty()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{rate:.1f} img/s")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _chunks(paths: Sequence[str]) -> Iterator[List[str]]:
    for start in range(0, len(paths), CHUNK):
        yield list(paths[start:start + CHUNK])


_FATAL = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
          grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED)


def _each(paths: Sequence[str], call: Callable[[List[str]], list], progress: Progress,
          errors: List[Tuple[str, CamserveError]]) -> Iterator[Tuple[str, object]]:
    """Answer every path, a chunk per RPC. A chunk refused for a bad image is retried one image
    at a time, so only the bad files fail; errors about the server itself end the run."""
    for chunk in _chunks(paths):
        try:
            results = call(chunk)
        except CamserveError as exc:
            if exc.code in _FATAL:
                raise
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT and len(chunk) > 1:
                for path in chunk:
                    yield from _each([path], call, progress, errors)
            else:
                errors.extend((path, exc) for path in chunk)
                progress.advance(len(chunk))
            continue
        progress.advance(len(chunk))
        yield from zip(chunk, results)


def _classes(prediction: Prediction) -> str:
    return ", ".join(f"{c.label} {c.probability:.1%} ({c.index})" for c in prediction.top)


def _prediction_json(path: str, prediction: Prediction) -> dict:
    return {"image": path, "size": list(prediction.image_size),
            "top": [vars(c) for c in prediction.top]}


def cmd_info(client: Client, args) -> int:
    info = client.model_info()
    if args.json:
        data = {k: v for k, v in vars(info).items()}
        data["layers"] = [vars(layer) for layer in info.layers]
        data["labels"] = list(info.labels)
        print(json.dumps(data, indent=2))
        return 0
    print(f"model:        {info.name} on {info.device}")
    print(f"classes:      {len(info.labels)} ({', '.join(info.labels[:3])}, ...)")
    print(f"input:        {info.input_size[1]}x{info.input_size[0]}, mean {info.mean}, "
          f"std {info.std}")
    for layer in info.layers:
        mark = " (default)" if layer.name == info.default_layer else ""
        print(f"layer:        {layer.name} {layer.channels}x{layer.height}x{layer.width}{mark}")
    print(f"methods:      {', '.join(info.methods) or 'none (Predict only)'}")
    print(f"batching:     up to {info.max_batch_size} items, {info.max_delay_ms:g} ms delay, "
          f"queue {info.max_queue}")
    return 0


def cmd_predict(client: Client, args) -> int:
    errors: List[Tuple[str, CamserveError]] = []
    progress = Progress(len(args.images), not args.json)
    rows = []
    for path, prediction in _each(args.images, lambda c: client.predict_many(c, top_k=args.top_k),
                                  progress, errors):
        if args.json:
            rows.append(_prediction_json(path, prediction))
        else:
            print(f"{path}: {_classes(prediction)}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return _report(errors)


def cmd_explain(client: Client, args) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    errors: List[Tuple[str, CamserveError]] = []
    progress = Progress(len(args.images), not args.json)
    methods = args.method or ["gradcam"]
    rows = []

    def call(chunk):
        return client.explain_many(
            chunk, target=[_target(c) for c in args.target_class] or None, method=methods,
            layer=args.layer or None, outputs=("raw", "heatmap", "overlay_png"),
            top_k=args.top_k, counterfactual=args.counterfactual,
            score_cam_channels=args.score_cam_channels)

    for path, exp in _each(args.images, call, progress, errors):
        written = _write(out, path, exp, args.grid)
        if args.json:
            row = _prediction_json(path, exp.prediction)
            row["maps"] = [dict(target=vars(m.target), method=m.method, layer=m.layer,
                                raw=m.raw.tolist(), overlay=str(o), heatmap=str(h))
                           for m, (o, h) in zip(exp.maps, written)]
            rows.append(row)
            continue
        print(f"{path}: {_classes(exp.prediction)}")
        for m, (overlay, heat) in zip(exp.maps, written):
            print(f"  explained {m.target.label} ({m.target.index}) with {m.method} at "
                  f"{m.layer}: {overlay}, {heat}")
        if args.grid:
            print(f"  comparison grid: {out / (Path(path).stem + '.grid.png')}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return _report(errors)


def cmd_evaluate(client: Client, args) -> int:
    """Faithfulness of every method (and a random map) over a folder of images."""
    import numpy as np

    folder = Path(args.folder)
    paths = sorted(str(p) for p in folder.iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
    if not paths:
        print(f"camserve: no images in {folder}", file=sys.stderr)
        return 1
    methods = args.method or [m for m in client.model_info().methods if m != "random"]
    methods = list(dict.fromkeys([*methods, "random"]))
    scores = {m: [] for m in methods}
    errors: List[Tuple[str, CamserveError]] = []
    progress = Progress(len(paths), not args.json)

    def call(chunk):
        return client.explain_many(chunk, method=methods, layer=args.layer, outputs=(),
                                   faithfulness_steps=args.steps,
                                   score_cam_channels=args.score_cam_channels)

    for _path, exp in _each(paths, call, progress, errors):
        for m in exp.maps:
            scores[m.method].append((m.deletion, m.insertion))
    table = {m: {"deletion": float(np.mean([d for d, _ in v])),
                 "insertion": float(np.mean([i for _, i in v])), "images": len(v)}
             for m, v in scores.items() if v}
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(f"{len(paths)} images from {folder}, {args.steps} steps; deletion: lower is "
              "better, insertion: higher is better")
        print(f"{'method':20} {'deletion':>9} {'insertion':>10} {'images':>7}")
        for method, row in table.items():
            print(f"{method:20} {row['deletion']:9.3f} {row['insertion']:10.3f} "
                  f"{row['images']:7d}")
    return _report(errors)


def cmd_stream(client: Client, args) -> int:
    """Stream a video file or camera through the server; write an annotated video."""
    from collections import OrderedDict

    import numpy as np

    from . import maps, video
    from .streams import Frame

    source = args.camera if args.video is None else args.video
    capture = video.open_video(source)
    fps_in, total = video.video_properties(capture)
    if args.max_frames:
        total = min(total, args.max_frames) if total else args.max_frames
    frames: OrderedDict[int, np.ndarray] = OrderedDict()  # sent, not answered yet
    lock = threading.Lock()  # gRPC reads the frames on its own thread
    interval = 1.0 / args.rate if args.rate else 0.0

    def produce():
        started = time.monotonic()
        for n, rgb in enumerate(video.read_frames(capture, args.max_frames)):
            if interval:
                time.sleep(max(0.0, started + n * interval - time.monotonic()))
            with lock:
                frames[n] = rgb
            yield Frame(video.jpeg(rgb) if args.encode == "jpeg" else rgb, n)

    def answered_frame(frame_id: int) -> np.ndarray:
        """The answered frame; frames sent before it were skipped and are forgotten."""
        with lock:
            while True:
                n, rgb = frames.popitem(last=False)
                if n == frame_id:
                    return rgb

    if args.explain:
        results = client.stream_explain(produce(), target=_target(args.target_class),
                                        layer=args.layer, policy=args.policy)
    else:
        results = client.stream_predict(produce(), top_k=1, policy=args.policy)
    progress = Progress(total or 0, enabled=total > 1)
    writer = None
    answered = skipped = failed = 0
    latencies = []
    started = time.monotonic()
    for r in results:
        rgb = answered_frame(r.frame_id)
        skipped += r.skipped
        progress.advance(r.skipped + 1)
        if not r.ok:
            failed += 1
            print(f"camserve: frame {r.frame_id}: {r.error.code.name}: {r.error.details}",
                  file=sys.stderr)
            continue
        answered += 1
        latencies.append(r.latency_ms)
        if args.output:
            prediction = r.result.prediction if args.explain else r.result
            if args.explain:
                rgb = maps.overlay(rgb, r.result.heatmap)
            best = prediction.best
            rate = answered / max(time.monotonic() - started, 1e-9)
            lines = [f"#{r.frame_id}  {best.label} {best.probability:.0%}", f"{rate:.1f} fps"]
            if writer is None:
                writer = video.VideoWriter(args.output, fps_in or 30.0, rgb.shape[:2])
            writer.write(video.annotate(rgb, lines))
    elapsed = time.monotonic() - started
    if writer is not None:
        writer.close()
    sent = answered + skipped + failed
    p50, p99 = (np.percentile(latencies, [50, 99]) if latencies else (float("nan"),) * 2)
    print(f"frames sent {sent}, answered {answered}, skipped {skipped}, failed {failed}; "
          f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; {answered / max(elapsed, 1e-9):.1f} fps"
          + (f"; wrote {writer.frames} frames to {args.output}" if writer is not None else ""))
    return 1 if failed else 0


def _write(out: Path, path: str, exp: Explanation, grid: bool) -> List[Tuple[Path, Path]]:
    """NAME.overlay.png and NAME.heatmap.png for one map; NAME.METHOD.CLASS[.LAYER].*.png each
    when there are several (and NAME.grid.png with --grid)."""
    stem = Path(path).stem
    layers = len({m.layer for m in exp.maps}) > 1
    written = []
    for m in exp.maps:
        name = stem if len(exp.maps) == 1 else ".".join(
            [stem, m.method, str(m.target.index)] + ([m.layer] if layers else []))
        overlay, heat = out / f"{name}.overlay.png", out / f"{name}.heatmap.png"
        overlay.write_bytes(m.overlay_image)
        heat.write_bytes(m.heatmap_png)
        written.append((overlay, heat))
    if grid:
        from PIL import Image

        from .grid import comparison_grid
        from .images import load_rgb

        Image.fromarray(comparison_grid(exp, load_rgb(path))).save(out / f"{stem}.grid.png")
    return written


def _target(value: Optional[str]):
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value


def _report(errors: List[Tuple[str, CamserveError]]) -> int:
    for path, exc in errors:
        print(f"camserve: {path}: {exc.code.name}: {exc.details}", file=sys.stderr)
    return 1 if errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camserve", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("CAMSERVE_TARGET", "localhost:50051"),
                        help="server address host:port (env CAMSERVE_TARGET; default "
                        "%(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument("--token", default=os.environ.get("CAMSERVE_TOKEN"),
                        help="bearer token, when the server requires one (env CAMSERVE_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect over TLS (system CAs)")
    parser.add_argument("--ca-cert", metavar="PEM", help="trust this CA (implies --tls)")
    parser.add_argument("--client-cert", metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--client-key", metavar="PEM", help="key of --client-cert")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show the served model")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    predict = sub.add_parser("predict", help="top classes for images")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(run=cmd_predict)

    explain = sub.add_parser("explain", help="write a heatmap and an overlay per image")
    explain.add_argument("images", nargs="+", metavar="IMAGE")
    explain.add_argument("-o", "--output", required=True, metavar="DIR",
                         help="folder for NAME.overlay.png and NAME.heatmap.png")
    explain.add_argument("--class", dest="target_class", metavar="N|LABEL", action="append",
                         default=[], help="class to explain, index or label (repeatable; "
                         "default: the top-1 class)")
    explain.add_argument("--layer", action="append", default=[],
                         help="layer to explain (repeatable; default: the server's)")
    explain.add_argument("--method", action="append", choices=method_names(),
                         help="CAM method (repeatable; default: gradcam)")
    explain.add_argument("--counterfactual", action="store_true",
                         help="negated gradients: regions whose removal would raise the score")
    explain.add_argument("--score-cam-channels", type=int, default=64, metavar="N",
                         help="Score-CAM: the N channels with the highest mean activation "
                         "(one forward each; default 64; 0: all)")
    explain.add_argument("--grid", action="store_true",
                         help="also write NAME.grid.png: methods down, classes across")
    explain.add_argument("--top-k", type=int, default=5)
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(run=cmd_explain)

    evaluate = sub.add_parser("evaluate", help="deletion/insertion scores of every method "
                              "over a folder of images, beside a random map")
    evaluate.add_argument("folder", metavar="FOLDER")
    evaluate.add_argument("--method", action="append", choices=method_names(),
                          help="method to score (repeatable; default: all the server has)")
    evaluate.add_argument("--layer", help="layer to explain (default: the server's)")
    evaluate.add_argument("--steps", type=int, default=16, help="steps per curve (default 16)")
    evaluate.add_argument("--score-cam-channels", type=int, default=64,
                          help="Score-CAM: top channels by activation (default 64; 0: all)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=cmd_evaluate)

    stream = sub.add_parser("stream", help="stream a video or camera; write an annotated video")
    where = stream.add_mutually_exclusive_group(required=True)
    where.add_argument("video", nargs="?", metavar="VIDEO", help="a video file")
    where.add_argument("--camera", type=int, metavar="N", help="camera index instead of a file")
    stream.add_argument("-o", "--output", metavar="OUT.mp4",
                        help="write the answered frames, annotated, to this video")
    stream.add_argument("--explain", action="store_true",
                        help="explain each frame; the output shows the heatmap overlay")
    stream.add_argument("--policy", choices=("all", "latest"), default="all",
                        help="all: answer every frame; latest: skip frames a newer one "
                        "overtook (default %(default)s)")
    stream.add_argument("--class", dest="target_class", metavar="N|LABEL",
                        help="class to explain (default: each frame's top-1)")
    stream.add_argument("--layer", help="layer to explain (default: the server's)")
    stream.add_argument("--rate", type=float, default=0.0, metavar="FPS",
                        help="send at most FPS frames a second (default: as fast as the "
                        "server takes them)")
    stream.add_argument("--max-frames", type=int, default=None, metavar="N")
    stream.add_argument("--encode", choices=("jpeg", "raw"), default="jpeg",
                        help="how frames travel (default %(default)s)")
    stream.set_defaults(run=cmd_stream)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "top_k", 1) < 1:
        print("camserve: --top-k must be at least 1", file=sys.stderr)
        return 2
    try:
        with Client(args.target, timeout=args.timeout, token=args.token, tls=args.tls,
                    root_certificates=args.ca_cert, client_cert=args.client_cert,
                    client_key=args.client_key) as client:
            return args.run(client, args)
    except CamserveError as exc:
        print(f"camserve: {args.target}: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
