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
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Tuple

DEFAULT_MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class Settings:
    # Loopback by default: a server is reachable from other machines only when asked
    # (--host 0.0.0.0, as containers do), since plaintext without tokens is the default.
    host: str = "127.0.0.1"
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
    # "auto" (CUDA when available), "cpu", "cuda" (every GPU), "cuda:N"; several devices
    # comma-separated (--device cuda:0 --device cuda:1): one engine and worker thread each.
    device: str = "auto"
    # fp32 (strict), tf32 (CUDA: TF32 tensor cores), bf16 (autocast; CPU too) or fp16
    # (autocast; CUDA only)
    precision: str = "fp32"
    # Batch norms folded into the convolutions before them at load (engine/fold.py): the same
    # answers, 15-30% less CPU per forward. Off: the model runs as it was built.
    fold_batchnorm: bool = True
    # TensorFlow "same" padding (timm's tf_* models, the default one among them) made static
    # for the model's input size at load (engine/same_padding.py): the same answers, no copy of
    # each strided convolution's input. Off: the model pads at every call, as built.
    static_padding: bool = True
    # JPEGs decoded on the engine's device (batched, nvJPEG on CUDA) or on the host in the
    # handler: "auto" = on the device when it is CUDA.
    jpeg_decode: str = "auto"
    max_batch_size: int = 8
    # 0: an idle worker starts a lone item at once, and under load items gather while the
    # previous batch computes; > 0 also waits that long for a batch to fill.
    max_delay_ms: float = 0.0
    max_queue: int = 256
    # Threads that decode requests' images and render answers' heatmaps (0: from the cores).
    decode_threads: int = 0
    # Server processes sharing the port, each with a model replica (--workers auto: from the
    # cores or GPUs). worker_index is this process's number (0: the only process; 1..N: a
    # worker of the supervisor); the supervisor sets it (hidden flag --worker-index).
    workers: int = 1
    worker_index: int = 0
    # torch's intra-op threads per engine (0: the cores / workers / CPU engines in --device)
    torch_threads: int = 0
    # Open streams beyond this are refused with RESOURCE_EXHAUSTED and a retry hint.
    max_streams: int = 4096
    # A stream that has sent no frame this long after it opened is closed.
    stream_idle_s: float = 30.0
    # HTTP/2 keepalive pings to notice dead peers: every keepalive_s, answered within 20 s.
    keepalive_s: float = 60.0
    # Close a connection this long after it opened (0: never), after letting its calls finish
    # within max_connection_age_grace_s, so that clients reconnect and spread over replicas.
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 30.0
    # (height, width); None: the model source's default.
    input_size: Optional[Tuple[int, int]] = None
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_images_per_request: int = 64
    # gRPC receives each request whole before any camserve code runs, so the server may hold
    # calls in flight x this limit in gRPC's own buffers: 32 MiB keeps sixteen at once under
    # 1 GB (a raw 4K frame is 24.9 MB; send larger images encoded).
    max_message_bytes: int = 32 * 1024 * 1024
    max_stream_frames_in_flight: int = 4
    # Score-CAM costs one forward per channel: requests beyond this many channels are refused.
    max_score_cam_channels: int = 256
    max_maps_per_image: int = 64  # methods x targets x layers
    # One image's explanation may cost at most this many forwards (Score-CAM channels and
    # faithfulness steps make most of it); the worker runs them in slices between batches.
    max_item_cost: int = 4096
    # Bytes of requests being parsed, decoded and answered at once; a request (over 1 MiB)
    # that does not fit waits for RESOURCE_EXHAUSTED's retry hint. Each holds about 4 times
    # its size meanwhile (the message, its parsed copy, the pixels, the decoded image).
    max_inflight_bytes: int = 96 * 1024 * 1024
    max_faithfulness_steps: int = 256
    # Heatmaps and overlays of larger images are rendered downscaled to this many pixels.
    max_render_pixels: int = 8_388_608
    grace_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"  # "text" or "json": one line per event either way
    # TLS: a PEM certificate chain and key; with a client CA, clients must present a
    # certificate it signed (mutual TLS).
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    # Bearer tokens accepted on every RPC but health checks; empty: no authentication.
    # Never printed: repr=False keeps them out of logs and tracebacks.
    auth_tokens: Tuple[str, ...] = field(default=(), repr=False)
    metrics_port: Optional[int] = None  # Prometheus /metrics over HTTP; 0 picks a free port
    metrics_host: Optional[str] = None  # where /metrics listens; None: the same as host
    # The model's name in the Open Inference Protocol (KServe v2 gRPC) served beside camserve's.
    oip_model_name: str = "camserve"

    @property
    def max_queued_forwards(self) -> int:
        """The extra forwards (Score-CAM, faithfulness) queued and running at once, and so
        the most one request may ask for: four of the costliest images."""
        return 4 * self.max_item_cost

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("give --tls-cert and --tls-key together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("--tls-client-ca needs --tls-cert and --tls-key")
        if self.log_format not in ("text", "json"):
            problems.append(f"log-format must be text or json, not {self.log_format!r}")
        if any(not t or any(c.isspace() for c in t) for t in self.auth_tokens):
            problems.append("auth tokens must be non-empty and without spaces")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics-port {self.metrics_port} is not in 0..65535")
        if self.max_batch_size < 1:
            problems.append("max-batch-size must be at least 1")
        if self.precision not in ("fp32", "tf32", "bf16", "fp16"):
            problems.append(f"precision must be fp32, tf32, bf16 or fp16, not "
                            f"{self.precision!r}")
        if self.jpeg_decode not in ("auto", "host", "device"):
            problems.append(f"jpeg-decode must be auto, host or device, not "
                            f"{self.jpeg_decode!r}")
        if not self.device or any(not d.strip() for d in self.device.split(",")):
            problems.append(f"device {self.device!r}: name a device, e.g. cpu or cuda:0")
        if self.max_delay_ms < 0:
            problems.append("max-delay-ms must be 0 or more")
        if self.max_queue < 1:
            problems.append("max-queue must be at least 1")
        if self.decode_threads < 0:
            problems.append("decode-threads must be 0 (from the cores) or more")
        if self.workers < 1:
            problems.append("workers must be at least 1 (or auto)")
        if self.torch_threads < 0:
            problems.append("torch-threads must be 0 (automatic) or more")
        if self.stream_idle_s <= 0 or self.keepalive_s <= 0:
            problems.append("stream-idle-s and keepalive-s must be positive")
        if self.max_connection_age_s < 0 or self.max_connection_age_grace_s < 0:
            problems.append("max-connection-age-s and its grace must be 0 or more")
        if self.input_size is not None and min(self.input_size) < 1:
            problems.append("input-size must be positive")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                problems.append(f"{name} needs 3 values (R,G,B), got {len(value)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            problems.append("std values must be positive")
        for name in ("max_image_bytes", "max_image_pixels", "max_images_per_request",
                     "max_message_bytes", "max_stream_frames_in_flight",
                     "max_score_cam_channels", "max_maps_per_image", "max_streams",
                     "max_render_pixels", "max_item_cost", "max_inflight_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1")
        if self.max_faithfulness_steps < 2:
            problems.append("max-faithfulness-steps must be at least 2")
        if self.max_stream_frames_in_flight < 2:
            problems.append("max-stream-frames-in-flight must be at least 2")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def devices(self) -> Tuple[str, ...]:
        """--device as a list: one engine per entry."""
        return tuple(d.strip() for d in self.device.split(","))

    @property
    def metrics_address(self) -> str:
        return self.metrics_host if self.metrics_host is not None else self.host

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


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return auto_workers()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


# --workers auto on CPU: at most this many processes (each holds a model replica and its own
# torch, about 0.8 GB for the default model).
MAX_AUTO_CPU_WORKERS = 4


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity (what a container's cpuset or
    ``taskset`` grants, unlike os.cpu_count, which counts the host's), and no more than a
    cgroup v2 CPU quota (``cpu.max``, Kubernetes' CPU limit) allows, rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def auto_workers() -> int:
    """--workers auto: one process per GPU when there are several, one with a single GPU; on
    CPU, one process per core up to MAX_AUTO_CPU_WORKERS (torch threads: the cores divided
    among them). On 2 cores, 2 workers x 1 torch thread answered 14-60 % more images/s than 1 x
    2, at a lower p50 (bench/bench_workers.py, the README's table): a process's
    decoding and gRPC work runs beside the other's model, and one-thread convolutions waste
    less than two threads splitting small batches."""
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    if gpus:
        return gpus
    return max(1, min(MAX_AUTO_CPU_WORKERS, usable_cpus()))


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r}: say on or off")


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="camserve-server",
        description="Serve an image classifier over gRPC with Grad-CAM explanations. "
        "Every flag can also be set as CAMSERVE_<FLAG> in the environment.",
    )
    p.add_argument("--host", default=d.host,
                   help="address to listen on (default %(default)s: this machine only; "
                   "0.0.0.0 for every interface)")
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
    p.add_argument("--device", action="append", default=None,
                   help="auto (CUDA when available; the default), cpu, cuda (every GPU) or "
                   "cuda:N; repeat it for several devices, one engine and worker each, sharing "
                   "one queue")
    p.add_argument("--precision", default=d.precision,
                   choices=("fp32", "tf32", "bf16", "fp16"),
                   help="fp32 (default), tf32 (CUDA), bf16 (autocast, CPU too) or fp16 "
                   "(autocast, CUDA only)")
    p.add_argument("--fold-batchnorm", type=_on_off, default=d.fold_batchnorm,
                   metavar="{on,off}",
                   help="fold batch norms into the convolutions before them when the model "
                   "loads: the same answers, a cheaper forward (default on)")
    p.add_argument("--static-padding", type=_on_off, default=d.static_padding,
                   metavar="{on,off}",
                   help="make timm's TensorFlow \"same\" padding static for the input size "
                   "when the model loads: the same answers, a cheaper forward (default on)")
    p.add_argument("--jpeg-decode", default=d.jpeg_decode, choices=("auto", "host", "device"),
                   help="decode JPEGs on the engine's device (nvJPEG on CUDA) or on the host; "
                   "auto: on the device when it is CUDA")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-delay-ms", type=float, default=d.max_delay_ms,
                   help="longest wait for a batch to fill after its first item arrives "
                   "(default 0: start at once; batches fill while the previous computes)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="items waiting beyond this answer RESOURCE_EXHAUSTED")
    p.add_argument("--decode-threads", type=int, default=d.decode_threads,
                   help="threads that decode images and render heatmaps (0: from the cores)")
    p.add_argument("--workers", type=_workers, default=d.workers,
                   help="server processes sharing the port, each with a model replica; "
                   "'auto' picks from the cores or GPUs (default %(default)s)")
    p.add_argument("--worker-index", type=int, default=d.worker_index, help=argparse.SUPPRESS)
    p.add_argument("--torch-threads", type=int, default=d.torch_threads,
                   help="torch threads per engine (0: the cores divided by --workers and by "
                   "the CPU engines that --device lists)")
    p.add_argument("--max-streams", type=int, default=d.max_streams,
                   help="open streams beyond this are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--stream-idle-s", type=float, default=d.stream_idle_s,
                   help="close a stream that sent no frame this long after it opened")
    p.add_argument("--keepalive-s", type=float, default=d.keepalive_s,
                   help="ping idle connections this often to notice dead peers")
    p.add_argument("--max-connection-age-s", type=float, default=d.max_connection_age_s,
                   help="close connections this long after they opened (0: never), so that "
                   "clients reconnect and spread over replicas behind a load balancer")
    p.add_argument("--max-connection-age-grace-s", type=float,
                   default=d.max_connection_age_grace_s,
                   help="how long calls on a connection closed for its age may take to finish")

    p.add_argument("--input-size", type=_size, default=None, help="SIZE or HEIGHTxWIDTH")
    p.add_argument("--mean", type=_floats, default=None, help="R,G,B normalisation mean")
    p.add_argument("--std", type=_floats, default=None, help="R,G,B normalisation std")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request)
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    p.add_argument("--max-stream-frames-in-flight", type=int,
                   default=d.max_stream_frames_in_flight,
                   help="frames one stream (policy ALL) may have queued or running")
    p.add_argument("--max-score-cam-channels", type=int, default=d.max_score_cam_channels,
                   help="Score-CAM requests over this many channels (one forward each) are "
                   "refused")
    p.add_argument("--max-maps-per-image", type=int, default=d.max_maps_per_image)
    p.add_argument("--max-item-cost", type=int, default=d.max_item_cost,
                   help="most forwards one image's explanation may cost (Score-CAM channels, "
                   "faithfulness steps); costlier requests are refused")
    p.add_argument("--max-inflight-bytes", type=int, default=d.max_inflight_bytes,
                   help="bytes of requests decoded and answered at once; beyond it large "
                   "requests answer RESOURCE_EXHAUSTED with a retry hint")
    p.add_argument("--max-faithfulness-steps", type=int, default=d.max_faithfulness_steps)
    p.add_argument("--max-render-pixels", type=int, default=d.max_render_pixels,
                   help="heatmaps and overlays of larger images are rendered downscaled")
    p.add_argument("--grace-s", type=float, default=d.grace_s,
                   help="on SIGTERM, how long in-flight calls may take to finish")
    p.add_argument("--log-level", default=d.log_level, help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--log-format", default=d.log_format, choices=("text", "json"))
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None,
                   help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    p.add_argument("--auth-token", dest="auth_tokens", action="append", default=None,
                   help="accept 'authorization: Bearer TOKEN' (repeatable); every RPC but "
                   "health checks then needs one")
    p.add_argument("--auth-token-file", default=None,
                   help="file with one accepted token per line")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (HTTP /metrics)")
    p.add_argument("--metrics-host", default=None,
                   help="address /metrics listens on (default: the same as --host)")
    p.add_argument("--oip-model-name", default=d.oip_model_name,
                   help="the model's name in the Open Inference Protocol (KServe v2 gRPC, "
                   "for tritonclient and perf_analyzer; default %(default)s)")
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
        repeatable = action.dest in ("layers", "auth_tokens", "device")
        values = [v.strip() for v in value.split(",")] if repeatable else [value]
        for v in values:
            args += [long, v]
    return args


def parse_settings(argv: Optional[Sequence[str]] = None,
                   environ: Optional[Mapping[str, str]] = None) -> Settings:
    parser = build_parser()
    environ = os.environ if environ is None else environ
    cli = sys.argv[1:] if argv is None else list(argv)
    merged = vars(parser.parse_args(_env_args(parser, environ)))
    # Flags given on the command line win, even when they say the default; repeatable flags
    # are replaced, not merged. A parser without defaults tells which flags were given.
    given = build_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS
    merged.update(vars(given.parse_args(cli)))
    merged["layers"] = tuple(merged["layers"] or ())
    merged["device"] = ",".join(merged["device"] or ()) or Settings.device
    tokens = list(merged["auth_tokens"] or ())
    token_file = merged.pop("auth_token_file")
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                tokens += [line.strip() for line in f if line.strip()]
        except OSError as exc:
            parser.error(f"cannot read --auth-token-file: {exc.strerror}")
    merged["auth_tokens"] = tuple(tokens)
    for key in ("mean", "std"):
        if merged[key] is not None:
            merged[key] = tuple(merged[key])
    try:
        return Settings(**merged)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
