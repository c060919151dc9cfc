"""
The PTY pages, token endpoint and WebSocket over real loopback sockets, on the fake engine: what
opens a terminal, what is refused (403, with no container started), and the protocol itself.
"""

from __future__ import annotations

import json
import re
from html import unescape
from typing import Any, Iterator

import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.server import Site

from flynnsched.http.root import Components, build_root
from flynnsched.pty.assets import default_web_root
from flynnsched.pty.origin import OriginPolicy
from flynnsched.pty.resource import PtyResource
from flynnsched.pty.session import PtyConfig, PtyManager
from flynnsched.pty.websocket import SUBPROTOCOL, TOKEN_PREFIX
from flynnsched.testing import FakeDockerEngine
from tests.conftest import poll


class Server:
    """A daemon-like web server on a loopback port with the PTY resource on a fake engine."""

    def __init__(self, reactor: Any, **config: Any) -> None:
        self.engine = FakeDockerEngine(reactor)
        self.engine.add_image("flynn/busybox", ("sh",))
        self.manager = PtyManager(reactor, self.engine, PtyConfig(**config))
        web_root = default_web_root()
        pty = PtyResource(self.manager, OriginPolicy(["https://allowed.example"]), web_root, reactor)
        site = Site(build_root(Components(batch=None, pty=pty, web_root=web_root)))
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.number = self.port.getHost().port
        self.base = f"http://127.0.0.1:{self.number}"

    async def page_token(self, path: str = "/pty/flynn/busybox?sh") -> str:
        response = await treq.get(self.base + path)
        body = (await treq.content(response)).decode()
        assert response.code == 200, body
        config = json.loads(unescape(re.search(r'data-config="([^"]*)"', body).group(1)))  # type: ignore[union-attr]
        return str(config["token"])


@pytest.fixture
def server(reactor: Any) -> Iterator[Server]:
    """The PTY resource on a fake engine, listening on loopback."""
    s = Server(reactor)
    yield s
    pytest_twisted.blockon(s.manager.stop())
    pytest_twisted.blockon(s.port.stopListening())


class _Raw(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.done.called:
            self.done.callback(self.data)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.data)


