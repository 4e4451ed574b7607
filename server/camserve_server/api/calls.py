"""Where every RPC enters and leaves the server (the interceptor-like layer around handlers).

- Parsing: a request's bytes become its message here. Bytes that are not that message (or
  hold invalid UTF-8), and messages up to 1 MiB over ``--max-message-bytes``, become
  INVALID_ARGUMENT, answered, logged and counted like any other call, instead of gRPC's own
  INTERNAL or RESOURCE_EXHAUSTED. (gRPC refuses a larger message itself, RESOURCE_EXHAUSTED,
  from its length prefix and without reading it: process/server.py OVER_LIMIT_SLACK.)
- Errors: a ServiceError ends the call with its status and rich details (google.rpc
  ErrorInfo, BadRequest, RetryInfo, plus ``grpc-retry-pushback-ms`` for gRPC's own retries);
  anything else is a bug: INTERNAL, logged with its traceback, and the server keeps serving.
- Admission by size: the bytes of unary requests in flight (parsed, decoding, being
  answered) are bounded; a large request that does not fit answers RESOURCE_EXHAUSTED with a
  retry hint, so that many large messages at once cannot exhaust memory. Small requests
  (at most 1 MiB) are always admitted.
- One access-log line and the metrics per call, with the status the caller saw (a call the
  caller cancelled or lost to the server's shutdown is never logged OK).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional, Sequence, Set

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from ..errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from ..metrics import Metrics

log = logging.getLogger(__name__)
access = logging.getLogger("camserve_server.access")

ERROR_DOMAIN = "camserve.dev"
MAX_MESSAGE_CHARS = 1000  # an error message is cut to this length
MAX_FIELD_CHARS = 200  # and the name of the field at fault to this
MAX_REQUEST_ID = 64
_REQUEST_ID = re.compile(r"[^A-Za-z0-9._:/+=@-]")


# The model versions a call uses, as the handler resolved them ((name, version) pairs): the
# access log and the per-model metrics read it. A context variable, so each call's task has its
# own; its default is an empty tuple.
MODELS: contextvars.ContextVar = contextvars.ContextVar("camserve_models", default=())


# Who the running call is, for the queue's turns and per-caller bound (levels.py): set when the
# call starts (Call), read by the pipeline and the streams when they queue items.
CALLER: contextvars.ContextVar = contextvars.ContextVar("camserve_caller", default="")
# Whether the running call holds a --priority-token: it may ask for any priority.
PRIVILEGED: contextvars.ContextVar = contextvars.ContextVar("camserve_privileged",
                                                            default=False)
TENANT_HEADER = "x-camserve-tenant"
MAX_TENANT_CHARS = 64


def caller_of(context, trust_tenant: bool = False) -> str:
    """A call's caller: its ``x-camserve-tenant`` header when the operator trusts it
    (``--tenant-header on``), else its bearer token (a digest of it, never the token), else
    its connection (the peer's address and port)."""
    metadata = context.invocation_metadata() or ()
    if trust_tenant:
        tenant = next((v for k, v in metadata if k == TENANT_HEADER and isinstance(v, str)
                       and v), None)
        if tenant is not None:
            return "tenant:" + tenant[:MAX_TENANT_CHARS]
    token = next((v for k, v in metadata if k == "authorization" and isinstance(v, str)), None)
    if token is not None:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return "peer:" + (context.peer() or "")


def holds(metadata, tokens: Sequence[bytes]) -> bool:
    """Whether a call's metadata sends exactly one ``authorization: Bearer TOKEN`` with one of
    these tokens (compared in constant time)."""
    values = [v for k, v in (metadata or ()) if k == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return False
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = token.strip().encode()
    return any(hmac.compare_digest(given, t) for t in tokens)


def uses_model(name: str, version: int) -> None:
    """Record that the running call uses this model version (servicer.py's live)."""
    MODELS.set(MODELS.get() + ((name, version),))


SMALL_REQUEST = 1 << 20  # bytes: always admitted
BUSY_RETRY_S = 1.0


class InflightBytes:
    """The bytes of unary requests the server holds at once, bounded (event-loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def refusal(self, size: int) -> Optional[ResourceExhausted]:
        """Why a request of ``size`` bytes cannot be admitted now; None when it can (a small
        one always can, and one larger than the limit when nothing else is in)."""
        if size <= SMALL_REQUEST or not self.used or self.used + size <= self.limit:
            return None
        return ResourceExhausted(
            f"the server holds {self.used / 2**20:.0f} MiB of other large requests "
            f"(max_inflight_bytes {self.limit / 2**20:.0f} MiB); retry in {BUSY_RETRY_S:g} s",
            retry_after_s=BUSY_RETRY_S, reason="BUSY_WITH_LARGE")

    def take(self, size: int) -> int:
        """Reserve ``size`` bytes; returns what to give back. Raises ResourceExhausted when a
        large request does not fit."""
        refused = self.refusal(size)
        if refused is not None:
            raise refused
        if size <= SMALL_REQUEST:
            return 0
        self.used += size
        return size

    def give(self, size: int) -> None:
        self.used -= size


@dataclass(frozen=True)
class Malformed:
    """What a request that was not parsed becomes: the handler answers its error."""

    error: ServiceError


@dataclass(frozen=True)
class Unparsed:
    """A large unary request's bytes, parsed by its handler in a thread (parsing tens of MB
    of repeated fields takes a fraction of a second: never on the event loop)."""

    data: bytes
    parse: Callable[[bytes], object]


def parser(message_type, max_bytes: int,
           inflight: Optional[InflightBytes] = None) -> Callable[[bytes], object]:
    """A request deserializer that never raises: a message, or Malformed. With ``inflight``
    (unary calls), a large request that would not be admitted is refused before it is parsed,
    so that its parsed copy never exists (the handler still reserves its bytes), and one that
    would is left Unparsed, for the handler to parse off the event loop."""
    name = message_type.DESCRIPTOR.full_name

    def parse_now(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as exc:  # protobuf's DecodeError, or its UTF-8 checks
            return Malformed(InvalidArgument(
                f"the request is not a valid {name} message ({str(exc)[:120]}); build it "
                "with the .proto's generated code", reason="MALFORMED_REQUEST"))

    def parse(data: bytes):
        busy = inflight.refusal(len(data)) if inflight is not None else None
        if busy is not None:
            return Malformed(busy)
        if len(data) > max_bytes:
            return Malformed(InvalidArgument(
                f"the request is {len(data):,} bytes; this server accepts at most "
                f"{max_bytes:,} (max_message_bytes): send fewer images per call, or send them "
                "encoded (JPEG, PNG) instead of raw pixels", reason="MESSAGE_TOO_LARGE"))
        if inflight is not None and len(data) > SMALL_REQUEST:
            return Unparsed(data, parse_now)
        return parse_now(data)

    return parse


def status_of(error: ServiceError) -> status_pb2.Status:
    """The google.rpc.Status a ServiceError answers with (unary calls and stream frames): its
    message cut to MAX_MESSAGE_CHARS and the field at fault to MAX_FIELD_CHARS (a field's name
    may hold caller input, e.g. an Open Inference Protocol parameter's name)."""
    message = error.message[:MAX_MESSAGE_CHARS]
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)]
    if error.field:
        field = error.field
        if len(field) > MAX_FIELD_CHARS:
            field = field[:MAX_FIELD_CHARS - 3] + "..."
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=error.code.value[0], message=message, details=packed)


