"""
PTY sessions: a container with a terminal, and the browser terminal attached to it.

A ``PtySession`` owns one TTY container from creation to removal. At most one terminal (a
WebSocket) is attached at a time; the program keeps running without one for the linger period,
and everything it writes goes into a bounded ``RingBuffer`` so that a terminal that (re)attaches
gets the recent history, then the live stream. Output is paused at the source, the engine
attachment, whenever the attached terminal cannot keep up.

``PtyManager`` holds the sessions, mints the tokens that open WebSockets and enforces the limits.
It knows nothing of HTTP or WebSockets: a terminal is anything with the ``Terminal`` methods.
"""

from __future__ import annotations

import enum
import hmac
import secrets
import uuid
from typing import Any, Mapping, Protocol as TypingProtocol

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from flynnsched.docker.interface import (
    LABEL_JOB_ID,
    LABEL_JOB_TYPE,
    LABEL_MANAGED,
    Conflict,
    ContainerSpec,
    EngineError,
    IAttachment,
    IDockerEngine,
    ImageNotFound,
    NoSuchContainer,
)
from flynnsched.pty.ring import RingBuffer, skip_partial_utf8
from flynnsched.pty.tokens import AttachGrant, Grant, StartGrant, TokenStore

log = Logger()

#: Terminal type the container is told; xterm.js implements it.
TERM = "xterm-256color"
#: The largest terminal accepted (columns and rows); anything bigger is clamped.
MAX_DIMENSION = 1000
#: Input typed before the program runs is kept, up to this many bytes, and delivered at start.
MAX_EARLY_INPUT = 64 * 1024

#: WebSocket close codes the terminal page understands.
CLOSE_EXITED = 1000
CLOSE_TAKEN_OVER = 4000
CLOSE_FAILED = 4001


class State(enum.Enum):
    """Where a session is in its life."""

    PULLING = "pulling"
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"


_LIVE = (State.PULLING, State.STARTING, State.RUNNING)


class SessionLimit(Exception):
    """As many sessions as allowed are live already."""


class NoSuchSession(Exception):
    """No live session has that id and secret."""


class Terminal(TypingProtocol):
    """The far end of a session: the WebSocket of a browser terminal."""

    def send_output(self, data: bytes) -> None:
        """Deliver terminal bytes, untouched."""

    def send_control(self, message: Mapping[str, Any]) -> None:
        """Deliver a control message (it becomes a JSON text frame)."""

    def close(self, code: int, reason: str) -> None:
        """End the connection."""


@attrs.frozen
class PtyConfig:
    """
    Tunables of PTY sessions.

    ``linger``: seconds a session lives on with no terminal attached (also how long the record of an
    exited session is kept for a page that comes back). ``idle_timeout``: seconds without input or
    output after which a session is ended; 0 disables it. ``max_sessions``: live sessions at most.
    ``ring_bytes``: output history kept per session. ``token_ttl``: lifetime of a WebSocket token.
    ``engine_timeout``: seconds any one engine call may take (pulls excepted). ``labels``: extra
    labels for every container.
    """

    linger: float = 60.0
    idle_timeout: float = 0.0
    max_sessions: int = 16
    ring_bytes: int = 256 * 1024
    token_ttl: float = 60.0
    max_pending_tokens: int = 1024
    engine_timeout: float = 30.0
    network: str = "none"
    labels: Mapping[str, str] = attrs.field(factory=dict)


