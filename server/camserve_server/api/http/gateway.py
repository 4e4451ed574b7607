"""One HTTP call through the gRPC handlers: the handlers of both services, each wrapped by
``api/calls.py`` exactly as gRPC wraps it (parsing errors answered like any other, access log,
metrics, in-flight byte admission), the token check, the bounded body, and the answers.

A body goes through the same steps as a gRPC message: a request over 1 MiB is admitted by size
(``InflightBytes``) before it is parsed, and parsed in a thread (``calls.Unparsed``); one
that does not parse becomes ``calls.Malformed`` and is answered, logged and counted by the
wrapped handler. Only what HTTP adds is checked here: the body's size against
``--max-message-bytes`` (from Content-Length, before anything is read, and while it is read),
its content type, and the bearer token.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...errors import InvalidArgument, ServiceError, Unauthenticated
from .. import calls
from ..auth import DENIED, TokenAuth
from . import context as ctx


@dataclass(frozen=True)
class Rpc:
    """One RPC of a service: its name, the wrapped handler, its message types."""

    name: str
    handle: Callable
    request_type: type
    response_type: type
    streaming: bool
    behavior: Callable  # the unwrapped handler (streams wrap it per connection)


@dataclass
class Gateway:
    """What every HTTP route shares: the wrapped RPCs of both services, the limits, the
    token check."""

    max_message_bytes: int
    recorder: calls.Recorder
    inflight: calls.InflightBytes
    tokens: Tuple[str, ...] = ()
    on_denied: Callable[[str, object], None] = lambda method, context: None
    rpcs: Dict[str, Rpc] = field(default_factory=dict)
    _auth: Optional[TokenAuth] = None

    def __post_init__(self) -> None:
        self._auth = TokenAuth(self.tokens) if self.tokens else None

    def add(self, service: str, methods: dict, items=calls.images_of,
            expands=calls.no_expansion) -> None:
        """Wrap ``methods`` (a servicer's ``methods()``) as gRPC does, under
        ``service/NAME``."""
        for name, (behavior, request_type, response_type, streaming) in methods.items():
            handle = None if streaming else calls.unary(
                name, behavior, self.recorder, self.inflight, items, expands)
            self.rpcs[f"{service}/{name}"] = Rpc(name, handle, request_type, response_type,
                                                 streaming, behavior)

    def find(self, service: str, name: str) -> Optional[Rpc]:
        return self.rpcs.get(f"{service}/{name}")

    # --- checks --------------------------------------------------------------------------

    def context(self, request) -> ctx.HttpContext:
        return ctx.HttpContext(ctx.peer_of(request.scope), ctx.metadata_of(request.scope))

    def authorized(self, rpc: str, context: ctx.HttpContext) -> None:
        """Raises Unauthenticated (counted and logged as a gRPC denial is) without an
        accepted ``Authorization: Bearer`` token."""
        if self._auth is None or self._auth.accepts(context.invocation_metadata()):
            return
        self.on_denied(rpc, context)
        raise Unauthenticated(DENIED)

    async def body(self, request: Request) -> bytes:
        """The request's body, at most ``max_message_bytes``: a larger Content-Length is
        refused before a byte is read, a body that grows past it (chunked) as soon as it
        does."""
        limit = self.max_message_bytes
        length = request.headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                raise InvalidArgument(f"Content-Length {length[:40]!r} is not a number",
                                      reason="MALFORMED_REQUEST") from None
            if size > limit:
                raise too_large(f"{size:,} bytes", limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"more than {limit:,} bytes", limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def parsed(self, data: bytes, parse: Callable[[bytes], object]):
        """What a wrapped handler takes for a body: the message ``parse(data)`` makes (or
        calls.Malformed, answered by the handler), left calls.Unparsed when it is large, or
        Malformed at once when its size is not admitted now."""
        busy = self.inflight.refusal(len(data))
        if busy is not None:
            return calls.Malformed(busy)
        if len(data) > calls.SMALL_REQUEST:
            return calls.Unparsed(data, parse)
        return parse(data)

    async def call(self, rpc: Rpc, message, context: ctx.HttpContext, request: Request):
        """The RPC's answer message; raises ctx.HttpAbort with the status it ended with."""
        return await ctx.invoke(rpc.handle, message, context, request.receive)


def too_large(size: str, limit: int) -> InvalidArgument:
    return InvalidArgument(
        f"the request body is {size}; this server accepts at most {limit:,} "
        "(max_message_bytes): send fewer images per call, send them as multipart/form-data "
        "or in the Open Inference Protocol's binary form instead of base64 JSON, or encoded "
        "(JPEG, PNG) instead of raw pixels", reason="MESSAGE_TOO_LARGE")


def json_parser(message_type, adjust: Optional[Callable[[object], None]] = None
                ) -> Callable[[bytes], object]:
    """A body parser that never raises: the message the JSON (protobuf's JSON mapping) says,
    then ``adjust(message)``, or calls.Malformed."""
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes):
        message = message_type()
        try:
            json_format.Parse(data, message)
        except (json_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
            return calls.Malformed(malformed_json(name, exc))
        if adjust is not None:
            try:
                adjust(message)
            except ServiceError as exc:
                return calls.Malformed(exc)
        return message

    return parse


def malformed_json(name: str, exc: Exception) -> InvalidArgument:
    return InvalidArgument(
        f"the request body is not a valid {name} in JSON ({str(exc)[:200]}); its fields are "
        "the .proto's, in protobuf's JSON mapping (GET /openapi.json describes them)",
        reason="MALFORMED_REQUEST")


# --- answers ---------------------------------------------------------------------------------


def to_json(message) -> str:
    """A message in protobuf's JSON mapping, on one line."""
    return json_format.MessageToJson(message, indent=None)


def error_answer(status, oip: bool = False) -> Response:
    """An error as JSON: google.rpc.Status's JSON form (and, for the Open Inference
    Protocol, its ``error`` field, which KServe's and Triton's clients read)."""
    body = ctx.status_json(status)
    if oip:
        body = {"error": status.message, **body}
    return JSONResponse(body, status_code=ctx.http_status(status),
                        headers=ctx.error_headers(status))


def service_error(error: ServiceError, oip: bool = False) -> Response:
    return error_answer(calls.status_of(error), oip)


async def json_answer(message, status: int = 200) -> Response:
    """A message in protobuf's JSON mapping; a large one is written in a thread."""
    if message.ByteSize() > calls.SMALL_REQUEST:
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(None, to_json, message)
    else:
        text = to_json(message)
    return Response(text, status_code=status, media_type=ctx.JSON)
