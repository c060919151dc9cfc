"""
``FakeDockerEngine``: an in-memory ``IDockerEngine`` for fast tests of everything above the engine.

It keeps to the contract that ``tests/test_engine_contract.py`` checks against the real engine too.
Containers run small built-in programs (``true``, ``false``, ``echo``, ``cat``, ``sleep``, ``yes``
and ``sh`` with ``-c`` scripts of ``echo``/``exit``/``sleep``/``true``/``false``) on the given
clock. Controls that only a fake can have — emit output, make a container exit, take the engine
down — are methods of the fake, never of the interface.
"""

from __future__ import annotations

import hashlib
import itertools
import shlex
from typing import Any, Awaitable, Callable, Mapping

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IProtocol, IPushProducer, IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from flynnsched.docker.interface import (
    Conflict,
    ContainerSpec,
    ContainerState,
    ContainerSummary,
    EngineError,
    EngineUnavailable,
    Event,
    IAttachment,
    IDockerEngine,
    IEventSubscription,
    ImageNotFound,
    NoSuchContainer,
)
from flynnsched.docker.mux import STDERR, STDOUT, encode_frame

__all__ = ["FakeDockerEngine", "FakeContainer", "ProgramContext"]

_NEVER = "0001-01-01T00:00:00Z"
_counter = itertools.count(1)


def _fake_id(prefix: str) -> str:
    return hashlib.sha256(f"{prefix}-{next(_counter)}".encode()).hexdigest()


def _normalise(reference: str) -> str:
    """``flynn/busybox`` and ``flynn/busybox:latest`` name one image."""
    if "@" in reference:
        return reference
    slash, colon = reference.rfind("/"), reference.rfind(":")
    return reference if colon > slash else reference + ":latest"


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


class _Stopped(Exception):
    """The program was killed."""


@implementer(IAttachment, IPushProducer)
class _FakeAttachment:
    """An attachment that delivers output to its protocol, holding it while paused."""

    def __init__(self, container: FakeContainer, protocol: IProtocol, stdin: bool) -> None:
        self._container = container
        self._protocol = protocol
        self._stdin = stdin
        self._paused = False
        self._held: list[bytes] = []
        self._ending = False
        self.closed = False

    def deliver(self, stream: int, data: bytes) -> None:
        payload = data if self._container.spec.tty else encode_frame(stream, data)
        if self._paused:
            self._held.append(payload)
        else:
            self._protocol.dataReceived(payload)

    def end(self) -> None:
        if self._paused and self._held:
            self._ending = True
            return
        self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self in self._container.attachments:
            self._container.attachments.remove(self)
        from twisted.internet.error import ConnectionDone

        self._protocol.connectionLost(Failure(ConnectionDone()))

    def write(self, data: bytes) -> None:
        if self._stdin and not self.closed:
            self._container.feed_stdin(data)

    def close_stdin(self) -> None:
        if self._stdin and not self.closed and self._container.spec.stdin_once:
            self._container.feed_stdin(b"")

    def close(self) -> None:
        self._finish()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._held and not self._paused and not self.closed:
            self._protocol.dataReceived(self._held.pop(0))
        if self._ending and not self._held:
            self._finish()

    def stopProducing(self) -> None:
        self._finish()


@implementer(IPushProducer)
class _FakeLogStream:
    """The producer ``logs`` answers with; the fake delivers without pausing."""

    def __init__(self, end: Callable[[], None]) -> None:
        self._end = end

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self._end()


@implementer(IEventSubscription)
class _FakeSubscription:
    def __init__(self, engine: FakeDockerEngine, callback: Callable[[Event], None],
                 filters: Mapping[str, list[str]]) -> None:
        self._engine = engine
        self.callback = callback
        self.filters = filters
        self.done: Deferred[None] = Deferred()

    def wants(self, event: Event) -> bool:
        for key, values in self.filters.items():
            if key == "type" and event.type not in values:
                return False
            if key == "event" and event.action not in values:
                return False
            if key == "label":
                for want in values:
                    k, eq, v = want.partition("=")
                    if k not in event.attributes or (eq and event.attributes[k] != v):
                        return False
        return True

    def stop(self) -> None:
        if self in self._engine._subscriptions:
            self._engine._subscriptions.remove(self)
        if not self.done.called:
            self.done.callback(None)


