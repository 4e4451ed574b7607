"""The server's one settings object, built from flags and ``CAMSERVE_*`` environment variables.

Every flag ``--some-flag`` has an environment variable ``CAMSERVE_SOME_FLAG``; a flag given on
the command line wins over the environment. Repeatable flags (``--layer``) take a
comma-separated list from the environment. The result is frozen and passed down explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

DEFAULT_MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 50051
    # Model source: "efficientnet_lite0", "torchvision:NAME", "timm:NAME",
    # "torchscript:PATH" or "python:MODULE:FACTORY".
    model: str = DEFAULT_MODEL
    # A state_dict or checkpoint file; "random" for untrained weights; "pretrained" to let
    # torchvision/timm download their published weights (the only download camserve makes,
    # and only when asked).
    weights: Optional[str] = None
    # Explainable layers (dotted module names); the first is the default. Empty: found.
    layers: Tuple[str, ...] = ()
    labels: Optional[str] = None
    device: str = "auto"
    max_batch_size: int = 8
    max_delay_ms: float = 5.0
    max_queue: int = 256
    threads: int = 32
    # (height, width); None: the model source's default.
    input_size: Optional[Tuple[int, int]] = None
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_images_per_request: int = 64
    max_message_bytes: int = 64 * 1024 * 1024
    grace_s: float = 10.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if self.max_batch_size < 1:
            problems.append("max-batch-size must be at least 1")
        if self.max_delay_ms < 0:
            problems.append("max-delay-ms must be 0 or more")
        if self.max_queue < 1:
            problems.append("max-queue must be at least 1")
        if self.threads < 2:
            problems.append("threads must be at least 2")
        if self.input_size is not None and min(self.input_size) < 1:
            problems.append("input-size must be positive")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                problems.append(f"{name} needs 3 values (R,G,B), got {len(value)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            problems.append("std values must be positive")
        for name in ("max_image_bytes", "max_image_pixels", "max_images_per_request",
                     "max_message_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def _floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 0.5,0.5,0.5, got {text!r}") from None


def _size(text: str) -> Tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH, got {text!r}")
    return values[0], values[1]


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="camserve-server",
        description="Serve an image classifier over gRPC with Grad-CAM explanations. "
        "Every flag can also be set as CAMSERVE_<FLAG> in the environment.",
    )
    p.add_argument("--host", default=d.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port,
                   help="port; 0 picks a free one and prints it (default %(default)s)")
    p.add_argument("--model", default=d.model,
                   help="efficientnet_lite0 (default), torchvision:NAME, timm:NAME, "
                   "torchscript:PATH or python:MODULE:FACTORY")
    p.add_argument("--weights", default=None,
                   help="state_dict or checkpoint file; 'random' for untrained weights; "
                   "'pretrained' lets torchvision/timm download theirs")
    p.add_argument("--layer", dest="layers", action="append", default=None,
                   help="layer that may be explained (repeatable; the first is the default; "
                   "default: the last 4-D layer before global pooling)")
    p.add_argument("--labels", default=None, help="text file with one class label per line")
    p.add_argument("--device", default=d.device, help="auto (CUDA when available), cpu, cuda:N")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-delay-ms", type=float, default=d.max_delay_ms,
                   help="longest wait for a batch to fill after its first item arrives")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="items waiting beyond this answer RESOURCE_EXHAUSTED")
    p.add_argument("--threads", type=int, default=d.threads, help="gRPC handler threads")
    p.add_argument("--input-size", type=_size, default=None, help="SIZE or HEIGHTxWIDTH")
    p.add_argument("--mean", type=_floats, default=None, help="R,G,B normalisation mean")
    p.add_argument("--std", type=_floats, default=None, help="R,G,B normalisation std")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request)
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    p.add_argument("--grace-s", type=float, default=d.grace_s,
                   help="on SIGTERM, how long in-flight calls may take to finish")
    p.add_argument("--log-level", default=d.log_level)
    return p


def _env_args(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list:
    """Turn CAMSERVE_* variables into command-line arguments placed before the real ones."""
    args = []
    for action in parser._actions:  # argparse offers no public iterator over its options
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long is None or long == "--help":
            continue
        value = environ.get("CAMSERVE_" + long[2:].upper().replace("-", "_"))
        if value is None or value == "":
            continue
        values = [v.strip() for v in value.split(",")] if action.dest == "layers" else [value]
        for v in values:
            args += [long, v]
    return args


def parse_settings(argv: Optional[Sequence[str]] = None,
                   environ: Optional[Mapping[str, str]] = None) -> Settings:
    parser = build_parser()
    environ = os.environ if environ is None else environ
    cli = sys.argv[1:] if argv is None else list(argv)
    ns = parser.parse_args(_env_args(parser, environ))
    ns_cli = parser.parse_args(cli)
    # Flags given on the command line win; repeatable flags are replaced, not merged.
    merged = vars(ns)
    defaults = vars(parser.parse_args([]))
    for key, value in vars(ns_cli).items():
        if value != defaults[key]:
            merged[key] = value
    merged["layers"] = tuple(merged["layers"] or ())
    for key in ("mean", "std"):
        if merged[key] is not None:
            merged[key] = tuple(merged[key])
    try:
        return Settings(**merged)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
