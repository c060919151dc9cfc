"""
``ServiceSupervisor`` on a fake clock and the fake engine: restarts with backoff, graceful
deletion, reconciliation after a restart of the daemon, and engine outages.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from flynnsched.docker.interface import LABEL_JOB_ID, LABEL_JOB_TYPE, LABEL_MANAGED, ContainerSpec, EngineUnavailable
from flynnsched.docker.interface import ImageNotFound
from flynnsched.services.policy import State, Status
from flynnsched.services.spec import parse_service_spec
from flynnsched.services.store import HistoryEntry, MemoryServiceStore, NameTaken, StoredService
from flynnsched.services.supervisor import NoContainer, NoSuchService, ServiceSupervisor, container_spec
from flynnsched.testing import FakeDockerEngine

from .conftest import result


OWNER = "0123456789abcdef"


def make(clock: Clock, engine: FakeDockerEngine, store: MemoryServiceStore | None = None) -> ServiceSupervisor:
    supervisor = ServiceSupervisor(clock, engine, store or MemoryServiceStore(OWNER), random=lambda: 0.0)
    supervisor.startService()
    return supervisor


def create(supervisor: ServiceSupervisor, **body: Any) -> str:
    body.setdefault("image", "flynn/busybox")
    view = result((supervisor.create(parse_service_spec(body))))
    return str(view.id)


def service_containers(engine: FakeDockerEngine, service_id: str) -> list[Any]:
    return [c for c in engine.containers.values() if c.spec.labels.get(LABEL_JOB_ID) == service_id]


def running(engine: FakeDockerEngine, service_id: str) -> list[str]:
    return [c.id for c in service_containers(engine, service_id) if c.status == "running"]


def test_create_runs_a_labelled_container(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A new service gets one running container with the flynnsched labels and its limits."""
    supervisor = make(clock, fake_engine)
    sid = create(supervisor, cmd=["sleep", "1000"], env={"A": "1"}, name="web",
                 resources={"memory": "64m", "cpus": 0.5, "pids": 50}, stop_signal="SIGINT")
    (container,) = service_containers(fake_engine, sid)
    assert container.status == "running"
    assert container.spec.labels[LABEL_MANAGED] == "1"
    assert container.spec.labels[LABEL_JOB_TYPE] == "service"
    assert container.spec.memory == 64 << 20 and container.spec.nano_cpus == 500_000_000
    assert container.spec.pids_limit == 50 and container.spec.stop_signal == "SIGINT"
    view = supervisor.get("web")
    assert view.id == sid and view.status.state is State.RUNNING
    assert view.status.container_id == container.id
    assert [h.event for h in view.history] == ["created", "started"]