@attrs.define
class ProgramContext:
    """What a fake program sees: its argv, env, clock, output and stdin."""

    container: FakeContainer
    argv: tuple[str, ...]
    clock: IReactorTime

    def write(self, data: bytes, stream: int = STDOUT) -> None:
        self.container.output(stream, data)

    def read(self) -> Deferred[bytes]:
        """The next stdin bytes; ``b""`` at end of file."""
        return self.container.read_stdin()

    def sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self.clock, seconds, lambda: None)


Program = Callable[[ProgramContext], Awaitable[int]]


async def _true(ctx: ProgramContext) -> int:
    return 0


async def _false(ctx: ProgramContext) -> int:
    return 1


async def _echo(ctx: ProgramContext) -> int:
    ctx.write((" ".join(ctx.argv[1:]) + "\n").encode())
    return 0


async def _cat(ctx: ProgramContext) -> int:
    while True:
        data = await ctx.read()
        if not data:
            return 0
        ctx.write(data)


async def _sleep(ctx: ProgramContext) -> int:
    await ctx.sleep(float(ctx.argv[1]))
    return 0


async def _yes(ctx: ProgramContext) -> int:
    line = ((" ".join(ctx.argv[1:]) or "y") + "\n").encode() * 512
    while True:
        ctx.write(line)
        await ctx.sleep(0)


async def _sh(ctx: ProgramContext) -> int:
    if len(ctx.argv) < 3 or ctx.argv[1] != "-c":
        return await _cat(ctx)
    status = 0
    for part in ctx.argv[2].split(";"):
        words = shlex.split(part)
        if not words:
            continue
        stream = STDOUT
        if words[-1] in (">&2", "1>&2"):
            stream, words = STDERR, words[:-1]
        name = words[0]
        if name == "exit":
            return int(words[1]) if len(words) > 1 else status
        if name == "echo":
            ctx.write((" ".join(words[1:]) + "\n").encode(), stream)
            status = 0
        elif name == "sleep":
            await ctx.sleep(float(words[1]))
            status = 0
        elif name in ("true", "false"):
            status = 0 if name == "true" else 1
        else:
            ctx.write(f"sh: {name}: not found\n".encode(), STDERR)
            status = 127
    return status


BUILTIN_PROGRAMS: dict[str, Program] = {
    "true": _true, "false": _false, "echo": _echo, "cat": _cat, "sleep": _sleep, "yes": _yes, "sh": _sh,
}