async def abort(context, error: ServiceError) -> None:
    """End the call with the error's status and details (raises, as context.abort does)."""
    status = status_of(error)
    metadata = [("grpc-status-details-bin", status.SerializeToString())]
    if error.retry_after_s is not None:
        metadata.append(("grpc-retry-pushback-ms", str(max(1, int(error.retry_after_s * 1000)))))
    await context.abort(error.code, status.message, trailing_metadata=tuple(metadata))


def request_id(context) -> str:
    """The caller's x-request-id, cut to 64 safe characters; a new id when it sent none."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            clean = _REQUEST_ID.sub("", value)[:MAX_REQUEST_ID]
            if clean:
                return clean
    return uuid.uuid4().hex[:16]


class Recorder:
    """Counts each call and writes its access line; knows the calls running, so that the
    end of a shutdown's grace can cut them off with a status of their own."""

    def __init__(self, metrics: Metrics, stopping: Callable[[], bool],
                 trust_tenant: bool = False, priority_tokens: Sequence[str] = ()) -> None:
        self._metrics = metrics
        self._stopping = stopping
        self.trust_tenant = trust_tenant  # --tenant-header: callers named by x-camserve-tenant
        self._priority_tokens = tuple(t.encode() for t in priority_tokens)
        self.running: Set[asyncio.Task] = set()  # the handlers' tasks (event-loop only)
        self.cut = False

    def privileged(self, context) -> bool:
        """Whether the call sends one of the --priority-token tokens (compared in constant
        time)."""
        return bool(self._priority_tokens) and holds(context.invocation_metadata(),
                                                      self._priority_tokens)

    def cut_off(self) -> None:
        """End every running call now: each answers UNAVAILABLE, the server is shutting
        down (a caller retries elsewhere rather than finding a closed port)."""
        self.cut = True
        for task in list(self.running):
            task.cancel()

    def done(self, rpc: str, code: grpc.StatusCode, seconds: float, items: int, rid: str,
             peer: str) -> None:
        self._metrics.requests.labels(rpc, code.name).inc()
        self._metrics.latency.labels(rpc).observe(seconds)
        models = MODELS.get()
        for name, version in models:
            self._metrics.model_requests.labels(name, str(version), rpc, code.name).inc()
        model = ",".join(f"{name}:{version}" for name, version in models)
        access.info("%s %s %.1f ms id=%s items=%d peer=%s%s", rpc, code.name, seconds * 1000.0,
                    rid, items, peer, f" model={model}" if model else "", extra={
                        "request_id": rid, "rpc": rpc, "code": code.name,
                        "ms": round(seconds * 1000.0, 2), "items": items, "peer": peer,
                        "model": model})

    def interrupted(self, call: Call) -> grpc.StatusCode:
        """The status a caller saw for a call that was cut short under its handler."""
        if self._stopping():
            return grpc.StatusCode.UNAVAILABLE
        if call.deadline is not None and time.monotonic() >= call.deadline:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED


