"""Bearer-token authentication: an interceptor in front of every RPC but health checks."""

from __future__ import annotations

import hmac
from typing import Callable, Iterable

import grpc

# Health checks answer without a token so that orchestrators can probe the server.
OPEN_METHODS = ("/grpc.health.v1.Health/",)


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