class FakeContainer:
    """One container of the fake engine: its spec, state, output and attachments."""

    def __init__(self, engine: FakeDockerEngine, container_id: str, name: str, spec: ContainerSpec,
                 argv: tuple[str, ...]) -> None:
        self.engine = engine
        self.id = container_id
        self.name = name
        self.spec = spec
        self.argv = argv
        self.status = "created"
        self.exit_code = 0
        self.oom_killed = False
        self.started_at = _NEVER
        self.finished_at = _NEVER
        self.attachments: list[_FakeAttachment] = []
        self.log: list[tuple[int, bytes]] = []
        self.log_followers: list[IProtocol] = []
        self.size: tuple[int, int] | None = None
        self._stdin: list[bytes] = []
        self._stdin_waiter: Deferred[bytes] | None = None
        self._run: Deferred[int] | None = None
        self._waiters: list[Deferred[int]] = []
        self._stop_timer: Any = None

    # -- what programs do --------------------------------------------------------------

    def output(self, stream: int, data: bytes) -> None:
        if self.status != "running" or not data:
            return
        if self.spec.tty:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            stream = STDOUT
        self.log.append((stream, data))
        for attachment in list(self.attachments):
            attachment.deliver(stream, data)
        for follower in list(self.log_followers):
            follower.dataReceived(data if self.spec.tty else encode_frame(stream, data))

    def feed_stdin(self, data: bytes) -> None:
        if self.spec.tty and data:
            # A terminal echoes what is typed.
            self.output(STDOUT, data)
        if self._stdin_waiter is not None:
            waiter, self._stdin_waiter = self._stdin_waiter, None
            waiter.callback(data)
        else:
            self._stdin.append(data)

    def read_stdin(self) -> Deferred[bytes]:
        if self._stdin:
            return succeed(self._stdin.pop(0))
        self._stdin_waiter = Deferred()
        return self._stdin_waiter

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, program: Program) -> None:
        self.status = "running"
        self.started_at = self.engine.now()
        self.engine.emit("start", self)
        context = ProgramContext(self, self.argv, self.engine.clock)
        self._run = Deferred.fromCoroutine(program(context))  # type: ignore[arg-type]
        self._run.addCallbacks(self.exited, self._crashed)

    def _crashed(self, failure: Failure) -> None:
        if failure.check(CancelledError, _Stopped):
            return
        self.output(STDERR, f"{failure.getErrorMessage()}\n".encode())
        self.exited(1)

    def exited(self, code: int, oom: bool = False) -> None:
        if self.status != "running":
            return
        if self._stop_timer is not None and self._stop_timer.active():
            self._stop_timer.cancel()
        self.status = "exited"
        self.exit_code = code
        self.oom_killed = oom
        self.finished_at = self.engine.now()
        if self._run is not None and not self._run.called:
            run, self._run = self._run, None
            run.addErrback(lambda f: f.trap(CancelledError, _Stopped))
            run.cancel()
        for attachment in list(self.attachments):
            attachment.end()
        for follower in list(self.log_followers):
            self.log_followers.remove(follower)
            from twisted.internet.error import ConnectionDone

            follower.connectionLost(Failure(ConnectionDone()))
        if oom:
            self.engine.emit("oom", self)
        self.engine.emit("die", self, exitCode=str(code))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(code)

    def wait(self) -> Deferred[int]:
        if self.status != "running":
            return succeed(self.exit_code)
        d: Deferred[int] = Deferred()
        self._waiters.append(d)
        return d

    def signal(self, signal: str) -> None:
        if signal in ("KILL", "SIGKILL", "9"):
            self.exited(137)
        # Like PID 1 in a container, the built-in programs ignore every other signal.

    def stop(self, timeout: int) -> Deferred[None]:
        if self.status != "running":
            return succeed(None)
        done = self.wait().addCallback(lambda _: None)
        self._stop_timer = self.engine.clock.callLater(timeout, self.signal, "KILL")
        return done

    def state(self) -> ContainerState:
        return ContainerState(
            id=self.id, name=self.name, image=self.spec.image, status=self.status,
            running=self.status == "running", exit_code=self.exit_code, oom_killed=self.oom_killed,
            started_at=self.started_at, finished_at=self.finished_at, labels=dict(self.spec.labels),
            tty=self.spec.tty,
        )


