"""TLS credentials for the server, from the settings' PEM files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import grpc

from ..errors import StartupError
from .settings import Settings


def server_credentials(settings: Settings) -> Optional[grpc.ServerCredentials]:
    """TLS credentials from the settings' PEM files; None serves plaintext."""
    if settings.tls_cert is None:
        return None
    cert, key = _read(settings.tls_cert), _read(settings.tls_key)
    ca = _read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {path!r}: {exc.strerror}") from None
