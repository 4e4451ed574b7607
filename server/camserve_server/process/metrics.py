"""Serving the metrics: ``/metrics`` over HTTP(S) on ``--metrics-port`` for one server's
registry (:class:`MetricsEndpoint`, the registry itself is ``camserve_server.metrics``), and the
supervisor's merge of its worker processes' numbers (:class:`SupervisorMetrics`).
"""

from __future__ import annotations

import hmac
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .settings import Settings


class MetricsEndpoint:
    """A registry's /metrics over HTTP, in a thread of its own (see :func:`_serve`)."""

    def __init__(self, registry: CollectorRegistry, settings: Settings) -> None:
        self._http = _serve(registry, settings)

    @property
    def port(self) -> int:
        return self._http.server_port

    @property
    def host(self) -> str:
        """The address it listens on."""
        return self._http.server_address[0]

    def close(self) -> None:
        _shut(self._http)


class SupervisorMetrics:
    """The supervisor's /metrics: its workers' numbers merged from the shared folder, and the
    supervisor's own: ``camserve_worker_up`` (1 while a worker process runs) and
    ``camserve_worker_process_restarts_total``, both by ``worker``. Thread-safe."""

    def __init__(self, path: str, workers: int) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = path
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._up: Dict[int, int] = {i: 0 for i in range(1, workers + 1)}
        self._restarts: Dict[int, int] = {i: 0 for i in range(1, workers + 1)}
        self._endpoint: Optional[MetricsEndpoint] = None
        MultiProcessCollector(self.registry, path=path)
        self.registry.register(self)

    def started(self, worker: int) -> None:
        with self._lock:
            self._up[worker] = 1

    def exited(self, worker: int, pid: int, restarting: bool) -> None:
        """A worker's process ended: its live gauges leave the merge (its counts stay)."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.path)
        with self._lock:
            self._up[worker] = 0
            self._restarts[worker] += 1 if restarting else 0

    def collect(self):
        with self._lock:
            up, restarts = dict(self._up), dict(self._restarts)
        family = GaugeMetricFamily("camserve_worker_up",
                                   "1 while the worker process runs (it may still be loading: "
                                   "see camserve_state)", labels=["worker"])
        for worker, value in up.items():
            family.add_metric([str(worker)], value)
        yield family
        family = CounterMetricFamily("camserve_worker_process_restarts",
                                     "Worker processes restarted after they died",
                                     labels=["worker"])
        for worker, value in restarts.items():
            family.add_metric([str(worker)], value)
        yield family

    def serve(self, settings: Settings) -> int:
        """Expose /metrics (:class:`MetricsEndpoint`); returns the bound port."""
        self._endpoint = MetricsEndpoint(self.registry, settings)
        return self._endpoint.port

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None


def _serve(registry: CollectorRegistry, settings: Settings):
    """/metrics on ``--metrics-host`` (default: ``--host``) and ``--metrics-port``, in a thread.
    Only that path answers (404 elsewhere). With ``--auth-token`` a scrape must send one of the
    tokens as ``Authorization: Bearer``; with ``--tls-cert`` it is HTTPS with the server's
    certificate (and ``--tls-client-ca`` requires a client certificate), so /metrics is never
    less protected than the gRPC port."""
    tokens = [t.encode() for t in settings.auth_tokens]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if urlsplit(self.path).path != "/metrics":
                return self._answer(404, b"only /metrics is served here\n")
            if tokens:
                sent = self.headers.get("Authorization", "")
                token = sent[7:].strip().encode() if sent.startswith("Bearer ") else b""
                if not any(hmac.compare_digest(token, t) for t in tokens):
                    return self._answer(401, b"send a token as Authorization: Bearer\n",
                                        [("WWW-Authenticate", "Bearer")])
            return self._answer(200, generate_latest(registry),
                                [("Content-Type", CONTENT_TYPE_LATEST)])

        def _answer(self, code: int, body: bytes, headers=()) -> None:
            self.send_response(code)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # no access lines for scrapes
            pass

    http = ThreadingHTTPServer((settings.metrics_address, settings.metrics_port), Handler)
    http.daemon_threads = True
    if settings.tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            context.load_verify_locations(settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        # The handshake happens in each request's thread, so that a client that connects and
        # stays silent holds only its own thread, not the accepting one.
        http.socket = context.wrap_socket(http.socket, server_side=True,
                                          do_handshake_on_connect=False)
    threading.Thread(target=http.serve_forever, name="camserve-metrics-http",
                     daemon=True).start()
    return http


def _shut(http) -> None:
    http.shutdown()
    http.server_close()
