"""
PTY benchmarks: keystroke-to-echo round trip through flynnsched's terminal WebSocket against a
direct hijacked attach to a TTY container, and the daemon's memory per idle session.

Both round trips run ``cat`` in a TTY container: a key typed is echoed by the container's terminal
line discipline, so the time is the path there and back — WebSocket, daemon, attach, engine — and
nothing else. The idle figure uses a daemon of its own, so that no memory freed by earlier
benchmarks is reused by the sessions and hides their cost.
"""

from __future__ import annotations

import json
import re
import time
from html import unescape
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from bench.common import (
    BENCH_LABEL,
    IMAGE,
    MiB,
    BenchError,
    Context,
    Daemon,
    poll,
    read_proc,
    rotations,
    sleep,
    summary,
)
from bench.report import Row, diff
from flynnsched.docker.interface import LABEL_JOB_ID, LABEL_MANAGED, ContainerSpec
from flynnsched.pty.websocket import SUBPROTOCOL, TOKEN_PREFIX

#: Keys typed in turn; all printable, so each comes back as itself.
KEYS = b"abcdefghijklmnopqrstuvwxyz0123456789"
#: A canonical-mode line holds 4095 characters; the benchmark never sends a newline.
MAX_KEYS = 4000


class _Echo:
    """Output of one terminal, and a wait for a given byte to come back."""

    def __init__(self) -> None:
        self.tail = b""
        self._want: bytes | None = None
        self._got: Deferred[None] | None = None

    def received(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-4096:]
        if self._want is not None and self._want in data and self._got is not None:
            got, self._got, self._want = self._got, None, None
            got.callback(None)

    def expect(self, key: bytes) -> Deferred[None]:
        self._want = key
        self._got = Deferred()
        return self._got


class _Terminal(WebSocketClientProtocol):
    """A terminal page's connection, as the page makes it."""

    factory: "_TerminalFactory"

    def onOpen(self) -> None:
        self.factory.page = self
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.factory.echo.received(payload)
            return
        message = json.loads(payload)
        if message.get("type") == "status":
            self.factory.status = message
            if message.get("state") == "running" and not self.factory.running.called:
                self.factory.running.callback(message)
            if message.get("exit_code") is not None and not self.factory.exited.called:
                self.factory.exited.callback(message)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        for d in (self.factory.opened, self.factory.running):
            if not d.called:
                d.errback(BenchError(f"the terminal WebSocket closed: {code} {reason}"))
        if not self.factory.closed.called:
            self.factory.closed.callback(None)


class _TerminalFactory(WebSocketClientFactory):
    """One terminal page's WebSocket: its connection, its program's state and its output."""

    protocol = _Terminal  # type: ignore[assignment]

    def __init__(self, url: str, origin: str, token: str) -> None:
        super().__init__(url, origin=origin, protocols=[SUBPROTOCOL, TOKEN_PREFIX + token])
        self.setProtocolOptions(tcpNoDelay=True)
        self.opened: Deferred[_Terminal] = Deferred()
        self.running: Deferred[dict[str, Any]] = Deferred()
        self.exited: Deferred[dict[str, Any]] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.echo = _Echo()
        self.status: dict[str, Any] | None = None
        self.page: _Terminal | None = None


async def open_terminal(reactor: Any, daemon: Daemon, cmd: str = "cat", timeout: float = 60) -> _TerminalFactory:
    """Load the page for ``cmd``, open its WebSocket and say hello; return once the program runs."""
    response = await treq.get(f"{daemon.url}/pty/flynn/busybox?{cmd}", timeout=timeout)
    body = (await treq.content(response)).decode()
    if response.code != 200:
        raise BenchError(f"GET /pty/flynn/busybox?{cmd} answered {response.code}: {body[:300]}")
    match = re.search(r'data-config="([^"]*)"', body)
    if match is None:
        raise BenchError("the terminal page carries no data-config")
    token = json.loads(unescape(match.group(1)))["token"]
    factory = _TerminalFactory(f"ws://127.0.0.1:{daemon.port}/pty/_ws", daemon.url, token)
    connectWS(factory)
    client = await factory.opened.addTimeout(timeout, reactor)
    client.sendMessage(json.dumps({"type": "hello", "offset": 0, "cols": 80, "rows": 24}).encode())
    await factory.running.addTimeout(timeout, reactor)
    assert factory.page is not None
    return factory


