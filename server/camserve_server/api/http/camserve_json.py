"""camserve's own API over HTTP/JSON, mapped from the .proto as gRPC-JSON transcoding maps it:
every unary RPC is ``POST /v1/<rpc-in-kebab-case>`` (``/v1/predict``, ``/v1/explain``,
``/v1/check-sanity``...) with its request message as the body in protobuf's JSON mapping, and
its answer is the same message the gRPC call answers, in the same mapping. The model's
description is also ``GET /v1/models/{name}[/versions/{version}]`` (and ``GET /v1/info`` for
the default model); a request message's fields may be given as query parameters on a GET
(``?model.version=2``).

Besides JSON, a request with images may come as ``multipart/form-data``: each file part is an
image (``images``, in order), each text part a request field in JSON (``options``,
``model``). ``Accept: image/png`` (or ``image/jpeg``) on ``/v1/explain`` answers the first
image's first overlay alone, with its class in ``X-Camserve-*`` headers.

Errors: google.rpc.Status in its JSON form, with the gRPC call's reason, field violations and
retry hint, and the HTTP status of its code (context.HTTP_STATUS).
"""

from __future__ import annotations

import json
import re
from typing import Callable, List, Optional

from google.protobuf import descriptor as pd
from google.protobuf import json_format
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from camserve.v1 import camserve_pb2 as pb

from ...errors import InvalidArgument, ServiceError, quote
from .. import calls
from ..servicer import SERVICE
from . import context as ctx
from .gateway import Gateway, Rpc, error_answer, json_answer, json_parser, service_error

PREFIX = "/v1"
# GET routes beside each RPC's POST: (path, RPC, {path parameter: request field}).
GET_ROUTES = (
    ("/v1/info", "GetModelInfo", {}),
    ("/v1/models", "ListModels", {}),
    ("/v1/models/{name}", "GetModelInfo", {"name": "model.name"}),
    ("/v1/models/{name}/versions/{version}", "GetModelInfo",
     {"name": "model.name", "version": "model.version"}),
)
OVERLAYS = {"image/png": pb.EXPLAIN_OUTPUT_OVERLAY_PNG,
            "image/jpeg": pb.EXPLAIN_OUTPUT_OVERLAY_JPEG}
JSON_TYPES = ("application/json",)
MULTIPART = "multipart/form-data"


