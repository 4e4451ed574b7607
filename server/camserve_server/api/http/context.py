"""What an HTTP call needs to go through the gRPC handlers unchanged: a context object with
the part of grpc.aio's ServicerContext that the handlers and ``calls.py`` use, the call of a
wrapped handler (cancelled when the client goes away), and its ServiceError as an HTTP answer.

A handler ends a call with ``context.abort`` (``calls.abort``: the status and its rich
details in ``grpc-status-details-bin``); here that raises :class:`HttpAbort`, which carries the
same google.rpc.Status, so the answer over HTTP has the same code, message, reason, field
violations and retry hint as over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Awaitable, Callable, Optional, Sequence, Tuple

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from ...errors import ServiceError
from .. import calls

JSON = "application/json"

# google.rpc.Code → HTTP status, as Google's APIs and gRPC-JSON transcoding map them
# (google/rpc/code.proto).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
_BY_NUMBER = {code.value[0]: status for code, status in HTTP_STATUS.items()}
# Reasons whose HTTP status says more than their gRPC code's.
HTTP_STATUS_BY_REASON = {"MESSAGE_TOO_LARGE": 413, "UNSUPPORTED_MEDIA_TYPE": 415,
                         "NOT_ACCEPTABLE": 406, "METHOD_NOT_ALLOWED": 405}


class HttpAbort(Exception):
    """A handler ended its call: ``status`` is the google.rpc.Status it answered."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


class HttpContext:
    """The ServicerContext of a call that came over HTTP: its peer, its headers as gRPC
    metadata (lower-case names: ``authorization``, ``x-request-id``), no deadline (HTTP has
    none; a client that goes away cancels its call instead), and ``abort`` raising HttpAbort.
    ``done()`` turns true once the client has gone away."""

    def __init__(self, peer: str, metadata: Sequence[Tuple[str, str]]) -> None:
        self._peer = peer
        self._metadata = tuple(metadata)
        self.gone = False

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> Tuple[Tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> Optional[float]:
        return None

    def done(self) -> bool:
        return self.gone

    def cancelled(self) -> bool:
        return self.gone

    async def abort(self, code, details: str = "", trailing_metadata=()) -> None:
        for key, value in trailing_metadata or ():
            if key == "grpc-status-details-bin":
                raise HttpAbort(status_pb2.Status.FromString(value))
        raise HttpAbort(status_pb2.Status(code=code.value[0], message=details))


def peer_of(scope) -> str:
    """An ASGI scope's client, written as gRPC writes a peer (``ipv4:127.0.0.1:5000``)."""
    client = scope.get("client")
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def metadata_of(scope) -> Tuple[Tuple[str, str], ...]:
    """An ASGI scope's headers as gRPC metadata: lower-case names, text values."""
    return tuple((name.decode("latin-1").lower(), value.decode("latin-1"))
                 for name, value in scope.get("headers", ()))


async def invoke(handle: Callable[[object, HttpContext], Awaitable], message,
                 context: HttpContext, receive) -> object:
    """Run a wrapped handler (``calls.unary``'s) on ``message``; its answer, or HttpAbort. A
    client that disconnects meanwhile cancels the call (its queued items are withdrawn, as
    when a gRPC caller goes away): then asyncio.CancelledError is raised here."""
    task = asyncio.ensure_future(handle(message, context))
    watch = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the HTTP server's own cut-off
        context.gone = True
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        context.gone = True
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise asyncio.CancelledError("the client went away")
    return task.result()


async def _disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def status_json(status: status_pb2.Status) -> dict:
    """google.rpc.Status in its JSON form (``details`` with their ``@type``)."""
    return json_format.MessageToDict(status)


def error_status(error: ServiceError) -> status_pb2.Status:
    return calls.status_of(error)


def http_status(status: status_pb2.Status) -> int:
    """The HTTP status of a google.rpc.Status: its reason's, else its code's."""
    reason = reason_of(status)
    if reason in HTTP_STATUS_BY_REASON:
        return HTTP_STATUS_BY_REASON[reason]
    return _BY_NUMBER.get(status.code, 500)


def reason_of(status: status_pb2.Status) -> str:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def retry_after(status: status_pb2.Status) -> Optional[str]:
    """The Retry-After header (whole seconds, at least 1) of a status with a RetryInfo."""
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            seconds = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return str(max(1, math.ceil(seconds)))
    return None


def error_headers(status: status_pb2.Status) -> dict:
    headers = {}
    after = retry_after(status)
    if after is not None:
        headers["Retry-After"] = after
    if status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]:
        headers["WWW-Authenticate"] = "Bearer"
    return headers
