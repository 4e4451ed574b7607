"""The Open Inference Protocol over REST (KServe v2 HTTP/REST, as Triton serves it), beside
camserve's JSON API: each route turns its JSON (and, with Triton's binary-data extension, the
binary tensors after it) into the gRPC protocol's message and calls the same OipService
handler as ``inference.GRPCInferenceService`` does, so the tensors, parameters, checks and
messages are those of docs/oip.md.

- ``GET /v2``: server metadata; ``GET /v2/health/live``, ``/v2/health/ready``: 200 or 503,
  without a token (probes);
- ``GET /v2/models/{name}[/versions/{v}]``: model metadata; ``.../ready``: 200 or 503;
  ``.../config``: Triton's model configuration;
- ``POST /v2/models/{name}[/versions/{v}]/infer``: JSON tensors (``data``, row-major, flat or
  nested; BYTES elements base64), or binary ones: the JSON header is the first
  ``Inference-Header-Content-Length`` bytes of the body and an input with parameter
  ``binary_data_size`` takes that many bytes after it, in input order. An output comes back
  binary when it asks (``"parameters": {"binary_data": true}``) or the request does
  (parameter ``binary_data_output``), otherwise as JSON ``data``.

Errors are ``{"error": message}`` (what tritonclient reads) with google.rpc.Status's fields
beside it.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...errors import InvalidArgument, ServiceError, quote
from .. import calls, oip
from . import context as ctx
from .gateway import Gateway, Rpc, error_answer, service_error

HEADER_LENGTH = "inference-header-content-length"
BINARY = "application/octet-stream"
OPEN = ("ServerLive", "ServerReady")  # answered without a token, as gRPC health checks are
# The typed contents field of each datatype (FP16 and BF16 have none: send them binary).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
            "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
            "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "UINT8": "u1",
          "INT8": "i1", "UINT32": "<u4", "UINT64": "<u8", "BOOL": "?"}
_LENGTH = struct.Struct("<I")


def routes(gateway: Gateway) -> List[Route]:
    s = oip.SERVICE
    found = [Route("/v2", _metadata(gateway, gateway.find(s, "ServerMetadata")), methods=["GET"]),
             Route("/v2/health/live", _health(gateway, gateway.find(s, "ServerLive"), "live"),
                   methods=["GET"]),
             Route("/v2/health/ready", _health(gateway, gateway.find(s, "ServerReady"),
                                               "ready"), methods=["GET"])]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        found += [
            Route(base, _metadata(gateway, gateway.find(s, "ModelMetadata"), model=True),
                  methods=["GET"]),
            Route(base + "/ready", _health(gateway, gateway.find(s, "ModelReady"), "ready",
                                           model=True), methods=["GET"]),
            Route(base + "/config", _metadata(gateway, gateway.find(s, "ModelConfig"),
                                              model=True, config=True), methods=["GET"]),
            Route(base + "/infer", _infer(gateway, gateway.find(s, "ModelInfer")),
                  methods=["POST"]),
        ]
    if gateway.find(s, "RepositoryIndex") is not None:  # Triton's model-repository extension
        found += [Route("/v2/repository/index", _repository(gateway, gateway.find(
                      s, "RepositoryIndex"), index=True), methods=["POST"]),
                  Route("/v2/repository/models/{name}/load", _repository(
                      gateway, gateway.find(s, "RepositoryModelLoad")), methods=["POST"]),
                  Route("/v2/repository/models/{name}/unload", _repository(
                      gateway, gateway.find(s, "RepositoryModelUnload")), methods=["POST"])]
    return found


def _repository(gateway: Gateway, rpc: Rpc, index: bool = False):
    """Triton's REST repository routes: index (a JSON list of the models' versions), load and
    unload (an empty object)."""
    async def endpoint(request: Request) -> Response:
        context = gateway.context(request)
        try:
            gateway.authorized(rpc.name, context)
        except ServiceError as exc:
            return service_error(exc, oip=True)
        try:
            body = await gateway.body(request)
            doc = json.loads(body) if body.strip() else {}
            if not isinstance(doc, dict):
                raise _shape_error("the request", "an object")
            if index:
                message = rpc.request_type(ready=doc.get("ready") is True)
            else:
                message = rpc.request_type(model_name=request.path_params["name"])
                params = doc.get("parameters") or {}
                if not isinstance(params, dict):
                    raise _shape_error("parameters", "an object")
                for key, value in params.items():
                    _parameters(message.parameters, {key: value}, "parameters")
        except ValueError as exc:  # json's
            message = calls.Malformed(InvalidArgument(
                f"the request's JSON does not parse ({str(exc)[:200]})",
                reason="MALFORMED_REQUEST"))
        except ServiceError as exc:
            message = calls.Malformed(exc)
        answer, error = await _call(gateway, rpc, request, context, message)
        if error is not None:
            return error
        if index:
            return JSONResponse([_plain(m) for m in answer.models])
        return JSONResponse({})
    return endpoint


async def _call(gateway: Gateway, rpc: Rpc, request: Request, context, message):
    try:
        return await gateway.call(rpc, message, context, request), None
    except ctx.HttpAbort as exc:
        return None, error_answer(exc.status, oip=True)


async def _run(gateway: Gateway, rpc: Rpc, request: Request, message):
    """The RPC's answer, or the error Response to send."""
    context = gateway.context(request)
    try:
        if rpc.name not in OPEN:
            gateway.authorized(rpc.name, context)
    except ServiceError as exc:
        return None, service_error(exc, oip=True)
    try:
        return await gateway.call(rpc, message, context, request), None
    except ctx.HttpAbort as exc:
        return None, error_answer(exc.status, oip=True)