class Call:
    """One call's record (``items``: its images, or a stream's frames so far), written
    once: on an error before the status goes out (so that a caller who has seen it also finds
    it in the metrics), otherwise when the handler ends. The request id and peer are read when
    the call starts: gRPC's context of a call that has ended must not be touched (its ``peer()``
    crashes the process after a cancelled stream)."""

    def __init__(self, rpc: str, recorder: Recorder, context) -> None:
        self.rpc, self.recorder = rpc, recorder
        self.request_id, self.peer = request_id(context), context.peer()
        CALLER.set(caller_of(context, recorder.trust_tenant))
        PRIVILEGED.set(recorder.privileged(context))
        self.deadline = deadline(context)
        self.started, self.items, self.recorded = time.perf_counter(), 0, False
        self.task = asyncio.current_task()
        recorder.running.add(self.task)

    def cut_off(self) -> Optional[ServiceError]:
        """Why the call was cancelled under its handler, when the server cut it off."""
        if not self.recorder.cut:
            return None
        return Unavailable("the server is shutting down and its grace period ended before this "
                           "call finished; send it again, to another replica", reason="DRAINING")

    def ended(self) -> None:
        self.recorder.running.discard(self.task)

    def done(self, code: grpc.StatusCode) -> None:
        if not self.recorded:
            self.recorded = True
            self.recorder.done(self.rpc, code, time.perf_counter() - self.started, self.items,
                               self.request_id, self.peer)


async def _cancelled(call: Call, context) -> None:
    """A handler's task was cancelled: by the server's cut-off (answered UNAVAILABLE), or by
    gRPC, for a caller gone or a deadline passed (cancelled on)."""
    error = call.cut_off()
    if error is None:
        call.done(call.recorder.interrupted(call))
        raise  # the CancelledError being handled
    call.done(error.code)
    await abort(context, error)


