"""Typed domain errors: each carries the gRPC status it maps to.

Domain code raises these; the API's call wrappers map them to a status at the edge. Anything
else that escapes a handler is a bug and answers INTERNAL.
"""

from __future__ import annotations

from typing import Optional

import grpc


class ServiceError(Exception):
    """An error a caller can act on; ``code`` is the gRPC status it answers with."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_s: Optional[float] = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class QueueFull(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class BatchFailed(ServiceError):
    """The engine failed on the batch this item ran in; other batches are unaffected."""

    code = grpc.StatusCode.INTERNAL


class OutOfMemory(Exception):
    """The device ran out of memory on a batch; a smaller batch may fit (the batcher splits
    it)."""


class StartupError(Exception):
    """The server cannot start: its model, weights, labels, layers or TLS files are wrong."""


def abort(context, error: ServiceError) -> None:
    """End the RPC with the error's status. A retry hint travels as google.rpc.RetryInfo in
    the rich status details (grpcio-status), which the client reads back."""
    if error.retry_after_s is None:
        context.abort(error.code, error.message)
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(error.retry_after_s * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(
        code=error.code.value[0], message=error.message, details=[detail])))