def _named(rpc: Rpc, request: Request, config: bool = False):
    params = request.path_params
    return rpc.request_type(name=params.get("name", ""), version=params.get("version", ""))


def _metadata(gateway: Gateway, rpc: Rpc, model: bool = False, config: bool = False):
    async def endpoint(request: Request) -> Response:
        message = _named(rpc, request) if model else rpc.request_type()
        answer, error = await _run(gateway, rpc, request, message)
        if error is not None:
            return error
        if config:  # Triton answers the configuration itself
            return JSONResponse(_plain(answer.config))
        return JSONResponse(_plain(answer))
    return endpoint


def _health(gateway: Gateway, rpc: Rpc, key: str, model: bool = False):
    async def endpoint(request: Request) -> Response:
        message = _named(rpc, request) if model else rpc.request_type()
        answer, error = await _run(gateway, rpc, request, message)
        if error is not None:
            return error
        value = getattr(answer, key)
        return JSONResponse({key: value}, status_code=200 if value else 503)
    return endpoint


def _plain(message) -> dict:
    """A message as KServe's REST JSON writes it: proto field names, integers as numbers."""
    return _numbers(json_format.MessageToDict(message, preserving_proto_field_name=True),
                    message.DESCRIPTOR)


def _numbers(value, descriptor):
    """proto3 JSON writes 64-bit integers as strings; the REST protocol writes numbers."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            f = descriptor.fields_by_name.get(key) if descriptor is not None else None
            if f is not None and f.message_type is not None and not f.message_type.GetOptions(
                    ).map_entry:
                out[key] = _numbers(item, f.message_type)
            elif f is not None and f.cpp_type in (f.CPPTYPE_INT64, f.CPPTYPE_UINT64):
                out[key] = [int(v) for v in item] if isinstance(item, list) else int(item)
            else:
                out[key] = item
        return out
    if isinstance(value, list):
        return [_numbers(item, descriptor) for item in value]
    return value


# --- inference -------------------------------------------------------------------------------


@dataclass
class _Wanted:
    """How the request wants its outputs (filled in when it is parsed)."""

    all_binary: bool = False
    binary: Dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.all_binary)


def _infer(gateway: Gateway, rpc: Rpc):
    async def endpoint(request: Request) -> Response:
        context = gateway.context(request)
        try:
            gateway.authorized(rpc.name, context)
        except ServiceError as exc:
            return service_error(exc, oip=True)
        wanted = _Wanted()
        name = request.path_params["name"]
        version = request.path_params.get("version", "")
        try:
            encoding = request.headers.get("content-encoding", "identity").lower()
            if encoding != "identity":
                raise InvalidArgument(f"Content-Encoding {quote(encoding)} is not accepted; "
                                      "send the body uncompressed",
                                      reason="UNSUPPORTED_MEDIA_TYPE")
            header = _header_length(request.headers.get(HEADER_LENGTH))
            body = await gateway.body(request)
            message = gateway.parsed(body, _parser(rpc.request_type, name, version, header,
                                                   wanted))
        except ServiceError as exc:
            message = calls.Malformed(exc)
        try:
            answer = await gateway.call(rpc, message, context, request)
        except ctx.HttpAbort as exc:
            return error_answer(exc.status, oip=True)
        return _infer_answer(answer, wanted)
    return endpoint


def _header_length(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidArgument(f"Inference-Header-Content-Length {quote(text[:40])} is not a "
                              "length", reason="MALFORMED_REQUEST")
    return value


def _parser(message_type, name: str, version: str, header: Optional[int],
            wanted: _Wanted) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return infer_request(message_type, data, name, version, header, wanted)
        except ServiceError as exc:
            return calls.Malformed(exc)
    return parse


def infer_request(message_type, data: bytes, name: str, version: str,
                  header: Optional[int], wanted: _Wanted):
    """The ModelInferRequest a REST body says (JSON, then the binary tensors)."""
    if header is not None and header > len(data):
        raise InvalidArgument(f"Inference-Header-Content-Length is {header:,}, but the body "
                              f"has {len(data):,} bytes", reason="MALFORMED_REQUEST")
    text, binary = (data, b"") if header is None else (data[:header], memoryview(data)[header:])
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"the request's JSON does not parse ({str(exc)[:200]})",
                              reason="MALFORMED_REQUEST") from None
    if not isinstance(doc, dict):
        raise _shape_error("the request", "an object")
    message = message_type(model_name=name, model_version=version, id=str(doc.get("id", "")))
    params = doc.get("parameters", {})
    _parameters(message.parameters, params, "parameters")
    wanted.all_binary = params.get("binary_data_output") is True if isinstance(
        params, dict) else False
    offset = 0
    inputs = doc.get("inputs", [])
    if not isinstance(inputs, list):
        raise _shape_error("inputs", "a list")
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise _shape_error(where, "an object")
        shape = item.get("shape", [])
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise _shape_error(f"{where}.shape", "a list of integers")
        tensor = message.inputs.add(name=str(item.get("name", "")),
                                    datatype=str(item.get("datatype", "")), shape=shape)
        tensor_params = dict(item.get("parameters") or {})
        size = tensor_params.pop("binary_data_size", None)
        _parameters(tensor.parameters, tensor_params, f"{where}.parameters")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(f"{where} has binary_data_size {quote(size)}, but the "
                                      f"body holds {len(binary) - offset:,} more bytes",
                                      field=f"{where}.parameters", reason="INVALID_TENSOR")
            message.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        elif "data" in item:
            _contents(tensor, item["data"], where)
    if offset != len(binary):
        raise InvalidArgument(f"the body has {len(binary) - offset:,} bytes after the inputs' "
                              "binary data", reason="INVALID_TENSOR")
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise _shape_error("outputs", "a list")
    for i, item in enumerate(outputs):
        if not isinstance(item, dict):
            raise _shape_error(f"outputs[{i}]", "an object")
        output = message.outputs.add(name=str(item.get("name", "")))
        out_params = item.get("parameters") or {}
        _parameters(output.parameters, out_params, f"outputs[{i}].parameters")
        if isinstance(out_params, dict) and isinstance(out_params.get("binary_data"), bool):
            wanted.binary[output.name] = out_params["binary_data"]
    return message


def _shape_error(where: str, wanted: str) -> InvalidArgument:
    return InvalidArgument(f"{where} must be {wanted} (KServe v2 REST)", field=where,
                           reason="MALFORMED_REQUEST")


def _parameters(target, params, where: str) -> None:
    if not isinstance(params, dict):
        raise _shape_error(where, "an object")
    for key, value in params.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            raise InvalidArgument(f"{where}[{key}] is {quote(value)}; a parameter is a bool, "
                                  "an integer or a string", field=f"{where}[{key}]",
                                  reason="INVALID_PARAMETER")


def _contents(tensor, data, where: str) -> None:
    values = _flat(data)
    name = CONTENTS.get(tensor.datatype)
    if name is None:
        raise InvalidArgument(f"{where} is {quote(tensor.datatype)}, which has no JSON form "
                              "here; send it binary (binary_data_size)", field=where,
                              reason="INVALID_DATATYPE")
    contents = getattr(tensor.contents, name)
    try:
        if tensor.datatype == "BYTES":
            contents.extend(_base64(v, f"{where}.data[{i}]") for i, v in enumerate(values))
        else:
            contents.extend(values)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{where}.data does not hold {tensor.datatype} values "
                              f"({str(exc)[:120]})", field=f"{where}.data",
                              reason="INVALID_TENSOR") from None


def _flat(data) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _base64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} is not a string: a BYTES element in JSON is its bytes "
                              "in base64", field=where, reason="INVALID_TENSOR")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{where} is not base64: a BYTES element in JSON is its bytes "
                              "in base64 (or send the tensor binary, binary_data_size)",
                              field=where, reason="INVALID_TENSOR") from None


def _infer_answer(answer, wanted: _Wanted) -> Response:
    head = {"model_name": answer.model_name, "model_version": answer.model_version}
    if answer.id:
        head["id"] = answer.id
    outputs, blobs = [], []
    for tensor, raw in zip(answer.outputs, answer.raw_output_contents):
        item = {"name": tensor.name, "datatype": tensor.datatype,
                "shape": [int(d) for d in tensor.shape]}
        if wanted.is_binary(tensor.name):
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            item["data"] = _values(tensor.datatype, raw)
        outputs.append(item)
    head["outputs"] = outputs
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type=ctx.JSON)
    return Response(text + b"".join(blobs), media_type=BINARY,
                    headers={"Inference-Header-Content-Length": str(len(text))})


def _values(datatype: str, raw: bytes) -> list:
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            (length,) = _LENGTH.unpack_from(raw, offset)
            offset += _LENGTH.size
            values.append(raw[offset:offset + length].decode("utf-8", "replace"))
            offset += length
        return values
    return np.frombuffer(raw, DTYPES[datatype]).tolist()