class _Attached(Protocol):
    def __init__(self, echo: _Echo) -> None:
        self.echo = echo
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.echo.received(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if not self.ended.called:
            self.ended.callback(None)


async def pty_available(ctx: Context) -> str | None:
    """None when the daemon serves terminal pages, else why not."""
    response = await treq.get(ctx.daemon.url + "/pty/flynn/busybox?cat", timeout=10)
    await treq.content(response)
    if response.code != 200:
        return f"the daemon answers GET /pty/flynn/busybox?cat with {response.code}"
    return None


async def measure_round_trips(ctx: Context, keys: int) -> dict[str, Any]:
    """
    ``keys`` keystrokes on each side, alternating, each waited for until its echo arrives:
    through flynnsched's WebSocket, and on a direct hijacked attach (stdin and a TTY).
    """
    if keys > MAX_KEYS:
        raise ValueError(f"at most {MAX_KEYS} keys fit on one terminal line")
    reactor = ctx.reactor
    factory = await open_terminal(reactor, ctx.daemon)
    page = factory.page
    assert page is not None
    spec = ContainerSpec(image=IMAGE, cmd=("cat",), labels={BENCH_LABEL: ctx.label}, tty=True,
                         open_stdin=True, network="none", log_driver="none")
    container_id = await ctx.engine.create_container(spec)
    direct_echo = _Echo()
    attached = _Attached(direct_echo)
    times: dict[str, list[float]] = {"flynnsched": [], "direct_attach": []}
    try:
        attachment = await ctx.engine.attach(container_id, attached, stdin=True)
        await ctx.engine.start_container(container_id)
        senders = {
            "flynnsched": (factory.echo, lambda key: page.sendMessage(key, isBinary=True)),
            "direct_attach": (direct_echo, attachment.write),
        }
        for i, order in rotations(list(senders), keys + 2):
            key = KEYS[i % len(KEYS) : i % len(KEYS) + 1]
            for name in order:
                echo, send = senders[name]
                echoed = echo.expect(key)
                started = time.perf_counter()
                send(key)
                await echoed.addTimeout(10, reactor)
                if i >= 2:  # the first two keys warm both paths up
                    times[name].append((time.perf_counter() - started) * 1000)
        # The first ^D hands cat the typed line, the second is the end of its input.
        attachment.write(b"\x04\x04")
        await attached.ended.addTimeout(10, reactor)
        page.sendMessage(b"\x04\x04", isBinary=True)
        await factory.exited.addTimeout(30, reactor)
    finally:
        await ctx.engine.remove_container(container_id, force=True)
    return {name: summary(values, 3) for name, values in times.items()}


async def measure_idle(ctx: Context, sessions: int) -> dict[str, Any]:
    """
    ``sessions`` terminals running ``cat``, all attached and idle, on a fresh daemon: its RSS
    after one warm-up session, and after all of them run.
    """
    reactor = ctx.reactor
    daemon = Daemon(ctx.docker_host, ["--pty-max-sessions", str(sessions + 1)])
    factories: list[_TerminalFactory] = []
    try:
        await daemon.ready(reactor)
        warm = await open_terminal(reactor, daemon)
        factories.append(warm)
        await sleep(reactor, 0.5)
        before = read_proc(daemon.pid).rss
        started = time.monotonic()
        limit = DeferredSemaphore(8)

        async def one() -> None:
            factories.append(await open_terminal(reactor, daemon, timeout=120))

        await gatherResults(
            [limit.run(lambda: Deferred.fromCoroutine(one())) for _ in range(sessions)], consumeErrors=True
        )
        opened = time.monotonic() - started
        # Let the sessions' start-up garbage go before reading the steady state.
        await sleep(reactor, 1.0)
        after = read_proc(daemon.pid).rss
        for factory in factories:
            if factory.page is not None:
                factory.page.sendMessage(b"\x04", isBinary=True)

        async def all_exited() -> bool:
            return all(f.exited.called for f in factories)

        await poll(reactor, all_exited, 120, "every terminal's program to exit")

        async def all_gone() -> bool:
            ids = [f.status["job_id"] for f in factories if f.status]
            found = await ctx.engine.list_containers({LABEL_MANAGED: "1"})
            return not any(c.labels.get(LABEL_JOB_ID) in ids for c in found)

        await poll(reactor, all_gone, 120, "every PTY container to be removed")
        cleanup = time.monotonic() - started - opened
    finally:
        for factory in factories:
            page = factory.page
            if page is not None and page.state == page.STATE_OPEN:
                page.sendClose()
        daemon.stop()
    per_session = (after - before) / sessions
    return {
        "sessions": sessions,
        "rss_before_mib": round(before / MiB, 2),
        "rss_after_mib": round(after / MiB, 2),
        "kib_per_session": round(per_session / 1024, 1),
        "open_seconds": round(opened, 2),
        "cleanup_seconds": round(cleanup, 2),
    }


async def bench_pty(ctx: Context, round_trips: int, idle_sessions: int) -> dict[str, Any]:
    """Both PTY figures, or why they cannot be measured."""
    reason = await pty_available(ctx)
    if reason:
        return {"available": False, "reason": reason, "rows": []}
    trips = await measure_round_trips(ctx, round_trips)
    idle = await measure_idle(ctx, idle_sessions)
    f, d = trips["flynnsched"], trips["direct_attach"]
    rows = [
        Row("PTY keystroke echo, median (ms)", f["median"], None, d["median"], None,
            diff(f["median"], d["median"], "ms"), "≤ direct + 2 ms", f["median"] - d["median"] <= 2.0),
        Row("PTY keystroke echo, p99 (ms)", f["p99"], None, d["p99"], None, diff(f["p99"], d["p99"], "ms"), "", None),
        Row(f"PTY {idle['sessions']} idle sessions: daemon RSS per session (KiB)", idle["kib_per_session"], None,
            None, None, None, "≤ 200 KiB", idle["kib_per_session"] <= 200),
    ]
    return {"round_trip": trips, "idle": idle, "rows": rows}
