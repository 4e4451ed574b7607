"""StreamPredict and StreamExplain over WebSocket, for browsers: ``/v1/stream-predict`` and
``/v1/stream-explain``. Each text message the client sends is one StreamPredictRequest (or
StreamExplainRequest) in protobuf's JSON mapping (a config, then frames), and each answer is
one StreamPredictResponse (StreamExplainResponse) text message, in frame order. The same
handler as the gRPC stream runs them (``CamserveService.StreamPredict``, wrapped by
``calls.streaming``), so the policies (ALL, LATEST), the limits (frames in flight, idle time,
``--max-streams``), the per-frame errors and the access line are the same.

A stream that ends with an error (a message that is not a request, too many streams, no frame
in time) sends a last message ``{"error": <google.rpc.Status>}`` and closes with code 1008
(an error of the caller's) or 1011 (the server's). Closing the socket ends the stream; its
queued frames are withdrawn. A browser cannot send headers with a WebSocket: a token may come
as ``?access_token=TOKEN`` instead of ``Authorization: Bearer``.
"""

from __future__ import annotations

import json
from typing import List

import grpc
from google.protobuf import json_format
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ...errors import InvalidArgument, ServiceError
from .. import calls
from ..servicer import SERVICE
from . import context as ctx
from .camserve_json import kebab
from .gateway import Gateway, Rpc, to_json

CALLER_ERROR = 1008  # policy violation: the caller's request was refused
SERVER_ERROR = 1011
CALLER_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}


def routes(gateway: Gateway) -> List[WebSocketRoute]:
    return [WebSocketRoute(f"/v1/{kebab(rpc.name)}", _stream(gateway, rpc), name=rpc.name)
            for key, rpc in gateway.rpcs.items()
            if key.startswith(SERVICE + "/") and rpc.streaming]


def _metadata(websocket: WebSocket):
    """The headers as metadata, with ``?access_token=`` as an Authorization header."""
    metadata = list(ctx.metadata_of(websocket.scope))
    token = websocket.query_params.get("access_token")
    if token is not None and not any(k == "authorization" for k, _ in metadata):
        metadata.append(("authorization", f"Bearer {token}"))
    return metadata


def _stream(gateway: Gateway, rpc: Rpc):
    handle = calls.streaming(rpc.name, rpc.behavior, gateway.recorder)
    name = rpc.request_type.DESCRIPTOR.full_name

    async def endpoint(websocket: WebSocket) -> None:
        context = ctx.HttpContext(ctx.peer_of(websocket.scope), _metadata(websocket))
        await websocket.accept()
        try:
            gateway.authorized(rpc.name, context)
        except ServiceError as exc:
            await _end(websocket, calls.status_of(exc))
            return

        async def requests():
            while True:
                try:
                    message = await websocket.receive()
                except (WebSocketDisconnect, RuntimeError):
                    context.gone = True
                    return
                if message["type"] == "websocket.disconnect":
                    context.gone = True
                    return
                text = message.get("text")
                if text is None:
                    yield calls.Malformed(InvalidArgument(
                        f"a binary WebSocket message; send each {name} as a JSON text "
                        "message", reason="MALFORMED_REQUEST"))
                    continue
                request = rpc.request_type()
                try:
                    json_format.Parse(text, request)
                except (json_format.ParseError, RecursionError) as exc:
                    yield calls.Malformed(InvalidArgument(
                        f"a message is not a valid {name} in JSON ({str(exc)[:200]})",
                        reason="MALFORMED_REQUEST"))
                    continue
                yield request

        answers = handle(requests(), context)
        try:
            async for answer in answers:
                await websocket.send_text(to_json(answer))
        except ctx.HttpAbort as exc:
            await _end(websocket, exc.status)
            return
        except (WebSocketDisconnect, RuntimeError, OSError):
            context.gone = True
            return
        finally:
            await answers.aclose()
        if not context.gone:
            await websocket.close()

    return endpoint


async def _end(websocket: WebSocket, status) -> None:
    """Send the status that ended the stream, and close."""
    code = grpc.StatusCode.INTERNAL
    for candidate in grpc.StatusCode:
        if candidate.value[0] == status.code:
            code = candidate
    try:
        await websocket.send_text(json.dumps({"error": ctx.status_json(status)}))
        await websocket.close(CALLER_ERROR if code in CALLER_CODES else SERVER_ERROR,
                              reason=status.message.encode()[:120].decode("utf-8", "ignore"))
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