async def _internal(context, rpc: str) -> None:
    log.exception("unexpected error in %s", rpc)
    await abort(context, ServiceError(f"internal error in {rpc}; the server log has details"))


def images_of(request) -> int:
    """A camserve request's item count for the access log: its images."""
    return len(getattr(request, "images", ()))


def no_expansion(request) -> int:
    return 0


def unary(rpc: str, behavior: Callable[..., Awaitable], recorder: Recorder,
          inflight: InflightBytes, items: Callable[[object], int] = images_of,
          expands: Callable[[object], int] = no_expansion):
    """A unary handler around ``behavior(request, context)``; ``items(request)`` is the count
    the access log shows. The in-flight bytes a request holds are its size on the wire plus
    ``expands(request)``: what its parsing makes of it beyond that (e.g. typed tensor contents
    turned into pixels)."""

    async def handle(request, context):
        call = Call(rpc, recorder, context)
        held = 0
        try:
            if isinstance(request, Unparsed):
                held = inflight.take(len(request.data))
                loop = asyncio.get_running_loop()
                request = await loop.run_in_executor(None, request.parse, request.data)
            if isinstance(request, Malformed):
                raise request.error
            call.items = items(request)
            size = (held or request.ByteSize()) + expands(request)
            inflight.give(held)
            held = 0  # the request's whole size, taken again at once (nothing runs between)
            held = inflight.take(size)
            return await behavior(request, context)
        except ServiceError as exc:
            inflight.give(held)
            held = 0
            call.done(exc.code)  # before the caller can see the status
            await abort(context, exc)
        except asyncio.CancelledError:
            await _cancelled(call, context)
        except Exception:
            call.done(grpc.StatusCode.INTERNAL)
            await _internal(context, rpc)
        finally:
            inflight.give(held)
            call.done(grpc.StatusCode.OK)
            call.ended()

    return handle


def streaming(rpc: str, behavior: Callable[..., AsyncIterator], recorder: Recorder):
    """A bidirectional-stream handler around the async generator
    ``behavior(requests, context, call)``; the behavior counts frames in ``call.items``."""

    async def handle(requests, context):
        call = Call(rpc, recorder, context)
        try:
            async for answer in behavior(requests, context, call):
                if context.done():  # the caller went away: a write would only fail, and gRPC
                    call.done(recorder.interrupted(call))  # would log that as an error
                    return
                yield answer
        except ServiceError as exc:
            call.done(exc.code)
            await abort(context, exc)
        except asyncio.CancelledError:
            await _cancelled(call, context)
        except GeneratorExit:
            call.done(recorder.interrupted(call))
            raise
        except Exception:
            call.done(grpc.StatusCode.INTERNAL)
            await _internal(context, rpc)
        finally:
            call.done(grpc.StatusCode.OK)
            call.ended()

    return handle


def generic_handler(service: str, methods: dict, max_bytes: int, recorder: Recorder,
                    inflight: InflightBytes, items: Callable[[object], int] = images_of,
                    expands: Callable[[object], int] = no_expansion) -> grpc.GenericRpcHandler:
    """The gRPC handler of one service: ``methods`` maps each RPC name to (behavior, request
    type, response type, streaming); ``items`` counts a unary request's items and
    ``expands`` the bytes its parsing adds (``unary``)."""
    handlers = {}
    for name, (behavior, request_type, response_type, streaming_rpc) in methods.items():
        kwargs = {"response_serializer": response_type.SerializeToString}
        if streaming_rpc:
            handlers[name] = grpc.stream_stream_rpc_method_handler(
                streaming(name, behavior, recorder),
                request_deserializer=parser(request_type, max_bytes), **kwargs)
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                unary(name, behavior, recorder, inflight, items, expands),
                request_deserializer=parser(request_type, max_bytes, inflight), **kwargs)
    return grpc.method_handlers_generic_handler(service, handlers)


def deadline(context) -> Optional[float]:
    """The call's deadline as a time.monotonic() value; None when it has none."""
    remaining = context.time_remaining()
    # gRPC reports "no deadline" as None or as a time centuries away.
    if remaining is None or remaining > 1e6:
        return None
    return time.monotonic() + remaining
