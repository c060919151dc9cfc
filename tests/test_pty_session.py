"""
Unit tests of PTY sessions on a fake clock and the fake engine: tokens, starting, reattaching,
replay, linger, idle timeout, limits and flow control.
"""

from __future__ import annotations

from typing import Any, Mapping

import pytest
from twisted.internet.task import Clock

from flynnsched.docker.interface import LABEL_JOB_ID, LABEL_JOB_TYPE, LABEL_MANAGED
from flynnsched.pty.ring import RingBuffer, skip_partial_utf8
from flynnsched.pty.session import (
    CLOSE_EXITED,
    CLOSE_TAKEN_OVER,
    NoSuchSession,
    PtyConfig,
    PtyManager,
    SessionLimit,
    State,
)
from flynnsched.pty.tokens import AttachGrant, StartGrant, TokenStore
from flynnsched.testing import FakeDockerEngine


class FakeTerminal:
    """Records what a session sends to its terminal."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.controls: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def send_output(self, data: bytes) -> None:
        assert self.closed is None, "output after close"
        self.output += data

    def send_control(self, message: Mapping[str, Any]) -> None:
        self.controls.append(dict(message))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def statuses(self) -> list[str]:
        return [m["state"] for m in self.controls if m["type"] == "status"]


def manager_for(clock: Clock, engine: FakeDockerEngine, **config: Any) -> PtyManager:
    return PtyManager(clock, engine, PtyConfig(**config))


def start(manager: PtyManager, cmd: tuple[str, ...] | None = ("cat",), image: str = "flynn/busybox") -> tuple[Any, FakeTerminal]:
    token = manager.start_token(image, cmd)
    grant = manager.redeem(token)
    assert grant is not None
    terminal = FakeTerminal()
    session = manager.connect(grant, terminal)
    return session, terminal


# -- ring buffer and tokens -------------------------------------------------------------------


def test_ring_keeps_the_newest_bytes_with_offsets() -> None:
    """The ring keeps only its capacity, newest last, and reports absolute offsets."""
    ring = RingBuffer(10)
    for chunk in (b"abc", b"defgh", b"ijklmn"):
        ring.append(chunk)
    assert (ring.start, ring.end, len(ring)) == (4, 14, 10)
    assert ring.read_from(0) == (4, b"efghijklmn")
    assert ring.read_from(9) == (9, b"jklmn")
    assert ring.read_from(14) == (14, b"")
    ring.append(b"x" * 25)
    assert ring.read_from(0) == (29, b"x" * 10)


def test_ring_stays_bounded_under_many_small_writes() -> None:
    """A flood of tiny appends keeps the ring at capacity and in few chunks."""
    ring = RingBuffer(1024)
    for i in range(100_000):
        ring.append(bytes([65 + i % 26]))
    assert len(ring) == 1024
    assert ring.end == 100_000
    start, data = ring.read_from(0)
    assert start == 100_000 - 1024 and len(data) == 1024
    assert data[-1] == 65 + (99_999 % 26)


def test_skip_partial_utf8_drops_only_continuation_bytes() -> None:
    """A replay that starts inside a multi-byte character skips to the next character."""
    text = "é日😀".encode()
    assert skip_partial_utf8(text[1:]) == 1  # inside é
    assert skip_partial_utf8(text[3:]) == 2  # inside 日, two of its three bytes left
    assert skip_partial_utf8(text) == 0
    assert skip_partial_utf8("😀".encode()[1:]) == 3


def test_tokens_are_single_use_and_expire(clock: Clock) -> None:
    """A token works once, and not after its lifetime."""
    store = TokenStore(clock, ttl=30)
    grant = StartGrant("flynn/busybox:latest", ("sh",))
    token = store.mint(grant)
    assert store.redeem(token) == grant
    assert store.redeem(token) is None
    late = store.mint(grant)
    clock.advance(31)
    assert store.redeem(late) is None
    assert store.redeem("made-up") is None


def test_token_store_is_bounded(clock: Clock) -> None:
    """Minting past the bound forgets the oldest tokens."""
    store = TokenStore(clock, ttl=30, max_pending=3)
    tokens = [store.mint(AttachGrant(str(i))) for i in range(5)]
    assert len(store) == 3
    assert store.redeem(tokens[0]) is None
    assert store.redeem(tokens[4]) == AttachGrant("4")


# -- sessions ---------------------------------------------------------------------------------


def test_session_starts_a_labelled_tty_container_and_relays_both_ways(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Opening with a start token creates, attaches, starts and sizes a TTY container; bytes flow both ways."""
    manager = manager_for(clock, fake_engine, labels={"io.flynnsched.test": "x"})
    session, terminal = start(manager)
    session.hello(terminal, 0, 100, 30)
    assert session.state is State.RUNNING
    container = fake_engine.containers[session.container_id]
    spec = container.spec
    assert spec.tty and spec.open_stdin
    assert spec.env["TERM"] == "xterm-256color"
    assert spec.labels[LABEL_MANAGED] == "1"
    assert spec.labels[LABEL_JOB_ID] == session.id
    assert spec.labels[LABEL_JOB_TYPE] == "pty"
    assert spec.labels["io.flynnsched.test"] == "x"
    assert spec.cmd == ("cat",)
    assert container.size == (30, 100)
    session.input(terminal, "héllo 日本\n".encode())
    assert bytes(terminal.output).count("héllo 日本".encode()) == 2  # the TTY echo and cat's copy
    session.resize(terminal, 120, 40)
    assert container.size == (40, 120)
    assert terminal.statuses()[-1] == "running"
    assert {"type": "session", "id": session.id, "secret": session.secret} in terminal.controls


