"""Bearer-token authentication: an interceptor in front of every RPC but health checks."""

from __future__ import annotations

import hmac
from typing import Callable, Iterable

import grpc
from grpc import aio

from ..errors import Unauthenticated
from .calls import abort

# Health checks answer without a token so that orchestrators can probe the server.
OPEN_METHODS = ("/grpc.health.v1.Health/",)
DENIED = "missing or wrong token: send 'authorization: Bearer <token>'"


class TokenAuth(aio.ServerInterceptor):
    """Every RPC but health checks needs ``authorization: Bearer <token>`` with an accepted
    token; otherwise it answers UNAUTHENTICATED (and ``on_denied(method, peer)`` is told).
    Tokens are compared in constant time and never logged."""

    def __init__(self, tokens: Iterable[str],
                 on_denied: Callable[[str, object], None] = lambda method, context: None) -> None:
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

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS) or self._accepts(
                details.invocation_metadata):
            return handler
        method = details.method

        async def deny(request, context):
            self._on_denied(method, context)
            await abort(context, Unauthenticated(DENIED))

        async def deny_stream(request, context):
            self._on_denied(method, context)
            await abort(context, Unauthenticated(DENIED))
            yield  # an async generator, as streaming handlers are

        streaming = handler.response_streaming
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            (handler.request_streaming, streaming)]
        # The denying handler never parses the request: an unauthenticated caller cannot
        # make the server decode anything.
        return kind(deny_stream if streaming else deny, request_deserializer=lambda data: None,
                    response_serializer=handler.response_serializer)
