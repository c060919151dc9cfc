"""
The supervision rules of a service, as a pure function.

``decide(status, event, now, policy)`` takes what is known about a service (a frozen ``Status``),
one thing that happened (an event record) and the time, and returns the new status and the
actions to carry out. It does no I/O, reads no clock and draws no random numbers (the jitter
sample arrives inside the event), so every rule is tested by calling it. ``ServiceSupervisor``
feeds it events from the Docker engine and its timers, and performs the actions.

States::

    pending ──▶ starting ──▶ running ──(died, policy says restart)──▶ backoff ──(delay over)──▶ starting
       ▲            │                 └─(died, policy says no)──▶ stopped | failed
       └─(engine unreachable)            any ──(DELETE)──▶ stopping ──▶ (gone)
"""

from __future__ import annotations

import enum
from typing import Any, Mapping, Union

import attrs
from twisted.application.internet import backoffPolicy

from flynnsched.services.spec import RestartPolicy

__all__ = [
    "Action",
    "CancelRestart",
    "ContainerAdopted",
    "ContainerCreated",
    "ContainerDied",
    "ContainerStarted",
    "CreateContainer",
    "Decision",
    "EngineLost",
    "Event",
    "LastExit",
    "Note",
    "RemoveContainer",
    "RestartDue",
    "ScheduleRestart",
    "StartFailed",
    "StartRequested",
    "State",
    "Status",
    "StopContainer",
    "StopRequested",
    "backoff_delay",
    "decide",
]


class State(enum.Enum):
    """Where a service is in its life."""

    #: Wants to run; no container yet (just created, or the engine is unreachable).
    PENDING = "pending"
    #: Its container is being created and started.
    STARTING = "starting"
    #: Its container runs.
    RUNNING = "running"
    #: Its container stopped; a new one starts at ``next_restart_at``.
    BACKOFF = "backoff"
    #: Being deleted: stop signal, grace period, kill, remove.
    STOPPING = "stopping"
    #: Its container exited successfully and the policy does not restart it.
    STOPPED = "stopped"
    #: Its container failed and the policy gave up (``never``, or ``max_restarts`` reached).
    FAILED = "failed"


#: States in which the service has, or is about to have, a live container.
LIVE_STATES = frozenset({State.STARTING, State.RUNNING})
#: States that end supervision until the service is deleted.
FINAL_STATES = frozenset({State.STOPPED, State.FAILED})


@attrs.frozen
class LastExit:
    """
    How the last container ended: exit ``code`` (``None`` when it never ran or vanished),
    ``time``, whether the kernel ``oom_killed`` it, and the ``error`` that kept it from starting.
    """

    code: int | None
    time: float
    oom_killed: bool = False
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.code != 0 or self.oom_killed or self.error is not None


@attrs.frozen
class Status:
    """
    The supervision state of one service.

    ``restarts`` counts every restart since creation (it only grows). ``attempt`` counts restarts
    in a row without ``reset_after`` seconds of healthy running: it is the backoff exponent and what
    ``max_restarts`` limits. ``previous_container_id`` is the last dead container, kept for
    ``logs?previous=1`` until the next one dies.
    """

    state: State = State.PENDING
    restarts: int = 0
    attempt: int = 0
    container_id: str | None = None
    previous_container_id: str | None = None
    started_at: float | None = None
    last_exit: LastExit | None = None
    next_restart_at: float | None = None


# -- events -------------------------------------------------------------------------------------


@attrs.frozen
class StartRequested:
    """Start the service: it was just created, or it was pending when the engine came back."""


@attrs.frozen
class ContainerCreated:
    """Its new container exists (not started yet)."""

    container_id: str


@attrs.frozen
class ContainerStarted:
    """Its new container started."""

    container_id: str


@attrs.frozen
class StartFailed:
    """
    Creating or starting a container failed for a reason a retry may fix or not (no image, no
    such executable, a bad limit). ``container_id`` is the created container, if any.
    """

    error: str
    container_id: str | None = None
    jitter_sample: float = 0.0


