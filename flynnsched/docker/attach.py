"""
The hijacked attach: a small raw protocol for ``POST /containers/{id}/attach`` with ``Upgrade: tcp``.

Twisted's HTTP client cannot take over a connection after a ``101``; this protocol writes the
request itself, reads the response head, and from then on passes raw stream bytes to the caller's
protocol. The connection's own transport is the flow control: pausing it stops reading from the
engine, so the engine holds what a slow consumer has not taken yet.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from flynnsched.docker.interface import (
    EngineError,
    EngineUnavailable,
    IAttachment,
    NoSuchContainer,
)

#: The longest response head accepted before the stream starts.
MAX_HEAD = 64 * 1024


#: Reads at least this large come from a stream that is already read in large pieces.
LARGE_READ = 48 * 1024


@implementer(IAttachment, IPushProducer)
class Attachment:
    """
    An ``IAttachment`` over the hijacked connection's transport.

    With a ``clock`` and a ``gather`` delay, two small reads in a row are followed by a pause of
    that many seconds before the next: while output flows, the engine's small frames (a few KiB
    each) gather into one large read, so relaying a stream costs far fewer wakeups and system
    calls. A small read right after a large one is the end of a backlog, not a slow stream, and
    does not pause. Output is never held back: what was read is delivered at once, and only the
    next read waits.
    """

    def __init__(self, transport: Any, clock: IReactorTime | None = None, gather: float = 0.0) -> None:
        self._transport = transport
        self._clock = clock
        self._gather = gather if clock is not None else 0.0
        self._paused = False
        self._gathering: IDelayedCall | None = None
        self._large = False

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def close_stdin(self) -> None:
        self._transport.loseWriteConnection()

    def close(self) -> None:
        self._stop_gathering()
        self._transport.loseConnection()

    def pauseProducing(self) -> None:
        self._paused = True
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._gathering is None:
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self.close()

    def _read(self, size: int) -> None:
        """``size`` bytes were just read: after two small reads in a row, wait before reading again."""
        after_large, self._large = self._large, size >= LARGE_READ
        if not self._gather or self._large or after_large or self._gathering is not None:
            return
        assert self._clock is not None
        self._transport.pauseProducing()
        self._gathering = self._clock.callLater(self._gather, self._gathered)

    def _gathered(self) -> None:
        self._gathering = None
        if not self._paused:
            self._transport.resumeProducing()

    def _stop_gathering(self) -> None:
        if self._gathering is not None:
            if self._gathering.active():
                self._gathering.cancel()
            self._gathering = None


def _error_for(status: int, body: bytes, container_id: str) -> EngineError:
    try:
        message = json.loads(body.decode("utf-8"))["message"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    if status == 404:
        return NoSuchContainer(message, status)
    return EngineError(f"attach to {container_id} failed: {message}", status)


@implementer(IHalfCloseableProtocol)
class HijackProtocol(Protocol):
    """
    Writes the attach request, waits for ``101``, then hands the stream to ``inner``.

    ``attached`` fires with the ``Attachment`` once the engine has switched protocols, or fails
    with a named engine error.
    """

    def __init__(
        self, request: bytes, container_id: str, inner: IProtocol, clock: IReactorTime | None = None,
        gather: float = 0.0,
    ) -> None:
        self._request = request
        self._clock = clock
        self._gather = gather
        self._attachment: Attachment | None = None
        self._container_id = container_id
        self._inner = inner
        self._head = b""
        self._status = 0
        self._error_body: bytes | None = None
        self._content_length: int | None = None
        self.attached: Deferred[Attachment] = Deferred()
        self._streaming = False

    def connectionMade(self) -> None:
        self.transport.write(self._request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._streaming:
            self._inner.dataReceived(data)
            if self._attachment is not None:
                self._attachment._read(len(data))
            return
        if self._error_body is not None:
            self._error_body += data
            self._maybe_fail()
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._fail(EngineError("attach: the engine's response head is too long"))
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        lines = head.split(b"\r\n")
        try:
            self._status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self._fail(EngineError(f"attach: unexpected response {lines[0][:80]!r}"))
            return
        if self._status in (101, 200):
            # 101 after the upgrade; 200 from engines that hijack without announcing it.
            self._streaming = True
            attachment = self._attachment = Attachment(self.transport, self._clock, self._gather)
            self._inner.makeConnection(attachment)  # type: ignore[arg-type]
            self.attached.callback(attachment)
            if rest:
                self._inner.dataReceived(rest)
                attachment._read(len(rest))
            return
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                try:
                    self._content_length = int(value.strip())
                except ValueError:
                    pass
        self._error_body = rest
        self._maybe_fail()

    def _maybe_fail(self) -> None:
        assert self._error_body is not None
        if self._content_length is None or len(self._error_body) >= self._content_length:
            self._fail(_error_for(self._status, self._error_body, self._container_id))

    def _fail(self, error: EngineError) -> None:
        if not self.attached.called:
            self.attached.errback(error)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        # The engine has finished sending: the container's output is complete.
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._attachment is not None:
            self._attachment._stop_gathering()
        if self._streaming:
            self._inner.connectionLost(reason)
        elif not self.attached.called:
            if self._error_body is not None:
                self.attached.errback(_error_for(self._status, self._error_body, self._container_id))
            else:
                self.attached.errback(
                    EngineUnavailable(f"the connection closed before the attach was answered: {reason.value}")
                )


def hijack_attach(
    endpoint: IStreamClientEndpoint,
    path: str,
    container_id: str,
    inner: IProtocol,
    clock: IReactorTime | None = None,
    gather: float = 0.0,
) -> Deferred[Attachment]:
    """
    Connect to ``endpoint``, send ``POST path`` as an upgrade to a raw stream, and pass the stream
    to ``inner``. Fires with the ``Attachment`` once attached; ``clock`` and ``gather`` are the
    ``Attachment``'s.
    """
    request = (
        f"POST {path} HTTP/1.1\r\n"
        "Host: docker\r\n"
        "Content-Type: text/plain\r\n"
        "Content-Length: 0\r\n"
        "Connection: Upgrade\r\n"
        "Upgrade: tcp\r\n"
        "\r\n"
    ).encode("ascii")
    protocol = HijackProtocol(request, container_id, inner, clock, gather)

    def connected(_: object) -> Deferred[Attachment]:
        return protocol.attached

    def unreachable(f: Failure) -> Failure:
        if f.check(EngineError):
            return f
        return Failure(EngineUnavailable(f"cannot reach the Docker engine: {f.getErrorMessage()}"))

    d: Deferred[Any] = endpoint.connect(Factory.forProtocol(lambda: protocol))
    d.addCallback(connected)
    d.addErrback(unreachable)
    return d
