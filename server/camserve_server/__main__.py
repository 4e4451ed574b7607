"""``camserve-server`` / ``python -m camserve_server``: run the server until SIGTERM or SIGINT.

With ``--workers N`` (N > 1) this process supervises N worker processes (process/workers.py),
each of them this same command with ``--worker-index``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Optional, Sequence

from .errors import StartupError
from .process import logs
from .process.settings import parse_settings


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_settings(argv)
    logs.configure(settings.log_level, settings.log_format)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if settings.workers > 1 and not settings.worker_index:
        from .process.workers import supervise

        return supervise(settings, argv, stop)
    if settings.worker_index:
        from .process.workers import become_worker

        settings = become_worker(settings)
    from .process.server import CamServer

    server = CamServer(settings)
    try:
        port = server.listen()
        # Printed (not only logged) so scripts and tests started with --port 0 find the port.
        print(f"camserve-server listening on {settings.host}:{port}", flush=True)
        if server.metrics_port is not None:
            print(f"camserve-server metrics on {settings.host}:{server.metrics_port}", flush=True)
        server.load()
    except (StartupError, OSError) as exc:
        print(f"camserve-server: {exc}", file=sys.stderr)
        server.stop(grace=0)
        return 2
    if not stop.is_set():
        print(f"camserve-server serving {settings.model} on {settings.host}:{port}", flush=True)
    while not stop.wait(1.0):
        pass
    logging.getLogger("camserve_server").info("signal received: draining (grace %.0fs)",
                                              settings.grace_s)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
