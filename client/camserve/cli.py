"""camserve: the command line for a camserve server.

    camserve info [--json]
    camserve health
    camserve models [--json]
    camserve load NAME | camserve unload NAME[:VERSION]
    camserve predict IMAGE... [--top-k N] [--json]
    camserve explain IMAGE... -o DIR [--class N|LABEL]... [--layer NAME]... [--method NAME]...
                                    [--grid] [--counterfactual]
    camserve explain IMAGE... -o DIR --model NAME:V1 --model NAME:V2 [--grid]
    camserve evaluate FOLDER [--method NAME]... [--steps N]
    camserve evaluate --sanity IMAGE|FOLDER... [--method NAME]... [--stages N]
    camserve stream VIDEO|--camera N [-o OUT.mp4] [--explain] [--policy all|latest]

The server address comes from --target or CAMSERVE_TARGET (default localhost:50051;
a port-less host gets :50051). Connection flags (--target, --timeout, --token, TLS,
--model, --request-id) go before or after the subcommand. Exit status: 0 when every image was
answered, 1 when any failed (or the server could not be reached), 2 for usage errors.
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
import numpy as np

from . import _calls, reasons
from .client import Client
from .errors import CamserveError, invalid
from .methods import method_names, target_kind_names
from .results import ClassMap, Explanation, ModelInfo, Prediction, SanityReport

CHUNK = 8  # images per RPC, so the server can batch them
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")
IMAGE_HELP = f"image files ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})"
FORWARDS_PER_TIMEOUT = 64  # evaluate: the call timeout grows by --timeout per this many forwards


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
        filled = int(width * min(self.done, self.total) / self.total)
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{rate:.1f} img/s")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _chunks(paths: Sequence[str], size: int = CHUNK) -> Iterator[List[str]]:
    for start in range(0, len(paths), size):
        yield list(paths[start:start + size])


_FATAL = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
          grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED,
          grpc.StatusCode.FAILED_PRECONDITION)


def _each(paths: Sequence[str], call: Callable[[List[str]], list], progress: Progress,
          errors: List[Tuple[str, CamserveError]], size: int = CHUNK
          ) -> Iterator[Tuple[str, object]]:
    """Answer every path, a chunk per RPC. A chunk refused for a bad image is retried one image
    at a time, so only the bad files fail; errors about the server itself end the run, and so
    does an option the server refuses for every image."""
    for chunk in _chunks(paths, size):
        try:
            results = call(chunk)
        except CamserveError as exc:
            if exc.code in _FATAL or (exc.code == grpc.StatusCode.INVALID_ARGUMENT
                                      and not _about_images(exc)):
                raise
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT and len(chunk) > 1:
                yield from _each(chunk, call, progress, errors, size=1)
            else:
                errors.extend((path, exc) for path in chunk)
                progress.advance(len(chunk))
            continue
        progress.advance(len(chunk))
        yield from zip(chunk, results)


def _about_images(error: CamserveError) -> bool:
    """Whether an INVALID_ARGUMENT is about an image (or a file the client could not read),
    rather than about an option that every image would fail on."""
    fields = [field for field, _ in error.field_violations]
    return not fields or any(field.startswith("images") for field in fields)


def _classes(prediction: Prediction) -> str:
    if prediction.embedding is not None:  # an embedding model's answer
        e = prediction.embedding
        return (f"embedding of {e.size} values, norm {float(np.linalg.norm(e)):.4g} "
                f"({', '.join(f'{v:.4g}' for v in e[:3])}, ...)")
    return ", ".join(f"{c.label} {c.probability:.1%} ({c.index})" for c in prediction.top)


def _prediction_json(path: str, prediction: Prediction) -> dict:
    row = {"image": path, "size": list(prediction.image_size),
           "top": [vars(c) for c in prediction.top]}
    if prediction.embedding is not None:
        row["embedding"] = prediction.embedding.tolist()
    return row


def _concept(client: Client, args):
    """--similar-to: a .npy vector or a text file of numbers as it is, or an image's
    embedding (a Predict of it first, on the first --model)."""
    if not args.similar_to:
        return None
    path = Path(args.similar_to)
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".txt":
        return np.loadtxt(path, dtype=np.float32, ndmin=1)
    return client.predict(path, model=args.model[0] if args.model else None).embedding


def _explain_options(client: Client, args) -> dict:
    """explain's options, the same for one model and for several compared."""
    return dict(target=[_target(c) for c in args.target_class] or None,
                method=args.method or ["gradcam"], outputs=("raw", "heatmap", "overlay_png"),
                top_k=args.top_k, counterfactual=args.counterfactual,
                score_cam_channels=args.score_cam_channels, target_kind=args.target_kind,
                eigen_smooth=args.eigen_smooth, aug_smooth=args.aug_smooth,
                similar_to=_concept(client, args))


