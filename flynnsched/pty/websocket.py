"""
The terminal WebSocket: binary frames carry terminal bytes both ways, JSON text frames control.

The handshake is refused with 403, before any session exists, unless the ``Origin`` is allowed and
the client offers the subprotocol ``flynnsched.pty.v1`` together with a valid token as a second
subprotocol ``flynnsched.token.<token>`` (kept out of URLs and so out of access logs). A token is
redeemed at most once, whatever the outcome.

Control messages from the page: ``{"type": "hello", "offset", "cols", "rows"}`` (first, says how
much output the page already shows), ``resize`` (``cols``, ``rows``), ``pause`` and ``resume``
(flow control of the page's renderer) and ``ping`` (answered ``pong``). From the daemon:
``session`` (``id`` and ``secret``, for reattaching), ``status`` (``state``, ``job_id``, ``image``,
``container_id``, ``exit_code`` …), ``reset`` (``offset``: the history sent next starts there) and
``replay`` (``length``: the next binary frame is history a terminal has shown before, whose queries
were answered then and must not be answered again).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from flynnsched.pty.origin import OriginPolicy
from flynnsched.pty.session import NoSuchSession, PtyManager, PtySession, SessionLimit
from flynnsched.pty.tokens import AttachGrant, Grant, StartGrant

log = Logger()

#: The subprotocol the terminal page speaks.
SUBPROTOCOL = "flynnsched.pty.v1"
#: The prefix of the subprotocol that carries the token.
TOKEN_PREFIX = "flynnsched.token."
#: The largest message accepted from a page (pasted text arrives in pieces of at most this).
MAX_MESSAGE = 1024 * 1024

CLOSE_GONE = 4404
CLOSE_BUSY = 1013


@implementer(IPushProducer)
class _SendBuffer:
    """Registered on the connection: a full send buffer pauses the session's output."""

    def __init__(self, protocol: PtyServerProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol._transport_paused(True)

    def resumeProducing(self) -> None:
        self._protocol._transport_paused(False)

    def stopProducing(self) -> None:
        pass


def _dimension(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class PtyServerProtocol(WebSocketServerProtocol):
    """One browser terminal's connection."""

    factory: PtyWebSocketFactory

    def __init__(self) -> None:
        super().__init__()
        self._grant: Grant | None = None
        self._session: PtySession | None = None

    # -- handshake ------------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> str:
        host = request.headers.get("host")
        if not self.factory.origins.allows(request.origin, host):
            log.info("refused a terminal WebSocket from origin {origin!r}", origin=request.origin)
            raise ConnectionDeny(403, "origin not allowed")
        tokens = [p[len(TOKEN_PREFIX) :] for p in request.protocols if p.startswith(TOKEN_PREFIX)]
        grant = self.factory.manager.redeem(tokens[0]) if len(tokens) == 1 else None
        if grant is None or SUBPROTOCOL not in request.protocols:
            log.info("refused a terminal WebSocket without a valid token")
            raise ConnectionDeny(403, "a valid, unused terminal token is required")
        if isinstance(grant, StartGrant):
            try:
                self.factory.manager.check_capacity()
            except SessionLimit as e:
                raise ConnectionDeny(503, str(e)) from None
        elif isinstance(grant, AttachGrant) and grant.session_id not in self.factory.manager.sessions:
            raise ConnectionDeny(404, "the terminal session is over")
        self._grant = grant
        return SUBPROTOCOL

    def onOpen(self) -> None:
        # twisted.web's channel is still this connection's producer; take over so that a full send
        # buffer pauses the program instead of growing the buffer.
        transport: Any = self.transport
        if transport is not None and getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        if transport is not None:
            transport.registerProducer(_SendBuffer(self), True)
        assert self._grant is not None
        try:
            self._session = self.factory.manager.connect(self._grant, self)
        except SessionLimit as e:
            self.sendClose(CLOSE_BUSY, str(e))
        except NoSuchSession as e:
            self.sendClose(CLOSE_GONE, str(e))

    # -- from the page --------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self._session
        if session is None:
            return
        if isBinary:
            session.input(self, payload)
            return
        try:
            message = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            log.debug("ignored a malformed control message")
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "hello":
            offset = message.get("offset")
            cols, rows = _dimension(message.get("cols")), _dimension(message.get("rows"))
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or cols is None or rows is None:
                self.sendClose(1008, "hello needs offset, cols and rows")
                return
            session.hello(self, offset, cols, rows)
        elif kind == "resize":
            cols, rows = _dimension(message.get("cols")), _dimension(message.get("rows"))
            if cols is not None and rows is not None:
                session.resize(self, cols, rows)
        elif kind == "pause":
            session.set_paused(self, True)
        elif kind == "resume":
            session.set_paused(self, False)
        elif kind == "ping":
            self.send_control({"type": "pong"})

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.detach(self)

    def _transport_paused(self, paused: bool) -> None:
        if self._session is not None:
            self._session.set_paused(self, paused, transport=True)

    # -- the session's ``Terminal`` -----------------------------------------------------------

    def send_output(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(data, isBinary=True)

    def send_control(self, message: Mapping[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(json.dumps(message, separators=(",", ":")).encode("utf-8"), isBinary=False)

    def close(self, code: int, reason: str) -> None:
        self._session = None
        if self.state == self.STATE_OPEN:
            self.sendClose(code, reason)


class PtyWebSocketFactory(WebSocketServerFactory):
    """Builds terminal connections for ``manager``, admitting only origins that ``origins`` allows."""

    protocol = PtyServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        manager: PtyManager,
        origins: OriginPolicy,
        reactor: Any,
        ping_interval: float = 15.0,
        ping_timeout: float = 10.0,
    ) -> None:
        super().__init__(server="flynnsched", reactor=reactor)
        self.manager = manager
        self.origins = origins
        self.setProtocolOptions(
            webStatus=False,
            # Origins, "null" included, are judged in onConnect, which refuses with 403.
            allowNullOrigin=True,
            maxMessagePayloadSize=MAX_MESSAGE,
            maxFramePayloadSize=MAX_MESSAGE,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            tcpNoDelay=True,
        )
