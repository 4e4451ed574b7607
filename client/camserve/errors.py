"""The client's one exception family."""

from __future__ import annotations

from typing import Optional, Tuple

import grpc

from . import reasons
from .addresses import shown

_CONNECT_FAILURES = ("failed to connect", "dns resolution failed", "connection refused",
                     "name resolution", "connections to all backends failing",
                     "no address", "could not resolve", "errors resolving")


class CamserveError(Exception):
    """A call failed. ``code`` is the ``grpc.StatusCode``; ``details`` the server's message.

    ``reason`` is a stable word for the cause (e.g. "QUEUE_FULL", "INVALID_IMAGE",
    "TOO_MANY_STREAMS"), one of the keys of ``camserve.REASONS``, which says what each means.
    The server sends it in its status details; problems the client finds before anything is
    sent (an image it cannot read, an unknown method name, a message too large to send) raise
    this too, with code INVALID_ARGUMENT and a reason of the client's, and a server the client
    cannot reach gives UNAVAILABLE with reason "UNREACHABLE". It is empty only when a failure
    came from gRPC itself with no reason (e.g. the call's own deadline passed).

    From the server's status details too: ``field_violations`` lists (field, description)
    pairs naming the request fields at fault (e.g. ("images[2]", ...)); ``retry_after``
    (seconds) is set when the server asked the caller to retry later (RESOURCE_EXHAUSTED).
    """

    def __init__(self, code: grpc.StatusCode, details: str,
                 retry_after: Optional[float] = None, reason: str = "",
                 field_violations: Tuple[Tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after = retry_after
        self.reason = reason
        self.field_violations = field_violations

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, target: Optional[str] = None) -> CamserveError:
        """From a failed call; ``target`` (the address dialled) makes connection failures
        say where the client tried and how to start a server."""
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        details = error.details() if callable(getattr(error, "details", None)) else str(error)
        code, details = code or grpc.StatusCode.UNKNOWN, details or ""
        unreachable = target is not None and code == grpc.StatusCode.UNAVAILABLE and any(
            text in details.lower() for text in _CONNECT_FAILURES)
        if unreachable:
            details = (f"cannot reach a camserve server at {shown(target)} "
                       f"({_short(details)}); start "
                       "one with `camserve-server` (or `make serve` in a checkout), or pass "
                       "--target HOST:PORT")
        metadata = error.trailing_metadata() if callable(
            getattr(error, "trailing_metadata", None)) else None
        status = None
        for key, value in metadata or ():
            if key == "grpc-status-details-bin":
                from google.rpc import status_pb2

                try:
                    status = status_pb2.Status.FromString(value)
                except Exception:  # a malformed detail is not worth failing the error path for
                    status = None
        found = _details(status)
        if unreachable and not found["reason"]:
            found["reason"] = reasons.UNREACHABLE
        return cls(code, details, **found)

    @classmethod
    def from_status(cls, status) -> CamserveError:
        """From a google.rpc.Status (a stream frame's error)."""
        code = next((c for c in grpc.StatusCode if c.value[0] == status.code),
                    grpc.StatusCode.UNKNOWN)
        return cls(code, status.message, **_details(status))


def _short(details: str) -> str:
    last = details.rsplit(":", 1)[-1].strip(" []")
    return last or details[:80]


def _details(status) -> dict:
    """retry_after, reason and field_violations from a google.rpc.Status's details."""
    out = {"retry_after": None, "reason": "", "field_violations": ()}
    if status is None:
        return out
    from google.rpc import error_details_pb2

    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            out["retry_after"] = info.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            info = error_details_pb2.BadRequest()
            detail.Unpack(info)
            out["field_violations"] = tuple((v.field, v.description)
                                            for v in info.field_violations)
    return out


def invalid(message: str, reason: str) -> CamserveError:
    """An INVALID_ARGUMENT the client raises itself, before anything is sent; ``reason`` is
    one of camserve.REASONS."""
    if reason not in reasons.REASONS:
        raise ValueError(f"{reason!r} is not one of camserve.REASONS")
    return CamserveError(grpc.StatusCode.INVALID_ARGUMENT, message, reason=reason)
