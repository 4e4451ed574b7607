"""Typed domain errors: each carries the gRPC status it maps to.

Domain code raises these; :func:`camserve_server.handler.rpc` maps them to a status at the
edge. Anything else that escapes a handler is a bug and answers INTERNAL.
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


class ModelLoadError(Exception):
    """The model, its weights, labels or layers cannot be loaded (raised at start-up)."""
