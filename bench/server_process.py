"""A `camserve-server` subprocess for the benchmarks: started on a free port, its log kept in a
temporary file (shown if it fails to start), stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from typing import Sequence

# A client option: a connection of its own (gRPC would otherwise share one among clients of the
# same target). The kernel spreads connections, not calls, over --workers.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


class Server:
    """``python -m camserve_server`` on 127.0.0.1 with ``model`` (random weights unless it is
    the default model) and ``flags``; returns once it serves. ``port``, ``process``."""

    def __init__(self, model: str, flags: Sequence[str] = ()) -> None:
        weights = [] if model == "efficientnet_lite0" else ["--weights", "random"]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "camserve_server", "--host", "127.0.0.1", "--port", "0",
             "--model", model, *weights, "--log-level", "WARNING", *flags],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.port = 0
        for line in self.process.stdout:
            if line.startswith("camserve-server listening on "):
                self.port = int(line.rsplit(":", 1)[1])
            if line.startswith("camserve-server serving "):
                return
        self.stop()
        raise RuntimeError(f"the server did not start:\n{self.tail()}")

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.log.close()
