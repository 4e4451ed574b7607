"""Channels, request building and answer parsing shared by Client and AsyncClient."""

from __future__ import annotations

import json
import numbers
import os
import socket
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from . import reasons
from .addresses import DEFAULT_PORT, is_uri, with_port
from .errors import CamserveError, invalid
from .images import to_proto
from .methods import method_value, target_kind_value
from .results import Comparison, Explanation, Prediction, Similarity
from .v1 import camserve_pb2 as pb

DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # the server's default --max-message-bytes
DEFAULT_RETRIES = 4
SERVICE = "camserve.v1.CamserveService"
UNARY_METHODS = ("Predict", "Explain", "GetModelInfo")

OUTPUTS = {
    "raw": pb.EXPLAIN_OUTPUT_RAW_MAP,
    "heatmap": pb.EXPLAIN_OUTPUT_HEATMAP_PNG,
    "overlay_jpeg": pb.EXPLAIN_OUTPUT_OVERLAY_JPEG,
    "overlay_png": pb.EXPLAIN_OUTPUT_OVERLAY_PNG,
}

Target = Union[int, str, Sequence[Union[int, str]], None]
Metadata = Sequence[Tuple[str, str]]


# --- channels --------------------------------------------------------------------------------


def resolve_target(target: str) -> str:
    """The gRPC target for what a caller gives: ``host[:port]`` (the port defaults to 50051),
    several comma-separated addresses (each replica is dialled; hostnames are resolved once,
    here), or any gRPC URI (``dns:///name:port`` re-resolves as replicas come and go)."""
    target = target.strip()
    if not target:
        raise invalid("the target is empty: pass host:port, a comma-separated list, or "
                      "dns:///name:port", reasons.INVALID_TARGET)
    if is_uri(target):
        return target
    addresses = [with_port(a) for a in target.split(",") if a.strip()]
    if len(addresses) == 1:
        return addresses[0]
    resolved = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)
        except (OSError, ValueError) as exc:
            raise invalid(f"cannot resolve {address!r} in target {target!r}: {exc}",
                          reasons.INVALID_TARGET) from None
        family, *_, sockaddr = infos[0]
        resolved.append((family, f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6
                         else f"{sockaddr[0]}:{port}"))
    if len({family for family, _ in resolved}) > 1:
        raise invalid(f"target {target!r} mixes IPv4 and IPv6 addresses; use one family, or a "
                      "dns:/// name", reasons.INVALID_TARGET)
    scheme = "ipv6" if resolved[0][0] == socket.AF_INET6 else "ipv4"
    return f"{scheme}:" + ",".join(address for _, address in resolved)


def service_config(retries: int) -> str:
    """Round-robin over every address of the target, and, when ``retries`` > 0, gRPC's own
    retries of the unary calls on UNAVAILABLE (a replica going away) and RESOURCE_EXHAUSTED
    (a busy replica; the server's retry hint sets the delay), within each call's deadline.
    CANCELLED is retried too: a gRPC server that shuts down answers it for the calls it had
    received but not yet started (grpc/grpc#41785), which never ran; the calls retried only
    read, and a caller's own cancellation ends the call instead. Streams are never retried."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries > 0:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE, "method": m} for m in UNARY_METHODS],
            "retryPolicy": {
                "maxAttempts": min(retries + 1, 5),
                "initialBackoff": "0.05s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"],
            },
        }]
    return json.dumps(config)


def channel_options(max_message_bytes: int, retries: int) -> List[tuple]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.service_config", service_config(retries)),
            ("grpc.enable_retries", 1 if retries > 0 else 0)]


def _pem(value) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as exc:
        raise invalid(f"cannot read {os.fspath(value)!r}: {exc.strerror}",
                      reasons.INVALID_TLS) from None


def credentials(tls: bool, root_certificates, client_cert, client_key):
    """TLS channel credentials, or None for plaintext. PEM values are bytes or file paths;
    root_certificates=None trusts the system's CAs."""
    if not (tls or root_certificates or client_cert or client_key):
        return None
    if (client_cert is None) != (client_key is None):
        raise invalid("give client_cert and client_key together", reasons.INVALID_TLS)
    return grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates),
                                        private_key=_pem(client_key),
                                        certificate_chain=_pem(client_cert))


def not_ready(target: str, state: str, timeout: float) -> CamserveError:
    """wait_until_ready's error when the server is not serving in time."""
    reason = {"loading": reasons.LOADING, "draining": reasons.DRAINING}.get(
        state, reasons.UNAVAILABLE)
    return CamserveError(grpc.StatusCode.UNAVAILABLE,
                         f"the server at {target} is still {state} after {timeout:g} s",
                         reason=reason)