def _info_json(info: ModelInfo) -> dict:
    data = {k: v for k, v in vars(info).items() if k not in ("layers", "method_info")}
    data["labels"] = list(info.labels)
    data["layers"] = [vars(layer) for layer in info.layers]
    data["methods"] = [vars(m) for m in info.method_info]
    return data


def _model(args) -> Optional[str]:
    """The one --model a subcommand takes (None: the server's default)."""
    models = getattr(args, "model", None) or []
    if len(models) > 1:
        raise _LocalError(f"{args.command} takes one --model, not {len(models)} (explain "
                          "compares several)")
    return models[0] if models else None


def cmd_info(client: Client, args) -> int:
    info = client.model_info(model=_model(args))
    if args.json:
        print(json.dumps(_info_json(info), indent=2))
        return 0 if info.state == "serving" else 1
    print(f"model:        {info.model + ':' + str(info.version) + ' ' if info.model else ''}"
          f"{info.name}")
    print(f"state:        {info.state}")
    if info.state == "loading":
        print("              the server is loading its model; run this again in a moment")
        return 1
    loaded = [f"{m.name}:{m.version}{' (default)' if m.is_default else ''}"
              for m in client.models(ready=True)]
    print(f"loaded:       {', '.join(loaded)}")
    print(f"devices:      {', '.join(info.devices)} ({info.workers} worker process"
          f"{'es' if info.workers != 1 else ''})")
    print(f"classes:      {len(info.labels)} ({', '.join(info.labels[:3])}, ...)")
    if info.output_activation:
        print(f"outputs:      {info.output_activation}")
    print(f"input:        {info.input_size[1]}x{info.input_size[0]}, mean ({_floats(info.mean)}), "
          f"std ({_floats(info.std)})")
    for layer in info.layers:
        mark = " (default)" if layer.name == info.default_layer else ""
        print(f"layer:        {layer.name} {layer.channels}x{layer.height}x{layer.width}{mark}")
        if layer.reason:
            print(f"              {layer.reason}")
    if info.method_info:
        for m in info.method_info:
            traits = ["backward" if m.needs_backward else "forwards only",
                      "class-discriminative" if m.class_discriminative else "same map for "
                      "every class"]
            print(f"method:       {m.name:{_METHOD_WIDTH}} {', '.join(traits)}")
    else:
        print("methods:      none (Predict only)")
    print(f"batching:     up to {info.max_batch_size} items, {info.max_delay_ms:g} ms delay, "
          f"queue {info.max_queue}")
    if info.priority_levels:
        per_caller = (f"at most {info.max_queue_per_caller} waiting per caller"
                      if info.max_queue_per_caller else "no bound per caller")
        named = "tenant header" if info.tenant_header else "token or connection"
        print(f"scheduling:   priorities 1-{info.priority_levels} (unary {info.unary_priority}, "
              f"streams {info.stream_priority}, expensive {info.expensive_priority}; callers "
              f"may ask for {info.highest_priority} or lower), a waiting lower priority goes "
              f"first after {info.level_share} above it; callers by {named} take turns, "
              f"{per_caller}")
        for p in info.level_policies:
            bounds = [f"answered within {p.max_wait_ms:g} ms" + (" or delayed" if p.delay
                                                                 else "")] * bool(p.max_wait_ms)
            bounds += [f"at most {p.max_queued} waiting"] * bool(p.max_queued)
            bounds += [f"at most {p.max_batch} per batch"] * bool(p.max_batch)
            print(f"priority {p.priority}:   {', '.join(bounds)}")
    return 0 if info.state == "serving" else 1