def test_crash_loop_backs_off_exponentially(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A container that exits after 1 s is restarted after 1, 2, 4, 8 s: the restart count says so."""
    supervisor = make(clock, fake_engine)
    sid = create(supervisor, cmd=["sh", "-c", "sleep 1; exit 1"])
    delays = []
    for n in range(4):
        assert supervisor.get(sid).status.state is State.RUNNING
        clock.advance(1.0)
        status = supervisor.get(sid).status
        assert status.state is State.BACKOFF and status.restarts == n
        assert status.last_exit is not None and status.last_exit.code == 1
        assert status.next_restart_at is not None
        delays.append(status.next_restart_at - clock.seconds())
        clock.advance(delays[-1] - 0.01)
        assert supervisor.get(sid).status.restarts == n
        clock.advance(0.01)
        assert supervisor.get(sid).status.restarts == n + 1
    assert delays == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert supervisor.get(sid).status.state is State.RUNNING
    assert len(service_containers(fake_engine, sid)) == 2  # the running one and the last dead one


def test_killed_container_is_replaced(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A container killed under the service (``docker kill``) is replaced; last exit and count show it."""
    supervisor = make(clock, fake_engine)
    sid = create(supervisor, cmd=["sleep", "1000"])
    (first,) = running(fake_engine, sid)
    result(fake_engine.kill_container(first, "KILL"))
    status = supervisor.get(sid).status
    assert status.state is State.BACKOFF
    assert status.last_exit is not None and status.last_exit.code == 137 and not status.last_exit.oom_killed
    clock.advance(1.0)
    (second,) = running(fake_engine, sid)
    assert second != first
    status = supervisor.get(sid).status
    assert status.restarts == 1 and status.container_id == second and status.previous_container_id == first


def test_oom_kill_is_reported(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """An OOM-killed container shows ``oom_killed`` in its last exit."""
    supervisor = make(clock, fake_engine)
    sid = create(supervisor, cmd=["sleep", "1000"])
    fake_engine.exit(running(fake_engine, sid)[0], 137, oom=True)
    last = supervisor.get(sid).status.last_exit
    assert last is not None and last.oom_killed and last.code == 137


def test_delete_stops_gracefully_then_removes(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """DELETE waits the grace period for a container that ignores its signal, then it is gone."""
    store = MemoryServiceStore(OWNER)
    supervisor = make(clock, fake_engine, store)
    sid = create(supervisor, cmd=["sleep", "1000"], stop_grace_period=3)
    done = (supervisor.delete(sid))
    assert not done.called
    assert supervisor.get(sid).status.state is State.STOPPING
    assert store.services[sid].status.state is State.STOPPING
    clock.advance(2.9)
    assert not done.called
    clock.advance(0.2)
    result(done)
    assert service_containers(fake_engine, sid) == []
    with pytest.raises(NoSuchService):
        supervisor.get(sid)
    assert store.services == {}


def test_delete_in_backoff_cancels_the_restart(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A service deleted while waiting to restart never starts again."""
    supervisor = make(clock, fake_engine)
    sid = create(supervisor, cmd=["false"])
    assert supervisor.get(sid).status.state is State.BACKOFF
    result((supervisor.delete(sid)))
    clock.advance(1000)
    assert service_containers(fake_engine, sid) == []
    assert clock.getDelayedCalls() == []


def test_start_failure_is_retried_with_its_error(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A command the image lacks fails to start: its error is shown and it is retried with backoff."""
    supervisor = make(clock, fake_engine)
    sid = create(supervisor, cmd=["no-such-program"])
    status = supervisor.get(sid).status
    assert status.state is State.BACKOFF
    assert status.last_exit is not None and "executable file not found" in (status.last_exit.error or "")
    assert service_containers(fake_engine, sid) == []
    clock.advance(1.0)
    assert supervisor.get(sid).status.restarts == 1


def test_missing_image_is_pulled_or_refused(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """An image not in the engine is pulled; one no registry has is refused with ImageNotFound."""
    supervisor = make(clock, fake_engine)
    fake_engine.registry["example/app:latest"] = ("sleep", "100")
    sid = create(supervisor, image="example/app")
    assert running(fake_engine, sid)
    with pytest.raises(ImageNotFound):
        create(supervisor, image="example/missing")
    assert len(supervisor.views()) == 1


def test_names_are_unique(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A taken name is refused; ids and names both find a service."""
    supervisor = make(clock, fake_engine)
    sid = create(supervisor, cmd=["sleep", "100"], name="web")
    with pytest.raises(NameTaken):
        create(supervisor, cmd=["sleep", "100"], name="web")
    assert supervisor.get("web").id == sid and supervisor.get(sid).spec.name == "web"


def test_logs_of_current_and_previous_container(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Logs come from the current container, or the last dead one with ``previous``."""
    from twisted.internet.protocol import Protocol

    class Collect(Protocol):
        def __init__(self) -> None:
            self.data = b""

        def dataReceived(self, data: bytes) -> None:
            self.data += data

    supervisor = make(clock, fake_engine)
    sid = create(supervisor, cmd=["sleep", "1000"])
    with pytest.raises(NoContainer):
        result(Deferred.fromCoroutine(supervisor.logs(sid, Collect(), previous=True)))
    first = running(fake_engine, sid)[0]
    fake_engine.emit_output(first, b"first life\n")
    fake_engine.exit(first, 3)
    clock.advance(1.0)
    fake_engine.emit_output(running(fake_engine, sid)[0], b"second life\n")
    current, previous = Collect(), Collect()
    result(Deferred.fromCoroutine(supervisor.logs(sid, current)))
    result(Deferred.fromCoroutine(supervisor.logs(sid, previous, previous=True)))
    assert current.data.endswith(b"second life\n") and b"first" not in current.data
    assert previous.data.endswith(b"first life\n")


# -- restarts of the daemon -------------------------------------------------------------------


def stored(sid: str, status: Status, **body: Any) -> StoredService:
    body.setdefault("image", "flynn/busybox")
    body.setdefault("cmd", ["sleep", "1000"])
    return StoredService(sid, parse_service_spec(body), 1.0, status, (HistoryEntry(1.0, "created", {}),))


def start_container(engine: FakeDockerEngine, sid: str, cmd: tuple[str, ...] = ("sleep", "1000"),
                    owner: str = OWNER) -> str:
    spec = container_spec(sid, parse_service_spec({"image": "flynn/busybox", "cmd": list(cmd)}), owner)
    cid = result(engine.create_container(spec))
    result(engine.start_container(cid))
    return str(cid)


def test_restart_adopts_running_containers(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """After a daemon restart, running containers are kept: none restarted, none duplicated."""
    store = MemoryServiceStore(OWNER)
    first = make(clock, fake_engine, store)
    ids = [create(first, cmd=["sleep", "1000"]) for _ in range(5)]
    before = {sid: running(fake_engine, sid) for sid in ids}
    history = {sid: first.get(sid).history for sid in ids}
    result(first.stopService())
    assert all(len(c) == 1 for c in before.values())
    second = make(clock, fake_engine, store)
    for sid in ids:
        assert running(fake_engine, sid) == before[sid]
        view = second.get(sid)
        assert view.status.state is State.RUNNING and view.status.restarts == 0
        assert view.history == history[sid]
    assert second.reconciles == 1


def test_restart_adopts_an_unrecorded_container_and_drops_duplicates(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A container the store never heard of is adopted by its labels; extra ones are removed."""
    store = MemoryServiceStore(OWNER)
    result(store.insert(stored("a" * 16, Status(state=State.STARTING))))
    result(store.insert(stored("b" * 16, Status(state=State.RUNNING, container_id="gone", started_at=1.0))))
    lone = start_container(fake_engine, "a" * 16)
    clock.advance(5)
    extra_old = start_container(fake_engine, "b" * 16)
    clock.advance(5)
    extra_new = start_container(fake_engine, "b" * 16)
    supervisor = make(clock, fake_engine, store)
    assert supervisor.get("a" * 16).status.container_id == lone
    assert running(fake_engine, "a" * 16) == [lone]
    assert running(fake_engine, "b" * 16) == [extra_new]
    assert extra_old not in fake_engine.containers
    assert supervisor.get("b" * 16).status.state is State.RUNNING


def test_restart_revives_services_that_died_meanwhile(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Containers that stopped while the daemon was down are replaced after the initial delay."""
    store = MemoryServiceStore(OWNER)
    first = make(clock, fake_engine, store)
    sid = create(first, cmd=["sleep", "1000"])
    (old,) = running(fake_engine, sid)
    result(first.stopService())
    fake_engine.exit(old, 137)
    second = make(clock, fake_engine, store)
    status = second.get(sid).status
    assert status.state is State.BACKOFF and status.last_exit is not None and status.last_exit.code == 137
    clock.advance(1.0)
    (new,) = running(fake_engine, sid)
    assert new != old and second.get(sid).status.restarts == 1


def test_restart_resumes_pending_and_backoff(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A stored pending service starts at once; one in backoff at its stored restart time."""
    store = MemoryServiceStore(OWNER)
    clock.advance(100)
    result(store.insert(stored("a" * 16, Status())))
    result(store.insert(stored("b" * 16, Status(state=State.BACKOFF, attempt=3, next_restart_at=105.0))))
    make(clock, fake_engine, store)
    assert len(running(fake_engine, "a" * 16)) == 1
    assert running(fake_engine, "b" * 16) == []
    clock.advance(4.9)
    assert running(fake_engine, "b" * 16) == []
    clock.advance(0.2)
    assert len(running(fake_engine, "b" * 16)) == 1


def test_restart_removes_unwanted_containers(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Service containers no record wants are removed; others' containers are left alone."""
    orphan = start_container(fake_engine, "9" * 16)
    batch = result(fake_engine.create_container(
        ContainerSpec(image="flynn/busybox", labels={LABEL_MANAGED: "1", LABEL_JOB_TYPE: "batch"})))
    other_daemon = start_container(fake_engine, "8" * 16, owner="fedcba9876543210")
    make(clock, fake_engine)
    assert orphan not in fake_engine.containers
    assert batch in fake_engine.containers
    assert fake_engine.containers[other_daemon].status == "running"


def test_restart_finishes_an_interrupted_delete(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A service stored as stopping (the daemon died mid-DELETE) is removed for good."""
    store = MemoryServiceStore(OWNER)
    cid = start_container(fake_engine, "a" * 16)
    result(store.insert(stored("a" * 16, Status(state=State.STOPPING, container_id=cid), stop_grace_period=0)))
    supervisor = make(clock, fake_engine, store)
    clock.advance(1)
    assert cid not in fake_engine.containers
    assert store.services == {}
    with pytest.raises(NoSuchService):
        supervisor.get("a" * 16)


# -- engine outages ---------------------------------------------------------------------------


def test_engine_outage_and_return(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """While the engine is away reads work and engine work is refused; once back, all run again."""
    store = MemoryServiceStore(OWNER)
    supervisor = make(clock, fake_engine, store)
    ids = [create(supervisor, cmd=["sleep", "1000"]) for _ in range(3)]
    clock.advance(2)
    fake_engine.go_down()
    # The engine restarts: its containers die without anyone hearing of it.
    for sid in ids:
        fake_engine.containers[running(fake_engine, sid)[0]].exited(143)
    assert supervisor.engine_available is False
    with pytest.raises(EngineUnavailable):
        result((supervisor.delete(ids[0])))
    with pytest.raises(EngineUnavailable):
        create(supervisor, cmd=["sleep", "1"])
    assert [v.id for v in supervisor.views()] == ids
    assert supervisor.get(ids[0]).status.state is State.RUNNING
    clock.advance(30)
    assert supervisor.engine_available is False
    fake_engine.come_back()
    clock.advance(5.0)
    assert supervisor.engine_available is True
    clock.advance(1.0)
    for sid in ids:
        assert len(running(fake_engine, sid)) == 1
        assert supervisor.get(sid).status.restarts == 1


def test_engine_down_while_restarting_waits_for_it(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A restart that finds no engine leaves the service pending; it starts when the engine returns."""
    supervisor = make(clock, fake_engine)
    sid = create(supervisor, cmd=["sleep", "1000"])
    fake_engine.exit(running(fake_engine, sid)[0], 1)
    fake_engine.go_down()
    clock.advance(1.0)
    assert supervisor.get(sid).status.state is State.PENDING
    fake_engine.come_back()
    clock.advance(5.0)
    assert len(running(fake_engine, sid)) == 1
    assert supervisor.get(sid).status.state is State.RUNNING


def test_cancelled_requests_still_complete(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """A client that leaves mid-DELETE (its Deferred cancelled) does not stop the deletion."""
    store = MemoryServiceStore(OWNER)
    supervisor = make(clock, fake_engine, store)
    sid = create(supervisor, cmd=["sleep", "1000"], stop_grace_period=2)
    pending = supervisor.delete(sid)
    pending.cancel()
    with pytest.raises(CancelledError):
        result(pending)
    clock.advance(2)
    assert service_containers(fake_engine, sid) == [] and store.services == {}
    with pytest.raises(NoSuchService):
        supervisor.get(sid)


def test_stopping_the_daemon_leaves_containers_running(clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Stopping the supervisor keeps services' containers and closes the store."""
    store = MemoryServiceStore(OWNER)
    supervisor = make(clock, fake_engine, store)
    sid = create(supervisor, cmd=["sleep", "1000"])
    result(supervisor.stopService())
    assert len(running(fake_engine, sid)) == 1
    assert store.closed
