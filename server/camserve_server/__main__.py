"""``camserve-server`` / ``python -m camserve_server``: run the server until SIGTERM or SIGINT.

The first signal drains (calls in flight get ``--grace-s`` to finish); a second one stops at
once, cutting off what is left, and the exit status is 130. With ``--workers N`` (N > 1) this
process supervises N worker processes (process/workers.py), each of them this same command
with ``--worker-index``."""

from __future__ import annotations

import importlib.util
import logging
import signal
import sys
import threading
from typing import Optional, Sequence

from .process import logs
from .process.settings import HEARTBEAT_S, parse_settings

# What `pip install camserve` lacks and the server needs (camserve[server]), checked before
# anything is imported.
SERVER_MODULES = ("torch", "torchvision", "timm", "grpc_reflection", "prometheus_client",
                  "starlette", "uvicorn")
EXIT_INTERRUPTED = 130  # a second signal: stopped without draining (128 + SIGINT)


class Shutdown:
    """SIGTERM and SIGINT: the first sets ``stop`` (drain), the second sets ``now`` and calls
    ``on_now`` (stop at once); before anything can be stopped, it exits."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.now = threading.Event()
        self.on_now = None

    def __call__(self, signum, frame) -> None:
        if not self.stop.is_set():
            self.stop.set()
            return
        self.now.set()
        if self.on_now is None:
            raise SystemExit(EXIT_INTERRUPTED)
        self.on_now()


def _missing(modules: Sequence[str]) -> Optional[str]:
    """The first of ``modules`` that cannot be imported, found without importing any."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):  # ValueError: blocked (None in sys.modules)
            return name
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_settings(argv)
    missing = _missing(SERVER_MODULES)
    if missing is not None:
        print(f"camserve-server: {missing} is not installed: the server needs camserve's "
              "server extra (torch, torchvision, timm, grpcio-reflection...): "
              "pip install 'camserve[server]', or `make serve` in a checkout", file=sys.stderr)
        return 2
    from .errors import StartupError
    from .process.server import CamServer
    from .process.workers import become_worker, heartbeat, supervise
    logs.configure(settings.log_level, settings.log_format)
    shutdown = Shutdown()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, shutdown)
    if settings.workers > 1 and not settings.worker_index:
        shutdown.on_now = lambda: None  # the supervisor watches shutdown.now itself
        return supervise(settings, argv, shutdown.stop, shutdown.now)
    if settings.worker_index:
        settings = become_worker(settings)

    server = CamServer(settings)
    beat = heartbeat() if settings.worker_index else None
    if beat is not None:  # from the event loop: a loop that stops or sticks stops beating
        server.every(HEARTBEAT_S, beat)
    try:
        port = server.listen()
        # Printed (not only logged) so scripts and tests started with --port 0 find the port.
        print(f"camserve-server listening on {settings.host}:{port}", flush=True)
        if server.metrics_port is not None:
            print(f"camserve-server metrics on {settings.host}:{server.metrics_port}", flush=True)
        if server.http_port is not None:
            print(f"camserve-server http on {settings.host}:{server.http_port}", flush=True)
        server.load()
    except (StartupError, OSError) as exc:
        print(f"camserve-server: {exc}", file=sys.stderr)
        server.stop(grace=0)
        return 2
    shutdown.on_now = server.stop_now
    if not shutdown.stop.is_set():
        print(f"camserve-server serving {settings.model} on {settings.host}:{port}", flush=True)
    while not shutdown.stop.wait(1.0):
        pass
    logging.getLogger("camserve_server").info(
        "signal received: draining (grace %.0fs; a second signal stops at once)",
        settings.grace_s)
    server.stop()
    if shutdown.now.is_set():
        logging.getLogger("camserve_server").warning("stopped at once by a second signal")
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
