"""The server's one settings object, built from flags and ``CAMSERVE_*`` environment variables.

Each setting is declared once, as a field of ``Settings`` whose metadata holds its flag, its
help, how a flag's text becomes a value and what it must satisfy; the parser, the environment
variables, ``--help`` and the checks all come from those declarations. Every flag
``--some-flag`` has an environment variable ``CAMSERVE_SOME_FLAG``; a flag given on the command
line wins over the environment. Repeatable flags (``--layer``) take a comma-separated list from
the environment. The result is frozen and passed down explicitly: layers below ``process/``
receive the few values they use, never the whole object.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from ..engine.spec import DEFAULT_MODEL, MODEL_SOURCES

# A check takes the value and answers the problem with it, or None.
Check = Callable[[Any], Optional[str]]


def setting(default: Any, help: str, *, parse: Optional[Callable[[str], Any]] = None,
            check: Optional[Check] = None, choices: Optional[Tuple[str, ...]] = None,
            flag: Optional[str] = None, shown: Optional[str] = None, repeat: bool = False,
            metavar: Optional[str] = None, hidden: bool = False, repr: bool = True) -> Any:
    """A Settings field with its flag's declaration: ``help`` (the default is appended as
    ``shown``, or the value itself), ``parse`` (flag text → value), ``check``, ``choices``,
    ``flag`` (default: ``--`` and the field's name with dashes), ``repeat`` (the flag may be
    given several times; the environment variable takes a comma-separated list)."""
    return field(default=default, repr=repr, metadata=dict(
        help=help, parse=parse, check=check, choices=choices, flag=flag, shown=shown,
        repeat=repeat, metavar=metavar, hidden=hidden))


def _between(low: float, high: Optional[float] = None) -> Check:
    def check(value):
        if value is None or (value >= low and (high is None or value <= high)):
            return None
        return f"must be in {low}..{high}" if high is not None else f"must be at least {low}"
    return check


def _positive(value) -> Optional[str]:
    return None if value > 0 else "must be positive"


def _floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 0.5,0.5,0.5, got {text!r}") from None


def _rgb(value) -> Optional[str]:
    if value is not None and len(value) != 3:
        return f"needs 3 values (R,G,B), got {len(value)}"
    return None


def _std(value) -> Optional[str]:
    if value is not None and any(s <= 0 for s in value):
        return "values must be positive"
    return _rgb(value)


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


def _sizes_positive(value) -> Optional[str]:
    return None if value is None or min(value) >= 1 else "must be positive"


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return auto_workers()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r}: say on or off")


def _port_or_off(text: str) -> Optional[int]:
    if text.strip().lower() == "off":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number or off, got {text!r}") from None


def _devices(value: str) -> Optional[str]:
    if not value or any(not d.strip() for d in value.split(",")):
        return "name a device, e.g. cpu or cuda:0"
    return None


def _activation(value) -> Optional[str]:
    return (None if value in (None, "softmax", "sigmoid", "embedding")
            else "must be softmax, sigmoid or embedding")


def _tokens(value) -> Optional[str]:
    if any(not t or any(c.isspace() for c in t) for t in value):
        return "tokens must be non-empty and without spaces"
    return None


def _pair(value_type: Callable[[str], Any]) -> Callable[[str], Tuple[str, Any]]:
    """A flag's ``KEY=VALUE`` text as (key, value)."""
    def parse(text: str) -> Tuple[str, Any]:
        key, equals, value = text.partition("=")
        try:
            if not equals or not key.strip():
                raise ValueError
            return key.strip().lower(), value_type(value.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected KEY=VALUE like 2=500, got {text!r}") from None
    return parse


KINDS = ("unary", "stream", "expensive")  # the kinds of work --default-priority sets


def _kinds(value) -> Optional[str]:
    wrong = [kind for kind, _ in value if kind not in KINDS]
    return f"names {wrong[0]!r}: say unary, stream or expensive" if wrong else None


def _priorities(value) -> Optional[str]:
    """A --level-* flag's PRIORITY=VALUE pairs: each priority a number, each value >= 0."""
    for key, number in value:
        if not key.isdigit() or int(key) < 1:
            return f"names priority {key!r}: say a priority, 1 the highest"
        if number < 0:
            return f"gives priority {key} {number:g}: must be at least 0"
    return None


def _int_list(value) -> Optional[str]:
    return None if all(v >= 1 for v in value) else "names priority 0: priorities start at 1"


# A worker beats its heartbeat this often (process/workers.py); --worker-hang-s must leave room.
HEARTBEAT_S = 0.5


def _hang_bound(value) -> Optional[str]:
    if value == 0 or value >= 4 * HEARTBEAT_S:
        return None
    return f"must be 0 (off) or at least {4 * HEARTBEAT_S:g}"


ON_OFF = dict(parse=_on_off, metavar="{on,off}")


@dataclass(frozen=True)
class Settings:
    host: str = setting("127.0.0.1", "address to listen on: this machine only by default; "
                        "0.0.0.0 for every interface")
    port: int = setting(50051, "gRPC port; 0 picks a free one and prints it", parse=int,
                        check=_between(0, 65535))
    http_port: Optional[int] = setting(
        8000, "HTTP port on --host, beside gRPC (camserve's API as JSON, the Open Inference "
        "Protocol over REST, WebSocket streams, /metrics, the explorer page at /: "
        "docs/http.md); 0 picks a free one and prints it; off: no HTTP", parse=_port_or_off,
        check=_between(0, 65535), metavar="PORT")
    model: str = setting(DEFAULT_MODEL, f"the model: {MODEL_SOURCES}")
    model_repository: Optional[str] = setting(
        None, "serve the models of this folder (NAME/config.toml, NAME/VERSION/weights.pth: "
        "docs/models.md) instead of --model", metavar="DIR", shown="none: --model alone")
    model_control: str = setting(
        "none", "none: the repository's models are loaded at start and fixed; explicit: "
        "LoadModel/UnloadModel calls with --admin-token load and unload them; poll: new "
        "version folders are noticed and loaded every --repository-poll-s",
        choices=("none", "explicit", "poll"))
    load_models: Tuple[str, ...] = setting(
        (), "the models to load at start (repeatable)", flag="--load-model", metavar="NAME",
        repeat=True, shown="every model of the repository")
    default_model: Optional[str] = setting(
        None, "the model that calls naming none go to", metavar="NAME",
        shown="--oip-model-name with --model; the first by name with a repository")
    repository_poll_s: float = setting(15.0, "--model-control poll: how often to look",
                                       parse=float, check=_between(0.1))
    max_models_bytes: int = setting(
        0, "most bytes of parameters and buffers the loaded models may take together; a load "
        "beyond it is refused", parse=int, check=_between(0), shown="0: no bound")
    weights: Optional[str] = setting(
        None, "state_dict or checkpoint file; 'random' for untrained weights; 'pretrained' "
        "lets torchvision/timm download their published weights (the only download camserve "
        "makes, and only when asked)", shown="the model source's own")
    layers: Tuple[str, ...] = setting(
        (), "layer that may be explained, a dotted module name (repeatable; the first is the "
        "default; pytorch-grad-cam's layer4[-1] indexing is accepted)", flag="--layer",
        metavar="LAYER", repeat=True, shown="the layer chosen for the model's family")
    labels: Optional[str] = setting(None, "text file with one class label per line",
                                    shown="the model source's, else class numbers")
    device: str = setting(
        "auto", "auto (CUDA when available), cpu, cuda (every GPU) or cuda:N; repeat it for "
        "several devices, one engine and worker thread each, sharing one queue", repeat=True,
        check=_devices)
    precision: str = setting("fp32", "fp32 (strict), tf32 (CUDA: TF32 tensor cores), bf16 "
                             "(autocast, CPU too) or fp16 (autocast, CUDA only)",
                             choices=("fp32", "tf32", "bf16", "fp16"))
    fold_batchnorm: bool = setting(
        True, "fold batch norms into the convolutions before them when the model loads "
        "(engine/fold.py): the same answers, a cheaper forward", **ON_OFF)
    static_padding: bool = setting(
        True, "make timm's TensorFlow \"same\" padding static for the input size when the "
        "model loads (engine/same_padding.py): the same answers, no copy of each strided "
        "convolution's input", **ON_OFF)
    output_activation: Optional[str] = setting(
        None, "how the outputs are read: softmax (one class per image), sigmoid (multi-label: "
        "Predict answers per-class probabilities that need not sum to 1, and Explain's "
        "SIGMOID target applies) or embedding (no classes: Predict answers the output "
        "vector, Explain the similarity to a concept)",
        check=_activation, metavar="{softmax,sigmoid,embedding}",
        shown="the model's own: sigmoid when it says multi-label, else softmax")
    jpeg_decode: str = setting("auto", "decode JPEGs on the engine's device (batched, nvJPEG "
                               "on CUDA) or on the host; auto: on the device when it is CUDA",
                               choices=("auto", "host", "device"))
    max_batch_size: int = setting(8, "most images one forward takes", parse=int,
                                  check=_between(1))
    max_delay_ms: float = setting(
        0.0, "longest wait for a batch to fill after its first item arrives (0: start at "
        "once; under load items gather while the previous batch computes)", parse=float,
        check=_between(0))
    max_queue: int = setting(256, "items waiting beyond this answer RESOURCE_EXHAUSTED",
                             parse=int, check=_between(1))
    max_queue_per_caller: int = setting(
        0, "items one caller (its token, trusted tenant header, else its connection) may have "
        "waiting in a model's queue; a call that would pass it answers RESOURCE_EXHAUSTED "
        "while others' are taken (one larger than it, when the caller has nothing waiting, "
        "is taken)", parse=int, check=_between(0), shown="0: only --max-queue")
    priority_levels: int = setting(
        3, "the queue's priority levels, 1 the highest (docs/scaling.md)", parse=int,
        check=_between(1, 9))
    default_priorities: Tuple[Tuple[str, int], ...] = setting(
        (), "the priority of a kind of work when a call asks for none (repeatable KIND=P; "
        "kinds: unary calls, stream frames, expensive items with extra forwards, whose "
        "priority is the highest they may have)", flag="--default-priority",
        metavar="KIND=P", parse=_pair(int), repeat=True, check=_kinds,
        shown="unary=1, stream=2, expensive=3, or the lowest when there are fewer")
    level_share: int = setting(
        4, "a waiting lower priority's next item goes first once this many were taken above "
        "it, so it is never starved", parse=int, check=_between(1))
    level_max_wait_ms: Tuple[Tuple[str, float], ...] = setting(
        (), "answer an item of priority P within MS of queueing it, else DEADLINE_EXCEEDED "
        "(repeatable P=MS)", metavar="P=MS", parse=_pair(float), repeat=True,
        check=_priorities, shown="no bound")
    level_delay: Tuple[int, ...] = setting(
        (), "priorities whose items past their --level-max-wait-ms still run, behind every "
        "other item, instead of answering DEADLINE_EXCEEDED (repeatable)", metavar="P",
        parse=int, repeat=True, check=_int_list, shown="none")
    level_max_queued: Tuple[Tuple[str, int], ...] = setting(
        (), "most items of priority P waiting; beyond it calls answer RESOURCE_EXHAUSTED "
        "(repeatable P=N)", metavar="P=N", parse=_pair(int), repeat=True, check=_priorities,
        shown="only --max-queue")
    level_max_batch: Tuple[Tuple[str, int], ...] = setting(
        (), "most items of priority P in one batch, so that its batches leave room for "
        "higher priorities sooner (repeatable P=N)", metavar="P=N", parse=_pair(int),
        repeat=True, check=_priorities, shown="--max-batch-size")
    highest_priority: int = setting(
        1, "the highest priority a call may ask for (a call asking for more is served at "
        "this one) unless it holds a --priority-token", parse=int, check=_between(1),
        shown="1: any")
    tenant_header: bool = setting(
        False, "name callers by their x-camserve-tenant header (set by a proxy you trust) for "
        "the queue's turns and --max-queue-per-caller", **ON_OFF)
    decode_threads: int = setting(0, "threads that decode images and render heatmaps (0: from "
                                  "the cores)", parse=int, check=_between(0))
    workers: int = setting(1, "server processes sharing the port, each with a model replica; "
                           "'auto' picks from the cores or GPUs", parse=_workers,
                           check=_between(1))
    worker_hang_s: float = setting(
        5.0, "with --workers: a worker whose event loop has not beaten its heartbeat this long "
        "(stopped, or stuck) is killed and replaced (0: never)", parse=float,
        check=_hang_bound)
    # This process's number: 0 the only process, 1..N a worker of the supervisor, which sets it.
    worker_index: int = setting(0, "", parse=int, hidden=True)
    torch_threads: int = setting(0, "torch's intra-op threads per engine (0: the cores divided "
                                 "by --workers and by the CPU engines that --device lists)",
                                 parse=int, check=_between(0))
    max_streams: int = setting(1024, "open streams beyond this are refused with "
                               "RESOURCE_EXHAUSTED and a retry hint", parse=int,
                               check=_between(1))
    stream_idle_s: float = setting(30.0, "close a stream that sent no frame this long after "
                                   "it opened", parse=float, check=_positive)
    max_calls_per_connection: int = setting(
        1024, "calls (HTTP/2 streams, StreamPredict's included) one connection may hold open at "
        "once; a client's further calls wait in the client until one ends. It bounds what one "
        "connection's flood of opened and cancelled calls costs everyone else", parse=int,
        check=_between(1))
    keepalive_s: float = setting(60.0, "ping connections this often to notice dead peers "
                                 "(answered within 20 s)", parse=float, check=_positive)
    max_connection_age_s: float = setting(
        0.0, "close connections this long after they opened (0: never), once their calls "
        "finish, so that clients reconnect and spread over replicas behind a load balancer",
        parse=float, check=_between(0))
    max_connection_age_grace_s: float = setting(
        30.0, "how long calls on a connection closed for its age may take to finish",
        parse=float, check=_between(0))
    input_size: Optional[Tuple[int, int]] = setting(
        None, "the model's input, SIZE or HEIGHTxWIDTH", parse=_size, check=_sizes_positive,
        shown="the model source's")
    mean: Optional[Tuple[float, float, float]] = setting(
        None, "R,G,B normalisation mean", parse=_floats, check=_rgb, shown="the model source's")
    std: Optional[Tuple[float, float, float]] = setting(
        None, "R,G,B normalisation std", parse=_floats, check=_std, shown="the model source's")
    max_image_bytes: int = setting(32 * 1024 * 1024, "largest encoded image", parse=int,
                                   check=_between(1))
    max_image_pixels: int = setting(50_000_000, "largest image, in pixels, decoded or raw",
                                    parse=int, check=_between(1))
    max_images_per_request: int = setting(64, "most images one request may carry", parse=int,
                                          check=_between(1))
    # gRPC receives each request whole before any camserve code runs, so the server may hold
    # calls in flight x this limit in gRPC's own buffers.
    max_message_bytes: int = setting(32 * 1024 * 1024, "largest gRPC message, either way "
                                     "(send large images encoded)", parse=int,
                                     check=_between(1))
    max_stream_frames_in_flight: int = setting(
        4, "frames one stream (policy ALL) may have queued or running", parse=int,
        check=_between(2))
    max_score_cam_channels: int = setting(
        256, "Score-CAM requests over this many channels (one forward each) are refused",
        parse=int, check=_between(1))
    max_maps_per_image: int = setting(64, "most maps one image may ask for (methods x targets "
                                      "x layers)", parse=int, check=_between(1))
    max_item_cost: int = setting(
        4096, "most forwards one image's explanation may cost (Score-CAM channels, "
        "faithfulness steps); costlier requests are refused, and the worker runs the rest in "
        "slices between batches", parse=int, check=_between(1))
    # Each request holds about 4 times its size meanwhile (the message, its parsed copy, the
    # pixels, the decoded image).
    max_inflight_bytes: int = setting(
        96 * 1024 * 1024, "bytes of requests decoded and answered at once; beyond it a request "
        "over 1 MiB answers RESOURCE_EXHAUSTED with a retry hint", parse=int,
        check=_between(1))
    max_faithfulness_steps: int = setting(256, "most deletion/insertion steps a faithfulness "
                                          "score may take", parse=int, check=_between(2))
    max_render_pixels: int = setting(8_388_608, "heatmaps and overlays of larger images are "
                                     "rendered downscaled to this many pixels", parse=int,
                                     check=_between(1))
    grace_s: float = setting(10.0, "on SIGTERM or Ctrl-C, how long calls in flight may take to "
                             "finish (a second Ctrl-C stops at once)", parse=float,
                             check=_between(0))
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting("text", "one line per event either way", choices=("text", "json"))
    tls_cert: Optional[str] = setting(None, "PEM certificate chain: serve over TLS",
                                      shown="plaintext")
    tls_key: Optional[str] = setting(None, "PEM private key of --tls-cert", shown="none")
    tls_client_ca: Optional[str] = setting(
        None, "PEM CA bundle: require client certificates it signed (mutual TLS)",
        shown="no client certificates")
    # Never printed: repr=False keeps them out of logs and tracebacks.
    auth_tokens: Tuple[str, ...] = setting(
        (), "accept 'authorization: Bearer TOKEN' (repeatable); every RPC but health checks "
        "then needs one", flag="--auth-token", metavar="TOKEN", repeat=True, check=_tokens,
        repr=False, shown="no authentication")
    admin_tokens: Tuple[str, ...] = setting(
        (), "accept LoadModel/UnloadModel (and OIP's repository load/unload) from "
        "'authorization: Bearer TOKEN' (repeatable); distinct from --auth-token",
        flag="--admin-token", metavar="TOKEN", repeat=True, check=_tokens, repr=False,
        shown="none: no loading by call")
    priority_tokens: Tuple[str, ...] = setting(
        (), "accept 'authorization: Bearer TOKEN' (repeatable) as --auth-token does, and let "
        "its calls ask for any priority, above --highest-priority", flag="--priority-token",
        metavar="TOKEN", repeat=True, check=_tokens, repr=False, shown="none")
    metrics_port: Optional[int] = setting(
        None, "serve Prometheus metrics on this port (HTTP /metrics; 0 picks a free one)",
        parse=int, check=_between(0, 65535), shown="off")
    metrics_host: Optional[str] = setting(None, "address /metrics listens on",
                                          shown="the same as --host")
    oip_model_name: str = setting(
        "camserve", "the model's name in the Open Inference Protocol (KServe v2 gRPC, for "
        "tritonclient and perf_analyzer)")

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            value, check, choices = getattr(self, f.name), f.metadata["check"], f.metadata[
                "choices"]
            problem = check(value) if check is not None else None
            if choices is not None and value not in choices:
                problem = f"must be {', '.join(choices[:-1])} or {choices[-1]}, not {value!r}"
            if problem:
                problems.append(f"{flag_of(f)[2:]} {problem}")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("give --tls-cert and --tls-key together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("--tls-client-ca needs --tls-cert and --tls-key")
        if not problems:  # each priority named is one of the levels
            levels = self.priority_levels
            named = [int(k) for pairs in (self.level_max_wait_ms, self.level_max_queued,
                                          self.level_max_batch) for k, _ in pairs]
            named += [*self.level_delay, *(p for _, p in self.default_priorities),
                      self.highest_priority]
            beyond = sorted({p for p in named if p > levels or p < 1})
            if beyond:
                problems.append(f"priority {beyond[0]} is not one of the {levels} priorities "
                                "(--priority-levels)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def devices(self) -> Tuple[str, ...]:
        """--device as a list: one engine per entry."""
        return tuple(d.strip() for d in self.device.split(","))

    @property
    def accepted_tokens(self) -> Tuple[str, ...]:
        """The bearer tokens a call may send (admin and priority tokens pass for ordinary
        ones); empty when --auth-token is not given: no authentication."""
        if not self.auth_tokens:
            return ()
        return self.auth_tokens + self.admin_tokens + self.priority_tokens

    @property
    def metrics_address(self) -> str:
        return self.metrics_host if self.metrics_host is not None else self.host

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


# --workers auto on CPU: at most this many processes (each holds a model replica and its own
# torch).
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
    among them), since a process's decoding and gRPC work then runs beside another's model,
    and one-thread convolutions waste less than several threads splitting small batches
    (bench/bench_workers.py compares the configurations)."""
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    if gpus:
        return gpus
    return max(1, min(MAX_AUTO_CPU_WORKERS, usable_cpus()))


# The settings whose flag may be given several times (a comma-separated list in the environment).
REPEATED = frozenset(f.name for f in dataclasses.fields(Settings) if f.metadata["repeat"])

# Not a setting: its tokens join --auth-token's.
TOKEN_FILE = "--auth-token-file"


def _shown(f: dataclasses.Field) -> str:
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


def build_parser() -> argparse.ArgumentParser:
    """The flags, from Settings' declarations. No argument has a default here (parse_settings
    tells the given flags from the rest); each help says the default itself."""
    p = argparse.ArgumentParser(
        prog="camserve-server", argument_default=argparse.SUPPRESS,
        description="Serve an image classifier over gRPC with Grad-CAM explanations. "
        "Every flag can also be set as CAMSERVE_<FLAG> in the environment "
        "(CAMSERVE_MAX_BATCH_SIZE=16); a flag on the command line wins.")
    for f in dataclasses.fields(Settings):
        m = f.metadata
        if m["hidden"]:
            text = argparse.SUPPRESS
        else:
            text = f"{m['help']} (default: {_shown(f)})".replace("%", "%%")
        kwargs = dict(dest=f.name, help=text, action="append" if m["repeat"] else "store")
        for key in ("choices", "metavar"):
            if m[key] is not None:
                kwargs[key] = m[key]
        if m["metavar"] is None and m["parse"] in (int, float):
            kwargs["metavar"] = "N"
        if m["parse"] is not None:
            kwargs["type"] = m["parse"]
        p.add_argument(flag_of(f), **kwargs)
    p.add_argument(TOKEN_FILE, dest="auth_token_file",
                   help="file with one accepted token per line, added to --auth-token's "
                   "(default: none)")
    return p


def _env_args(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list:
    """Turn CAMSERVE_* variables into command-line arguments."""
    args = []
    for action in parser._actions:  # argparse offers no public iterator over its options
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long is None or long == "--help":
            continue
        value = environ.get("CAMSERVE_" + long[2:].upper().replace("-", "_"))
        if value is None or value == "":
            continue
        values = [v.strip() for v in value.split(",")] if action.dest in REPEATED else [value]
        for v in values:
            args += [long, v]
    return args


def parse_settings(argv: Optional[Sequence[str]] = None,
                   environ: Optional[Mapping[str, str]] = None) -> Settings:
    parser = build_parser()
    environ = os.environ if environ is None else environ
    cli = sys.argv[1:] if argv is None else list(argv)
    # Flags given on the command line win, even when they say the default; repeatable flags
    # are replaced, not merged.
    given = vars(parser.parse_args(_env_args(parser, environ)))
    given.update(vars(parser.parse_args(cli)))
    token_file = given.pop("auth_token_file", None)
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                tokens = [line.strip() for line in f if line.strip()]
        except OSError as exc:
            parser.error(f"cannot read {TOKEN_FILE}: {exc.strerror}")
        given["auth_tokens"] = given.get("auth_tokens", []) + tokens
    if "device" in given:
        given["device"] = ",".join(given["device"])
    for name in REPEATED - {"device"}:
        if name in given:
            given[name] = tuple(given[name])
    try:
        return Settings(**given)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
