"""
The one interface to a Docker engine, its records and its named errors.

Everything flynnsched asks of Docker goes through ``IDockerEngine``. Two providers exist: the treq
client in ``flynnsched.docker.client`` and the in-memory fake in ``flynnsched.testing``; one contract
suite (``tests/test_engine_contract.py``) holds both to the behaviour documented here.

Every method returns a ``Deferred``; errors are always failed Deferreds, never synchronous raises.
"""

from __future__ import annotations

from typing import Mapping

import attrs
from zope.interface import Attribute, Interface

#: The label every container created by flynnsched carries (value ``"1"``).
LABEL_MANAGED = "io.flynnsched.managed"
#: The job id of the container's job.
LABEL_JOB_ID = "io.flynnsched.job-id"
#: The job type: ``batch``, ``service`` or ``pty``.
LABEL_JOB_TYPE = "io.flynnsched.job-type"
#: The daemon that owns the container: its instance id, kept in its state directory. A daemon only
#: adopts, cleans up or removes containers it owns, so several daemons can share one engine.
LABEL_OWNER = "io.flynnsched.owner"


class EngineError(Exception):
    """
    The engine answered with an error that has no more specific name here.

    ``status`` is the HTTP status the engine gave (0 when there was none) and ``message`` its text.
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class EngineUnavailable(EngineError):
    """The engine could not be reached (socket missing, connection refused or cut)."""


class ImageNotFound(EngineError):
    """The image is neither in the engine nor pullable from its registry."""


class NoSuchContainer(EngineError):
    """The container does not exist (any more)."""


class Conflict(EngineError):
    """The engine refused because of the object's state or a name already in use (HTTP 409)."""


@attrs.frozen
class ContainerSpec:
    """
    What to create: the subset of Docker's container configuration flynnsched uses.

    ``cmd`` of ``None`` keeps the image's own CMD. ``network`` is ``"none"`` or ``"host"``.
    ``memory`` is in bytes, ``nano_cpus`` in billionths of a CPU, ``pids_limit`` a count; ``None``
    means no limit. With ``stdin_once`` the container's stdin closes when an attachment closes
    its stdin (``IAttachment.close_stdin``) or goes away; without it, stdin stays open for the next
    attachment. ``stop_timeout`` is in seconds. ``log_driver`` of ``None`` keeps the engine's
    default.
    """

    image: str
    cmd: tuple[str, ...] | None = None
    env: Mapping[str, str] = attrs.field(factory=dict)
    labels: Mapping[str, str] = attrs.field(factory=dict)
    tty: bool = False
    open_stdin: bool = False
    stdin_once: bool = False
    network: str = "none"
    memory: int | None = None
    nano_cpus: int | None = None
    pids_limit: int | None = None
    stop_signal: str | None = None
    stop_timeout: int | None = None
    log_driver: str | None = None
    name: str | None = None


@attrs.frozen
class ContainerState:
    """
    A container as ``inspect`` sees it.

    ``status`` is Docker's word (created, running, paused, restarting, removing, exited, dead).
    Times are Docker's RFC 3339 strings (``"0001-01-01T00:00:00Z"`` when never).
    """

    id: str
    name: str
    image: str
    status: str
    running: bool
    exit_code: int
    oom_killed: bool
    started_at: str
    finished_at: str
    labels: Mapping[str, str]
    tty: bool


@attrs.frozen
class ContainerSummary:
    """A container as ``list`` sees it."""

    id: str
    image: str
    state: str
    labels: Mapping[str, str]


@attrs.frozen
class Event:
    """
    One record of the engine's event stream.

    ``type`` (container, image, …), ``action`` (create, start, die, oom, destroy, …), ``id`` of the
    object, its ``attributes`` (labels, ``exitCode`` for ``die``, …) and ``time_nano``.
    """

    type: str
    action: str
    id: str
    attributes: Mapping[str, str]
    time_nano: int


class IAttachment(Interface):
    """
    A live attachment to a container's streams.

    The protocol given to ``IDockerEngine.attach`` receives the raw stream with ``dataReceived``
    (multiplexed frames for non-TTY containers, raw bytes for TTY ones) and ``connectionLost`` once
    the stream ends, which is when the container stops or the attachment is closed.

    An attachment is also a streaming ``IPushProducer`` (``pauseProducing``, ``resumeProducing``,
    ``stopProducing``): pausing it stops reading from the engine, so the engine, not flynnsched,
    holds output that a slow consumer has not taken yet.
    """

    def write(data: bytes) -> None:
        """Send bytes to the container's stdin (only when attached with ``stdin=True``)."""

    def close_stdin() -> None:
        """
        Half-close: a container created with ``stdin_once`` reads end-of-file on stdin (others keep
        their stdin open). The output keeps flowing.
        """

    def close() -> None:
        """Drop the attachment; the protocol's ``connectionLost`` follows."""

    def pauseProducing() -> None:
        """Stop delivering output until ``resumeProducing``."""

    def resumeProducing() -> None:
        """Deliver output again."""

    def stopProducing() -> None:
        """The same as ``close``."""


