"""The ASGI app and its server: camserve's JSON API (camserve_json.py), the Open Inference
Protocol over REST (oip_rest.py), WebSocket streams (websocket.py), ``/metrics``,
``/openapi.json`` and the explorer page (static/), on uvicorn, on the gRPC server's event loop.

:class:`HttpServer` binds its socket itself (so port 0 picks a free port, and a worker of
``--workers`` shares the port with SO_REUSEPORT as gRPC does), with the gRPC port's TLS and
client certificates, and runs ``uvicorn.Server.serve`` as a task on the running loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ...errors import InvalidArgument, NotFound, ServiceError
from ..servicer import SERVICE
from . import camserve_json, oip_rest, openapi, websocket
from .gateway import Gateway, service_error

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STOP_S = 1.0  # after the grace: how long the cut-off calls' answers may take to go out


@dataclass(frozen=True)
class HttpOptions:
    """What the HTTP server needs of the settings."""

    host: str
    port: int
    max_message_bytes: int
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_client_ca: Optional[str] = None
    reuse_port: bool = False  # a worker of --workers: the port is shared


def build_app(gateway: Gateway, registry, tokens: Tuple[str, ...] = ()) -> Starlette:
    """The app: every route, and errors (unknown path, method not allowed, bugs) as
    google.rpc.Status JSON."""
    document = openapi.document(gateway)

    async def spec(request: Request) -> Response:
        return JSONResponse(document)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def metrics(request: Request) -> Response:
        if tokens and not _token_ok(request.headers.get("authorization", ""), tokens):
            return Response("send a token as Authorization: Bearer\n", status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [*camserve_json.routes(gateway), *oip_rest.routes(gateway),
              *websocket.routes(gateway),
              Route("/openapi.json", spec, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]),
              Route("/", page, methods=["GET"]),
              Mount("/explorer", app=StaticFiles(directory=str(STATIC)), name="explorer")]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            allowed = exc.headers.get("Allow", "") if exc.headers else ""
            error = InvalidArgument(f"{request.method} is not allowed on {request.url.path}; "
                                    f"it answers {allowed or 'other methods'}",
                                    reason="METHOD_NOT_ALLOWED")
            answer = service_error(error, oip=request.url.path.startswith("/v2"))
            if allowed:
                answer.headers["Allow"] = allowed
            return answer
        if exc.status_code == 404:
            return service_error(NotFound(
                f"no such path: {request.url.path[:200]}; the API is under /v1 (camserve), "
                "/v2 (Open Inference Protocol), described at /openapi.json",
                reason="UNKNOWN_PATH"), oip=request.url.path.startswith("/v2"))
        return JSONResponse({"code": 2, "message": str(exc.detail)},
                            status_code=exc.status_code)

    async def bug(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error in HTTP %s %s", request.method, request.url.path)
        return service_error(ServiceError("internal error; the server log has details"))

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                        Exception: bug})


def _token_ok(header: str, tokens: Tuple[str, ...]) -> bool:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = token.strip().encode()
    return any(hmac.compare_digest(given, t.encode()) for t in tokens)


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; port 0 picks a free one. Raises OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer:
    """uvicorn serving ``app`` on the running event loop (start and stop from it)."""

    def __init__(self, app, options: HttpOptions,
                 on_stop: Optional[Callable[[], None]] = None) -> None:
        import uvicorn

        self.options = options
        self._socket: Optional[socket.socket] = None
        self._task: Optional[asyncio.Task] = None
        kwargs = {}
        if options.tls_cert is not None:
            kwargs.update(ssl_certfile=options.tls_cert, ssl_keyfile=options.tls_key)
            if options.tls_client_ca is not None:
                kwargs.update(ssl_ca_certs=options.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, server_header=False,
            ws_max_size=options.max_message_bytes, ws_per_message_deflate=False,
            timeout_graceful_shutdown=None, **kwargs)
        self._server = uvicorn.Server(self._config)
        self.port: Optional[int] = None

    async def start(self) -> int:
        """Listen; returns the bound port. Raises OSError when the port cannot be had, and
        ssl.SSLError (or OSError) on bad TLS files."""
        o = self.options
        self._socket = listening_socket(o.host, o.port, o.reuse_port)
        self.port = self._socket.getsockname()[1]
        self._config.load()  # TLS files are read here
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # its error
                raise OSError(f"the HTTP server on port {self.port} stopped at start-up")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting connections, let requests in flight finish within ``grace``
        seconds (the caller cuts off what is left), then close."""
        if self._task is None:
            return
        self._config.timeout_graceful_shutdown = max(0.0, grace) + STOP_S
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 2 * STOP_S + 1.0)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
        except Exception:  # noqa: BLE001 - its errors are logged by uvicorn
            pass
        finally:
            if self._socket is not None:
                self._socket.close()


def serve(service, oip_model_name: str, recorder, inflight, registry, options: HttpOptions,
          tokens: Tuple[str, ...] = (), on_denied=lambda method, context: None) -> HttpServer:
    """The HTTP server of a CamServer: camserve's and the Open Inference Protocol's handlers
    (``service.methods()``, ``OipService.methods()``), wrapped as gRPC wraps them with the same
    recorder (access log, metrics) and in-flight bytes; not started yet (``start``)."""
    from .. import oip

    gateway = Gateway(options.max_message_bytes, recorder, inflight, tokens, on_denied)
    gateway.add(SERVICE, service.methods())
    gateway.add(oip.SERVICE, oip.OipService(service, oip_model_name).methods(),
                items=oip.batch_of, expands=oip.expanded_bytes)
    return HttpServer(build_app(gateway, registry, tokens), options)