async def raw_handshake(reactor: Any, port: int, origin: str | None, protocols: list[str]) -> int:
    """Send a WebSocket handshake over a plain socket; the HTTP status of the answer."""
    lines = [
        "GET /pty/_ws HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    protocol = _Raw(("\r\n".join(lines) + "\r\n\r\n").encode())
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    answer = await protocol.done.addTimeout(10, reactor)
    return int(answer.split(b" ", 2)[1])


class _Client(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.factory.output += payload
        else:
            self.factory.controls.append(json.loads(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.close_code = code
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))


def client_factory(server: Server, token: str, origin: str | None = None) -> Any:
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{server.number}/pty/_ws",
        origin=origin or server.base,
        protocols=[SUBPROTOCOL, TOKEN_PREFIX + token],
    )
    factory.protocol = _Client
    factory.opened = Deferred()
    factory.output = bytearray()
    factory.controls = []
    factory.close_code = None
    return factory


async def open_terminal(reactor: Any, server: Server, token: str) -> tuple[Any, Any]:
    factory = client_factory(server, token)
    connectWS(factory)
    client = await factory.opened.addTimeout(10, reactor)
    return factory, client


@pytest_twisted.ensureDeferred
async def test_page_mints_a_token_and_starts_nothing(server: Server) -> None:
    """GET of a terminal page answers the page with a token, safe headers, and no container."""
    response = await treq.get(server.base + "/pty/flynn/busybox?sh+-c+echo%20hi")
    body = (await treq.content(response)).decode()
    assert response.code == 200
    headers = response.headers
    assert headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert headers.getRawHeaders("cache-control") == ["no-store"]
    assert "frame-ancestors 'none'" in headers.getRawHeaders("content-security-policy")[0]
    assert headers.getRawHeaders("x-frame-options") == ["DENY"]
    config = json.loads(unescape(re.search(r'data-config="([^"]*)"', body).group(1)))  # type: ignore[union-attr]
    assert config["cmd"] == ["sh", "-c", "echo hi"]
    assert len(config["token"]) >= 40
    assert server.engine.containers == {}
    assert server.manager.sessions == {}


@pytest.mark.parametrize(
    "path, message",
    [
        ("/pty/Flynn/BusyBox", "invalid image reference"),
        ("/pty/flynn/busybox?sh+%zz", "invalid command"),
        ("/pty/", "an image is required"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_page_refuses_bad_requests(server: Server, path: str, message: str) -> None:
    """A malformed image or command is a JSON 400."""
    response = await treq.get(server.base + path)
    body = await treq.json_content(response)
    assert response.code == 400
    assert message in body["error"]


@pytest.mark.parametrize(
    "origin, protocols",
    [
        ("http://evil.example", "valid"),
        (None, "valid"),
        ("null", "valid"),
        ("http://127.0.0.1:1", "valid"),
        ("self", []),
        ("self", [SUBPROTOCOL]),
        ("self", [SUBPROTOCOL, TOKEN_PREFIX + "made-up"]),
        ("self", "token-only"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_websocket_refusals_start_nothing(reactor: Any, server: Server, origin: str | None, protocols: Any) -> None:
    """Another origin, no origin, or a missing or unknown token is refused with 403 and starts no container."""
    token = await server.page_token()
    if protocols == "valid":
        protocols = [SUBPROTOCOL, TOKEN_PREFIX + token]
    elif protocols == "token-only":
        protocols = [TOKEN_PREFIX + token]
    if origin == "self":
        origin = server.base
    status = await raw_handshake(reactor, server.number, origin, protocols)
    assert status == 403
    assert server.engine.containers == {}
    assert server.manager.sessions == {}


@pytest_twisted.ensureDeferred
async def test_a_token_works_once(reactor: Any, server: Server) -> None:
    """A token opens one terminal; the same token again is refused (403) and starts nothing more."""
    token = await server.page_token()
    factory, client = await open_terminal(reactor, server, token)
    await poll(lambda: server.engine.containers, what="the container")
    status = await raw_handshake(reactor, server.number, server.base, [SUBPROTOCOL, TOKEN_PREFIX + token])
    assert status == 403
    # An autobahn client is refused just the same.
    again = client_factory(server, token)
    connectWS(again)
    with pytest.raises(ConnectionError):
        await again.opened.addTimeout(10, reactor)
    assert len(server.engine.containers) == 1
    client.sendClose()


@pytest_twisted.ensureDeferred
async def test_explicitly_allowed_origin(reactor: Any, server: Server) -> None:
    """An origin given with --allowed-origin may open a terminal."""
    token = await server.page_token()
    factory = client_factory(server, token, origin="https://allowed.example")
    connectWS(factory)
    client = await factory.opened.addTimeout(10, reactor)
    await poll(lambda: server.engine.containers, what="the container")
    client.sendClose()


@pytest_twisted.ensureDeferred
async def test_terminal_protocol_and_reattach(reactor: Any, server: Server) -> None:
    """Bytes flow both ways as binary frames, control as JSON; a fresh token from the secret reattaches."""
    token = await server.page_token()
    factory, client = await open_terminal(reactor, server, token)
    client.sendMessage(json.dumps({"type": "hello", "offset": 0, "cols": 90, "rows": 20}).encode())
    await poll(lambda: any(m.get("state") == "running" for m in factory.controls), what="running")
    session_message = next(m for m in factory.controls if m["type"] == "session")
    container = next(iter(server.engine.containers.values()))
    assert container.size == (20, 90)
    client.sendMessage("日本 ok\n".encode(), isBinary=True)
    await poll(lambda: bytes(factory.output).count("日本 ok".encode()) == 2, what="echo")
    client.sendMessage(json.dumps({"type": "ping"}).encode())
    await poll(lambda: {"type": "pong"} in factory.controls, what="pong")

    url = f"{server.base}/pty/_sessions/{session_message['id']}/token"
    good = {"Origin": server.base, "Content-Type": "application/json"}
    body = json.dumps({"secret": session_message["secret"]}).encode()
    evil = await treq.post(url, body, headers={**good, "Origin": "http://evil.example"})
    assert evil.code == 403
    await treq.content(evil)
    form = await treq.post(url, body, headers={**good, "Content-Type": "text/plain"})
    assert form.code == 415
    await treq.content(form)
    wrong = await treq.post(url, json.dumps({"secret": "guess"}).encode(), headers=good)
    assert wrong.code == 404
    await treq.content(wrong)
    response = await treq.post(url, body, headers=good)
    assert response.code == 200
    fresh = (await treq.json_content(response))["token"]

    second, client2 = await open_terminal(reactor, server, fresh)
    client2.sendMessage(json.dumps({"type": "hello", "offset": 0, "cols": 100, "rows": 30}).encode())
    await poll(lambda: factory.close_code == 4000, what="the first terminal taken over")
    await poll(lambda: bytes(second.output).count("日本 ok".encode()) == 2, what="replayed history")
    assert len(server.engine.containers) == 1
    assert container.size == (30, 100)
    client2.sendClose()


@pytest_twisted.ensureDeferred
async def test_static_assets(server: Server) -> None:
    """The terminal's assets are served; nothing else in the web root is."""
    for name, kind in [("xterm.js", "javascript"), ("addon-fit.js", "javascript"), ("xterm.css", "css"), ("pty.js", "javascript")]:
        response = await treq.get(f"{server.base}/static/{name}")
        assert response.code == 200, name
        assert kind in response.headers.getRawHeaders("content-type")[0]
        assert len(await treq.content(response)) > 100
    for name in ("package.json", "__init__.py", ".npmrc", "node_modules", "..%2Fsetup.py"):
        response = await treq.get(f"{server.base}/static/{name}")
        assert response.code == 404, name
        await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_pauses_the_program(reactor: Any, server: Server) -> None:
    """When the WebSocket's send buffer is full the engine attachment is paused, so the daemon holds little."""
    from twisted.internet.task import deferLater

    token = await server.page_token("/pty/flynn/busybox?cat")
    factory, client = await open_terminal(reactor, server, token)
    client.sendMessage(json.dumps({"type": "hello", "offset": 0, "cols": 80, "rows": 24}).encode())
    await poll(lambda: any(m.get("state") == "running" for m in factory.controls), what="running")
    session = next(iter(server.manager.sessions.values()))
    client.transport.pauseProducing()
    chunk = b"y\n" * 32768
    on_screen = len(chunk.replace(b"\n", b"\r\n"))  # a TTY turns "\n" into "\r\n"
    emitted = 0
    while emitted - session.ring.end < 4 * 1024 * 1024:
        assert emitted < 256 * 1024 * 1024, "the attachment was never paused"
        server.engine.emit_output(session.container_id, chunk)
        emitted += on_screen
        await deferLater(reactor, 0, lambda: None)
    held = session.ring.end
    for _ in range(20):
        server.engine.emit_output(session.container_id, chunk)
        emitted += on_screen
        await deferLater(reactor, 0.01, lambda: None)
    # While the client is stuck the daemon reads (almost) nothing more: the engine holds the rest.
    assert session.ring.end - held < 20 * on_screen
    client.transport.resumeProducing()
    await poll(lambda: session.ring.end == emitted, 30, what="the held output to flow again")
    await poll(lambda: len(factory.output) == emitted, 30, what="the client to get everything")
    client.sendClose()


@pytest_twisted.ensureDeferred
async def test_page_is_503_when_all_sessions_are_in_use(reactor: Any) -> None:
    """Beyond --pty-max-sessions the page answers 503 with Retry-After, and the WebSocket too."""
    server = Server(reactor, max_sessions=1)
    try:
        spare = await server.page_token()
        factory, client = await open_terminal(reactor, server, await server.page_token())
        await poll(lambda: server.engine.containers, what="the container")
        response = await treq.get(server.base + "/pty/flynn/busybox?sh")
        body = await treq.json_content(response)
        assert response.code == 503
        assert response.headers.getRawHeaders("retry-after") == ["5"]
        assert "in use" in body["error"]
        status = await raw_handshake(reactor, server.number, server.base, [SUBPROTOCOL, TOKEN_PREFIX + spare])
        assert status == 503
        assert len(server.engine.containers) == 1
        client.sendClose()
    finally:
        await server.manager.stop()
        await server.port.stopListening()