def retry_while_starting(error) -> bool:
    """Whether wait_until_ready should keep trying after this error."""
    return error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def channel(module, target: str, tls: bool, root_certificates, client_cert, client_key,
            max_message_bytes: int, retries: int, options) -> Any:
    """A channel from ``module`` (grpc, or grpc.aio): TLS when any TLS option is given."""
    creds = credentials(tls, root_certificates, client_cert, client_key)
    options = channel_options(max_message_bytes, retries) + list(options)
    if creds is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, creds, options=options)


def call_metadata(token: Optional[str], metadata: Optional[Metadata] = None,
                  request_id: Optional[str] = None) -> tuple:
    """The metadata of one call: the token, the caller's own pairs, an x-request-id."""
    out = [("authorization", f"Bearer {token}")] if token else []
    for key, value in metadata or ():
        if not isinstance(key, str) or key != key.lower():
            raise invalid(f"metadata keys must be lower-case strings, got {key!r}",
                          reasons.INVALID_METADATA)
        out.append((key, value))
    if request_id is not None:
        out.append(("x-request-id", str(request_id)))
    return tuple(out)


def check_size(request, max_message_bytes: int) -> None:
    """Refuse a request too large to send before gRPC does (with RESOURCE_EXHAUSTED, a code
    that reads as "busy, retry")."""
    size = request.ByteSize()
    if size > max_message_bytes:
        raise invalid(f"the request is {size:,} bytes, over the {max_message_bytes:,}-byte "
                      "message limit: send images as encoded files (JPEG, PNG) instead of raw "
                      "arrays, downscale them, or send fewer per call",
                      reasons.MESSAGE_TOO_LARGE)


# --- requests --------------------------------------------------------------------------------


Model = Optional[str]  # "NAME" or "NAME:VERSION"; None: the server's default model


def model_ref(model: Model, version: int = 0) -> Optional[pb.ModelRef]:
    """The ModelRef of ``model`` ("NAME" or "NAME:VERSION") and ``version`` (0: the newest the
    server serves); None for the default model."""
    if model is None and not version:
        return None
    name, _, written = (model or "").partition(":")
    if written:
        if not written.isdigit() or int(written) < 1:
            raise invalid(f"model {model!r}: write NAME or NAME:VERSION, VERSION a positive "
                          "number", reasons.INVALID_OPTION)
        if version and version != int(written):
            raise invalid(f"model {model!r} and version={version} disagree",
                          reasons.INVALID_OPTION)
        version = int(written)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise invalid(f"version must be a positive integer (0: the newest), got {version!r}",
                      reasons.INVALID_OPTION)
    return pb.ModelRef(name=name, version=version)


def check_priority(priority: int) -> int:
    """A call's priority: 0 (its default) or 1 (the highest) to the server's number of
    priorities (3 by default; the server refuses one beyond it)."""
    if (isinstance(priority, bool) or not isinstance(priority, int)
            or not 0 <= priority < 2**32):
        raise invalid(f"priority must be 0 (the call's default) or a priority from 1 (the "
                      f"highest), got {priority!r}", reasons.INVALID_OPTION)
    return priority


def predict_request(images: Sequence[Any], top_k: int, model: Optional[pb.ModelRef] = None,
                    priority: int = 0) -> pb.PredictRequest:
    return pb.PredictRequest(images=[to_proto(i) for i in images],
                             options=predict_options(top_k), model=model,
                             priority=check_priority(priority))


def predict_options(top_k: int = 5) -> pb.PredictOptions:
    return pb.PredictOptions(top_k=check_top_k(top_k))


ADVANCED = {"top_targets": 0, "counterfactual": False, "signed": False,
            "score_cam_channels": 0, "faithfulness_steps": 0, "target_kind": None,
            "eigen_smooth": False, "aug_smooth": False, "similar_to": None,
            "similar_to_image": 0, "road_percentiles": ()}


