"""The Open Inference Protocol (KServe v2 gRPC, ``inference.GRPCInferenceService``) beside
camserve's own API, on the same port: thin handlers and the tensor conversion at the edge.

Requests take the same path as Predict and Explain (pipeline.py: the same checks, limits and
messages, decode in the pool, one batcher, the engine), with the same auth interceptor, access
log and metrics (``calls.py`` wraps every handler); this module only converts the tensors and
parameters. docs/oip.md describes the tensors for users:

- the server's models by their repository names and versions (``--model`` alone: one model,
  ``--oip-model-name``, default ``camserve``, version ``1``), and Triton's repository extension
  (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload);
- input ``image``: BYTES ``[N]`` or ``[N, 1]`` (encoded image files) or UINT8
  ``[N, H, W, C]`` (raw pixels, C = 3 RGB, or 1 or 4);
- outputs ``probabilities`` FP32 ``[N, classes]``, ``top_indices`` INT64 ``[N, k]``,
  ``top_labels`` BYTES ``[N, k]`` (``top_k`` parameter, default 5), and when the request
  explains (parameter ``explain``, or ``method``/``layer``/``target``, or asks for these
  outputs) ``raw_map`` FP32 ``[N, h, w]`` and ``target`` INT64 ``[N]``.

The six RPCs of KServe's protocol are served, and Triton's ModelConfig (perf_analyzer and
``tritonclient``'s ``get_model_config`` need it); every other RPC of the service (Triton's
extensions) answers UNIMPLEMENTED, saying what is served.

The protocol's generated messages are loaded when the first server registers the service,
not on import: ``tritonclient`` registers the same ``inference.*`` messages in protobuf's
default pool, and a process that holds them already (a test, a notebook) uses those classes
(their wire format is the same) instead of failing on the duplicate names.
"""

from __future__ import annotations

import struct
import types
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from camserve.methods import method_value
from camserve.v1 import camserve_pb2 as pb

from .. import __version__
from ..batching.levels import INTERACTIVE
from ..domain import METHODS, RawPixels, Source
from ..errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
    quote,
)
from ..oip.v2 import model_config_pb2, repository_pb2
from . import calls
from . import request as req
from .pipeline import Pipeline
from .response import ranked
from .servicer import CamserveService

SERVICE = "inference.GRPCInferenceService"
PROTO = "camserve_server/oip/v2/grpc_predict_v2.proto"
PLATFORM = "pytorch"
EXTENSIONS = ("model_configuration", "model_repository", "parameters")

INPUT = "image"
PROBABILITIES, TOP_INDICES, TOP_LABELS = "probabilities", "top_indices", "top_labels"
RAW_MAP, TARGET = "raw_map", "target"
CLASSIFY_OUTPUTS = (PROBABILITIES, TOP_INDICES, TOP_LABELS)
EXPLAIN_OUTPUTS = (RAW_MAP, TARGET)

EXPLAIN_PARAMETERS = ("method", "layer", "target")
PARAMETERS = ("top_k", "explain", "priority") + EXPLAIN_PARAMETERS
# Accepted and ignored: Triton's timeout (the call's deadline bounds it) and binary_data_output,
# which tritonclient sends when asked to, and its reserved triton_* ones (perf_analyzer sends
# triton_enable_empty_final_response).
IGNORED_PARAMETERS = ("timeout", "binary_data_output")
IGNORED_PREFIX = "triton_"
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


# --- the generated messages ------------------------------------------------------------------

_MESSAGES = ("ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest",
             "ServerReadyResponse", "ModelReadyRequest", "ModelReadyResponse",
             "ServerMetadataRequest", "ServerMetadataResponse", "ModelMetadataRequest",
             "ModelMetadataResponse", "ModelInferRequest", "ModelInferResponse",
             "InferParameter", "InferTensorContents")
_loaded: Optional[types.SimpleNamespace] = None


