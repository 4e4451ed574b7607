"""Bearer-token authentication: an interceptor in front of every RPC but health checks."""

from __future__ import annotations

from typing import Callable, Iterable

import grpc
from grpc import aio

from ..errors import FailedPrecondition, PermissionDenied, Unauthenticated
from .calls import abort, holds

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

    def accepts(self, metadata) -> bool:
        return holds(metadata, self._tokens)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS) or self.accepts(
                details.invocation_metadata):
            return handler
        method = details.method

        async def deny(requests, context):
            self._on_denied(method, context)
            await abort(context, Unauthenticated(DENIED))

        async def deny_stream(requests, context):
            self._on_denied(method, context)
            await abort(context, Unauthenticated(DENIED))
            yield  # an async generator, as streaming handlers are

        # The denying handler takes its requests as a stream, whatever the RPC's kind, and
        # never reads it: gRPC receives (and decompresses) a message only when the handler
        # asks for it, and a unary handler would be handed its message read. So an
        # unauthenticated caller's message is never decompressed nor parsed, only refused
        # from its headers. The wire does not tell the kinds apart: a unary caller gets its
        # UNAUTHENTICATED status as from any unary handler.
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                deny_stream, request_deserializer=lambda data: None,
                response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            deny, request_deserializer=lambda data: None,
            response_serializer=handler.response_serializer)


class AdminAuth:
    """Loading and unloading models: allowed by ``--model-control explicit`` only, to a caller
    with an admin token (``--admin-token``; distinct from the ordinary ones, which it also
    passes for) and in a server of one process (a load would reach one of several)."""

    def __init__(self, tokens: Iterable[str], control: str, workers: int) -> None:
        self._auth = TokenAuth(tokens)
        self._any = bool(tuple(tokens))
        self._control = control
        self._workers = workers

    def check(self, context) -> None:
        """Raises unless this call may load and unload models."""
        if self._control != "explicit":
            raise FailedPrecondition(
                f"this server's models are fixed (--model-control {self._control}); start it "
                "with --model-control explicit to load and unload them by call",
                reason="MODEL_CONTROL")
        if self._workers > 1:
            raise FailedPrecondition(
                f"this server runs {self._workers} processes (--workers) and a load would reach "
                "one of them; use --model-control poll, or --workers 1", reason="MODEL_CONTROL")
        if not self._any:
            raise PermissionDenied("loading and unloading need an admin token, and this server "
                                   "has none: start it with --admin-token", reason="NOT_ADMIN")
        if not self._auth.accepts(context.invocation_metadata()):
            raise PermissionDenied("loading and unloading need the admin token: send "
                                   "'authorization: Bearer <admin token>'", reason="NOT_ADMIN")
