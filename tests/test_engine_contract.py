"""
The engine contract: one suite, run against the fake and against the real Docker engine.

Whatever the scheduler relies on is asserted here, so the fake cannot drift from the engine.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from flynnsched.docker.interface import (
    Conflict,
    ContainerSpec,
    EngineError,
    Event,
    ImageNotFound,
    NoSuchContainer,
)
from flynnsched.docker.mux import Demultiplexer
from flynnsched.testing import FakeDockerEngine

from .conftest import make_client, need_engine_or_skip, poll

TIMEOUT = 30


@pytest.fixture(params=["fake", "real"])
def engine(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The fake engine on the real reactor, or the real engine."""
    if request.param == "fake":
        fake = FakeDockerEngine(reactor)
        fake.add_image("flynn/busybox", ("sh",))
        yield fake
        return
    client = make_client(need_engine_or_skip())
    yield client
    pytest_twisted.blockon(client.close())


def within(d: Deferred[Any], seconds: float = TIMEOUT) -> Deferred[Any]:
    assert isinstance(d, Deferred)
    return d.addTimeout(seconds, reactor)


class Collector(Protocol):
    """Collects an attached stream, demultiplexed unless it is a TTY's."""

    def __init__(self, tty: bool = False) -> None:
        self.tty = tty
        self.raw = b""
        self.streams: dict[int, bytes] = {1: b"", 2: b""}
        self.demux = Demultiplexer()
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if not self.tty:
            for stream, piece in self.demux.feed(data):
                self.streams[stream] += piece

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.ended.called:
            self.ended.callback(None)


def spec(labels: dict[str, str], *cmd: str, **kw: Any) -> ContainerSpec:
    return ContainerSpec(image="flynn/busybox", cmd=cmd, labels=labels, **kw)


async def run_to_end(engine: Any, labels: dict[str, str], *cmd: str) -> tuple[str, Collector, int]:
    container_id = await within(engine.create_container(spec(labels, *cmd)))
    collector = Collector()
    await within(engine.attach(container_id, collector))
    await within(engine.start_container(container_id))
    await within(collector.ended)
    code = await within(engine.wait_container(container_id))
    return container_id, collector, code


@pytest_twisted.ensureDeferred
async def test_ping(engine: Any) -> None:
    """ping fires with None when the engine answers."""
    assert await within(engine.ping()) is None


@pytest_twisted.ensureDeferred
async def test_inspect_image(engine: Any) -> None:
    """inspect_image gives the image id, and a failed Deferred with ImageNotFound for a missing one."""
    image_id = await within(engine.inspect_image("flynn/busybox"))
    assert image_id.startswith("sha256:")
    d = engine.inspect_image("flynn/no-such-image:nope")
    with pytest.raises(ImageNotFound):
        await within(d)


@pytest_twisted.ensureDeferred
async def test_pull_unreachable(engine: Any) -> None:
    """Pulling an image no registry has fails with ImageNotFound."""
    with pytest.raises(ImageNotFound):
        await within(engine.pull_image("127.0.0.1:9/flynn/missing:1"))


@pytest_twisted.ensureDeferred
async def test_create_missing_image(engine: Any, labels: dict[str, str]) -> None:
    """Creating from a missing image fails with ImageNotFound, without pulling."""
    with pytest.raises(ImageNotFound):
        await within(engine.create_container(ContainerSpec(image="flynn/no-such-image:nope", labels=labels)))