def messages() -> types.SimpleNamespace:
    """The protocol's message classes by name (``messages().ModelInferRequest``): camserve's
    generated ones, or, where the process already registered the ``inference`` package (as
    tritonclient does), the classes it registered."""
    global _loaded
    if _loaded is None:
        try:
            from ..oip.v2 import grpc_predict_v2_pb2 as module

            classes = {name: getattr(module, name) for name in _MESSAGES}
        except (TypeError, ValueError):  # "duplicate symbol": protobuf's pool has them
            classes = {name: _registered("inference." + name) for name in _MESSAGES}
        _loaded = types.SimpleNamespace(**classes)
    return _loaded


def _registered(full_name: str):
    from google.protobuf import descriptor_pool, message_factory

    descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
    if hasattr(message_factory, "GetMessageClass"):  # protobuf 4.22 and later
        return message_factory.GetMessageClass(descriptor)
    from google.protobuf import symbol_database

    return symbol_database.Default().GetSymbol(full_name)


# --- the service -----------------------------------------------------------------------------


def handler(service: CamserveService, model_name: str, max_message_bytes: int,
            recorder: calls.Recorder, inflight: calls.InflightBytes) -> grpc.GenericRpcHandler:
    """The gRPC handler of ``inference.GRPCInferenceService``, for ``add_generic_rpc_handlers``:
    the served RPCs through ``calls.generic_handler`` (with ``inflight``, the admission by
    size that camserve's own service uses), every other one UNIMPLEMENTED."""
    oip = OipService(service, model_name)
    served = calls.generic_handler(SERVICE, oip.methods(), max_message_bytes, recorder,
                                   inflight, items=batch_of, expands=expanded_bytes)
    return _Handler(served, recorder)


def expanded_bytes(request) -> int:
    """What parsing a ModelInferRequest's input adds to its size on the wire: typed
    ``uint_contents`` become a pixel buffer and each image's copy (2 bytes an element, from
    an element of 1 or 2 bytes on the wire; converted a chunk at a time, ``_typed_pixels``),
    raw contents each image's copy."""
    extra = 0
    for tensor in getattr(request, "inputs", ()):
        extra += 2 * len(tensor.contents.uint_contents)
    for raw in getattr(request, "raw_input_contents", ()):
        extra += len(raw)
    return extra


def large(request) -> bool:
    """A ModelInferRequest whose input takes more than a few milliseconds to turn into
    images (counted without reading it): parsed in the pool, not on the event loop."""
    size = sum(len(raw) for raw in request.raw_input_contents)
    for tensor in request.inputs:
        contents = tensor.contents
        size += len(contents.uint_contents) + len(contents.bytes_contents) * 64
    return size > calls.SMALL_REQUEST


def batch_of(request) -> int:
    """A call's item count for the access log: a ModelInferRequest's images (its input's first
    dimension, as the request states it); 0 for the other RPCs."""
    for tensor in getattr(request, "inputs", ()):
        if tensor.name == INPUT and tensor.shape:
            return max(0, int(tensor.shape[0]))
    return 0


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, served: grpc.GenericRpcHandler, recorder: calls.Recorder) -> None:
        self._served = served
        self._recorder = recorder

    def service(self, handler_call_details):
        found = self._served.service(handler_call_details)
        method = handler_call_details.method or ""
        if found is not None or not method.startswith(f"/{SERVICE}/"):
            return found
        rpc = method.rsplit("/", 1)[-1]

        async def refuse(requests, context, frames):
            raise Unimplemented(
                f"{SERVICE}/{rpc} is not served by camserve; it serves ServerLive, ServerReady, "
                "ModelReady, ServerMetadata, ModelMetadata, ModelInfer, ModelConfig and the "
                "Repository RPCs (docs/oip.md)", reason="UNIMPLEMENTED")
            yield  # an async generator, as calls.streaming expects

        # A streaming handler answers unary and streaming calls alike, without reading them.
        return grpc.stream_stream_rpc_method_handler(
            calls.streaming(rpc, refuse, self._recorder), request_deserializer=None,
            response_serializer=None)


