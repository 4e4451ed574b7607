"""TLS credentials and bearer-token authentication."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Callable, Iterable, Optional

import grpc

from .errors import StartupError
from .settings import Settings

# Health checks answer without a token so that orchestrators can probe the server.
OPEN_METHODS = ("/grpc.health.v1.Health/",)


def server_credentials(settings: Settings) -> Optional[grpc.ServerCredentials]:
    """TLS credentials from the settings' PEM files; None serves plaintext."""
    if settings.tls_cert is None:
        return None
    cert, key = _read(settings.tls_cert), _read(settings.tls_key)
    ca = _read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {path!r}: {exc.strerror}") from None


class TokenAuth(grpc.ServerInterceptor):
    """Every RPC but health checks needs ``authorization: Bearer <token>`` with an accepted
    token; otherwise it answers UNAUTHENTICATED. Tokens are compared in constant time and
    never logged."""

    def __init__(self, tokens: Iterable[str],
                 on_denied: Callable[[str], None] = lambda method: None) -> None:
        self._tokens = tuple(t.encode() for t in tokens)
        self._on_denied = on_denied

    def _accepts(self, metadata) -> bool:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return False
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        return any(hmac.compare_digest(given, t) for t in self._tokens)

    def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS) or self._accepts(
                details.invocation_metadata):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        self._on_denied(details.method)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong token: send 'authorization: Bearer <token>'")

        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            (handler.request_streaming, handler.response_streaming)]
        return kind(deny, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