class IEventSubscription(Interface):
    """A live subscription to the engine's event stream."""

    done = Attribute(
        "A Deferred that fires with None when the stream ends (engine restart, connection cut or "
        "``stop``). It never fails: reconnecting is the subscriber's choice."
    )

    def stop() -> None:
        """End the subscription; ``done`` fires."""


class IDockerEngine(Interface):
    """A Docker engine, as flynnsched uses it."""

    def ping():  # type: ignore[no-untyped-def]
        """
        Check that the engine answers.

        :return: Deferred firing with None. Fails with ``EngineUnavailable``. Safe to repeat.
        """

    def version():  # type: ignore[no-untyped-def]
        """
        :return: Deferred firing with the engine's version ``dict`` (``Version``, ``ApiVersion``, …).
            Fails with ``EngineUnavailable``. Safe to repeat.
        """

    def inspect_image(reference: str):  # type: ignore[no-untyped-def]
        """
        :return: Deferred firing with the image's id (``sha256:…``). Fails with ``ImageNotFound``
            when the engine does not have it. Safe to repeat.
        """

    def pull_image(reference: str):  # type: ignore[no-untyped-def]
        """
        Pull an image from its registry into the engine.

        :return: Deferred firing with None once the image is present. Fails with ``ImageNotFound``
            when no registry has it (or none is reachable) and ``EngineError`` otherwise. Safe to
            repeat; callers share concurrent pulls through ``flynnsched.docker.images.ImagePuller``.
        """

    def create_container(spec: ContainerSpec):  # type: ignore[no-untyped-def]
        """
        Create (not start) a container.

        :return: Deferred firing with the new container's id. Fails with ``ImageNotFound`` when the
            image is missing (no pull is tried) and ``Conflict`` when ``spec.name`` is taken. Not
            safe to repeat: each call creates another container.
        """

    def attach(container_id: str, protocol, stdin: bool = False):  # type: ignore[no-untyped-def]
        """
        Attach to a container's stdout and stderr (and stdin when ``stdin``), through the hijacked
        attach. Attach before ``start_container`` to miss nothing.

        :param protocol: an ``IProtocol`` that receives the stream (see ``IAttachment``).
        :return: Deferred firing with an ``IAttachment`` once the engine has attached. Fails with
            ``NoSuchContainer``. Each call makes another attachment.
        """

    def start_container(container_id: str):  # type: ignore[no-untyped-def]
        """
        :return: Deferred firing with None once started. Fails with ``NoSuchContainer``, and
            ``EngineError`` when the command cannot run (status 400 or 500, Docker's message).
            Starting a running container succeeds.
        """

    def wait_container(container_id: str):  # type: ignore[no-untyped-def]
        """
        Wait until the container is not running.

        :return: Deferred firing with its exit code (``int``); at once for a container that is
            not running. Fails with ``NoSuchContainer``. Safe to repeat.
        """

    def resize(container_id: str, height: int, width: int):  # type: ignore[no-untyped-def]
        """
        Set a TTY container's terminal size.

        :return: Deferred firing with None. Fails with ``NoSuchContainer``, and ``Conflict`` when
            the container is not running. Safe to repeat.
        """

    def kill_container(container_id: str, signal: str = "KILL"):  # type: ignore[no-untyped-def]
        """
        Send a signal.

        :return: Deferred firing with None. Fails with ``NoSuchContainer``, and ``Conflict`` when it
            is not running.
        """

    def stop_container(container_id: str, timeout: int):  # type: ignore[no-untyped-def]
        """
        Stop gracefully: the container's stop signal, ``timeout`` seconds, then SIGKILL.

        :return: Deferred firing with None once stopped; also when it was not running. Fails with
            ``NoSuchContainer``. Safe to repeat.
        """

    def remove_container(container_id: str, force: bool = True):  # type: ignore[no-untyped-def]
        """
        Remove a container (killing it first when ``force``) and its anonymous volumes.

        :return: Deferred firing with None. Fails with ``NoSuchContainer`` when there is none.
        """

    def inspect_container(container_id: str):  # type: ignore[no-untyped-def]
        """
        :return: Deferred firing with a ``ContainerState``. Fails with ``NoSuchContainer``. Safe to
            repeat.
        """

    def list_containers(labels: Mapping[str, str]):  # type: ignore[no-untyped-def]
        """
        List containers, running or not, that carry all of ``labels`` (an empty value matches
        any value of that label).

        :return: Deferred firing with a list of ``ContainerSummary``. Safe to repeat.
        """

    def logs(container_id: str, protocol, follow: bool = False, tail: int | None = None):  # type: ignore[no-untyped-def]
        """
        Read a container's logs (stdout and stderr; multiplexed frames for non-TTY containers)
        into ``protocol``, which gets ``connectionLost`` at the end (at once without ``follow``;
        when the container stops with it).

        :return: Deferred firing with an ``IPushProducer`` (pause, resume, stop) once the engine has
            answered. Fails with ``NoSuchContainer``.
        """

    def events(callback, filters: Mapping[str, list[str]] | None = None, since: int | None = None):  # type: ignore[no-untyped-def]
        """
        Subscribe to the event stream: ``callback(Event)`` for each event, in order.

        :param since: replay events from this Unix time (seconds) on.
        :return: Deferred firing with an ``IEventSubscription`` once the engine has answered.
            Fails with ``EngineUnavailable``.
        """
