"""Logging set-up: one line per event, as text or JSON, at the configured level.

Per-RPC lines come from the ``camserve_server.access`` logger with the fields request_id, rpc,
code, ms, items and peer as record attributes, so the JSON format carries them as keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time

ACCESS_FIELDS = ("request_id", "rpc", "code", "ms", "items", "peer", "model")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class CallerGone(logging.Filter):
    """gRPC logs an ERROR with a traceback when a stream's answer cannot be written because
    its caller has just gone (cancelled, disconnected): an ordinary event, which the access
    line already records as CANCELLED. Such records are lowered to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "ExecuteBatchError" in record.getMessage() \
                or (record.exc_info and record.exc_info[0] is not None
                    and record.exc_info[0].__name__ == "ExecuteBatchError"):
            record.levelno, record.levelname, record.exc_info = logging.DEBUG, "DEBUG", None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc._cython.cygrpc").addFilter(CallerGone())
