"""The client's one exception family."""

from __future__ import annotations

from typing import Optional

import grpc


class CamserveError(Exception):
    """A call failed. ``code`` is the ``grpc.StatusCode``; ``details`` the server's message.

    ``retry_after`` (seconds) is set when the server asked the caller to retry later
    (RESOURCE_EXHAUSTED). Problems found before anything is sent (an image the client cannot
    read, an unknown method name) raise this too, with code INVALID_ARGUMENT.
    """

    def __init__(self, code: grpc.StatusCode, details: str,
                 retry_after: Optional[float] = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> CamserveError:
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        details = error.details() if callable(getattr(error, "details", None)) else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", _retry_after(error))


def _retry_after(error: grpc.RpcError) -> Optional[float]:
    """The google.rpc.RetryInfo delay from the rich status details, if the server sent one."""
    metadata = error.trailing_metadata() if callable(
        getattr(error, "trailing_metadata", None)) else None
    for key, value in metadata or ():
        if key != "grpc-status-details-bin":
            continue
        from google.rpc import error_details_pb2, status_pb2

        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a malformed detail is not worth failing the error path for
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.ToNanoseconds() / 1e9
    return None


def invalid(message: str) -> CamserveError:
    return CamserveError(grpc.StatusCode.INVALID_ARGUMENT, message)