@implementer(IDockerEngine)
class FakeDockerEngine:
    """
    An in-memory Docker engine on ``clock``.

    Images are added with ``add_image``; images in ``registry`` can be pulled. ``programs`` maps a
    command name to the fake program that runs it.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.images: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.registry: dict[str, tuple[str, ...]] = {}
        self.programs: dict[str, Program] = dict(BUILTIN_PROGRAMS)
        self.containers: dict[str, FakeContainer] = {}
        self.available = True
        self.pull_count = 0
        self.pull_gate: Deferred[None] | None = None
        self._subscriptions: list[_FakeSubscription] = []

    # -- fake-only controls ------------------------------------------------------------

    def add_image(self, reference: str, cmd: tuple[str, ...] = ("sh",)) -> None:
        """Make ``reference`` present, with ``cmd`` as its default command."""
        self.images[_normalise(reference)] = ("sha256:" + _fake_id(reference), cmd)

    def emit_output(self, container_id: str, data: bytes, stream: int = STDOUT) -> None:
        """Make a running container write ``data``."""
        self.containers[container_id].output(stream, data)

    def exit(self, container_id: str, code: int, oom: bool = False) -> None:
        """Make a running container exit with ``code`` (OOM-killed when ``oom``)."""
        self.containers[container_id].exited(code, oom)

    def go_down(self) -> None:
        """Take the engine away: calls fail with ``EngineUnavailable``, event streams end."""
        self.available = False
        for subscription in list(self._subscriptions):
            subscription.stop()

    def come_back(self) -> None:
        """Bring the engine back, with its containers as they were."""
        self.available = True

    def now(self) -> str:
        import datetime

        when = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def emit(self, action: str, container: FakeContainer, **extra: str) -> None:
        attributes = dict(container.spec.labels)
        attributes.update(name=container.name, image=container.spec.image, **extra)
        event = Event(type="container", action=action, id=container.id, attributes=attributes,
                      time_nano=int(self.clock.seconds() * 1e9))
        for subscription in list(self._subscriptions):
            if subscription.wants(event):
                subscription.callback(event)

    # -- IDockerEngine -----------------------------------------------------------------

    def _guard(self) -> EngineUnavailable | None:
        if not self.available:
            return EngineUnavailable("cannot reach the Docker engine: connection refused")
        return None

    def _container(self, container_id: str) -> FakeContainer:
        container = self.containers.get(container_id)
        if container is None:
            for candidate in self.containers.values():
                if candidate.name == container_id or (len(container_id) >= 12 and candidate.id.startswith(container_id)):
                    return candidate
            raise NoSuchContainer(f"No such container: {container_id}", 404)
        return container

    def _do(self, action: Callable[[], Any]) -> Deferred[Any]:
        error = self._guard()
        if error is not None:
            return _failed(error)
        try:
            result = action()
        except EngineError as e:
            return _failed(e)
        return result if isinstance(result, Deferred) else succeed(result)

    def ping(self) -> Deferred[None]:
        return self._do(lambda: None)

    def version(self) -> Deferred[dict[str, Any]]:
        return self._do(lambda: {"Version": "fake", "ApiVersion": "1.41"})

    def inspect_image(self, reference: str) -> Deferred[str]:
        def inspect() -> str:
            image = self.images.get(_normalise(reference))
            if image is None:
                raise ImageNotFound(f"No such image: {reference}", 404)
            return image[0]

        return self._do(inspect)

    def pull_image(self, reference: str) -> Deferred[None]:
        def pull() -> Deferred[None]:
            self.pull_count += 1
            gate = self.pull_gate if self.pull_gate is not None else succeed(None)
            d: Deferred[None] = Deferred()

            def finish(_: object) -> None:
                cmd = self.registry.get(_normalise(reference))
                if cmd is None:
                    d.errback(ImageNotFound(f"cannot pull {reference}: repository does not exist", 404))
                else:
                    self.add_image(reference, cmd)
                    d.callback(None)

            gate.addCallback(finish)
            return d

        return self._do(pull)

    def create_container(self, spec: ContainerSpec) -> Deferred[str]:
        def create() -> str:
            image = self.images.get(_normalise(spec.image))
            if image is None:
                raise ImageNotFound(f"No such image: {spec.image}", 404)
            if spec.name and any(c.name == spec.name for c in self.containers.values()):
                raise Conflict(f'Conflict. The container name "/{spec.name}" is already in use', 409)
            container_id = _fake_id("container")
            name = spec.name or f"fake_{container_id[:8]}"
            argv = spec.cmd if spec.cmd is not None else image[1]
            self.containers[container_id] = FakeContainer(self, container_id, name, spec, tuple(argv))
            self.emit("create", self.containers[container_id])
            return container_id

        return self._do(create)

    def attach(self, container_id: str, protocol: IProtocol, stdin: bool = False) -> Deferred[Any]:
        def attach() -> _FakeAttachment:
            container = self._container(container_id)
            attachment = _FakeAttachment(container, protocol, stdin)
            protocol.makeConnection(attachment)  # type: ignore[arg-type]
            if container.status in ("created", "running"):
                container.attachments.append(attachment)
            else:
                self.clock.callLater(0, attachment.end)
            return attachment

        return self._do(attach)

    def start_container(self, container_id: str) -> Deferred[None]:
        def start() -> None:
            container = self._container(container_id)
            if container.status == "running":
                return
            program = self.programs.get(container.argv[0] if container.argv else "")
            if program is None:
                raise EngineError(
                    "OCI runtime create failed: exec: "
                    f"\"{container.argv[0] if container.argv else ''}\": executable file not found in $PATH",
                    400,
                )
            container.start(program)

        return self._do(start)

    def wait_container(self, container_id: str) -> Deferred[int]:
        return self._do(lambda: self._container(container_id).wait())

    def resize(self, container_id: str, height: int, width: int) -> Deferred[None]:
        def resize() -> None:
            container = self._container(container_id)
            if container.status != "running":
                raise Conflict(f"Container {container_id} is not running", 409)
            container.size = (height, width)

        return self._do(resize)

    def kill_container(self, container_id: str, signal: str = "KILL") -> Deferred[None]:
        def kill() -> None:
            container = self._container(container_id)
            if container.status != "running":
                raise Conflict(f"Container {container_id} is not running", 409)
            container.signal(signal)

        return self._do(kill)

    def stop_container(self, container_id: str, timeout: int) -> Deferred[None]:
        return self._do(lambda: self._container(container_id).stop(timeout))

    def remove_container(self, container_id: str, force: bool = True) -> Deferred[None]:
        def remove() -> None:
            container = self._container(container_id)
            if container.status == "running":
                if not force:
                    raise Conflict(f"You cannot remove a running container {container.id}", 409)
                container.signal("KILL")
            for attachment in list(container.attachments):
                attachment.end()
            del self.containers[container.id]
            self.emit("destroy", container)

        return self._do(remove)

    def inspect_container(self, container_id: str) -> Deferred[ContainerState]:
        return self._do(lambda: self._container(container_id).state())

    def list_containers(self, labels: Mapping[str, str]) -> Deferred[list[ContainerSummary]]:
        def listing() -> list[ContainerSummary]:
            return [
                ContainerSummary(id=c.id, image=c.spec.image, state=c.status, labels=dict(c.spec.labels))
                for c in self.containers.values()
                if all(k in c.spec.labels and (not v or c.spec.labels[k] == v) for k, v in labels.items())
            ]

        return self._do(listing)

    def logs(self, container_id: str, protocol: IProtocol, follow: bool = False,
             tail: int | None = None) -> Deferred[IPushProducer]:
        def logs() -> IPushProducer:
            container = self._container(container_id)
            from twisted.internet.error import ConnectionDone

            def end() -> None:
                if protocol in container.log_followers:
                    container.log_followers.remove(protocol)
                protocol.connectionLost(Failure(ConnectionDone()))

            producer = _FakeLogStream(end)
            protocol.makeConnection(producer)  # type: ignore[arg-type]
            records = container.log
            if tail is not None:
                records = _tail_lines(records, tail)
            for stream, data in records:
                protocol.dataReceived(data if container.spec.tty else encode_frame(stream, data))
            if follow and container.status == "running":
                container.log_followers.append(protocol)
            else:
                end()
            return producer

        return self._do(logs)

    def events(self, callback: Callable[[Event], None], filters: Mapping[str, list[str]] | None = None,
               since: int | None = None) -> Deferred[IEventSubscription]:
        def events() -> _FakeSubscription:
            subscription = _FakeSubscription(self, callback, dict(filters or {}))
            self._subscriptions.append(subscription)
            return subscription

        return self._do(events)


def _tail_lines(records: list[tuple[int, bytes]], count: int) -> list[tuple[int, bytes]]:
    """The records holding the last ``count`` lines (split at line ends, as Docker's log keeps them)."""
    lines: list[tuple[int, bytes]] = []
    for stream, data in records:
        for line in data.splitlines(keepends=True):
            lines.append((stream, line))
    return lines[-count:] if count > 0 else []