@pytest_twisted.ensureDeferred
async def test_attach_before_start(engine: Any, labels: dict[str, str]) -> None:
    """Attach before start gets all of stdout and stderr, separately, and wait gives the exit code."""
    _, collector, code = await run_to_end(engine, labels, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert collector.streams[1] == b"out\n"
    assert collector.streams[2] == b"err\n"
    assert code == 3


@pytest_twisted.ensureDeferred
async def test_inspect_and_list(engine: Any, labels: dict[str, str]) -> None:
    """inspect shows an exited container's code and labels; list finds it by label."""
    container_id, _, _ = await run_to_end(engine, labels, "sh", "-c", "exit 5")
    state = await within(engine.inspect_container(container_id))
    assert (state.id, state.status, state.running, state.exit_code) == (container_id, "exited", False, 5)
    assert dict(state.labels).items() >= labels.items()
    listed = await within(engine.list_containers(labels))
    assert [c.id for c in listed] == [container_id]
    assert listed[0].state == "exited"


@pytest_twisted.ensureDeferred
async def test_remove(engine: Any, labels: dict[str, str]) -> None:
    """A removed container is gone: inspect and a second remove fail with NoSuchContainer."""
    container_id, _, _ = await run_to_end(engine, labels, "true")
    await within(engine.remove_container(container_id))
    with pytest.raises(NoSuchContainer):
        await within(engine.inspect_container(container_id))
    with pytest.raises(NoSuchContainer):
        await within(engine.remove_container(container_id))
    assert await within(engine.list_containers(labels)) == []


@pytest_twisted.ensureDeferred
async def test_missing_container(engine: Any) -> None:
    """Every per-container call on a missing container fails with NoSuchContainer."""
    missing = "0" * 64
    calls = [
        lambda: engine.inspect_container(missing),
        lambda: engine.start_container(missing),
        lambda: engine.wait_container(missing),
        lambda: engine.kill_container(missing),
        lambda: engine.stop_container(missing, 1),
        lambda: engine.resize(missing, 24, 80),
        lambda: engine.attach(missing, Collector()),
    ]
    for call in calls:
        d = call()
        with pytest.raises(NoSuchContainer):
            await within(d)


@pytest_twisted.ensureDeferred
async def test_start_unknown_command(engine: Any, labels: dict[str, str]) -> None:
    """Starting a command the image lacks fails with EngineError carrying the engine's message."""
    container_id = await within(engine.create_container(spec(labels, "no-such-command")))
    with pytest.raises(EngineError) as info:
        await within(engine.start_container(container_id))
    assert "no-such-command" in info.value.message
    assert info.value.status in (400, 500)


@pytest_twisted.ensureDeferred
async def test_kill(engine: Any, labels: dict[str, str]) -> None:
    """kill ends a running container with 137; killing it again is a Conflict."""
    container_id = await within(engine.create_container(spec(labels, "sleep", "30")))
    await within(engine.start_container(container_id))
    await within(engine.kill_container(container_id))
    assert await within(engine.wait_container(container_id)) == 137
    with pytest.raises(Conflict):
        await within(engine.kill_container(container_id))


@pytest_twisted.ensureDeferred
async def test_stop_grace(engine: Any, labels: dict[str, str]) -> None:
    """stop gives the grace period, then kills a program that ignores SIGTERM (PID 1): code 137."""
    container_id = await within(engine.create_container(spec(labels, "sleep", "30")))
    await within(engine.start_container(container_id))
    started = reactor.seconds()
    await within(engine.stop_container(container_id, 1))
    assert reactor.seconds() - started >= 0.9
    state = await within(engine.inspect_container(container_id))
    assert (state.running, state.exit_code) == (False, 137)
    # Stopping a stopped container is fine.
    await within(engine.stop_container(container_id, 1))


@pytest_twisted.ensureDeferred
async def test_stdin(engine: Any, labels: dict[str, str]) -> None:
    """Bytes written to an attachment reach stdin; close_stdin gives the program end of file."""
    container_id = await within(engine.create_container(spec(labels, "cat", open_stdin=True, stdin_once=True)))
    collector = Collector()
    attachment = await within(engine.attach(container_id, collector, stdin=True))
    await within(engine.start_container(container_id))
    attachment.write(b"hello\n")
    await poll(lambda: collector.streams[1] == b"hello\n", what="the echo of stdin")
    attachment.close_stdin()
    await within(collector.ended)
    assert await within(engine.wait_container(container_id)) == 0


@pytest_twisted.ensureDeferred
async def test_tty(engine: Any, labels: dict[str, str]) -> None:
    """A TTY's stream is raw (no frame headers); resize is a Conflict before start and works after."""
    container_id = await within(engine.create_container(spec(labels, "cat", tty=True, open_stdin=True)))
    collector = Collector(tty=True)
    attachment = await within(engine.attach(container_id, collector, stdin=True))
    with pytest.raises(Conflict):
        await within(engine.resize(container_id, 30, 100))
    await within(engine.start_container(container_id))
    await within(engine.resize(container_id, 30, 100))
    attachment.write(b"hi\r")
    await poll(lambda: b"hi" in collector.raw, what="the terminal echo")
    assert not collector.raw.startswith(b"\x01\x00\x00\x00")
    await within(engine.kill_container(container_id))
    await within(collector.ended)


@pytest_twisted.ensureDeferred
async def test_events(engine: Any, labels: dict[str, str]) -> None:
    """The event stream reports start and die (with the exit code and labels); stop ends it."""
    seen: list[Event] = []
    key, value = next(iter(labels.items()))
    subscription = await within(
        engine.events(seen.append, filters={"type": ["container"], "label": [f"{key}={value}"]})
    )
    container_id, _, _ = await run_to_end(engine, labels, "sh", "-c", "exit 4")
    await poll(lambda: any(e.action == "die" for e in seen), what="the die event")
    actions = [e.action for e in seen if e.id == container_id]
    assert actions[:2] == ["create", "start"] or actions[:1] == ["start"] or "start" in actions
    die = next(e for e in seen if e.action == "die")
    assert die.attributes["exitCode"] == "4"
    assert die.attributes[key] == value
    subscription.stop()
    await within(subscription.done)


@pytest_twisted.ensureDeferred
async def test_logs(engine: Any, labels: dict[str, str]) -> None:
    """logs replays a container's output; tail keeps the last lines."""
    container_id, _, _ = await run_to_end(engine, labels, "sh", "-c", "echo one; echo two; echo three >&2")
    everything = Collector()
    await within(engine.logs(container_id, everything))
    await within(everything.ended)
    assert everything.streams[1] == b"one\ntwo\n"
    assert everything.streams[2] == b"three\n"
    last = Collector()
    await within(engine.logs(container_id, last, tail=1))
    await within(last.ended)
    # Docker copies stdout and stderr separately, so only one stream's order is defined.
    assert last.streams[1] + last.streams[2] in (b"two\n", b"three\n")
    last_out = Collector()
    other_id, _, _ = await run_to_end(engine, labels, "sh", "-c", "echo one; echo two; echo three")
    await within(engine.logs(other_id, last_out, tail=2))
    await within(last_out.ended)
    assert last_out.streams[1] == b"two\nthree\n"


@pytest_twisted.ensureDeferred
async def test_name_conflict(engine: Any, labels: dict[str, str]) -> None:
    """Creating a second container with a name in use is a Conflict."""
    name = "flynnsched-test-" + next(iter(labels.values()))
    await within(engine.create_container(spec(labels, "true", name=name)))
    with pytest.raises(Conflict):
        await within(engine.create_container(spec(labels, "true", name=name)))
