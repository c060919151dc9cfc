"""
The supervision rules of services: ``policy.decide`` and ``policy.backoff_delay``, called directly.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flynnsched.services.policy import (
    CancelRestart,
    ContainerAdopted,
    ContainerCreated,
    ContainerDied,
    ContainerStarted,
    CreateContainer,
    EngineLost,
    Note,
    RemoveContainer,
    RestartDue,
    ScheduleRestart,
    StartFailed,
    StartRequested,
    State,
    Status,
    StopContainer,
    StopRequested,
    backoff_delay,
    decide,
)
from flynnsched.services.spec import RestartPolicy

ALWAYS = RestartPolicy(jitter=0.0)


def running(policy: RestartPolicy = ALWAYS, now: float = 100.0, container: str = "c1") -> Status:
    """A service whose container ``container`` started at ``now``."""
    status = Status()
    for event in (StartRequested(), ContainerCreated(container), ContainerStarted(container)):
        status = decide(status, event, now, policy).status
    return status


def kinds(actions: tuple[object, ...]) -> list[type]:
    return [type(a) for a in actions if not isinstance(a, Note)]


def notes(actions: tuple[object, ...]) -> list[str]:
    return [a.event for a in actions if isinstance(a, Note)]


def test_start_goes_through_starting_to_running() -> None:
    """A new service asks for a container, records it when created and runs once it started."""
    d = decide(Status(), StartRequested(), 5.0, ALWAYS)
    assert d.status.state is State.STARTING
    assert kinds(d.actions) == [CreateContainer]
    d = decide(d.status, ContainerCreated("c1"), 5.1, ALWAYS)
    assert d.status.container_id == "c1" and d.status.state is State.STARTING
    d = decide(d.status, ContainerStarted("c1"), 5.2, ALWAYS)
    assert d.status.state is State.RUNNING
    assert d.status.started_at == 5.2
    assert notes(d.actions) == ["started"]


def test_death_schedules_restart_after_initial_delay() -> None:
    """With ``always``, a dead container means backoff for the initial delay, then a new start."""
    status = running(now=100.0)
    d = decide(status, ContainerDied("c1", 1), 103.0, ALWAYS)
    assert d.status.state is State.BACKOFF
    assert d.status.next_restart_at == pytest.approx(104.0)
    assert d.status.last_exit is not None and d.status.last_exit.code == 1
    assert d.status.container_id is None and d.status.previous_container_id == "c1"
    assert ScheduleRestart(104.0) in d.actions
    assert notes(d.actions) == ["died", "backoff"]
    early = decide(d.status, RestartDue(), 103.5, ALWAYS)
    assert early.status == d.status and early.actions == (ScheduleRestart(104.0),)
    due = decide(d.status, RestartDue(), 104.0, ALWAYS)
    assert due.status.state is State.STARTING
    assert due.status.restarts == 1
    assert kinds(due.actions) == [CreateContainer]


def test_delays_double_up_to_the_cap() -> None:
    """Crash after crash, delays go 1, 2, 4, … and stop at max_delay."""
    policy = RestartPolicy(initial_delay=1.0, max_delay=20.0, jitter=0.0)
    status = running(policy, now=0.0)
    now = 0.0
    delays = []
    for n in range(8):
        d = decide(status, ContainerDied(f"c{n + 1}", 1), now, policy)
        assert d.status.next_restart_at is not None
        delays.append(d.status.next_restart_at - now)
        now = d.status.next_restart_at
        status = decide(d.status, RestartDue(), now, policy).status
        status = decide(status, ContainerCreated(f"c{n + 2}"), now, policy).status
        status = decide(status, ContainerStarted(f"c{n + 2}"), now, policy).status
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0]
    assert status.restarts == 8


def test_healthy_stretch_resets_the_backoff() -> None:
    """A container that ran for reset_after seconds restarts after the initial delay again."""
    policy = RestartPolicy(initial_delay=1.0, reset_after=600.0, jitter=0.0)
    status = attrs.evolve(running(policy, now=1000.0), attempt=6, restarts=6)
    short = decide(status, ContainerDied("c1", 1), 1000.0 + 599.0, policy)
    assert short.status.next_restart_at == pytest.approx(1599.0 + 64.0)
    healthy = decide(status, ContainerDied("c1", 1), 1000.0 + 600.0, policy)
    assert healthy.status.next_restart_at == pytest.approx(1601.0)
    assert healthy.status.attempt == 1
    assert healthy.status.restarts == 6


def test_on_failure_restarts_only_failures() -> None:
    """``on-failure`` restarts a nonzero exit or an OOM kill, and stops after exit 0."""
    policy = RestartPolicy(mode="on-failure", jitter=0.0)
    status = running(policy)
    assert decide(status, ContainerDied("c1", 0), 200.0, policy).status.state is State.STOPPED
    assert decide(status, ContainerDied("c1", 2), 200.0, policy).status.state is State.BACKOFF
    oom = decide(status, ContainerDied("c1", 0, oom_killed=True), 200.0, policy).status
    assert oom.state is State.BACKOFF
    assert oom.last_exit is not None and oom.last_exit.oom_killed


def test_never_ends_supervision() -> None:
    """``never`` leaves a service stopped (exit 0) or failed (anything else), with no timer."""
    policy = RestartPolicy(mode="never")
    status = running(policy)
    stopped = decide(status, ContainerDied("c1", 0), 200.0, policy)
    failed = decide(status, ContainerDied("c1", 137), 200.0, policy)
    assert stopped.status.state is State.STOPPED and failed.status.state is State.FAILED
    assert ScheduleRestart not in kinds(failed.actions)
    assert failed.status.next_restart_at is None


def test_max_restarts_gives_up() -> None:
    """After max_restarts restarts in a row the service fails instead of restarting."""
    policy = RestartPolicy(max_restarts=2, initial_delay=0.0, jitter=0.0)
    status = running(policy, now=0.0)
    states = []
    for n in range(3):
        d = decide(status, ContainerDied(f"c{n + 1}", 1), 1.0, policy)
        states.append(d.status.state)
        if d.status.state is State.BACKOFF:
            status = decide(d.status, RestartDue(), 1.0, policy).status
            status = decide(status, ContainerCreated(f"c{n + 2}"), 1.0, policy).status
            status = decide(status, ContainerStarted(f"c{n + 2}"), 1.0, policy).status
        else:
            assert "failed" in notes(d.actions)
    assert states == [State.BACKOFF, State.BACKOFF, State.FAILED]


def test_events_for_other_containers_change_nothing() -> None:
    """A replayed ``die`` of an old container, or a late timer, leaves the status alone."""
    status = running()
    d = decide(status, ContainerDied("old", 1), 200.0, ALWAYS)
    assert d.status == status and d.actions == ()
    assert decide(status, RestartDue(), 200.0, ALWAYS) == decide(status, RestartDue(), 200.0, ALWAYS)
    assert decide(status, RestartDue(), 200.0, ALWAYS).status == status


def test_previous_container_is_kept_until_the_next_death() -> None:
    """The last dead container stays for ``logs?previous=1``; the one before it is removed."""
    status = running(container="a")
    d = decide(status, ContainerDied("a", 1), 200.0, ALWAYS)
    assert not [a for a in d.actions if isinstance(a, RemoveContainer)]
    status = decide(d.status, RestartDue(), 300.0, ALWAYS).status
    status = decide(status, ContainerCreated("b"), 300.0, ALWAYS).status
    status = decide(status, ContainerStarted("b"), 300.0, ALWAYS).status
    d = decide(status, ContainerDied("b", 1), 400.0, ALWAYS)
    assert RemoveContainer("a") in d.actions
    assert d.status.previous_container_id == "b"


def test_start_failure_backs_off_and_removes_the_container() -> None:
    """A container that cannot start is removed, its error kept, and the start retried later."""
    status = decide(Status(), StartRequested(), 0.0, ALWAYS).status
    status = decide(status, ContainerCreated("c1"), 0.0, ALWAYS).status
    d = decide(status, StartFailed("exec: nope: not found", "c1"), 0.0, ALWAYS)
    assert d.status.state is State.BACKOFF
    assert RemoveContainer("c1") in d.actions
    assert d.status.last_exit is not None and d.status.last_exit.error == "exec: nope: not found"
    assert d.status.last_exit.code is None
    assert notes(d.actions) == ["start-failed", "backoff"]


def test_engine_lost_while_starting_waits_in_pending() -> None:
    """If the engine disappears during a start the service waits, counting no failure."""
    status = decide(Status(), StartRequested(), 0.0, ALWAYS).status
    d = decide(status, EngineLost(), 1.0, ALWAYS)
    assert d.status.state is State.PENDING
    assert d.status.attempt == 0 and d.status.restarts == 0
    again = decide(d.status, StartRequested(), 2.0, ALWAYS)
    assert again.status.state is State.STARTING


def test_stop_request_stops_and_removes_everything() -> None:
    """Deleting stops the current container, removes it and the previous one, and drops timers."""
    status = attrs.evolve(running(container="cur"), previous_container_id="prev")
    d = decide(status, StopRequested(), 200.0, ALWAYS)
    assert d.status.state is State.STOPPING
    assert [a for a in d.actions if not isinstance(a, Note)] == [
        CancelRestart(), StopContainer("cur"), RemoveContainer("cur"), RemoveContainer("prev"),
    ]
    assert decide(d.status, ContainerDied("cur", 143), 201.0, ALWAYS).status == d.status
    assert decide(d.status, StopRequested(), 201.0, ALWAYS).actions == ()


def test_adoption() -> None:
    """Adopting keeps a running container without a restart, and removes one a finished service has."""
    status = running(container="c1")
    assert decide(status, ContainerAdopted("c1", 50.0), 200.0, ALWAYS).status == status
    backoff = decide(status, ContainerDied("c1", 1), 200.0, ALWAYS).status
    d = decide(backoff, ContainerAdopted("c9", 150.0), 201.0, ALWAYS)
    assert d.status.state is State.RUNNING and d.status.container_id == "c9"
    assert d.status.next_restart_at is None and CancelRestart() in d.actions
    assert d.status.restarts == backoff.restarts
    failed = attrs.evolve(backoff, state=State.FAILED, next_restart_at=None)
    assert decide(failed, ContainerAdopted("c9", 150.0), 201.0, ALWAYS).actions == (RemoveContainer("c9"),)


@given(
    initial=st.floats(0.0, 10.0), cap=st.floats(10.0, 400.0), jitter=st.floats(0.0, 1.0),
    attempt=st.integers(0, 500), sample=st.floats(0.0, 1.0, exclude_max=True),
)
def test_backoff_stays_within_bounds(initial: float, cap: float, jitter: float, attempt: int, sample: float) -> None:
    """Every delay lies between (1 - jitter) × the doubled delay and the cap."""
    policy = RestartPolicy(initial_delay=initial, max_delay=cap, jitter=jitter)
    base = min(initial * 2.0**min(attempt, 100), cap)
    delay = backoff_delay(policy, attempt, sample)
    assert base * (1 - jitter) - 1e-9 <= delay <= base + 1e-9
    assert delay <= cap + 1e-9


_events = st.one_of(
    st.just(StartRequested()),
    st.builds(ContainerCreated, st.sampled_from(["a", "b"])),
    st.builds(ContainerStarted, st.sampled_from(["a", "b"])),
    st.builds(StartFailed, st.just("boom"), st.sampled_from([None, "a", "b"]), st.floats(0, 0.99)),
    st.builds(ContainerDied, st.sampled_from(["a", "b"]), st.sampled_from([None, 0, 1, 137]), st.booleans(),
              st.floats(0, 0.99)),
    st.just(EngineLost()),
    st.just(RestartDue()),
    st.builds(ContainerAdopted, st.sampled_from(["a", "b"]), st.floats(0, 100)),
    st.just(StopRequested()),
)


@settings(max_examples=300)
@given(
    steps=st.lists(st.tuples(_events, st.floats(0.0, 50.0)), max_size=40),
    mode=st.sampled_from(["always", "on-failure", "never"]),
    max_restarts=st.sampled_from([None, 0, 3]),
)
def test_invariants_hold_for_any_history(steps: list[tuple[object, float]], mode: str, max_restarts: int | None) -> None:
    """Whatever happens: a timer only in backoff, a container only when live, restarts never fall."""
    policy = RestartPolicy(mode=mode, max_restarts=max_restarts)
    status = Status()
    now = 0.0
    for event, gap in steps:
        now += gap
        before = status
        status = decide(status, event, now, policy).status  # type: ignore[arg-type]
        assert status.restarts >= before.restarts
        assert (status.next_restart_at is not None) == (status.state is State.BACKOFF)
        if status.state in (State.PENDING, State.BACKOFF, State.STOPPED, State.FAILED):
            assert status.container_id is None
        if status.state is State.RUNNING:
            assert status.container_id is not None and status.started_at is not None
        if before.state is State.STOPPING:
            assert status == before
        if max_restarts is not None:
            assert status.attempt <= max_restarts
