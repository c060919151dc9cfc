"""
PTY sessions on a real daemon and the real engine, driven by autobahn's WebSocket client: the
daemon's memory under a flood that nobody reads, and the echo round trip.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet.defer import Deferred

from flynnsched.pty.websocket import SUBPROTOCOL, TOKEN_PREFIX
from tests.conftest import REPO, poll

pytestmark = pytest.mark.docker


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class _Client(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.factory.received += len(payload)
            self.factory.tail = (self.factory.tail + payload)[-4096:]
        else:
            self.factory.controls.append(json.loads(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))


async def open_terminal(reactor: Any, daemon: Any, cmd: str = "sh") -> tuple[Any, Any]:
    """Load the page for ``cmd``, open its WebSocket and say hello; wait until the program runs."""
    response = await treq.get(f"{daemon.url}/pty/flynn/busybox?{cmd}")
    body = (await treq.content(response)).decode()
    token = json.loads(unescape(re.search(r'data-config="([^"]*)"', body).group(1)))["token"]  # type: ignore[union-attr]
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{daemon.port}/pty/_ws", origin=daemon.url, protocols=[SUBPROTOCOL, TOKEN_PREFIX + token]
    )
    factory.protocol = _Client
    factory.opened = Deferred()
    factory.received = 0
    factory.tail = b""
    factory.controls = []
    connectWS(factory)
    client = await factory.opened.addTimeout(10, reactor)
    client.sendMessage(json.dumps({"type": "hello", "offset": 0, "cols": 80, "rows": 24}).encode())
    await poll(lambda: any(m.get("state") == "running" for m in factory.controls), 30, what="running")
    return factory, client


async def pause(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_flood_to_a_reader_that_stopped_keeps_the_daemon_bounded(reactor: Any, daemon_factory: Any) -> None:
    """`yes` towards a client that stopped reading pauses the program instead of growing the daemon."""
    daemon = await daemon_factory()
    factory, client = await open_terminal(reactor, daemon)
    await poll(lambda: b"# " in factory.tail, 10, what="the prompt")
    baseline = rss_kib(daemon.pid)
    client.sendMessage(b"yes\r", isBinary=True)
    await poll(lambda: factory.received > 1_000_000, 20, what="a flood of output")
    client.transport.pauseProducing()  # stop reading: the daemon's send buffer fills up
    samples = []
    started = time.monotonic()
    while time.monotonic() - started < 10:
        samples.append(rss_kib(daemon.pid))
        await pause(reactor, 0.25)
    client.transport.resumeProducing()
    client.sendMessage(b"\x03", isBinary=True)
    client.sendMessage(b"echo stopped-$((3+4))\r", isBinary=True)
    await poll(lambda: b"stopped-7\r\n" in factory.tail, 60, what="the shell after Ctrl-C")
    peak = max(samples)
    report = (
        f"reader stopped: daemon RSS (KiB) before {baseline}, peak over 10 s {peak}, "
        f"growth {peak - baseline}; {factory.received} bytes received in all\n"
    )
    (REPO / "artifacts").mkdir(exist_ok=True)
    (REPO / "artifacts" / "pty-stalled-reader-rss.txt").write_text(report)
    print(report)
    assert peak - baseline < 32 * 1024, report
    client.sendClose()


@pytest_twisted.ensureDeferred
async def test_echo_round_trip(reactor: Any, daemon_factory: Any) -> None:
    """A key typed comes back echoed by the terminal quickly (median reported)."""
    daemon = await daemon_factory()
    factory, client = await open_terminal(reactor, daemon, "cat")
    times = []
    for i in range(20):
        marker = f"k{i:02d}".encode()
        before = factory.received
        started = time.perf_counter()
        client.sendMessage(marker, isBinary=True)
        await poll(lambda: factory.received >= before + len(marker) and marker in factory.tail, 5, 0.001, "echo")
        times.append((time.perf_counter() - started) * 1000)
    median = statistics.median(times)
    report = f"echo round trip over 20 keys: median {median:.1f} ms, max {max(times):.1f} ms\n"
    (REPO / "artifacts").mkdir(exist_ok=True)
    (REPO / "artifacts" / "pty-echo.txt").write_text(report)
    print(report)
    assert median < 200, report
    client.sendClose()