class OipService:
    """The handlers; they share CamserveService's state and models."""

    def __init__(self, service: CamserveService, model_name: str) -> None:
        self._service = service
        self.model_name = model_name  # the repository of one's model (--oip-model-name)

    def methods(self) -> dict:
        """RPC name → (handler, request type, response type, streaming), for calls.py."""
        m, r = messages(), repository_pb2
        return {
            "ServerLive": (self.ServerLive, m.ServerLiveRequest, m.ServerLiveResponse, False),
            "ServerReady": (self.ServerReady, m.ServerReadyRequest, m.ServerReadyResponse,
                            False),
            "ModelReady": (self.ModelReady, m.ModelReadyRequest, m.ModelReadyResponse, False),
            "ServerMetadata": (self.ServerMetadata, m.ServerMetadataRequest,
                               m.ServerMetadataResponse, False),
            "ModelMetadata": (self.ModelMetadata, m.ModelMetadataRequest,
                              m.ModelMetadataResponse, False),
            "ModelInfer": (self.ModelInfer, m.ModelInferRequest, m.ModelInferResponse, False),
            "ModelConfig": (self.ModelConfig, model_config_pb2.ModelConfigRequest,
                            model_config_pb2.ModelConfigResponse, False),
            "RepositoryIndex": (self.RepositoryIndex, r.RepositoryIndexRequest,
                                r.RepositoryIndexResponse, False),
            "RepositoryModelLoad": (self.RepositoryModelLoad, r.RepositoryModelLoadRequest,
                                    r.RepositoryModelLoadResponse, False),
            "RepositoryModelUnload": (self.RepositoryModelUnload,
                                      r.RepositoryModelUnloadRequest,
                                      r.RepositoryModelUnloadResponse, False),
        }

    def _ready(self) -> bool:
        return self._service.state == pb.SERVER_STATE_SERVING

    def _ref(self, name: str, version: str, field: str = "name") -> pb.ModelRef:
        """The model and version an OIP call names, as camserve's ModelRef."""
        if not name:
            names = self._names()
            raise InvalidArgument(f"{field} is empty: name the model; this server serves "
                                  f"{names}", field=field, reason="NO_MODEL")
        version_field = field.replace("name", "version")
        if version and not (version.isdigit() and int(version) > 0):
            raise NotFound(f"model {quote(name)} has no version {quote(version)}: a version "
                           "is a positive number (or leave it empty)", field=version_field,
                           reason="UNKNOWN_VERSION")
        return pb.ModelRef(name=name, version=int(version or 0))

    def _names(self) -> str:
        models = self._service.models
        names = sorted({s.name for s in models.statuses()}) if models else [self.model_name]
        return ", ".join(repr(n) for n in names)

    async def ServerLive(self, request, context):
        return messages().ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return messages().ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request, context):
        ref = self._ref(request.name, request.version)
        try:
            with self._service.live(ref, "name"):
                return messages().ModelReadyResponse(ready=self._ready())
        except (Unavailable, FailedPrecondition):  # loading, unloading, failed, draining
            return messages().ModelReadyResponse(ready=False)
        except NotFound as exc:
            if exc.reason == "MODEL_NOT_LOADED":
                return messages().ModelReadyResponse(ready=False)
            raise

    async def ServerMetadata(self, request, context):
        return messages().ServerMetadataResponse(name="camserve", version=__version__,
                                                 extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        with self._service.live(self._ref(request.name, request.version), "name") as rt:
            m = messages().ModelMetadataResponse
            tensors = [m.TensorMetadata(name=name, datatype=datatype, shape=shape)
                       for name, datatype, shape in signature(rt)]
            versions = [str(s.version) for s in self._service.models.of(rt.ref.name)
                        if s.state == pb.MODEL_STATE_READY]
            return m(name=rt.ref.name, versions=versions, platform=PLATFORM,
                     inputs=tensors[:1], outputs=tensors[1:])

    async def ModelConfig(self, request, context):
        with self._service.live(self._ref(request.name, request.version), "name") as rt:
            return model_config_pb2.ModelConfigResponse(config=model_config_pb2.ModelConfig(
                name=rt.ref.name, platform=PLATFORM,
                max_batch_size=rt.limits.max_images_per_request))

    async def ModelInfer(self, request, context):
        ref = self._ref(request.model_name, request.model_version, "model_name")
        with self._service.live(ref, "model_name") as rt:
            call = await rt.in_pool(infer_call, request, rt) if large(request) else \
                infer_call(request, rt)
            if call.plan is not None:
                _, outcomes = await rt.explain(call.sources, call.plan, context, field=INPUT,
                                               level=call.level)
            else:
                _, outcomes = await rt.predict(call.sources, context, field=INPUT,
                                               level=call.level)
            tensors = output_tensors([o.result for o in outcomes], rt.model.labels, call)
            answer = messages().ModelInferResponse(model_name=rt.ref.name,
                                                   model_version=str(rt.ref.version),
                                                   id=request.id)
            for tensor in tensors:
                answer.outputs.add(name=tensor.name, datatype=tensor.datatype,
                                   shape=tensor.shape)
                answer.raw_output_contents.append(tensor.data)
            return answer

    # --- Triton's model-repository extension ---------------------------------------------------

    async def RepositoryIndex(self, request, context):
        index = repository_pb2.RepositoryIndexResponse
        models = self._service.models
        statuses = models.statuses(request.ready) if models is not None else []
        return index(models=[index.ModelIndex(
            name=s.name, version=str(s.version) if s.version else "",
            state=TRITON_STATES[s.state], reason=s.error or (
                "unloaded" if s.state == pb.MODEL_STATE_UNLOADED else ""))
            for s in statuses])

    async def RepositoryModelLoad(self, request, context):
        if request.parameters:
            names = ", ".join(sorted(request.parameters))
            raise InvalidArgument(f"load parameters ({names}) are not taken: camserve loads "
                                  "a model from its folder's config.toml", field="parameters",
                                  reason="UNKNOWN_PARAMETER")
        await self._service.LoadModel(pb.LoadModelRequest(name=request.model_name), context)
        return repository_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._service.UnloadModel(pb.UnloadModelRequest(name=request.model_name),
                                        context)
        return repository_pb2.RepositoryModelUnloadResponse()


# Triton's words for a version's state in RepositoryIndex.
TRITON_STATES = {pb.MODEL_STATE_UNSPECIFIED: "UNKNOWN", pb.MODEL_STATE_LOADING: "LOADING",
                 pb.MODEL_STATE_READY: "READY", pb.MODEL_STATE_UNLOADING: "UNLOADING",
                 pb.MODEL_STATE_FAILED: "UNAVAILABLE", pb.MODEL_STATE_UNLOADED: "UNAVAILABLE"}


# --- tensors in ------------------------------------------------------------------------------


def signature(rt: Pipeline) -> List[Tuple[str, str, List[int]]]:
    """(name, datatype, shape) of the input, then of each output; -1: any size."""
    model = rt.model
    tensors = [(INPUT, "BYTES", [-1, 1]), (PROBABILITIES, "FP32", [-1, model.num_classes]),
               (TOP_INDICES, "INT64", [-1, -1]), (TOP_LABELS, "BYTES", [-1, -1])]
    if model.layers:
        grids = {(info.height, info.width) for info in model.layers}
        h, w = grids.pop() if len(grids) == 1 else (-1, -1)
        tensors += [(RAW_MAP, "FP32", [-1, h, w]), (TARGET, "INT64", [-1])]
    return tensors


@dataclass(frozen=True)
class InferCall:
    """A ModelInferRequest, validated."""

    sources: List[Source]
    top_k: int
    plan: Optional[req.ExplainPlan]  # None: classify only
    outputs: Tuple[str, ...]  # the output tensors to answer, in order
    level: int = INTERACTIVE  # the queue level of its images (the priority parameter)


def infer_call(request, rt: Pipeline) -> InferCall:
    params = dict(request.parameters)
    for name in params:
        if (name not in PARAMETERS and name not in IGNORED_PARAMETERS
                and not name.startswith(IGNORED_PREFIX)):
            raise InvalidArgument(f"parameter {quote(name)} is not one this model takes; "
                                  f"use {', '.join(PARAMETERS)} (docs/oip.md)",
                                  field=f"parameters[{name}]", reason="UNKNOWN_PARAMETER")
    try:
        top_k = rt.top_k(_int_param(params, "top_k"), "parameters[top_k]")
        level = rt.level(_int_param(params, "priority") or 0, field="parameters[priority]")
    except InvalidArgument as exc:
        raise _as_parameters(exc) from None

    known = CLASSIFY_OUTPUTS + (EXPLAIN_OUTPUTS if rt.model.layers else ())
    asked = _requested(request.outputs, known)
    explain = _bool_param(params, "explain")
    reasons = [f"parameter {n}" for n in EXPLAIN_PARAMETERS if n in params] + [
        f"output {n}" for n in asked if n in EXPLAIN_OUTPUTS]
    if explain is False and reasons:
        raise InvalidArgument(f"parameter explain is false, but the request sets "
                              f"{' and '.join(reasons)}: drop them, or set explain to true",
                              field="parameters[explain]", reason="INVALID_PARAMETER")
    plan = None
    if explain or (explain is None and reasons):
        plan = _plan(params, rt)
    outputs = asked or (CLASSIFY_OUTPUTS + (EXPLAIN_OUTPUTS if plan is not None else ()))
    return InferCall(_sources(request, rt), top_k, plan, outputs, level)


def _param(params, name: str, kinds: Sequence[str], wanted: str):
    if name not in params:
        return None
    value = params[name]
    kind = value.WhichOneof("parameter_choice")
    if kind not in kinds:
        raise InvalidArgument(f"parameter {name} must be {wanted}, not "
                              f"{kind.replace('_param', '') if kind else 'empty'}",
                              field=f"parameters[{name}]", reason="INVALID_PARAMETER")
    return getattr(value, kind)


def _int_param(params, name: str) -> Optional[int]:
    return _param(params, name, ("int64_param", "uint64_param"), "an int64")


def _bool_param(params, name: str) -> Optional[bool]:
    return _param(params, name, ("bool_param",), "a bool")


def _str_param(params, name: str) -> Optional[str]:
    return _param(params, name, ("string_param",), "a string")


def _requested(outputs, known: Tuple[str, ...]) -> Tuple[str, ...]:
    names = []
    for i, output in enumerate(outputs):
        if output.name not in known:
            raise InvalidArgument(f"outputs[{i}] asks for {quote(output.name)}, which this "
                                  f"model does not have; choose from {', '.join(known)}",
                                  field=f"outputs[{i}]", reason="UNKNOWN_OUTPUT")
        for key in output.parameters:
            if key == "binary_data":  # HTTP's binary extension: outputs here are always raw
                continue
            hint = (": ask for top_indices and top_labels, with the request parameter top_k"
                    if key == "classification" else "")
            raise InvalidArgument(f"outputs[{i}] has parameter {quote(key)}, which this model "
                                  f"does not take{hint}", field=f"outputs[{i}].parameters",
                                  reason="INVALID_PARAMETER")
        names.append(output.name)
    return tuple(dict.fromkeys(names))


# What the pipeline's checks call the options a request's parameters set: (in its messages,
# in its fields).
_PARAMETERS = (("options.targets[0].class_index", "target"), ("options.targets[0].label", "target"),
               ("options.targets[0]", "target"), ("options.methods[0]", "method"),
               ("options.layers[0]", "layer"), ("parameters[top_k]", "top_k"))


def _as_parameters(error: InvalidArgument) -> InvalidArgument:
    return req.renamed(error, [(old, f"parameter {new}") for old, new in _PARAMETERS],
                       [(old, f"parameters[{new}]") for old, new in _PARAMETERS])


def _plan(params, rt: Pipeline) -> req.ExplainPlan:
    """The explanation the parameters ask for, as an ExplainOptions the pipeline checks."""
    options = pb.ExplainOptions()
    method = _str_param(params, "method")
    if method is not None:
        try:
            options.methods.append(method_value(method))
        except ValueError:
            raise InvalidArgument(f"parameter method {quote(method)} is not a CAM method "
                                  f"served here; choose from {', '.join(METHODS)}",
                                  field="parameters[method]", reason="UNKNOWN_METHOD") from None
    layer = _str_param(params, "layer")
    if layer is not None:
        options.layers.append(layer)
    target = _param(params, "target", ("int64_param", "string_param"),
                    "a class index (int64) or a label (string)")
    if isinstance(target, str):
        options.targets.add(label=target)
    elif target is not None:
        # A class_index holds no negative number: one past the last class is as wrong.
        options.targets.add(class_index=target if target >= 0 else rt.model.num_classes)
    try:
        return rt.explain_plan(options)
    except InvalidArgument as exc:
        raise _as_parameters(exc) from None


def _sources(request, rt: Pipeline) -> List[Source]:
    """The images of the request's one input tensor, as Predict's sources."""
    names = [tensor.name for tensor in request.inputs]
    if INPUT not in names:
        got = f"its inputs are {', '.join(quote(n) for n in names)}" if names else "it has none"
        raise InvalidArgument(f"the request has no input {INPUT!r} ({got}); send the images as "
                              f"input {INPUT!r}: BYTES [N] or [N, 1] (encoded image files) "
                              "or UINT8 [N, H, W, 3] (RGB pixels)", field="inputs",
                              reason="MISSING_INPUT")
    if len(names) > 1:
        raise InvalidArgument(f"the request has inputs {', '.join(quote(n) for n in names)}; "
                              f"this model takes one, {INPUT!r}", field="inputs",
                              reason="UNKNOWN_INPUT")
    raw = request.raw_input_contents
    if len(raw) > 1:
        raise InvalidArgument(f"the request has {len(raw)} raw_input_contents for 1 input",
                              field="raw_input_contents", reason="INVALID_TENSOR")
    tensor = request.inputs[0]
    shape = [int(d) for d in tensor.shape]
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {INPUT} has shape {shape}; dimensions cannot be negative",
                              field=f"inputs[{INPUT}].shape", reason="INVALID_SHAPE")
    if shape:
        rt.count(shape[0], f"inputs[{INPUT}].shape")
    contents = tensor.contents
    typed = any(len(getattr(contents, f.name)) for f in contents.DESCRIPTOR.fields)
    if raw and typed:
        raise InvalidArgument(f"input {INPUT} has both contents and raw_input_contents; send "
                              "one", field=f"inputs[{INPUT}].contents", reason="INVALID_TENSOR")
    if tensor.datatype == "BYTES":
        return _encoded(shape, raw[0] if raw else None, contents)
    if tensor.datatype == "UINT8":
        return _pixels(shape, raw[0] if raw else None, contents)
    raise InvalidArgument(f"input {INPUT} is {quote(tensor.datatype)}; send BYTES [N] or "
                          "[N, 1] (encoded image files: JPEG, PNG, WebP, BMP, GIF) or UINT8 "
                          "[N, H, W, 3] (RGB pixels)", field=f"inputs[{INPUT}].datatype",
                          reason="INVALID_DATATYPE")