class _Output(Protocol):
    """Receives the container's TTY stream for its session."""

    def __init__(self, session: PtySession) -> None:
        self._session = session

    def dataReceived(self, data: bytes) -> None:
        self._session._on_output(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._session._on_stream_end()


class PtySession:
    """One TTY container and the terminal (if any) attached to it."""

    def __init__(self, manager: PtyManager, image: str, cmd: tuple[str, ...] | None) -> None:
        self._manager = manager
        self._clock = manager.clock
        self._engine = manager.engine
        self._config = manager.config
        self.id = uuid.uuid4().hex
        self.secret = secrets.token_urlsafe(32)
        self.image = image
        self.cmd = cmd
        self.state = State.STARTING
        self.container_id: str | None = None
        self.exit_code: int | None = None
        self.reason: str | None = None
        self.size: tuple[int, int] | None = None  # (rows, cols)
        self.ring = RingBuffer(self._config.ring_bytes)
        #: The offset up to which output has reached a terminal.
        self._delivered = 0
        #: Fires once the container is gone and the session is over.
        self.ended: Deferred[None] = Deferred()
        self._terminal: Terminal | None = None
        self._ready = False
        self._client_paused = False
        self._transport_paused = False
        self._attachment: IAttachment | None = None
        self._attachment_paused = False
        self._early_input: list[bytes] = []
        self._early_size = 0
        self._terminating = False
        self._stream_ended = False
        self._finishing = False
        self._last_activity = self._clock.seconds()
        self._removed: Deferred[None] | None = None
        self._linger_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None

    # -- what the manager and the terminal call ----------------------------------------

    @property
    def live(self) -> bool:
        """Whether the program is (about to be) running."""
        return self.state in _LIVE

    @property
    def terminal(self) -> Terminal | None:
        """The terminal attached now, if any."""
        return self._terminal

    def status(self) -> dict[str, Any]:
        """The session as a ``status`` control message."""
        message: dict[str, Any] = {
            "type": "status",
            "state": self.state.value,
            "job_id": self.id,
            "image": self.image,
            "cmd": list(self.cmd) if self.cmd is not None else None,
            "container_id": self.container_id,
        }
        if self.exit_code is not None:
            message["exit_code"] = self.exit_code
        if self.reason is not None:
            message["reason"] = self.reason
        return message

    def attach(self, terminal: Terminal) -> None:
        """
        Make ``terminal`` the attached one, replacing any other. Nothing is sent to it until its
        ``hello`` says where its screen stands.
        """
        previous = self._terminal
        self._terminal = terminal
        self._ready = False
        self._client_paused = False
        self._transport_paused = False
        self._cancel_linger()
        if previous is not None and previous is not terminal:
            previous.close(CLOSE_TAKEN_OVER, "the session was opened elsewhere")
        terminal.send_control({"type": "session", "id": self.id, "secret": self.secret})
        terminal.send_control(self.status())
        self._update_flow()

    def hello(self, terminal: Terminal, offset: int, cols: int, rows: int) -> None:
        """
        ``terminal`` has ``offset`` bytes of output on screen and is ``cols`` by ``rows``: send it
        what it is missing, then the live stream.
        """
        if terminal is not self._terminal:
            return
        self.resize(terminal, cols, rows)
        begin, data = self.ring.read_from(max(0, offset))
        if begin != offset:
            # Part of the history is gone (or the client claims more than exists): start over.
            skip = skip_partial_utf8(data) if begin > 0 else 0
            begin, data = begin + skip, data[skip:]
            terminal.send_control({"type": "reset", "offset": begin})
        # Output that a terminal has shown before had its queries (cursor position, …) answered
        # then: the page replays it without answering again. What nobody saw is plain output.
        seen = max(0, min(len(data), self._delivered - begin))
        if seen:
            terminal.send_control({"type": "replay", "length": seen})
            terminal.send_output(data[:seen])
        if len(data) > seen:
            terminal.send_output(data[seen:])
        self._delivered = self.ring.end
        self._ready = True
        self._update_flow()
        if not self.live:
            self._tell_end(terminal)

    def detach(self, terminal: Terminal) -> None:
        """``terminal`` went away; the session lingers unless another is attached."""
        if terminal is not self._terminal:
            return
        self._terminal = None
        self._ready = False
        self._update_flow()
        self._start_linger()

    def input(self, terminal: Terminal, data: bytes) -> None:
        """Bytes typed in ``terminal`` for the program."""
        if terminal is not self._terminal or not data:
            return
        self._touch()
        if self.state is State.RUNNING and self._attachment is not None:
            self._attachment.write(data)
        elif self.live and self._early_size + len(data) <= MAX_EARLY_INPUT:
            self._early_input.append(data)
            self._early_size += len(data)

    def resize(self, terminal: Terminal, cols: int, rows: int) -> None:
        """The attached terminal is now ``cols`` by ``rows``."""
        if terminal is not self._terminal:
            return
        size = (max(1, min(MAX_DIMENSION, rows)), max(1, min(MAX_DIMENSION, cols)))
        changed = size != self.size
        self.size = size
        if changed and self.state is State.RUNNING:
            self._apply_size()

    def set_paused(self, terminal: Terminal, paused: bool, *, transport: bool = False) -> None:
        """
        Flow control: the terminal (its page, or with ``transport`` its connection's send buffer)
        cannot take more output now, or can again.
        """
        if terminal is not self._terminal:
            return
        if transport:
            self._transport_paused = paused
        else:
            self._client_paused = paused
        self._update_flow()

    def terminate(self, reason: str) -> Deferred[None]:
        """End the session: kill the program and remove its container. Fires with ``ended``."""
        if self.live and not self._terminating:
            self._terminating = True
            self.reason = reason
            log.info("ending PTY session {job_id}: {reason}", job_id=self.id, reason=reason)
            if self.state is State.RUNNING and self.container_id is not None:
                self._kill()
            # Otherwise ``_launch`` sees ``_terminating`` after its current step.
        elif not self.live:
            self._forget()
        return self._ended_deferred()

    # -- life of the container -----------------------------------------------------------

    def launch(self) -> Deferred[None]:
        """Pull if needed, create, attach, start and size the container."""
        d = Deferred.fromCoroutine(self._launch())
        d.addErrback(lambda f: log.failure("PTY session {job_id}", f, job_id=self.id))
        return d

    async def _launch(self) -> None:
        engine, timeout = self._engine, self._config.engine_timeout
        try:
            try:
                await engine.inspect_image(self.image).addTimeout(timeout, self._clock)
            except ImageNotFound:
                self._set_state(State.PULLING)
                await self._manager.ensure_image(self.image)
                self._set_state(State.STARTING)
            if self._terminating:
                raise _Terminated()
            labels = {
                **self._config.labels,
                LABEL_MANAGED: "1",
                LABEL_JOB_ID: self.id,
                LABEL_JOB_TYPE: "pty",
            }
            spec = ContainerSpec(
                image=self.image,
                cmd=self.cmd,
                env={"TERM": TERM},
                labels=labels,
                tty=True,
                open_stdin=True,
                # The daemon holds one attachment for the session's life: if it dies with the
                # daemon, the program reads end of file instead of waiting forever.
                stdin_once=True,
                network=self._config.network,
                log_driver="none",
            )
            self.container_id = await engine.create_container(spec).addTimeout(timeout, self._clock)
            log.info(
                "PTY session {job_id}: container {container_id} for {image}",
                job_id=self.id,
                container_id=self.container_id,
                image=self.image,
            )
            if self._terminating:
                raise _Terminated()
            self._attachment = await engine.attach(self.container_id, _Output(self), stdin=True).addTimeout(
                timeout, self._clock
            )
            self._update_flow()
            if self._terminating:
                raise _Terminated()
            await engine.start_container(self.container_id).addTimeout(timeout, self._clock)
        except _Terminated:
            self._end(State.FAILED, None)
            return
        except Exception as e:
            message = e.message if isinstance(e, EngineError) else str(e) or type(e).__name__
            if not isinstance(e, EngineError):
                log.failure("PTY session {job_id} failed to start", Failure(e), job_id=self.id)
            self.reason = message
            self._end(State.FAILED, None)
            return
        self._set_state(State.RUNNING)
        self._touch()
        self._schedule_idle()
        if self._terminating:
            self._kill()
            return
        if self.size is not None:
            self._apply_size()
        early, self._early_input, self._early_size = self._early_input, [], 0
        attachment = self._attachment
        for data in early:
            if attachment is not None:
                attachment.write(data)
        if self._stream_ended:
            self._on_stream_end()

    def _apply_size(self) -> None:
        assert self.size is not None and self.container_id is not None
        rows, cols = self.size

        def failed(f: Failure) -> None:
            if not f.check(Conflict, NoSuchContainer):
                log.failure("resizing PTY session {job_id}", f, job_id=self.id)

        self._engine.resize(self.container_id, rows, cols).addErrback(failed)

    def _kill(self) -> None:
        assert self.container_id is not None
        container_id = self.container_id

        def failed(f: Failure) -> None:
            # Not running or gone already: make sure it is removed and the session ends.
            if not f.check(Conflict, NoSuchContainer):
                log.failure("killing PTY container {container_id}", f, container_id=container_id)
            if self._attachment is not None:
                self._attachment.close()

        self._engine.kill_container(container_id, "KILL").addErrback(failed)

    def _on_output(self, data: bytes) -> None:
        self.ring.append(data)
        self._last_activity = self._clock.seconds()
        if self._terminal is not None and self._ready:
            self._terminal.send_output(data)
            self._delivered = self.ring.end

    def _on_stream_end(self) -> None:
        self._stream_ended = True
        if self.state is not State.RUNNING or self._finishing:
            # Still starting: ``_launch`` comes back here once the state is RUNNING.
            return
        self._finishing = True
        Deferred.fromCoroutine(self._finish())

    async def _finish(self) -> None:
        code: int | None = None
        assert self.container_id is not None
        try:
            code = await self._engine.wait_container(self.container_id).addTimeout(
                self._config.engine_timeout, self._clock
            )
        except Exception:
            log.failure("waiting for PTY container {container_id}", container_id=self.container_id)
        self._end(State.EXITED, code)

    def _end(self, state: State, code: int | None) -> None:
        """The program is over (or never ran): tell the terminal and remove the container."""
        self.state = state
        self.exit_code = code
        self._cancel_idle()
        self._attachment = None
        log.info(
            "PTY session {job_id} {state} (exit code {exit_code})",
            job_id=self.id,
            state=state.value,
            exit_code=code,
        )
        self._removed = self._remove_container()
        terminal = self._terminal
        if terminal is not None and (self._ready or self._terminating):
            self._tell_end(terminal)
        elif terminal is not None:
            # The terminal gets the news after its replay (see ``hello``).
            terminal.send_control(self.status())
        elif self._terminating:
            self._forget()
        else:
            # Nobody saw the end: keep the record for a page that comes back, for the linger time.
            self._start_linger()

    def _tell_end(self, terminal: Terminal) -> None:
        """Give ``terminal`` the final status, close it and forget the session."""
        terminal.send_control(self.status())
        terminal.close(CLOSE_EXITED if self.state is State.EXITED else CLOSE_FAILED, self.state.value)
        self._terminal = None
        self._forget()

    def _remove_container(self) -> Deferred[None]:
        if self.container_id is None:
            return succeed(None)
        container_id = self.container_id

        def failed(f: Failure) -> None:
            if not f.check(NoSuchContainer):
                log.failure("removing PTY container {container_id}", f, container_id=container_id)

        return (
            self._engine.remove_container(container_id, force=True)
            .addTimeout(self._config.engine_timeout, self._clock)
            .addErrback(failed)
        )

    def _forget(self) -> None:
        """Drop the session from the manager; ``ended`` fires once the container is removed."""
        self._cancel_linger()
        self._cancel_idle()
        self._manager._forget(self)

        def ended(_: object) -> None:
            if not self.ended.called:
                self.ended.callback(None)

        (self._removed if self._removed is not None else succeed(None)).addBoth(ended)

    def _ended_deferred(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()

        def fire(result: object) -> object:
            d.callback(None)
            return result

        self.ended.addBoth(fire)
        return d

    # -- flow control, timers --------------------------------------------------------------

    def _update_flow(self) -> None:
        """Pause the engine attachment while the attached, ready terminal cannot take more."""
        attachment = self._attachment
        if attachment is None:
            return
        pause = self._terminal is not None and self._ready and (self._client_paused or self._transport_paused)
        if pause and not self._attachment_paused:
            self._attachment_paused = True
            attachment.pauseProducing()
        elif not pause and self._attachment_paused:
            self._attachment_paused = False
            attachment.resumeProducing()

    def _set_state(self, state: State) -> None:
        self.state = state
        if self._terminal is not None:
            self._terminal.send_control(self.status())

    def _touch(self) -> None:
        self._last_activity = self._clock.seconds()

    def _start_linger(self) -> None:
        self._cancel_linger()
        if self.live:
            self._linger_call = self._clock.callLater(
                self._config.linger, self.terminate, f"no terminal attached for {self._config.linger:g} s"
            )
        else:
            self._linger_call = self._clock.callLater(self._config.linger, self._forget)

    def _cancel_linger(self) -> None:
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None

    def _schedule_idle(self, delay: float | None = None) -> None:
        timeout = self._config.idle_timeout
        if timeout <= 0:
            return
        self._idle_call = self._clock.callLater(timeout if delay is None else delay, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_call = None
        idle = self._clock.seconds() - self._last_activity
        if idle >= self._config.idle_timeout:
            self.terminate(f"idle for {self._config.idle_timeout:g} s")
        else:
            self._schedule_idle(self._config.idle_timeout - idle)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None


class _Terminated(Exception):
    """The session was ended while its container was being set up."""


class PtyManager:
    """All PTY sessions of the daemon, their tokens and their limits."""

    def __init__(
        self,
        clock: IReactorTime,
        engine: IDockerEngine,
        config: PtyConfig = PtyConfig(),
        puller: Any = None,
    ) -> None:
        self.clock = clock
        self.engine = engine
        self.config = config
        self._puller = puller
        self.tokens = TokenStore(clock, ttl=config.token_ttl, max_pending=config.max_pending_tokens)
        self.sessions: dict[str, PtySession] = {}

    def live_count(self) -> int:
        """How many sessions are pulling, starting or running."""
        return sum(1 for s in self.sessions.values() if s.live)

    def check_capacity(self) -> None:
        """:raises SessionLimit: when no other session may start now."""
        if self.live_count() >= self.config.max_sessions:
            raise SessionLimit(f"all {self.config.max_sessions} PTY sessions are in use; try again later")

    def start_token(self, image: str, cmd: tuple[str, ...] | None) -> str:
        """A token for the page to start a session with (nothing starts until it is redeemed)."""
        self.check_capacity()
        return self.tokens.mint(StartGrant(image, cmd))

    def attach_token(self, session_id: str, secret: str) -> str:
        """
        A token to reattach to a session, for a caller that knows its secret.

        :raises NoSuchSession: when there is no such session or the secret is wrong (which of the
            two is not told).
        """
        session = self.sessions.get(session_id)
        if session is None or not hmac.compare_digest(session.secret.encode(), secret.encode()):
            raise NoSuchSession("no such PTY session")
        return self.tokens.mint(AttachGrant(session_id))

    def redeem(self, token: str) -> Grant | None:
        """Use up ``token``: its grant, or None when it is unknown, used or expired."""
        return self.tokens.redeem(token)

    def connect(self, grant: Grant, terminal: Terminal) -> PtySession:
        """
        Attach ``terminal`` to the session ``grant`` names, starting it for a ``StartGrant``.

        :raises SessionLimit: starting when all sessions are in use.
        :raises NoSuchSession: attaching to a session that is gone.
        """
        if isinstance(grant, StartGrant):
            self.check_capacity()
            session = PtySession(self, grant.image, grant.cmd)
            self.sessions[session.id] = session
            log.info("starting PTY session {job_id}: {image} {cmd}", job_id=session.id, image=grant.image,
                     cmd=grant.cmd)
            session.attach(terminal)
            session.launch()
            return session
        existing = self.sessions.get(grant.session_id)
        if existing is None:
            raise NoSuchSession("the PTY session is over")
        existing.attach(terminal)
        return existing

    def ensure_image(self, image: str) -> Deferred[Any]:
        """Make sure ``image`` is in the engine, pulling it if it is missing."""
        if self._puller is not None:
            return self._puller.ensure(image)
        return self.engine.pull_image(image)

    def remove_leftovers(self) -> Deferred[None]:
        """
        Remove PTY containers that carry this manager's ``labels`` but belong to no session: what an
        earlier run of the daemon left behind. Without extra labels nothing is touched, as the
        containers could be another daemon's.
        """
        return Deferred.fromCoroutine(self._remove_leftovers())

    async def _remove_leftovers(self) -> None:
        if not self.config.labels:
            return
        wanted = {**self.config.labels, LABEL_MANAGED: "1", LABEL_JOB_TYPE: "pty"}
        mine = {s.container_id for s in self.sessions.values()}
        for container in await self.engine.list_containers(wanted):
            if container.id in mine:
                continue
            log.info("removing PTY container {container_id} left from an earlier run", container_id=container.id)
            try:
                await self.engine.remove_container(container.id, force=True)
            except NoSuchContainer:
                pass

    def stop(self) -> Deferred[Any]:
        """End every session and remove its container."""
        return DeferredList([s.terminate("the daemon is stopping") for s in list(self.sessions.values())])

    def _forget(self, session: PtySession) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self.tokens.revoke_session(session.id)
