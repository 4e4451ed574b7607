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

Target = Union[int, str, None]


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
    return pb.PredictRequest(images=[to_proto(i) for i in images], top_k=_top_k(top_k))


def explain_request(images: Sequence[Any], target: Target, method: str, layer: Optional[str],
                    outputs: Iterable[str], top_k: int) -> pb.ExplainRequest:
    try:
        method_enum = method_value(method)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise invalid(f"unknown outputs {unknown}; choose from {', '.join(OUTPUTS)}")
    return pb.ExplainRequest(
        images=[to_proto(i) for i in images], target=_target(target), method=method_enum,
        layer=layer or "", outputs=[OUTPUTS[o] for o in outputs], top_k=_top_k(top_k))


def predictions(response: pb.PredictResponse) -> List[Prediction]:
    return [Prediction.from_proto(r.prediction, r.image_size, r.timing) for r in response.results]


def explanations(response: pb.ExplainResponse, images: Sequence[Any]) -> List[Explanation]:
    return [Explanation.from_proto(r, image) for r, image in zip(response.results, images)]


def _top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise invalid(f"top_k must be a positive integer, got {top_k!r}")
    return top_k


def _target(target: Target) -> Optional[pb.Target]:
    if target is None:
        return None
    if isinstance(target, bool):
        raise invalid("target must be a class index, a label or None")
    if isinstance(target, int):
        if target < 0:
            raise invalid(f"class index {target} is negative")
        return pb.Target(class_index=target)
    if isinstance(target, str):
        return pb.Target(label=target)
    raise invalid(f"target must be a class index, a label or None, got {type(target).__name__}")