def _encoded(shape: List[int], raw: Optional[bytes], contents) -> List[Source]:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidArgument(f"input {INPUT} is BYTES of shape {shape}; BYTES images have "
                              "shape [N] or [N, 1]: one encoded file per image",
                              field=f"inputs[{INPUT}].shape", reason="INVALID_SHAPE")
    count = shape[0]  # already within max_images_per_request
    if raw is None and len(contents.bytes_contents) != count:
        raise _miscounted(shape, len(contents.bytes_contents))
    elements = _split(raw, count) if raw is not None else list(contents.bytes_contents)
    if len(elements) != count:
        raise _miscounted(shape, len(elements) if len(elements) < count else f"more than {count}")
    return elements


def _miscounted(shape: List[int], held: object) -> InvalidArgument:
    return InvalidArgument(f"input {INPUT} has shape {shape} but holds {held} elements",
                           field=f"inputs[{INPUT}]", reason="INVALID_TENSOR")


def _split(raw: bytes, count: int) -> List[bytes]:
    """A raw BYTES tensor's elements: each a 4-byte little-endian length, then the bytes. It
    stops at ``count`` + 1 (one more than the shape says), leaving the rest unsplit."""
    elements, offset = [], 0
    while offset < len(raw) and len(elements) <= count:
        if offset + _LENGTH.size > len(raw):
            raise _truncated(offset)
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise _truncated(offset)
        elements.append(bytes(raw[offset:offset + length]))
        offset += length
    return elements


