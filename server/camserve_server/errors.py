"""Typed domain errors: each carries the gRPC status it maps to.

Domain code raises these; ``api/calls.py`` turns them into a status with details at the edge
(``reason`` becomes a google.rpc.ErrorInfo, ``field`` a google.rpc.BadRequest violation,
``retry_after_s`` a google.rpc.RetryInfo). Anything else that escapes a handler is a bug and
answers INTERNAL.
"""

from __future__ import annotations

from typing import Optional

import grpc

QUOTE_LIMIT = 60  # characters of caller input an error message repeats


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of caller input, cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


class ServiceError(Exception):
    """An error a caller can act on; ``code`` is the gRPC status it answers with."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(self, message: str, *, retry_after_s: Optional[float] = None,
                 field: Optional[str] = None, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.field = field  # the request field at fault, e.g. "images[2]"
        if reason is not None:
            self.reason = reason

    def at(self, field: str, prefix: str = "") -> ServiceError:
        """The same error about ``field`` (nested inside any field it already names), with
        ``prefix`` before its message."""
        error = type(self)(prefix + self.message, retry_after_s=self.retry_after_s,
                           field=field + ("." + self.field if self.field else ""),
                           reason=self.reason)
        return error


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "NOT_EXPLAINABLE"


class NotFound(ServiceError):
    """What the call names (a model, a version) is not served here."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class Unimplemented(ServiceError):
    """An RPC of a served protocol that this server does not implement."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"


QueueFull = ResourceExhausted


class Unauthenticated(ServiceError):
    """The call carries no accepted bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """The caller is known but may not do this (load or unload models without the admin
    token)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "NOT_ADMIN"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_TOO_SHORT"


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class BatchFailed(ServiceError):
    """The engine failed on the batch this item ran in; other batches are unaffected."""

    code = grpc.StatusCode.INTERNAL
    reason = "BATCH_FAILED"


class OutOfMemory(Exception):
    """The device ran out of memory on a batch; a smaller batch may fit (the batcher splits
    it)."""


class StartupError(Exception):
    """The server cannot start: its model, weights, labels, layers, port or TLS files are
    wrong."""
