"""
Where the Docker engine is: parse an engine address into a client endpoint factory.

Accepted forms: a unix socket path (``/var/run/docker.sock``), ``unix:PATH``, ``unix://PATH``
(``DOCKER_HOST``'s form), and ``tcp:HOST:PORT`` or ``tcp://HOST:PORT`` — over TLS when a CA is
given (and a client certificate and key for engines that ask for one, as ``dockerd --tlsverify``
does).
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import urlsplit

import attrs
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint


class BadEngineAddress(ValueError):
    """The engine address is not one of the accepted forms."""


@attrs.frozen
class EngineAddress:
    """A parsed engine address: a unix socket ``path``, or a TCP ``host`` and ``port``."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        return f"tcp://{self.host}:{self.port}"


def parse_engine_address(value: str) -> EngineAddress:
    """Parse ``value``; raise ``BadEngineAddress`` naming the problem."""
    value = value.strip()
    if not value:
        raise BadEngineAddress("the Docker engine address is empty")
    if value.startswith("/"):
        return EngineAddress(path=value)
    if value.startswith("unix:"):
        rest = value[len("unix:"):]
        path = rest[2:] if rest.startswith("//") else rest
        if not path.startswith("/"):
            raise BadEngineAddress(f"a unix engine address needs an absolute path: {value!r}")
        return EngineAddress(path=path)
    if value.startswith("tcp:"):
        rest = value[len("tcp:"):]
        if rest.startswith("//"):
            split = urlsplit("tcp:" + rest)
            try:
                host, port = split.hostname, split.port
            except ValueError:
                raise BadEngineAddress(f"a tcp engine address needs a host and a valid port: {value!r}") from None
        else:
            host, _, port_text = rest.rpartition(":")
            host = host.strip("[]")
            port = int(port_text) if port_text.isdigit() else None
        if not host or port is None or not 0 < port < 65536:
            raise BadEngineAddress(f"a tcp engine address needs a host and a port: {value!r}")
        return EngineAddress(host=host, port=port)
    raise BadEngineAddress(
        f"unsupported Docker engine address {value!r}: use a socket path, unix:PATH or tcp:HOST:PORT"
    )


def endpoint_factory(
    reactor: Any,
    address: EngineAddress,
    tls_ca: bytes | None = None,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
) -> Callable[[], IStreamClientEndpoint]:
    """
    A function making a fresh client endpoint to ``address`` for each connection.

    With ``tls_ca`` (PEM) a TCP engine is reached over TLS, verified against that CA; ``tls_cert``
    and ``tls_key`` (PEM) are the client's certificate for engines that require one.
    """
    if address.path is not None:
        path = address.path
        return lambda: UNIXClientEndpoint(reactor, path, timeout=10)
    host, port = address.host, address.port
    assert host is not None and port is not None
    if tls_ca is None:
        return lambda: HostnameEndpoint(reactor, host, port, timeout=10)
    from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

    trust = Certificate.loadPEM(tls_ca)
    client = PrivateCertificate.loadPEM(tls_cert + b"\n" + tls_key) if tls_cert and tls_key else None
    options = optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)
    return lambda: wrapClientTLS(options, HostnameEndpoint(reactor, host, port, timeout=10))