def _truncated(offset: int) -> InvalidArgument:
    return InvalidArgument(f"input {INPUT}'s raw contents end inside an element (at byte "
                           f"{offset}): a raw BYTES tensor is, per element, its length as 4 "
                           "bytes little-endian, then its bytes",
                           field="raw_input_contents[0]", reason="INVALID_TENSOR")


def _pixels(shape: List[int], raw: Optional[bytes], contents) -> List[Source]:
    if len(shape) != 4 or shape[3] not in (1, 3, 4):
        raise InvalidArgument(f"input {INPUT} is UINT8 of shape {shape}; pixels have shape "
                              "[N, H, W, 3] (RGB; also 1 gray or 4 RGBA channels)",
                              field=f"inputs[{INPUT}].shape", reason="INVALID_SHAPE")
    n, h, w, c = shape
    size = h * w * c
    if raw is None:
        held = len(contents.uint_contents)
        if held != n * size:
            raise InvalidArgument(f"input {INPUT} has shape {shape}, which needs {n * size:,} "
                                  f"elements, but holds {held:,}", field=f"inputs[{INPUT}]",
                                  reason="INVALID_TENSOR")
        raw = _typed_pixels(contents.uint_contents)
    if len(raw) != n * size:
        raise InvalidArgument(f"input {INPUT} has shape {shape}, which needs {n * size:,} bytes, "
                              f"but holds {len(raw):,}", field=f"inputs[{INPUT}]",
                              reason="INVALID_TENSOR")
    return [RawPixels(bytes(raw[i * size:(i + 1) * size]), h, w, c) for i in range(n)]