def test_program_exit_reports_the_code_and_removes_the_container(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """When the program exits the terminal gets the exit code and the container is removed."""
    manager = manager_for(clock, fake_engine)
    session, terminal = start(manager)
    session.hello(terminal, 0, 80, 24)
    container_id = session.container_id
    fake_engine.exit(container_id, 3)
    assert terminal.controls[-1]["state"] == "exited"
    assert terminal.controls[-1]["exit_code"] == 3
    assert terminal.closed == (CLOSE_EXITED, "exited")
    assert container_id not in fake_engine.containers
    assert session.id not in manager.sessions
    assert session.ended.called


def test_missing_image_is_pulled_with_a_pulling_status(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A missing image is pulled first, and the terminal sees pulling, starting, running."""
    fake_engine.registry["example/tool:latest"] = ("cat",)
    manager = manager_for(clock, fake_engine)
    session, terminal = start(manager, image="example/tool:latest", cmd=None)
    assert fake_engine.pull_count == 1
    assert terminal.statuses() == ["starting", "pulling", "starting", "running"]
    assert session.state is State.RUNNING


def test_failed_start_reports_the_error(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A command that cannot run ends the session as failed with Docker's message; nothing is left."""
    manager = manager_for(clock, fake_engine)
    session, terminal = start(manager, cmd=("no-such-program",))
    session.hello(terminal, 0, 80, 24)
    assert session.state is State.FAILED
    assert "executable file not found" in terminal.controls[-1]["reason"]
    assert terminal.closed is not None
    assert fake_engine.containers == {}


def test_reattach_replays_missed_output_exactly(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A terminal that comes back gets what it missed after its offset, then the live stream."""
    manager = manager_for(clock, fake_engine)
    session, first = start(manager)
    session.hello(first, 0, 80, 24)
    fake_engine.emit_output(session.container_id, b"one\n")
    seen = len(first.output)
    session.detach(first)
    fake_engine.emit_output(session.container_id, b"two\n")
    token = manager.attach_token(session.id, session.secret)
    second = FakeTerminal()
    assert manager.connect(manager.redeem(token), second) is session
    session.hello(second, seen, 80, 24)
    assert bytes(second.output) == b"two\r\n"
    fake_engine.emit_output(session.container_id, b"three\n")
    assert bytes(second.output) == b"two\r\nthree\r\n"
    # A reloaded page (offset 0) gets the whole history.
    token = manager.attach_token(session.id, session.secret)
    third = FakeTerminal()
    manager.connect(manager.redeem(token), third)
    assert second.closed == (CLOSE_TAKEN_OVER, "the session was opened elsewhere")
    session.hello(third, 0, 80, 24)
    assert bytes(third.output) == b"one\r\ntwo\r\nthree\r\n"


def test_reattach_after_the_history_wrapped_resets_the_screen(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """When the missed bytes are gone the terminal is told to reset and gets the kept history, cut at a character."""
    manager = manager_for(clock, fake_engine, ring_bytes=16)
    session, first = start(manager)
    session.hello(first, 0, 80, 24)
    session.detach(first)
    fake_engine.emit_output(session.container_id, "aaaa日日日日日日".encode())  # 4 + 18 bytes
    second = FakeTerminal()
    manager.connect(manager.redeem(manager.attach_token(session.id, session.secret)), second)
    session.hello(second, 0, 80, 24)
    resets = [m for m in second.controls if m["type"] == "reset"]
    assert resets == [{"type": "reset", "offset": 22 - 15}]
    assert bytes(second.output) == "日日日日日".encode()


def test_attach_token_needs_the_secret(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Re-issuing a token needs the session's secret; a wrong one looks like no session at all."""
    manager = manager_for(clock, fake_engine)
    session, _ = start(manager)
    with pytest.raises(NoSuchSession):
        manager.attach_token(session.id, "guess")
    with pytest.raises(NoSuchSession):
        manager.attach_token("nope", session.secret)
    assert isinstance(manager.redeem(manager.attach_token(session.id, session.secret)), AttachGrant)


def test_linger_keeps_a_detached_session_then_removes_it(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Without a terminal the program runs on for the linger period, then is killed and removed."""
    manager = manager_for(clock, fake_engine, linger=60)
    session, terminal = start(manager)
    session.hello(terminal, 0, 80, 24)
    container_id = session.container_id
    session.detach(terminal)
    for _ in range(59):
        clock.advance(1)
        fake_engine.emit_output(container_id, b"y\n" * 10_000)
    assert session.state is State.RUNNING
    assert container_id in fake_engine.containers
    assert len(session.ring) == session.ring.capacity  # output went on, the ring stayed bounded
    clock.advance(1.5)
    assert container_id not in fake_engine.containers
    assert session.id not in manager.sessions
    assert session.exit_code == 137
    assert "no terminal attached" in (session.reason or "")


def test_reattaching_within_the_linger_period_cancels_it(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A terminal that comes back in time keeps the session alive past the linger period."""
    manager = manager_for(clock, fake_engine, linger=10)
    session, terminal = start(manager)
    session.hello(terminal, 0, 80, 24)
    session.detach(terminal)
    clock.advance(9)
    again = FakeTerminal()
    manager.connect(manager.redeem(manager.attach_token(session.id, session.secret)), again)
    clock.advance(100)
    assert session.state is State.RUNNING


def test_an_exit_nobody_saw_is_kept_for_a_returning_page(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A program that exits while no page is attached is reported to a page that returns within the linger period."""
    manager = manager_for(clock, fake_engine, linger=30)
    session, terminal = start(manager)
    session.hello(terminal, 0, 80, 24)
    fake_engine.emit_output(session.container_id, b"bye\n")
    session.detach(terminal)
    fake_engine.exit(session.container_id, 0)
    assert fake_engine.containers == {}
    back = FakeTerminal()
    manager.connect(manager.redeem(manager.attach_token(session.id, session.secret)), back)
    session.hello(back, 0, 80, 24)
    assert bytes(back.output) == b"bye\r\n"
    assert back.controls[-1]["state"] == "exited" and back.controls[-1]["exit_code"] == 0
    assert back.closed == (CLOSE_EXITED, "exited")
    assert session.id not in manager.sessions


def test_idle_timeout_ends_a_quiet_session(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A session with neither input nor output for the idle timeout is ended; activity postpones it."""
    manager = manager_for(clock, fake_engine, idle_timeout=100)
    session, terminal = start(manager)
    session.hello(terminal, 0, 80, 24)
    clock.advance(60)
    session.input(terminal, b"x")
    clock.advance(60)
    assert session.state is State.RUNNING
    clock.advance(41)
    assert session.state is State.EXITED
    assert "idle" in terminal.controls[-1]["reason"]
    assert terminal.closed is not None
    assert fake_engine.containers == {}


def test_session_limit(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """No more than max_sessions live sessions: neither a page token nor a start is granted beyond it."""
    manager = manager_for(clock, fake_engine, max_sessions=2)
    spare = manager.start_token("flynn/busybox", ("cat",))
    first, t1 = start(manager)
    start(manager)
    with pytest.raises(SessionLimit):
        manager.start_token("flynn/busybox", ("cat",))
    with pytest.raises(SessionLimit):
        manager.connect(manager.redeem(spare), FakeTerminal())
    first.hello(t1, 0, 80, 24)
    fake_engine.exit(first.container_id, 0)
    assert manager.live_count() == 1
    manager.start_token("flynn/busybox", ("cat",))


def test_flow_control_pauses_the_attachment(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """The attachment is paused while the terminal or its connection is full, and resumed after."""
    manager = manager_for(clock, fake_engine)
    session, terminal = start(manager)
    session.hello(terminal, 0, 80, 24)
    session.set_paused(terminal, True)
    fake_engine.emit_output(session.container_id, b"held\n")
    assert b"held" not in terminal.output
    session.set_paused(terminal, True, transport=True)
    session.set_paused(terminal, False)
    assert b"held" not in terminal.output
    session.set_paused(terminal, False, transport=True)
    assert bytes(terminal.output).endswith(b"held\r\n")
    # A terminal that leaves while paused doesn't keep the program paused.
    session.set_paused(terminal, True)
    session.detach(terminal)
    fake_engine.emit_output(session.container_id, b"more\n")
    assert session.ring.read_from(0)[1].endswith(b"more\r\n")


def test_input_typed_before_start_is_delivered(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Keys typed while the container is still starting reach the program once it runs."""
    gate = fake_engine.pull_gate = __import__("twisted.internet.defer", fromlist=["Deferred"]).Deferred()
    fake_engine.registry["example/slow:latest"] = ("cat",)
    manager = manager_for(clock, fake_engine)
    session, terminal = start(manager, image="example/slow:latest", cmd=None)
    session.hello(terminal, 0, 80, 24)
    session.input(terminal, b"early\n")
    assert session.state is State.PULLING
    gate.callback(None)
    assert session.state is State.RUNNING
    assert b"early" in terminal.output


def test_stop_ends_every_session(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Stopping the manager kills and removes every container, starting or running."""
    manager = manager_for(clock, fake_engine)
    running, terminal = start(manager)
    running.hello(terminal, 0, 80, 24)
    start(manager)
    done = manager.stop()
    assert done.called
    assert fake_engine.containers == {}
    assert manager.sessions == {}


def test_leftovers_of_this_daemon_are_removed_and_no_others(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """On start, PTY containers with this daemon's owner label but no session are removed; others stay."""
    from flynnsched.docker.interface import ContainerSpec

    owner = {"io.flynnsched.owner": "me"}
    manager = manager_for(clock, fake_engine, labels=owner)
    live, terminal = start(manager)
    pty = {LABEL_MANAGED: "1", LABEL_JOB_TYPE: "pty"}
    mine = fake_engine.create_container(ContainerSpec("flynn/busybox", labels={**pty, **owner}))
    other = fake_engine.create_container(ContainerSpec("flynn/busybox", labels={**pty, "io.flynnsched.owner": "you"}))
    done = manager.remove_leftovers()
    assert done.called
    assert set(fake_engine.containers) == {live.container_id, other.result}
    assert mine.result not in fake_engine.containers
    # Without an owner label nothing is touched.
    bare = manager_for(clock, fake_engine)
    bare.remove_leftovers()
    assert other.result in fake_engine.containers


def test_replay_marks_history_that_a_terminal_has_already_answered(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """History shown before is marked as replay (its queries were answered); output nobody saw is not."""
    manager = manager_for(clock, fake_engine)
    session, first = start(manager)
    session.hello(first, 0, 80, 24)
    fake_engine.emit_output(session.container_id, b"seen\x1b[6n")
    session.detach(first)
    fake_engine.emit_output(session.container_id, b"unseen\x1b[6n")
    second = FakeTerminal()
    manager.connect(manager.redeem(manager.attach_token(session.id, session.secret)), second)
    session.hello(second, 0, 80, 24)
    assert {"type": "replay", "length": len(b"seen\x1b[6n")} in second.controls
    assert bytes(second.output) == b"seen\x1b[6nunseen\x1b[6n"
    # A terminal that reconnects after seeing everything gets no replay at all.
    third = FakeTerminal()
    manager.connect(manager.redeem(manager.attach_token(session.id, session.secret)), third)
    session.hello(third, len(second.output), 80, 24)
    assert not [m for m in third.controls if m["type"] in ("replay", "reset")]
    assert bytes(third.output) == b""
