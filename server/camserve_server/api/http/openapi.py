"""The OpenAPI 3.1 description of the HTTP API (``GET /openapi.json``), generated from the
routes and the .proto's message descriptors, so it says what the server parses: each
message's fields in protobuf's JSON mapping (lowerCamelCase names; the .proto's names are
accepted too), 64-bit integers as strings, bytes as base64, enums by name.
"""

from __future__ import annotations

from typing import Dict, List

from google.protobuf import descriptor as pd
from google.rpc import status_pb2

from ... import __version__
from ..servicer import SERVICE
from .camserve_json import GET_ROUTES, PREFIX, kebab, repeated
from .gateway import Gateway

_INTEGER = {pd.FieldDescriptor.CPPTYPE_INT32: ("integer", "int32"),
            pd.FieldDescriptor.CPPTYPE_UINT32: ("integer", "uint32")}
_STRING_INTEGER = {pd.FieldDescriptor.CPPTYPE_INT64: "int64",
                   pd.FieldDescriptor.CPPTYPE_UINT64: "uint64"}


def _ref(descriptor) -> dict:
    return {"$ref": f"#/components/schemas/{descriptor.full_name}"}


def _field_schema(field: pd.FieldDescriptor, todo: List) -> dict:
    kind = field.cpp_type
    if kind == pd.FieldDescriptor.CPPTYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": _field_schema(value, todo)}
        todo.append(field.message_type)
        item = _ref(field.message_type)
    elif kind in _INTEGER:
        item = {"type": "integer", "format": _INTEGER[kind][1]}
    elif kind in _STRING_INTEGER:
        item = {"type": "string", "format": _STRING_INTEGER[kind]}
    elif kind in (pd.FieldDescriptor.CPPTYPE_FLOAT, pd.FieldDescriptor.CPPTYPE_DOUBLE):
        item = {"type": "number"}
    elif kind == pd.FieldDescriptor.CPPTYPE_BOOL:
        item = {"type": "boolean"}
    elif kind == pd.FieldDescriptor.CPPTYPE_ENUM:
        item = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    elif field.type == pd.FieldDescriptor.TYPE_BYTES:
        item = {"type": "string", "format": "byte", "contentEncoding": "base64"}
    else:
        item = {"type": "string"}
    if repeated(field):
        return {"type": "array", "items": item}
    return item


def schemas(roots) -> Dict[str, dict]:
    """JSON schemas of ``roots`` and every message they reach, by full name."""
    found: Dict[str, dict] = {}
    todo = list(roots)
    while todo:
        descriptor = todo.pop()
        if descriptor.full_name in found:
            continue
        if descriptor.full_name == "google.protobuf.Any":
            found[descriptor.full_name] = {"type": "object", "properties": {
                "@type": {"type": "string"}}, "additionalProperties": True}
            continue
        properties = {f.json_name: _field_schema(f, todo) for f in descriptor.fields}
        found[descriptor.full_name] = {"type": "object", "properties": properties}
    return found


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {
        "schema": _ref(status_pb2.Status.DESCRIPTOR)}}}


ERRORS = {"400": "invalid request (google.rpc.Status with ErrorInfo, BadRequest)",
          "401": "no accepted bearer token", "404": "not found",
          "413": "body over --max-message-bytes",
          "429": "busy: retry after the Retry-After header's seconds",
          "503": "loading or draining"}


def _responses(response_type, extra: Dict[str, dict] = None) -> dict:
    answers = {"200": {"description": "the answer", "content": {
        "application/json": {"schema": _ref(response_type.DESCRIPTOR)}, **(extra or {})}}}
    answers.update({code: _error(text) for code, text in ERRORS.items()})
    return answers


def document(gateway: Gateway) -> dict:
    """The OpenAPI document of camserve's JSON API and the Open Inference Protocol's routes."""
    paths: Dict[str, dict] = {}
    roots = [status_pb2.Status.DESCRIPTOR]
    for key, rpc in gateway.rpcs.items():
        if not key.startswith(SERVICE + "/") or rpc.streaming:
            continue
        roots += [rpc.request_type.DESCRIPTOR, rpc.response_type.DESCRIPTOR]
        body = {"application/json": {"schema": _ref(rpc.request_type.DESCRIPTOR)}}
        if "images" in rpc.request_type.DESCRIPTOR.fields_by_name:
            body[MULTIPART] = {"schema": {"type": "object", "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "options": {"type": "string", "description": "JSON"}}}}
        extra = {}
        if rpc.name == "Explain":
            extra = {m: {"schema": {"type": "string", "format": "binary"}}
                     for m in ("image/png", "image/jpeg")}
        paths[f"{PREFIX}/{kebab(rpc.name)}"] = {"post": {
            "operationId": rpc.name, "summary": f"{SERVICE}/{rpc.name}",
            "requestBody": {"required": True, "content": body},
            "responses": _responses(rpc.response_type, extra)}}
    for path, name, fields in GET_ROUTES:
        rpc = gateway.find(SERVICE, name)
        if rpc is None:
            continue
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"},
                   "description": f"the request's {f}"} for p, f in fields.items()]
        paths[path] = {"get": {"operationId": f"{name}{''.join(p.title() for p in fields)}",
                               "summary": f"{SERVICE}/{name}", "parameters": params,
                               "responses": _responses(rpc.response_type)}}
    for path, summary in OIP_PATHS:
        method = "post" if path.endswith("/infer") else "get"
        paths[path] = {method: {"summary": summary, "responses": {
            "200": {"description": "KServe v2 REST (docs/oip.md, docs/http.md)"}}}}
    for path in ("/v1/stream-predict", "/v1/stream-explain"):
        paths[path] = {"get": {"summary": "WebSocket: one JSON message per stream request "
                               "and per answer (docs/http.md)", "responses": {
                                   "101": {"description": "switching to WebSocket"}}}}
    return {"openapi": "3.1.0",
            "info": {"title": "camserve", "version": __version__,
                     "description": "camserve's API over HTTP/JSON (protobuf's JSON mapping "
                     "of camserve.v1) and the Open Inference Protocol over REST"},
            "paths": paths, "components": {"schemas": schemas(roots)}}


MULTIPART = "multipart/form-data"
OIP_PATHS = (
    ("/v2", "server metadata"), ("/v2/health/live", "live (no token needed)"),
    ("/v2/health/ready", "ready (no token needed)"),
    ("/v2/models/{name}", "model metadata"), ("/v2/models/{name}/ready", "model ready"),
    ("/v2/models/{name}/config", "Triton's model configuration"),
    ("/v2/models/{name}/infer", "inference: JSON or binary tensors"),
)