def explain_options(target: Target = None, method: Union[str, Sequence[str]] = "gradcam",
                    layer: Union[None, str, Sequence[str]] = None,
                    outputs: Iterable[str] = ("raw",), top_k: int = 5,
                    **advanced) -> pb.ExplainOptions:
    """The ExplainOptions message for the client's options.

    ``target``, ``method`` and ``layer`` each take one value or a list. ``advanced``:
    top_targets, counterfactual, signed, score_cam_channels, faithfulness_steps, target_kind
    (a name of camserve.target_kind_names(): "logit", "softmax", "rest"...; None: the
    server's default, the logit, or the similarity when a concept is given), eigen_smooth,
    aug_smooth, similar_to (the similarity target's concept: a vector as long as the model's
    output, e.g. another image's ``Prediction.embedding``), similar_to_image (or: the
    request's image at this position, from 1), road_percentiles (ROAD scores at these
    percentiles of the pixels, e.g. range(10, 100, 10))."""
    unknown = sorted(set(advanced) - set(ADVANCED))
    if unknown:
        raise invalid(f"unknown explain options {unknown}; choose from {', '.join(ADVANCED)}",
                      reasons.UNKNOWN_OPTION)
    methods = [method] if isinstance(method, str) else list(method)
    try:
        method_enums = [method_value(m) for m in methods]
    except (ValueError, AttributeError) as exc:
        raise invalid(str(exc), reasons.UNKNOWN_METHOD) from None
    outputs = tuple(outputs)
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad:
        raise invalid(f"unknown outputs {bad}; choose from {', '.join(OUTPUTS)}",
                      reasons.UNKNOWN_OUTPUT)
    targets = [] if target is None else [target] if isinstance(target, (int, str)) \
        or not isinstance(target, Iterable) else list(target)
    layers = [] if layer is None else [layer] if isinstance(layer, str) else list(layer)
    fields = {**ADVANCED, **advanced}
    for name in ("top_targets", "score_cam_channels", "faithfulness_steps",
                 "similar_to_image"):
        if isinstance(fields[name], bool) or not isinstance(fields[name], int) or \
                fields[name] < 0:
            raise invalid(f"{name} must be a non-negative integer, got {fields[name]!r}",
                          reasons.INVALID_OPTION)
    try:
        kind = (0 if fields["target_kind"] is None
                else target_kind_value(fields["target_kind"]))
    except (ValueError, AttributeError) as exc:
        raise invalid(str(exc), reasons.INVALID_OPTION) from None
    concept = fields["similar_to"]
    try:
        concept = () if concept is None else np.asarray(concept, np.float32).ravel().tolist()
    except (TypeError, ValueError):
        raise invalid("similar_to must be a vector of numbers (e.g. a Prediction.embedding)",
                      reasons.INVALID_OPTION) from None
    road = list(fields["road_percentiles"] or ())
    if any(isinstance(p, bool) or not isinstance(p, numbers.Integral) or not 1 <= p <= 99
           for p in road):
        raise invalid(f"road_percentiles must be whole numbers 1..99, got {road!r}",
                      reasons.INVALID_OPTION)
    return pb.ExplainOptions(
        road_percentiles=[int(p) for p in road],
        similar_to=concept, similar_to_image=fields["similar_to_image"],
        target_kind=kind, eigen_smooth=bool(fields["eigen_smooth"]),
        aug_smooth=bool(fields["aug_smooth"]),
        targets=[_target(t) for t in targets], methods=method_enums, layers=layers,
        outputs=[OUTPUTS[o] for o in outputs], top_k=check_top_k(top_k),
        top_targets=fields["top_targets"], counterfactual=bool(fields["counterfactual"]),
        keep_sign=bool(fields["signed"]), score_cam_channels=fields["score_cam_channels"],
        faithfulness_steps=fields["faithfulness_steps"])


def explain_request(images: Sequence[Any], model: Optional[pb.ModelRef] = None,
                    priority: int = 0, **options) -> pb.ExplainRequest:
    return pb.ExplainRequest(images=[to_proto(i) for i in images],
                             options=explain_options(**options), model=model,
                             priority=check_priority(priority))


def predictions(response: pb.PredictResponse) -> List[Prediction]:
    return [Prediction.from_proto(r.prediction, r.image_size, r.timing, r.embedding)
            for r in response.results]


def explanations(response: pb.ExplainResponse, images: Sequence[Any]) -> List[Explanation]:
    return [Explanation.from_proto(r, image) for r, image in zip(response.results, images)]


def check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise invalid(f"top_k must be a positive integer, got {top_k!r}",
                      reasons.INVALID_OPTION)
    return top_k


def _target(target: Union[int, str]) -> pb.Target:
    if isinstance(target, bool):
        raise invalid("target must be a class index, a label or None", reasons.INVALID_OPTION)
    if isinstance(target, numbers.Integral):  # numpy integers too
        target = int(target)
        if target < 0:
            raise invalid(f"class index {target} is negative", reasons.UNKNOWN_CLASS)
        return pb.Target(class_index=target)
    if isinstance(target, str):
        return pb.Target(label=target)
    raise invalid(f"a target must be a class index or a label, got {type(target).__name__}",
                  reasons.INVALID_OPTION)


def comparison(response: pb.CompareExplainResponse, image: Any) -> Comparison:
    """CompareExplain's answer for one image."""
    from .methods import method_name

    return Comparison(
        explanations=tuple(Explanation.from_proto(e.results[0], image)
                           for e in response.explanations),
        similarities=tuple(Similarity(p.first, p.second, method_name(p.method), p.target,
                                      p.spearman)
                           for p in response.similarities[0].pairs))
