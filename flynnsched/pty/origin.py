"""
Which origins may open a terminal: the defence against cross-site WebSocket hijacking.

A browser always sends ``Origin`` on a WebSocket handshake and on a cross-site ``POST``. By
default only the daemon's own origin is allowed, meaning an ``Origin`` whose host and port are
those of the request's ``Host`` header. More origins can be allowed explicitly. A missing or
opaque (``null``) origin is refused.
"""

from __future__ import annotations

from typing import Iterable
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of a serialized origin, lower-cased, or ``None`` if malformed."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def _host_port(host: str, scheme: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(f"//{host.strip()}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


class OriginPolicy:
    """Decides whether a request's ``Origin`` may use the terminal endpoints."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self._allowed: set[tuple[str, str, int]] = set()
        for origin in allowed:
            normalized = normalize_origin(origin)
            if normalized is None:
                raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
            self._allowed.add(normalized)

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether ``origin`` is the origin of ``host`` (the ``Host`` header) or explicitly allowed."""
        if not origin:
            return False
        normalized = normalize_origin(origin)
        if normalized is None:
            return False
        if normalized in self._allowed:
            return True
        if not host:
            return False
        scheme, origin_host, origin_port = normalized
        return _host_port(host, scheme) == (origin_host, origin_port)