def _floats(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def cmd_health(client: Client, args) -> int:
    """Exit 0 when the server's gRPC health service says SERVING (for container probes)."""
    status = client.health()
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_predict(client: Client, args) -> int:
    errors: List[Tuple[str, CamserveError]] = []
    progress = Progress(len(args.images), not args.json)
    rows = []
    for path, prediction in _each(args.images, lambda c: client.predict_many(c, top_k=args.top_k,
                                                                  model=_model(args)),
                                  progress, errors):
        if args.json:
            rows.append(_prediction_json(path, prediction))
        else:
            print(f"{path}: {_classes(prediction)}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return _report(errors)


def _notes(m: ClassMap) -> str:
    return "".join(f"\n    note: {note.message}" for note in m.notes)


def cmd_explain(client: Client, args) -> int:
    if len(args.model) > 1:
        return cmd_compare(client, args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    errors: List[Tuple[str, CamserveError]] = []
    progress = Progress(len(args.images), not args.json)
    rows = []
    options = _explain_options(client, args)

    def call(chunk):
        return client.explain_many(chunk, layer=args.layer or None, model=_model(args),
                                   **options)

    for path, exp in _each(args.images, call, progress, errors):
        written = _write(out, path, exp, args.grid)
        if args.json:
            row = _prediction_json(path, exp.prediction)
            row["maps"] = [dict(target=vars(m.target), method=m.method, layer=m.layer,
                                raw=m.raw.tolist(), overlay=str(o), heatmap=str(h),
                                notes=[vars(n) for n in m.notes])
                           for m, (o, h) in zip(exp.maps, written)]
            rows.append(row)
            continue
        print(f"{path}: {_classes(exp.prediction)}")
        for m, (overlay, heat) in zip(exp.maps, written):
            what = (f"the similarity ({m.similarity:.4f})" if m.similarity is not None
                    else f"{m.target.label} ({m.target.index})")
            print(f"  explained {what} with {m.method} at {m.layer}: {overlay}, {heat}"
                  f"{_notes(m)}")
        for note in exp.notes:
            print(f"  note: {note.message}")
        if args.grid:
            print(f"  comparison grid: {out / (Path(path).stem + '.grid.png')}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return _report(errors)


def cmd_compare(client: Client, args) -> int:
    """explain with several --model: each image on every model, for the same class, with the
    similarity of their maps; NAME.MODEL.overlay.png per model (and NAME.models.grid.png)."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    errors: List[Tuple[str, CamserveError]] = []
    rows = []
    options = _explain_options(client, args)
    for path in args.images:
        try:
            compared = client.compare(path, args.model, **options)
        except CamserveError as exc:
            if not _about_images(exc):
                raise
            errors.append((path, exc))
            continue
        stem = Path(path).stem
        files = []
        for name, exp in zip(args.model, compared.explanations):
            safe = name.replace(":", "-v")
            overlay = out / f"{stem}.{safe}.overlay.png"
            overlay.write_bytes(exp.maps[0].overlay_image)
            files.append(str(overlay))
        if args.grid:
            from PIL import Image

            from .grid import models_grid
            from .images import load_rgb

            Image.fromarray(models_grid(compared, args.model, load_rgb(path))).save(
                out / f"{stem}.models.grid.png")
        pairs = [dict(first=args.model[s.first], second=args.model[s.second], method=s.method,
                      target=s.target, spearman=round(s.spearman, 4))
                 for s in compared.similarities]
        if args.json:
            rows.append(dict(image=path, overlays=files, similarities=pairs))
            continue
        first = compared.explanations[0]
        print(f"{path}: {first.maps[0].target.label} ({first.maps[0].target.index}) on "
              f"{', '.join(args.model)}: {', '.join(files)}")
        for p in pairs:
            print(f"  {p['method']}: {p['first']} vs {p['second']}: Spearman {p['spearman']:.3f}")
        if args.grid:
            print(f"  comparison grid: {out / (stem + '.models.grid.png')}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return _report(errors)


def cmd_models(client: Client, args) -> int:
    """The models and versions the server knows, with their states."""
    statuses = client.models()
    if args.json:
        print(json.dumps([vars(m) for m in statuses], indent=2))
        return 0
    for m in statuses:
        size = f"{m.bytes / 2**20:.1f} MiB" if m.bytes else ""
        line = (f"{m.name + (':' + str(m.version) if m.version else ''):24} {m.state:10} "
                f"{'default ' if m.is_default else ''}{m.source} {size}").rstrip()
        print(line + (f"\n  error: {m.error}" if m.error else ""))
    return 0


def cmd_load(client: Client, args) -> int:
    """Load a model of the server's repository (needs its admin token: --token)."""
    for m in client.load_model(args.name, wait=not args.no_wait):
        print(f"{m.name}:{m.version} {m.state}")
    return 0


def cmd_unload(client: Client, args) -> int:
    """Unload a model, or one version (NAME:VERSION)."""
    name, _, version = args.name.partition(":")
    if version and not version.isdigit():
        raise _LocalError(f"{args.name!r}: write NAME or NAME:VERSION")
    for m in client.unload_model(name, version=int(version or 0)):
        print(f"{m.name}:{m.version} {m.state}")
    return 0


def cmd_evaluate(client: Client, args) -> int:
    """Faithfulness of every method (and a random map) over a folder of images."""
    import numpy as np

    if args.sanity:
        return cmd_sanity(client, args)
    if len(args.folder) != 1:
        raise invalid("evaluate takes one FOLDER (several images or folders: with --sanity)",
                      reasons.INVALID_FOLDER)
    folder = Path(args.folder[0])
    if not folder.is_dir():
        raise invalid(f"{folder} is not a folder of images", reasons.INVALID_FOLDER)
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        print(f"camserve: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}", file=sys.stderr)
        return 1
    info = client.model_info(model=_model(args))
    methods = args.method or [m for m in info.methods if m != "random"]
    methods = list(dict.fromkeys([*methods, "random"]))
    scores = {m: [] for m in methods}
    errors: List[Tuple[str, CamserveError]] = []
    progress = Progress(len(paths), not args.json)
    # The deadline grows with the work one call asks for: 2 (steps + 1) forwards per map,
    # plus one per Score-CAM channel.
    if args.score_cam_channels is None:
        args.score_cam_channels = 64
    channels = args.score_cam_channels or info.max_score_cam_channels
    road = tuple(range(10, 100, 10)) if args.road else ()
    forwards = (len(methods) * (2 * args.steps + 2 + 2 * len(road))
                + (channels if "scorecam" in methods else 0))
    timeout = args.timeout * max(1.0, forwards / FORWARDS_PER_TIMEOUT)

    def call(chunk):
        return client.explain_many(chunk, method=methods, layer=args.layer, outputs=(),
                                   faithfulness_steps=args.steps, road_percentiles=road,
                                   score_cam_channels=args.score_cam_channels, timeout=timeout,
                                   model=_model(args))

    names = ("deletion", "insertion") + (("road_morf", "road_lerf", "road_combined")
                                         if road else ())
    for _path, exp in _each(paths, call, progress, errors, size=1):
        for m in exp.maps:
            scores[m.method].append([getattr(m, n) for n in names])
    table = {m: {**{n: float(np.mean([row[k] for row in v])) for k, n in enumerate(names)},
                 "images": len(v)} for m, v in scores.items() if v}
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(f"{len(paths)} images from {folder}, {args.steps} steps; deletion: lower is "
              "better, insertion: higher is better"
              + ("; ROAD at 10..90 %: MoRF lower, LeRF and combined higher is better"
                 if road else ""))
        widths = [{"deletion": 9}.get(n, len(n) + 1) for n in names]
        print(f"{'method':20} " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths))
              + f" {'images':>7}")
        for method, row in table.items():
            print(f"{method:20} " + " ".join(f"{row[n]:{w}.3f}" for n, w in zip(names, widths))
                  + f" {row['images']:7d}")
    return _report(errors, timeout)


def cmd_sanity(client: Client, args) -> int:
    """The server's sanity checks of every method on these images: a pass/fail table."""
    paths: List[str] = []
    for name in args.folder:
        path = Path(name)
        if path.is_dir():
            paths += sorted(str(p) for p in path.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(str(path))
        else:
            raise invalid(f"{name} is neither an image file nor a folder",
                          reasons.IMAGE_NOT_FOUND)
    if not paths:
        raise invalid(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(args.folder)}",
                      reasons.NO_IMAGES)
    info = client.model_info(model=_model(args))
    methods = args.method or list(info.methods)
    stages = args.stages or 4
    channels = args.score_cam_channels or 16
    # The deadline grows with the work: per image and model (trained, each stage), an
    # explanation of two classes, two Score-CAM forwards per channel.
    forwards = len(paths) * (1 + stages) * (len(methods) * 2 + 2 * channels * (
        "scorecam" in methods))
    timeout = args.timeout * max(1.0, forwards / FORWARDS_PER_TIMEOUT)
    report = client.check_sanity(paths, method=methods, layer=args.layer,
                                 score_cam_channels=args.score_cam_channels or 0,
                                 contrast_rank=args.contrast_rank, stages=args.stages,
                                 seed=args.seed, threshold=args.threshold, timeout=timeout,
                                 model=_model(args))
    if args.json:
        print(json.dumps(_sanity_json(report, paths, info), indent=2))
    else:
        _print_sanity(report, paths, info)
    return 0


def _sanity_json(report: SanityReport, paths: Sequence[str], info: ModelInfo) -> dict:
    return {"layer": report.layer, "threshold": report.threshold, "seed": report.seed,
            "stages": [{"name": s.name, "modules": list(s.modules)} for s in report.stages],
            "verdict_stage": report.stages[report.verdict_stage].name if report.stages else None,
            "classes": {p: {"top": info.labels[t], "contrast": info.labels[c]}
                        for p, (t, c) in zip(paths, report.classes)},
            "methods": {m.method: {"randomisation": dict(zip(
                [s.name for s in report.stages], m.randomisation)),
                "randomisation_passed": m.randomisation_passed,
                "discrimination": m.discrimination,
                "discrimination_passed": m.discrimination_passed} for m in report.methods}}


def _print_sanity(report: SanityReport, paths: Sequence[str], info: ModelInfo) -> None:
    print(f"sanity checks on {info.name}, layer {report.layer}, {len(paths)} images, seed "
          f"{report.seed}; a method passes a check when its correlation is below "
          f"{report.threshold:g}")
    print("parameter randomisation (Adebayo et al. 2018): mean |Spearman| of each map before "
          "and after randomising, cascading from the top (* decides)")
    before: set = set()
    for i, stage in enumerate(report.stages):
        added = [m for m in stage.modules if m not in before]
        before |= set(added)
        mark = "*" if i == report.verdict_stage else " "
        print(f"  {stage.name + mark:10} + {', '.join(added)}")
    print("class discrimination: Spearman of the top class's map and another class's")
    for path, (top, other) in zip(paths, report.classes):
        print(f"  {Path(path).name}: {info.labels[top]!r} vs {info.labels[other]!r}")
    names = [s.name + ("*" if i == report.verdict_stage else "")
             for i, s in enumerate(report.stages)]
    print()
    print(f"{'':{_METHOD_WIDTH}} {'parameter randomisation':{10 * len(names) + 7}} "
          "class discrimination")
    print(f"{'method':{_METHOD_WIDTH}} " + " ".join(f"{n:>9}" for n in names)
          + f" {'verdict':>7} {'Spearman':>9} {'verdict':>7}")
    for m in report.methods:
        print(f"{m.method:{_METHOD_WIDTH}} " + " ".join(f"{v:9.2f}" for v in m.randomisation)
              + f" {_verdict(m.randomisation_passed):>7} {m.discrimination:9.2f} "
              f"{_verdict(m.discrimination_passed):>7}")


_METHOD_WIDTH = max(len(name) for name in method_names())  # a table's method column


def _verdict(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def cmd_stream(client: Client, args) -> int:
    """Stream a video file or camera through the server; write an annotated video."""
    import numpy as np

    from . import maps, video
    from .streams import Frame

    try:
        video.require_opencv()
    except ImportError as exc:
        raise _LocalError(str(exc)) from None

    if args.output and Path(args.output).suffix.lower() not in VIDEO_SUFFIXES:
        raise _LocalError(f"cannot write {args.output}: choose a video file name ending in "
                          f"{', '.join(VIDEO_SUFFIXES)}")
    target = _target(args.target_class)
    if target is not None or args.layer:
        # Refuse a misspelled class or layer once, here, instead of once per frame.
        info = client.model_info(model=_model(args))
        lowered = {label.lower() for label in info.labels}
        if isinstance(target, str) and target.strip().lower() not in lowered:
            raise invalid(f"no class is labelled {target!r} (camserve info lists the labels)",
                          reasons.UNKNOWN_LABEL)
        if isinstance(target, int) and target >= len(info.labels):
            raise invalid(f"class index {target} is out of range: the model has "
                          f"{len(info.labels)} classes, 0 to {len(info.labels) - 1}",
                          reasons.UNKNOWN_CLASS)
        if args.layer and args.layer not in {layer.name for layer in info.layers}:
            raise invalid(f"layer {args.layer!r} is not one the server explains; choose from "
                          f"{', '.join(layer.name for layer in info.layers)}",
                          reasons.UNKNOWN_LAYER)
    source = args.camera if args.video is None else args.video
    try:
        capture = video.open_video(source)
    except CamserveError as exc:
        raise _LocalError(exc.details) from None
    fps_in, total = video.video_properties(capture)
    if args.max_frames:
        total = min(total, args.max_frames) if total else args.max_frames
    frames: dict = {}  # sent, not answered yet: frame id -> RGB
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
            for n in [n for n in frames if n < frame_id]:
                del frames[n]
            return frames.pop(frame_id)

    if args.explain:
        results = client.stream_explain(produce(), target=target, layer=args.layer,
                                        policy=args.policy, model=_model(args))
    else:
        results = client.stream_predict(produce(), top_k=1, policy=args.policy,
                                        model=_model(args))
    progress = Progress(total or 0, enabled=total > 1)
    writer = None
    answered = skipped = failed = written_up_to = 0
    latencies = []
    started = time.monotonic()
    last_picture = None
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
        if not args.output:
            continue
        if args.explain:
            rgb = maps.overlay(rgb, r.result.heatmap)
            best = r.result.target  # the class explained, which may not be the top-1
            label = f"{best.label} {best.probability:.0%} ({r.result.method})"
        else:
            best = r.result.best
            label = f"{best.label} {best.probability:.0%}"
        rate = answered / max(time.monotonic() - started, 1e-9)
        picture = video.annotate(rgb, [f"#{r.frame_id}  {label}", f"{rate:.1f} fps"])
        if writer is None:
            writer = video.VideoWriter(args.output, fps_in or 30.0, rgb.shape[:2])
        # Each answered frame is written at its own place in the source's timeline: the
        # frames skipped before it repeat the previous answer (before the first answer, the
        # first answer), so the video keeps the source's pace (and length) under --policy
        # latest too.
        for _ in range(r.frame_id - written_up_to):
            writer.write(picture if last_picture is None else last_picture)
        writer.write(picture)
        written_up_to, last_picture = r.frame_id + 1, picture
    elapsed = time.monotonic() - started
    if writer is not None:
        writer.close()
    sent = answered + skipped + failed
    if sent == 0:
        print(f"camserve: no frames could be read from {source!r}: is it a video file (or "
              "camera) OpenCV can open?", file=sys.stderr)
        return 1
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"),) * 2
    print(f"frames sent {sent}, answered {answered}, skipped {skipped}, failed {failed}; "
          f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; {answered / max(elapsed, 1e-9):.1f} fps"
          + (f"; wrote {writer.frames} frames to {args.output}" if writer is not None else ""))
    return 1 if failed else 0


class _LocalError(Exception):
    """A problem on this machine (a file, a camera), not an answer from the server."""


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


def _report(errors: List[Tuple[str, CamserveError]], timeout: Optional[float] = None) -> int:
    for path, exc in errors:
        hint = ""
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
            hint = f" (the call's timeout was {timeout:.0f} s; pass --timeout SECONDS for more)"
        print(f"camserve: {path}: {exc.code.name}: {exc.details}{hint}", file=sys.stderr)
    return 1 if errors else 0


def _connection_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The flags every subcommand shares. On the subcommands they default to SUPPRESS, so that
    a flag given before the subcommand is kept unless it is given again after it."""
    def d(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--target", default=d(os.environ.get("CAMSERVE_TARGET",
                                                             _calls.DEFAULT_TARGET)),
                        help="server address host[:port], several comma-separated, or "
                        "dns:///name:port (env CAMSERVE_TARGET; default localhost:50051)")
    parser.add_argument("--timeout", type=float, default=d(60.0),
                        help="seconds per call (default 60)")
    parser.add_argument("--token", default=d(os.environ.get("CAMSERVE_TOKEN")),
                        help="bearer token, when the server requires one (env CAMSERVE_TOKEN)")
    parser.add_argument("--tls", action="store_true", default=d(False),
                        help="connect over TLS (system CAs)")
    parser.add_argument("--ca-cert", metavar="PEM", default=d(None),
                        help="trust this CA (implies --tls)")
    parser.add_argument("--client-cert", metavar="PEM", default=d(None),
                        help="client certificate (mutual TLS)")
    parser.add_argument("--client-key", metavar="PEM", default=d(None),
                        help="key of --client-cert")
    parser.add_argument("--model", metavar="NAME[:VERSION]", action="append", default=d([]),
                        help="the model (and version) to ask, of those the server serves "
                        "(camserve models); explain takes several to compare them (default: "
                        "the server's default model)")
    parser.add_argument("--request-id", metavar="ID", default=d(None),
                        help="sent as x-request-id with every call, for the server's access "
                        "log (default: the server makes one per call)")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="camserve", description=doc[0], epilog=doc[-1])
    _connection_flags(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True,
                                help="what to do (camserve COMMAND --help: its options)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help)

    info = command("info", help="show the served model (exit 1 while it is not serving)")
    info.add_argument("--json", action="store_true",
                      help="print the model's description as JSON")
    info.set_defaults(run=cmd_info)

    health = command("health", help="exit 0 when the server's health service says SERVING")
    health.set_defaults(run=cmd_health)

    models = command("models", help="the models and versions the server serves, with their "
                     "states")
    models.add_argument("--json", action="store_true", help="print them as JSON")
    models.set_defaults(run=cmd_models)

    load = command("load", help="load a model of the server's repository, or reload it "
                   "(--token: the server's admin token)")
    load.add_argument("name", metavar="NAME", help="the model's folder in the repository")
    load.add_argument("--no-wait", action="store_true",
                      help="return at once instead of when the model is ready")
    load.set_defaults(run=cmd_load)

    unload = command("unload", help="unload a model, or one version of it (--token: the "
                     "server's admin token)")
    unload.add_argument("name", metavar="NAME[:VERSION]", help="the model (and version)")
    unload.set_defaults(run=cmd_unload)

    predict = command("predict", help="top classes for images")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help=IMAGE_HELP)
    predict.add_argument("--top-k", type=int, default=5, metavar="N",
                         help="classes to show per image (default %(default)s)")
    predict.add_argument("--json", action="store_true",
                         help="print a JSON list, one object per image, instead of lines")
    predict.set_defaults(run=cmd_predict)

    explain = command("explain", help="write a heatmap and an overlay per image")
    explain.add_argument("images", nargs="+", metavar="IMAGE", help=IMAGE_HELP)
    explain.add_argument("-o", "--output", required=True, metavar="DIR",
                         help="folder for NAME.overlay.png and NAME.heatmap.png")
    explain.add_argument("--class", dest="target_class", metavar="N|LABEL", action="append",
                         default=[], help="class to explain, index or label (repeatable; "
                         "default: the top-1 class)")
    explain.add_argument("--layer", action="append", default=[],
                         help="layer to explain (repeatable; default: the server's)")
    explain.add_argument("--method", action="append", choices=method_names(),
                         help="CAM method (repeatable; default: gradcam)")
    explain.add_argument("--target-kind", choices=target_kind_names(),
                         help="the score of each class explained (default: logit, or "
                         "similarity with --similar-to)")
    explain.add_argument("--similar-to", metavar="FILE",
                         help="explain the similarity of each image's output to a concept: "
                         "a .npy or .txt vector, or an image (its embedding, from a Predict "
                         "first); for embedding models")
    explain.add_argument("--eigen-smooth", action="store_true",
                         help="the first principal component of each map's terms instead of "
                         "their sum (methods whose map is a sum over channels)")
    explain.add_argument("--aug-smooth", action="store_true",
                         help="the mean heatmap of 6 flipped and scaled copies of each image "
                         "(test-time augmentation, one more batch)")
    explain.add_argument("--counterfactual", action="store_true",
                         help="negated gradients: regions whose removal would raise the score")
    explain.add_argument("--score-cam-channels", type=int, default=0, metavar="N",
                         help="Score-CAM: the N channels with the highest mean activation "
                         "(one forward each; default 0: the server's limit)")
    explain.add_argument("--grid", action="store_true",
                         help="also write NAME.grid.png: methods down, classes across")
    explain.add_argument("--top-k", type=int, default=5, metavar="N",
                         help="classes to show per image (default %(default)s)")
    explain.add_argument("--json", action="store_true",
                         help="print a JSON list, one object per image with its maps (the raw "
                         "grid and the files written), instead of lines")
    explain.set_defaults(run=cmd_explain)

    evaluate = command("evaluate", help="deletion/insertion scores of every method over a "
                       "folder of images, beside a random map; with --sanity, the server's "
                       "sanity checks of every method on images")
    evaluate.add_argument("folder", metavar="FOLDER", nargs="+",
                          help="a folder of images; with --sanity, images or folders")
    evaluate.add_argument("--sanity", action="store_true",
                          help="run the parameter-randomisation (Adebayo et al. 2018) and "
                          "class-discrimination checks: a pass/fail table per method")
    evaluate.add_argument("--stages", type=int, default=0,
                          help="--sanity: stages of the cascading randomisation, 1-4 (default 4)")
    evaluate.add_argument("--contrast-rank", type=int, default=0, metavar="RANK",
                          help="--sanity: compare the top class with the class at this rank "
                          "(default: the middle one)")
    evaluate.add_argument("--seed", type=int, default=0, help="--sanity: random parameters' seed")
    evaluate.add_argument("--threshold", type=float, default=0.0,
                          help="--sanity: pass below this correlation (default: the server's 0.5)")
    evaluate.add_argument("--method", action="append", choices=method_names(),
                          help="method to score (repeatable; default: all the server has)")
    evaluate.add_argument("--layer", help="layer to explain (default: the server's)")
    evaluate.add_argument("--steps", type=int, default=16, help="steps per curve (default 16)")
    evaluate.add_argument("--road", action="store_true",
                          help="ROAD scores too (remove and debias, most and least relevant "
                          "first, at 10, 20, ..., 90 %%: two forwards per percentile)")
    evaluate.add_argument("--score-cam-channels", type=int, default=None,
                          help="Score-CAM: top channels by activation (default 64, with "
                          "--sanity 16; 0: the server's limit)")
    evaluate.add_argument("--json", action="store_true",
                          help="print the table (or the sanity report) as JSON")
    evaluate.set_defaults(run=cmd_evaluate)

    stream = command("stream", help="stream a video or camera; write an annotated video")
    where = stream.add_mutually_exclusive_group(required=True)
    where.add_argument("video", nargs="?", metavar="VIDEO", help="a video file")
    where.add_argument("--camera", type=int, metavar="N", help="camera index instead of a file")
    stream.add_argument("-o", "--output", metavar="OUT.mp4",
                        help="write the answered frames, annotated, to this video "
                        f"({', '.join(VIDEO_SUFFIXES)})")
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
    stream.add_argument("--max-frames", type=int, default=None, metavar="N",
                        help="stop after the first N frames (default: the whole video; a "
                        "camera streams until Ctrl-C)")
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
        metadata = [("x-request-id", args.request_id)] if args.request_id else []
        with Client(args.target, timeout=args.timeout, token=args.token, tls=args.tls,
                    root_certificates=args.ca_cert, client_cert=args.client_cert,
                    client_key=args.client_key, metadata=metadata) as client:
            return args.run(client, args)
    except CamserveError as exc:
        print(f"camserve: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    except _LocalError as exc:
        print(f"camserve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