TYPED_CHUNK = 1 << 20  # typed elements converted at a time: 8 MB as uint64


def _typed_pixels(values) -> np.ndarray:
    """``uint_contents`` as uint8 bytes, a chunk at a time (never all of them as uint64)."""
    out = np.empty(len(values), np.uint8)
    for start in range(0, len(values), TYPED_CHUNK):
        chunk = np.asarray(values[start:start + TYPED_CHUNK], dtype=np.uint64)
        if chunk.size and chunk.max() > 255:
            raise InvalidArgument(f"input {INPUT} is UINT8 but holds {int(chunk.max())}",
                                  field=f"inputs[{INPUT}].contents", reason="INVALID_TENSOR")
        out[start:start + len(chunk)] = chunk
    return out


# --- tensors out -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: Tuple[int, ...]
    data: bytes  # raw contents: little-endian, row-major


def output_tensors(results, labels: Sequence[str], call: InferCall) -> List[Tensor]:
    probabilities = np.stack([r.probabilities for r in results]).astype("<f4")
    top = np.stack([ranked(r.probabilities, call.top_k) for r in results])
    made: Dict[str, Tensor] = {
        PROBABILITIES: Tensor(PROBABILITIES, "FP32", probabilities.shape,
                              probabilities.tobytes()),
        TOP_INDICES: Tensor(TOP_INDICES, "INT64", top.shape, top.astype("<i8").tobytes()),
        TOP_LABELS: Tensor(TOP_LABELS, "BYTES", top.shape, _joined(
            labels[i].encode() for i in top.ravel())),
    }
    if call.plan is not None:
        maps = [r.maps[0] for r in results]
        raw = np.stack([m.raw for m in maps]).astype("<f4")
        made[RAW_MAP] = Tensor(RAW_MAP, "FP32", raw.shape, raw.tobytes())
        made[TARGET] = Tensor(TARGET, "INT64", (len(maps),),
                              np.array([m.target for m in maps], "<i8").tobytes())
    return [made[name] for name in call.outputs]


def _joined(elements) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)
