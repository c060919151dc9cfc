"""
The engine client's plumbing without an engine: addresses, the hijacked attach and shared pulls.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from flynnsched.docker.address import BadEngineAddress, endpoint_factory, parse_engine_address
from flynnsched.docker.attach import LARGE_READ, HijackProtocol
from flynnsched.docker.images import ImagePuller
from flynnsched.docker.interface import EngineError, EngineUnavailable, ImageNotFound, NoSuchContainer
from flynnsched.testing import FakeDockerEngine


@pytest.mark.parametrize(
    "text, path, host, port",
    [
        ("/var/run/docker.sock", "/var/run/docker.sock", None, None),
        ("unix:///tmp/d.sock", "/tmp/d.sock", None, None),
        ("unix:/tmp/d.sock", "/tmp/d.sock", None, None),
        ("tcp://127.0.0.1:2376", None, "127.0.0.1", 2376),
        ("tcp:localhost:2375", None, "localhost", 2375),
        ("tcp:[::1]:2376", None, "::1", 2376),
    ],
)
def test_parse_address(text: str, path: str | None, host: str | None, port: int | None) -> None:
    """Socket paths, unix: and tcp: addresses parse to a path or a host and port."""
    address = parse_engine_address(text)
    assert (address.path, address.host, address.port) == (path, host, port)


@pytest.mark.parametrize("text", ["", "unix:relative.sock", "tcp:host", "tcp://host:99999", "http://x:1", "npipe:x"])
def test_bad_address(text: str) -> None:
    """Anything else is a BadEngineAddress that quotes the address."""
    with pytest.raises(BadEngineAddress):
        parse_engine_address(text)


def test_endpoints() -> None:
    """A unix address makes unix endpoints, a tcp one without TLS material plain TCP endpoints."""
    from twisted.internet import reactor

    assert isinstance(endpoint_factory(reactor, parse_engine_address("/x.sock"))(), UNIXClientEndpoint)
    assert isinstance(endpoint_factory(reactor, parse_engine_address("tcp:127.0.0.1:1"))(), HostnameEndpoint)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.append(reason)


def hijack() -> tuple[HijackProtocol, Recorder, StringTransport, list[Any]]:
    inner = Recorder()
    protocol = HijackProtocol(b"POST /x HTTP/1.1\r\n\r\n", "abc", inner)
    transport = StringTransport()
    protocol.makeConnection(transport)
    outcome: list[Any] = []
    protocol.attached.addBoth(outcome.append)
    return protocol, inner, transport, outcome


def test_hijack_upgrade_split_anywhere() -> None:
    """The 101 head may arrive in pieces; bytes after it are already stream data."""
    protocol, inner, transport, outcome = hijack()
    assert transport.value() == b"POST /x HTTP/1.1\r\n\r\n"
    response = b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\nhello"
    for i in range(len(response)):
        protocol.dataReceived(response[i : i + 1])
    assert len(outcome) == 1 and not isinstance(outcome[0], Failure)
    assert inner.data == b"hello"
    protocol.dataReceived(b" world")
    assert inner.data == b"hello world"


def test_hijack_not_found() -> None:
    """A 404 answer fails the attach with NoSuchContainer carrying the engine's message."""
    protocol, inner, _, outcome = hijack()
    body = b'{"message":"No such container: abc"}'
    protocol.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert outcome[0].check(NoSuchContainer)
    assert outcome[0].value.message == "No such container: abc"
    assert inner.data == b""


def test_hijack_other_error_and_cut() -> None:
    """Another status is an EngineError; a connection cut before any answer is EngineUnavailable."""
    protocol, _, _, outcome = hijack()
    protocol.dataReceived(b"HTTP/1.1 500 Internal\r\nContent-Length: 4\r\n\r\nbo")
    protocol.dataReceived(b"om")
    assert outcome[0].check(EngineError) and outcome[0].value.status == 500
    protocol, _, _, outcome = hijack()
    protocol.connectionLost(Failure(ConnectionError("gone")))
    assert outcome[0].check(EngineUnavailable)


def test_hijack_gathers_small_reads() -> None:
    """With a gather delay, reading pauses for that long after a small read, but not after a large one or its tail."""
    clock = Clock()
    inner = Recorder()
    protocol = HijackProtocol(b"POST /x HTTP/1.1\r\n\r\n", "abc", inner, clock, 0.001)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"HTTP/1.1 101 UPGRADED\r\n\r\n")
    protocol.dataReceived(b"small")
    assert inner.data == b"small" and transport.producerState == "paused"
    clock.advance(0.001)
    assert transport.producerState == "producing"
    protocol.dataReceived(b"x" * LARGE_READ)
    protocol.dataReceived(b"tail")
    assert transport.producerState == "producing" and not clock.getDelayedCalls()
    protocol.dataReceived(b"small again")
    assert transport.producerState == "paused"


def test_gather_keeps_a_consumer_pause() -> None:
    """A consumer's pause outlasts the gather delay; the consumer's resume ends it."""
    clock = Clock()
    protocol = HijackProtocol(b"POST /x HTTP/1.1\r\n\r\n", "abc", Recorder(), clock, 0.001)
    transport = StringTransport()
    protocol.makeConnection(transport)
    outcome: list[Any] = []
    protocol.attached.addCallback(outcome.append)
    protocol.dataReceived(b"HTTP/1.1 101 UPGRADED\r\n\r\nsmall")
    (attachment,) = outcome
    attachment.pauseProducing()
    attachment.resumeProducing()
    assert transport.producerState == "paused"  # still gathering
    attachment.pauseProducing()
    clock.advance(0.001)
    assert transport.producerState == "paused"
    attachment.resumeProducing()
    assert transport.producerState == "producing"
    protocol.dataReceived(b"more")
    protocol.connectionLost(Failure(ConnectionError("done")))
    assert not clock.getDelayedCalls()


def test_pulls_are_shared() -> None:
    """Concurrent jobs of one missing image share one pull; a cancelled waiter does not end it."""
    engine = FakeDockerEngine(Clock())
    engine.registry["flynn/shared:latest"] = ("true",)
    gate: Deferred[None] = Deferred()
    engine.pull_gate = gate
    puller = ImagePuller(engine)
    first, second, third = (puller.ensure("flynn/shared") for _ in range(3))
    assert engine.pull_count == 1 and puller.pulling("flynn/shared")
    third.cancel()
    third.addErrback(lambda f: None)
    gate.callback(None)
    results: list[Any] = []
    first.addCallback(results.append)
    second.addCallback(results.append)
    assert len(results) == 2 and results[0] == results[1] and results[0].startswith("sha256:")
    assert not puller.pulling("flynn/shared")


def test_never_pull() -> None:
    """With the never policy, a missing image fails at once and nothing is pulled."""
    engine = FakeDockerEngine(Clock())
    engine.registry["flynn/remote:latest"] = ("true",)
    failures: list[Failure] = []
    ImagePuller(engine, "never").ensure("flynn/remote").addErrback(failures.append)
    assert failures[0].check(ImageNotFound) and engine.pull_count == 0
    with pytest.raises(ValueError):
        ImagePuller(engine, "sometimes")