@attrs.frozen
class ContainerDied:
    """
    A container of the service stopped (the engine's ``die`` event, or found stopped when
    reconciling). ``exit_code`` is ``None`` when the container vanished.
    """

    container_id: str
    exit_code: int | None
    oom_killed: bool = False
    jitter_sample: float = 0.0


@attrs.frozen
class EngineLost:
    """The engine became unreachable while starting a container."""


@attrs.frozen
class RestartDue:
    """The backoff timer went off."""


@attrs.frozen
class ContainerAdopted:
    """Reconciling found this running container of the service and keeps it."""

    container_id: str
    started_at: float


@attrs.frozen
class StopRequested:
    """The service is being deleted."""


Event = Union[
    StartRequested, ContainerCreated, ContainerStarted, StartFailed, ContainerDied, EngineLost,
    RestartDue, ContainerAdopted, StopRequested,
]


# -- actions ------------------------------------------------------------------------------------


@attrs.frozen
class CreateContainer:
    """Create and start a new container for the service."""


@attrs.frozen
class ScheduleRestart:
    """Deliver ``RestartDue`` at ``at`` (replacing any earlier timer)."""

    at: float


@attrs.frozen
class CancelRestart:
    """Drop the backoff timer, if any."""


@attrs.frozen
class StopContainer:
    """Stop gracefully: the stop signal, the grace period, then SIGKILL."""

    container_id: str


@attrs.frozen
class RemoveContainer:
    """Remove (force) a container the service no longer wants."""

    container_id: str


@attrs.frozen
class Note:
    """Add ``event`` (with ``detail``) to the service's lifecycle history."""

    event: str
    detail: Mapping[str, Any] = attrs.field(factory=dict, hash=False)


Action = Union[CreateContainer, ScheduleRestart, CancelRestart, StopContainer, RemoveContainer, Note]


@attrs.frozen
class Decision:
    """What ``decide`` answers: the new status and the actions, in order."""

    status: Status
    actions: tuple[Action, ...] = ()


# -- rules --------------------------------------------------------------------------------------


def backoff_delay(policy: RestartPolicy, attempt: int, jitter_sample: float) -> float:
    """
    Seconds to wait before restart number ``attempt`` (0 for the first in a row): the initial
    delay doubled ``attempt`` times, capped, then shortened by ``policy.jitter × jitter_sample``
    (a sample in [0, 1)), so it never exceeds the cap.
    """
    base = backoffPolicy(policy.initial_delay, policy.max_delay, 2.0, jitter=lambda: 0.0)(attempt)
    sample = min(max(jitter_sample, 0.0), 1.0)
    return max(0.0, base * (1.0 - policy.jitter * sample))


def _exited(status: Status, exit: LastExit, now: float, policy: RestartPolicy, jitter_sample: float,
            dead_container: str | None, notes: list[Action]) -> Decision:
    """The container of a live service is gone: restart it later, or stop supervising."""
    actions: list[Action] = list(notes)
    attempt = status.attempt
    if status.started_at is not None and now - status.started_at >= policy.reset_after:
        attempt = 0
    previous = status.previous_container_id
    if dead_container is not None:
        if previous is not None and previous != dead_container:
            actions.append(RemoveContainer(previous))
        previous = dead_container
    base = attrs.evolve(
        status, container_id=None, previous_container_id=previous, started_at=None, last_exit=exit,
        attempt=attempt, next_restart_at=None,
    )
    wants_restart = policy.mode == "always" or (policy.mode == "on-failure" and exit.failed)
    if not wants_restart:
        final = State.FAILED if exit.failed else State.STOPPED
        actions.append(Note(final.value, {"reason": f"restart policy {policy.mode}"}))
        return Decision(attrs.evolve(base, state=final), tuple(actions))
    if policy.max_restarts is not None and attempt >= policy.max_restarts:
        actions.append(Note("failed", {"reason": f"gave up after {attempt} restarts in a row"}))
        return Decision(attrs.evolve(base, state=State.FAILED), tuple(actions))
    delay = backoff_delay(policy, attempt, jitter_sample)
    at = now + delay
    actions.append(ScheduleRestart(at))
    actions.append(Note("backoff", {"delay": round(delay, 3)}))
    return Decision(attrs.evolve(base, state=State.BACKOFF, attempt=attempt + 1, next_restart_at=at),
                    tuple(actions))