def kebab(name: str) -> str:
    """An RPC's path segment: ``CheckSanity`` → ``check-sanity``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def routes(gateway: Gateway) -> List[Route]:
    """POST /v1/<rpc> for every unary RPC of CamserveService, and the GET routes of the RPCs
    served."""
    found = []
    for key, rpc in gateway.rpcs.items():
        if key.startswith(SERVICE + "/") and not rpc.streaming:
            found.append(Route(f"{PREFIX}/{kebab(rpc.name)}", _post(gateway, rpc),
                               methods=["POST"], name=rpc.name))
    for path, name, fields in GET_ROUTES:
        rpc = gateway.find(SERVICE, name)
        if rpc is not None:
            found.append(Route(path, _get(gateway, rpc, fields), methods=["GET"],
                               name=f"{name} {path}"))
    return found


def _post(gateway: Gateway, rpc: Rpc) -> Callable:
    images = "images" in rpc.request_type.DESCRIPTOR.fields_by_name

    async def endpoint(request: Request) -> Response:
        context = gateway.context(request)
        try:
            gateway.authorized(rpc.name, context)
        except ServiceError as exc:
            return service_error(exc)
        overlay = None
        try:
            overlay = _overlay(request.headers.get("accept"), rpc)
            kind = _media_type(request.headers.get("content-type"))
            body = await gateway.body(request)
            if kind in JSON_TYPES or kind.endswith("+json"):
                adjust = (lambda m: _ask_overlay(m, overlay)) if overlay is not None else None
                message = gateway.parsed(body, json_parser(rpc.request_type, adjust))
            elif kind == MULTIPART and images:
                message = await _multipart(request, body, rpc.request_type)
                if overlay is not None:
                    _ask_overlay(message, overlay)
            else:
                raise _unsupported(kind, images)
        except ServiceError as exc:  # answered, logged and counted by the handler
            message = calls.Malformed(exc)
        try:
            answer = await gateway.call(rpc, message, context, request)
        except ctx.HttpAbort as exc:
            return error_answer(exc.status)
        if overlay is not None:
            return _overlay_answer(answer, overlay)
        return await json_answer(answer)

    return endpoint


def _get(gateway: Gateway, rpc: Rpc, path_fields: dict) -> Callable:
    async def endpoint(request: Request) -> Response:
        context = gateway.context(request)
        try:
            gateway.authorized(rpc.name, context)
        except ServiceError as exc:
            return service_error(exc)
        message = rpc.request_type()
        try:
            for name, value in request.query_params.multi_items():
                set_field(message, name, value)
            for name, path in path_fields.items():
                set_field(message, path, request.path_params[name])
        except ServiceError as exc:
            message = calls.Malformed(exc)
        try:
            answer = await gateway.call(rpc, message, context, request)
        except ctx.HttpAbort as exc:
            return error_answer(exc.status)
        return await json_answer(answer)

    return endpoint


# --- requests --------------------------------------------------------------------------------


def _media_type(header: Optional[str]) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def _unsupported(kind: str, images: bool) -> InvalidArgument:
    accepted = "application/json" + (" or multipart/form-data" if images else "")
    return InvalidArgument(f"the request body is {quote(kind or 'of no Content-Type')}; send "
                           f"it as {accepted} (Content-Type header)",
                           reason="UNSUPPORTED_MEDIA_TYPE")


def _overlay(accept: Optional[str], rpc: Rpc) -> Optional[int]:
    """The overlay the Accept header asks for instead of JSON (Explain only); None: JSON."""
    preferred = _preferred(accept)
    if preferred is None or preferred in ("application/json", "*/*", "application/*"):
        return None
    if preferred in OVERLAYS and rpc.name == "Explain":
        return OVERLAYS[preferred]
    offered = "application/json" + (", image/png or image/jpeg" if rpc.name == "Explain"
                                    else "")
    raise InvalidArgument(f"Accept asks for {quote(preferred)}; {rpc.name} answers {offered}",
                          reason="NOT_ACCEPTABLE")


def _preferred(accept: Optional[str]) -> Optional[str]:
    """The media type an Accept header prefers most (the first of the highest q)."""
    best, best_q = None, -1.0
    for part in (accept or "").split(","):
        pieces = [p.strip() for p in part.split(";")]
        if not pieces[0]:
            continue
        q = 1.0
        for param in pieces[1:]:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if q > best_q:
            best, best_q = pieces[0].lower(), q
    return best


def _ask_overlay(message, overlay: int) -> None:
    """An Explain request answered with an overlay alone asks for that overlay only."""
    del message.options.outputs[:]
    message.options.outputs.append(overlay)


async def _multipart(request: Request, body: bytes, message_type):
    """A request message from a multipart body: file parts are images, text parts fields."""

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form()
    except Exception as exc:  # starlette's MultiPartException, python-multipart's errors
        raise InvalidArgument(f"the multipart body cannot be read ({str(exc)[:200]})",
                              reason="MALFORMED_REQUEST") from None
    message = message_type()
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                message.images.add(encoded=await value.read())
                continue
            try:
                parsed = json.loads(value)
            except ValueError:
                raise InvalidArgument(f"form field {quote(name)} is not JSON: each text part "
                                      "is a request field in protobuf's JSON mapping, e.g. "
                                      "options={\"topK\": 3}", field=name,
                                      reason="MALFORMED_REQUEST") from None
            try:
                json_format.ParseDict({name: parsed}, message)
            except json_format.ParseError as exc:
                raise InvalidArgument(
                    f"form field {quote(name)} is not a field of "
                    f"{message_type.DESCRIPTOR.full_name} in JSON ({str(exc)[:200]})",
                    field=name, reason="MALFORMED_REQUEST") from None
    finally:
        await form.close()
    return message


def set_field(message, path: str, text: str) -> None:
    """Set a request field from a path or query parameter (``model.version=2``)."""
    target, descriptor = message, message.DESCRIPTOR
    names = path.split(".")
    for i, name in enumerate(names):
        found = descriptor.fields_by_name.get(name) or next(
            (f for f in descriptor.fields if f.json_name == name), None)
        if found is None:
            raise InvalidArgument(f"{quote(path)} is not a field of {descriptor.full_name}",
                                  field=path, reason="MALFORMED_REQUEST")
        if i < len(names) - 1:
            if found.type != pd.FieldDescriptor.TYPE_MESSAGE or repeated(found):
                raise InvalidArgument(f"{quote(path)} is not a field of "
                                      f"{message.DESCRIPTOR.full_name}", field=path,
                                      reason="MALFORMED_REQUEST")
            target, descriptor = getattr(target, found.name), found.message_type
            continue
        value = _scalar(found, text, path)
        if repeated(found):
            getattr(target, found.name).append(value)
        else:
            setattr(target, found.name, value)


def repeated(field: pd.FieldDescriptor) -> bool:
    """Whether a field is repeated (``is_repeated`` in protobuf 6 and later, ``label``
    before)."""
    value = getattr(field, "is_repeated", None)
    if value is None:
        return field.label == pd.FieldDescriptor.LABEL_REPEATED
    return bool(value)


def _scalar(field: pd.FieldDescriptor, text: str, path: str):
    kind = field.cpp_type
    try:
        if kind in (pd.FieldDescriptor.CPPTYPE_INT32, pd.FieldDescriptor.CPPTYPE_INT64,
                    pd.FieldDescriptor.CPPTYPE_UINT32, pd.FieldDescriptor.CPPTYPE_UINT64):
            value = int(text)
            if value < 0 and kind in (pd.FieldDescriptor.CPPTYPE_UINT32,
                                      pd.FieldDescriptor.CPPTYPE_UINT64):
                raise ValueError(text)
            return value
        if kind in (pd.FieldDescriptor.CPPTYPE_FLOAT, pd.FieldDescriptor.CPPTYPE_DOUBLE):
            return float(text)
        if kind == pd.FieldDescriptor.CPPTYPE_BOOL:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind == pd.FieldDescriptor.CPPTYPE_ENUM:
            value = field.enum_type.values_by_name.get(text)
            return value.number if value is not None else int(text)
        if kind == pd.FieldDescriptor.CPPTYPE_STRING:
            return text if field.type == pd.FieldDescriptor.TYPE_STRING else text.encode()
    except ValueError:
        pass
    raise InvalidArgument(f"{path}={quote(text)} is not a valid value of that field",
                          field=path, reason="MALFORMED_REQUEST")


# --- answers ---------------------------------------------------------------------------------


def _overlay_answer(answer, overlay: int) -> Response:
    result = answer.results[0]
    found = next(((m, m.overlay) for m in result.maps if m.overlay), None)
    if found is None:
        status = calls.status_of(ServiceError("the explanation has no overlay to answer "
                                              "with; ask for JSON"))
        return error_answer(status)
    class_map, data = found
    media = "image/png" if overlay == pb.EXPLAIN_OUTPUT_OVERLAY_PNG else "image/jpeg"
    headers = {
        "X-Camserve-Class": str(class_map.target.index),
        "X-Camserve-Label": class_map.target.label.encode("ascii", "replace").decode(),
        "X-Camserve-Probability": f"{class_map.target.probability:.6g}",
        "X-Camserve-Method": pb.CamMethod.Name(class_map.method),
        "X-Camserve-Layer": class_map.layer,
    }
    return Response(data, media_type=media, headers=headers)
