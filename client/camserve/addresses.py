"""Server addresses as a caller writes them: the default port, and which targets are gRPC URIs.
Imports nothing of the package, so that both the calls and the errors can use it."""

from __future__ import annotations

import ipaddress

DEFAULT_PORT = 50051
URI_PREFIXES = ("unix:", "ipv4:", "ipv6:", "dns:")


def is_uri(target: str) -> bool:
    """Whether ``target`` is a gRPC URI (``dns:///name:port``, ``unix:path``, ...), which is
    dialled as it is."""
    return "://" in target or target.startswith(URI_PREFIXES)


def with_port(address: str) -> str:
    """``host`` → ``host:50051``; addresses that name a port are kept."""
    address = address.strip()
    if address.startswith("["):  # [ipv6] or [ipv6]:port
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    if address.count(":") == 1:
        return address
    try:
        ipaddress.IPv6Address(address)
        return f"[{address}]:{DEFAULT_PORT}"
    except ValueError:
        return f"{address}:{DEFAULT_PORT}"


def shown(target: str) -> str:
    """The address dialled, as a person would write it: a port-less host gets the default port
    (several addresses, URIs and an empty target are shown as given)."""
    target = target.strip()
    if not target or "," in target or is_uri(target):
        return target
    return with_port(target)