def decide(status: Status, event: Event, now: float, policy: RestartPolicy) -> Decision:
    """
    The supervision rule: given what is known (``status``), what happened (``event``) and the
    time, the new status and what to do. Events that do not apply in the current state change
    nothing (a ``die`` replayed twice, a timer that fires after a restart, …).
    """
    state = status.state
    if isinstance(event, StopRequested):
        if state is State.STOPPING:
            return Decision(status)
        actions: list[Action] = [CancelRestart(), Note("stopping")]
        if status.container_id is not None:
            actions.append(StopContainer(status.container_id))
            actions.append(RemoveContainer(status.container_id))
        if status.previous_container_id is not None:
            actions.append(RemoveContainer(status.previous_container_id))
        return Decision(attrs.evolve(status, state=State.STOPPING, next_restart_at=None), tuple(actions))
    if state is State.STOPPING:
        return Decision(status)

    if isinstance(event, StartRequested):
        if state is not State.PENDING:
            return Decision(status)
        return Decision(attrs.evolve(status, state=State.STARTING), (CreateContainer(),))

    if isinstance(event, ContainerCreated):
        if state is not State.STARTING:
            return Decision(status, (RemoveContainer(event.container_id),))
        return Decision(attrs.evolve(status, container_id=event.container_id))

    if isinstance(event, ContainerStarted):
        if state is not State.STARTING or status.container_id != event.container_id:
            return Decision(status)
        return Decision(
            attrs.evolve(status, state=State.RUNNING, started_at=now),
            (Note("started", {"container_id": event.container_id}),),
        )

    if isinstance(event, StartFailed):
        if state is not State.STARTING:
            return Decision(status)
        notes: list[Action] = [Note("start-failed", {"error": event.error})]
        if event.container_id is not None:
            notes.append(RemoveContainer(event.container_id))
        exit = LastExit(code=None, time=now, error=event.error)
        return _exited(attrs.evolve(status, started_at=None), exit, now, policy, event.jitter_sample,
                       None, notes)

    if isinstance(event, ContainerDied):
        if state not in LIVE_STATES or status.container_id != event.container_id:
            return Decision(status)
        detail = {"container_id": event.container_id, "exit_code": event.exit_code,
                  "oom_killed": event.oom_killed}
        exit = LastExit(code=event.exit_code, time=now, oom_killed=event.oom_killed,
                        error=None if event.exit_code is not None else "the container vanished")
        return _exited(status, exit, now, policy, event.jitter_sample, event.container_id,
                       [Note("died", detail)])

    if isinstance(event, EngineLost):
        if state is not State.STARTING:
            return Decision(status)
        return Decision(attrs.evolve(status, state=State.PENDING, container_id=None),
                        (Note("engine-unreachable"),))

    if isinstance(event, RestartDue):
        if state is not State.BACKOFF or status.next_restart_at is None:
            return Decision(status)
        if now < status.next_restart_at:
            return Decision(status, (ScheduleRestart(status.next_restart_at),))
        return Decision(
            attrs.evolve(status, state=State.STARTING, restarts=status.restarts + 1, next_restart_at=None),
            (CreateContainer(),),
        )

    if isinstance(event, ContainerAdopted):
        if state in FINAL_STATES:
            return Decision(status, (RemoveContainer(event.container_id),))
        if state is State.RUNNING and status.container_id == event.container_id:
            return Decision(status)
        actions = [Note("adopted", {"container_id": event.container_id})]
        if state is State.BACKOFF:
            actions.insert(0, CancelRestart())
        return Decision(
            attrs.evolve(status, state=State.RUNNING, container_id=event.container_id,
                         started_at=event.started_at, next_restart_at=None),
            tuple(actions),
        )

    raise TypeError(f"not a service event: {event!r}")
