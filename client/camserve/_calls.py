"""Request building and answer parsing shared by Client and AsyncClient."""

from __future__ import annotations

import os
from typing import Any, Iterable, List, Optional, Sequence, Union

import grpc

from .errors import invalid
from .images import to_proto
from .methods import method_value
from .results import Explanation, Prediction
from .v1 import camserve_pb2 as pb

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

OUTPUTS = {
    "raw": pb.EXPLAIN_OUTPUT_RAW_MAP,
    "heatmap": pb.EXPLAIN_OUTPUT_HEATMAP_PNG,
    "overlay_jpeg": pb.EXPLAIN_OUTPUT_OVERLAY_JPEG,
    "overlay_png": pb.EXPLAIN_OUTPUT_OVERLAY_PNG,
}

Target = Union[int, str, Sequence[Union[int, str]], None]


def channel_options(max_message_bytes: int) -> List[tuple]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def _pem(value) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as exc:
        raise invalid(f"cannot read {os.fspath(value)!r}: {exc.strerror}") from None


def credentials(tls: bool, root_certificates, client_cert, client_key):
    """TLS channel credentials, or None for plaintext. PEM values are bytes or file paths;
    root_certificates=None trusts the system's CAs."""
    if not (tls or root_certificates or client_cert or client_key):
        return None
    if (client_cert is None) != (client_key is None):
        raise invalid("give client_cert and client_key together")
    return grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates),
                                        private_key=_pem(client_key),
                                        certificate_chain=_pem(client_cert))


def retry_while_starting(error) -> bool:
    """Whether wait_until_ready should keep trying after this error."""
    return error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def channel(module, target: str, tls: bool, root_certificates, client_cert, client_key,
            max_message_bytes: int, options) -> Any:
    """A channel from ``module`` (grpc, or grpc.aio): TLS when any TLS option is given."""
    creds = credentials(tls, root_certificates, client_cert, client_key)
    options = channel_options(max_message_bytes) + list(options)
    if creds is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, creds, options=options)


def call_metadata(token: Optional[str]) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def predict_request(images: Sequence[Any], top_k: int) -> pb.PredictRequest:
    return pb.PredictRequest(images=[to_proto(i) for i in images], top_k=check_top_k(top_k))


ADVANCED = {"top_targets": 0, "counterfactual": False, "signed": False,
            "score_cam_channels": 0, "faithfulness_steps": 0}


def explain_fields(target: Target = None, method: Union[str, Sequence[str]] = "gradcam",
                   layer: Union[None, str, Sequence[str]] = None,
                   outputs: Iterable[str] = ("raw",), top_k: int = 5, **advanced) -> dict:
    """The fields ExplainRequest and StreamExplainRequest share, from the client's options.

    ``target``, ``method`` and ``layer`` each take one value or a list. ``advanced``:
    top_targets, counterfactual, signed, score_cam_channels, faithfulness_steps."""
    unknown = sorted(set(advanced) - set(ADVANCED))
    if unknown:
        raise invalid(f"unknown explain options {unknown}; choose from {', '.join(ADVANCED)}")
    methods = [method] if isinstance(method, str) else list(method)
    try:
        method_enums = [method_value(m) for m in methods]
    except (ValueError, AttributeError) as exc:
        raise invalid(str(exc)) from None
    outputs = tuple(outputs)
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad:
        raise invalid(f"unknown outputs {bad}; choose from {', '.join(OUTPUTS)}")
    targets = [] if target is None else [target] if isinstance(target, (int, str)) \
        else list(target)
    layers = [] if layer is None else [layer] if isinstance(layer, str) else list(layer)
    fields = {**ADVANCED, **advanced}
    for name in ("top_targets", "score_cam_channels", "faithfulness_steps"):
        if isinstance(fields[name], bool) or not isinstance(fields[name], int) or \
                fields[name] < 0:
            raise invalid(f"{name} must be a non-negative integer, got {fields[name]!r}")
    return {"targets": [_target(t) for t in targets], "methods": method_enums,
            "layers": layers, "outputs": [OUTPUTS[o] for o in outputs], "top_k": check_top_k(top_k),
            **fields}


def explain_request(images: Sequence[Any], **options) -> pb.ExplainRequest:
    fields = explain_fields(**options)
    return pb.ExplainRequest(images=[to_proto(i) for i in images], **fields)


def predictions(response: pb.PredictResponse) -> List[Prediction]:
    return [Prediction.from_proto(r.prediction, r.image_size, r.timing) for r in response.results]


def explanations(response: pb.ExplainResponse, images: Sequence[Any]) -> List[Explanation]:
    return [Explanation.from_proto(r, image) for r, image in zip(response.results, images)]


def check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise invalid(f"top_k must be a positive integer, got {top_k!r}")
    return top_k


def _target(target: Union[int, str]) -> pb.Target:
    if isinstance(target, bool):
        raise invalid("target must be a class index, a label or None")
    if isinstance(target, int):
        if target < 0:
            raise invalid(f"class index {target} is negative")
        return pb.Target(class_index=target)
    if isinstance(target, str):
        return pb.Target(label=target)
    raise invalid(f"a target must be a class index or a label, got {type(target).__name__}")
