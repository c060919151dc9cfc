"""
``ServiceSupervisor``: keeps every service's container running, through crashes of the service,
of flynnsched and of the Docker engine.

It owns the runtime side of services: it feeds ``policy.decide`` with the engine's ``die`` events
(never polling), its backoff timers and the API's requests, performs the actions it answers, and
writes every change to the ``IServiceStore``. Work on one service is serialised by that service's
lock, so a ``die`` that races a start, or a DELETE that races a restart, is handled in order.

Reconciling — after start-up and after every reconnection of the event stream — compares the
store with the engine's containers (found by the flynnsched labels): a running container of a
service is adopted (never duplicated or restarted), a service whose container died meanwhile is
restarted as its policy says, and containers no service wants are removed.
"""

from __future__ import annotations

import datetime
import functools
import random
import re
import secrets
from collections import defaultdict, deque
from typing import Any, Awaitable, Callable, Coroutine, Iterable, TypeVar

import attrs
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, gatherResults
from twisted.internet.interfaces import IDelayedCall, IProtocol, IPushProducer, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from flynnsched.docker.images import ImagePuller
from flynnsched.docker.interface import (
    LABEL_JOB_ID,
    LABEL_JOB_TYPE,
    LABEL_MANAGED,
    LABEL_OWNER,
    ContainerSpec,
    ContainerSummary,
    EngineError,
    EngineUnavailable,
    Event,
    IDockerEngine,
    ImageNotFound,
    NoSuchContainer,
)
from flynnsched.services import policy
from flynnsched.services.policy import State, Status
from flynnsched.services.spec import RestartPolicy, ServiceSpec
from flynnsched.services.store import HistoryEntry, IServiceStore, NameTaken, StoredService

__all__ = [
    "JOB_TYPE",
    "LABEL_SERVICE_NAME",
    "NoContainer",
    "NoSuchService",
    "ServiceSupervisor",
    "ServiceView",
]

#: The job type label value of service containers.
JOB_TYPE = "service"
#: A label with the service's name (when it has one), for people reading ``docker ps``.
LABEL_SERVICE_NAME = "io.flynnsched.service-name"
#: History entries kept in memory (and shown) per service.
HISTORY_SHOWN = 20
#: Seconds to wait for the engine to answer a request (pulls excepted).
ENGINE_TIMEOUT = 30.0
#: Seconds to wait for an image pull.
PULL_TIMEOUT = 600.0

T = TypeVar("T")


class NoSuchService(LookupError):
    """No service has this id or name."""


class NoContainer(LookupError):
    """The service has no container (of the kind asked for) to read logs from."""


@attrs.frozen
class ServiceView:
    """A snapshot of one service for the API."""

    id: str
    spec: ServiceSpec
    created_at: float
    status: Status
    history: tuple[HistoryEntry, ...]


@attrs.define(eq=False)
class _Service:
    """The supervisor's live record of one service."""

    id: str
    spec: ServiceSpec
    created_at: float
    status: Status
    history: deque[HistoryEntry]
    lock: DeferredLock = attrs.field(factory=DeferredLock)
    timer: IDelayedCall | None = None
    gone: bool = False

    def view(self) -> ServiceView:
        return ServiceView(self.id, self.spec, self.created_at, self.status, tuple(self.history))


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def docker_time(text: str) -> float | None:
    """Seconds since the epoch for Docker's RFC 3339 time (nanoseconds allowed); None for never or junk."""
    match = _RFC3339.match(text.strip()) if text else None
    if match is None or text.startswith("0001-"):
        return None
    main, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    seconds = datetime.datetime.fromisoformat(main + zone).timestamp()
    return seconds + (float("0." + fraction) if fraction else 0.0)


def container_spec(service_id: str, spec: ServiceSpec, owner: str) -> ContainerSpec:
    """The container a service runs, with the flynnsched labels and its owner's."""
    labels = {LABEL_MANAGED: "1", LABEL_JOB_ID: service_id, LABEL_JOB_TYPE: JOB_TYPE, LABEL_OWNER: owner}
    if spec.name is not None:
        labels[LABEL_SERVICE_NAME] = spec.name
    cpus = spec.resources.cpus
    return ContainerSpec(
        image=spec.image,
        cmd=spec.cmd,
        env=dict(spec.env),
        labels=labels,
        network=spec.network,
        memory=spec.resources.memory,
        nano_cpus=None if cpus is None else int(round(cpus * 1e9)),
        pids_limit=spec.resources.pids,
        stop_signal=spec.stop_signal,
        stop_timeout=spec.stop_grace_period,
    )


class ServiceSupervisor(Service):
    """
    Supervises the services in ``store`` on ``engine``.

    :param clock: the reactor's time (timers and timestamps; wall-clock seconds in production, so
        stored times mean the same after a restart).
    :param images: makes sure an image is present before a service is accepted.
    :param defaults: the restart policy for what a new service's body leaves out.
    :param random: samples in [0, 1) for the restart jitter.
    :param reconnect_policy: seconds to wait before reconnection attempt ``n`` of the event stream.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        engine: IDockerEngine,
        store: IServiceStore,
        images: ImagePuller | None = None,
        defaults: RestartPolicy | None = None,
        random: Callable[[], float] = random.random,
        reconnect_policy: Callable[[int], float] | None = None,
    ) -> None:
        self._clock = clock
        self._engine = engine
        self._store = store
        self._images = images if images is not None else ImagePuller(engine)
        #: The restart policy for fields a new service leaves out.
        self.defaults = defaults or RestartPolicy()
        self._random = random
        self._reconnect_policy = reconnect_policy or backoffPolicy(0.1, 5.0, 2.0, jitter=lambda: 0.0)
        self._services: dict[str, _Service] = {}
        self._names: dict[str, str] = {}
        self._tasks: set[Deferred[Any]] = set()
        self._subscription: Any = None
        self._retry_wait: Deferred[None] | None = None
        self._watcher: Deferred[None] | None = None
        self._since: int | None = None
        #: Whether the engine answered last time we asked (None: not asked yet).
        self.engine_available: bool | None = None
        #: Fires once the stored services are loaded.
        self.ready: Deferred[None] = Deferred()
        #: When the last reconciliation finished and how long it took (seconds).
        self.last_reconcile: tuple[float, float] | None = None
        self.reconciles = 0
        self._reconciled_waiters: list[Deferred[None]] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._watcher = self._spawn(self._run())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    def now(self) -> float:
        """The supervisor's clock, in seconds since the epoch."""
        return self._clock.seconds()

    async def _run(self) -> None:
        try:
            stored = await self._store.load(HISTORY_SHOWN)
        except BaseException as e:
            self.ready.errback(e)
            raise
        for record in stored:
            self._add(record.id, record.spec, record.created_at, record.status, record.history)
        self.log.info("loaded {count} services", count=len(stored))
        if not self.ready.called:
            self.ready.callback(None)
        await self._watch_events()

    async def _stop(self) -> None:
        if self._retry_wait is not None and not self._retry_wait.called:
            self._retry_wait.cancel()
        if self._subscription is not None:
            self._subscription.stop()
        for service in self._services.values():
            self._cancel_timer(service)
        pending = [d for d in self._tasks if d is not self._watcher]
        if pending:
            waiting = gatherResults(pending, consumeErrors=True)
            waiting.addTimeout(10, self._clock)
            try:
                await waiting
            except Exception:
                self.log.warn("stopping with {count} service operations unfinished", count=len(pending))
        if self._watcher is not None and not self._watcher.called:
            self._watcher.cancel()
        await self._store.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
        """Run a coroutine in the background, logging its failure."""
        d = Deferred.fromCoroutine(coroutine)
        self._tasks.add(d)

        def done(result: Any) -> Any:
            self._tasks.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: None if f.check(CancelledError) else self.log.failure("service task failed", f))
        return d

    def _shielded(self, coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
        """
        Run ``coroutine`` to its end whatever happens to the returned Deferred: cancelling that
        only stops the wait (an HTTP client that goes away must not leave half a service behind).
        """
        work = Deferred.fromCoroutine(coroutine)
        self._tasks.add(work)
        outcome: Deferred[T] = Deferred(lambda _: None)

        def finished(result: Any) -> None:
            self._tasks.discard(work)
            if not outcome.called:
                if isinstance(result, Failure):
                    outcome.errback(result)
                else:
                    outcome.callback(result)
            elif isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("an operation whose client left failed", result)

        work.addBoth(finished)
        return outcome

    # -- the API -----------------------------------------------------------------------------------

    def views(self) -> list[ServiceView]:
        """Every service, oldest first."""
        return [s.view() for s in sorted(self._services.values(), key=lambda s: s.created_at)]

    def get(self, key: str) -> ServiceView:
        """The service with this id or name; ``NoSuchService`` otherwise."""
        return self._lookup(key).view()

    def _lookup(self, key: str) -> _Service:
        service = self._services.get(key)
        if service is None and key in self._names:
            service = self._services.get(self._names[key])
        if service is None or service.gone:
            raise NoSuchService(f"no service {key!r}")
        return service

    def create(self, spec: ServiceSpec) -> Deferred[ServiceView]:
        """
        Accept a new service: check its image (pulling it if missing), store it durably, then
        start its first container in the background.

        Fails with ``NameTaken``, ``ImageNotFound`` and the engine's errors (``EngineUnavailable``
        when it cannot be reached). Cancelling the Deferred (a client that went away) does not
        stop the creation halfway.
        """
        return self._shielded(self._create(spec))

    async def _create(self, spec: ServiceSpec) -> ServiceView:
        await self.ready
        if spec.name is not None and spec.name in self._names:
            raise NameTaken(f"a service named {spec.name!r} exists already")
        await self.require_engine()
        try:
            try:
                await self._with_timeout(self._engine.inspect_image(spec.image))
            except ImageNotFound:
                await self._with_timeout(self._images.ensure(spec.image), PULL_TIMEOUT)
        except TimeoutError as e:
            raise EngineUnavailable(str(e)) from None
        if spec.name is not None and spec.name in self._names:
            raise NameTaken(f"a service named {spec.name!r} exists already")
        service_id = secrets.token_hex(8)
        while service_id in self._services:
            service_id = secrets.token_hex(8)
        now = self._clock.seconds()
        entry = HistoryEntry(now, "created", {})
        stored = StoredService(service_id, spec, now, Status(), (entry,))
        if spec.name is not None:
            self._names[spec.name] = service_id
        try:
            await self._store.insert(stored)
        except BaseException:
            if spec.name is not None and self._names.get(spec.name) == service_id:
                del self._names[spec.name]
            raise
        service = self._add(service_id, spec, now, Status(), (entry,))
        self.log.info("service {job_id} created ({image})", job_id=service_id, image=spec.image)
        self._spawn(self._locked(service, lambda: self._dispatch(service, policy.StartRequested())))
        return service.view()

    def delete(self, key: str) -> Deferred[None]:
        """
        Delete a service: stop its container gracefully (stop signal, grace period, SIGKILL),
        remove its containers, forget it. The intent is stored first, so a deletion that an engine
        outage or a crash interrupts is finished by the next reconciliation.

        Fails with ``NoSuchService``, and ``EngineUnavailable`` when the engine is unreachable
        (before anything was done) or became so midway. Cancelling the Deferred does not stop
        the deletion.
        """
        return self._shielded(self._delete(key))

    async def _delete(self, key: str) -> None:
        await self.ready
        service = self._lookup(key)
        await self.require_engine()
        await service.lock.acquire()
        try:
            if service.gone:
                raise NoSuchService(f"no service {key!r}")
            await self._dispatch(service, policy.StopRequested())
            await self._finish_delete(service)
        finally:
            service.lock.release()

    async def logs(self, key: str, protocol: IProtocol, follow: bool = False, tail: int | None = None,
                   previous: bool = False) -> IPushProducer:
        """
        Stream a service's container logs into ``protocol`` (Docker's multiplexed frames).

        The current container's, or with ``previous`` the last one that stopped; a service between
        containers shows its last one. Fails with ``NoSuchService``, ``NoContainer`` and the
        engine's errors.
        """
        await self.ready
        service = self._lookup(key)
        status = service.status
        if previous:
            container_id = status.previous_container_id
            if container_id is None:
                raise NoContainer(f"service {service.id} has no previous container")
        else:
            container_id = status.container_id or status.previous_container_id
            if container_id is None:
                raise NoContainer(f"service {service.id} has no container yet")
        await self.require_engine()
        result = await self._with_timeout(self._engine.logs(container_id, protocol, follow, tail))
        return result  # type: ignore[no-any-return]

    async def require_engine(self) -> None:
        """Fail with ``EngineUnavailable`` at once if the engine is known to be unreachable."""
        if self.engine_available is not False:
            return
        try:
            await self._with_timeout(self._engine.ping(), 2.0)
        except EngineError:
            raise EngineUnavailable("the Docker engine is unreachable") from None
        # It is back: reconnect the event stream now rather than at the next retry.
        if self._retry_wait is not None and not self._retry_wait.called:
            self._retry_wait.callback(None)

    def wait_reconciled(self) -> Deferred[None]:
        """Fire after the next reconciliation finishes."""
        d: Deferred[None] = Deferred()
        self._reconciled_waiters.append(d)
        return d

    # -- events from the engine ------------------------------------------------------------------

    async def _watch_events(self) -> None:
        """Follow the engine's container events forever, reconnecting with backoff."""
        failures = 0
        while self.running:
            try:
                subscription = await self._with_timeout(self._engine.events(
                    self._on_event,
                    filters={
                        "type": ["container"],
                        "event": ["die"],
                        "label": [f"{LABEL_MANAGED}=1", f"{LABEL_JOB_TYPE}={JOB_TYPE}",
                                  f"{LABEL_OWNER}={self._store.instance_id}"],
                    },
                    since=self._since,
                ))
            except (EngineError, TimeoutError) as e:
                if self.engine_available is not False:
                    self.log.warn("the Docker engine is unreachable: {error}", error=str(e))
                self.engine_available = False
                delay = self._reconnect_policy(failures)
                failures += 1
                self._retry_wait = deferLater(self._clock, delay, lambda: None)
                try:
                    await self._retry_wait
                except CancelledError:
                    return
                continue
            connected_at = self._clock.seconds()
            self._subscription = subscription
            if self.engine_available is False:
                self.log.info("the Docker engine is back")
            self.engine_available = True
            await self.reconcile()
            await subscription.done
            self._subscription = None
            if not self.running:
                return
            self.log.warn("the Docker event stream ended; reconnecting")
            self.engine_available = False
            if self._clock.seconds() - connected_at >= 1.0:
                failures = 0
            else:
                # A stream that ends as soon as it starts: don't spin.
                self._retry_wait = deferLater(self._clock, self._reconnect_policy(failures), lambda: None)
                failures += 1
                try:
                    await self._retry_wait
                except CancelledError:
                    return

    def _on_event(self, event: Event) -> None:
        self._since = max(self._since or 0, event.time_nano // 1_000_000_000)
        if event.type != "container" or event.action != "die":
            return
        service_id = event.attributes.get(LABEL_JOB_ID)
        service = self._services.get(service_id) if service_id else None
        if service is None or service.gone:
            return
        raw = event.attributes.get("exitCode")
        code = int(raw) if raw is not None and raw.lstrip("-").isdigit() else None
        self._spawn(self._locked(service, lambda: self._died(service, event.id, code)))

    async def _died(self, service: _Service, container_id: str, code: int | None) -> None:
        if service.gone or container_id != service.status.container_id:
            return
        oom = False
        try:
            state = await self._with_timeout(self._engine.inspect_container(container_id))
            code, oom = state.exit_code, state.oom_killed
        except NoSuchContainer:
            pass
        except EngineError as e:
            self.log.warn("cannot inspect {container_id}: {error}", container_id=container_id, error=str(e))
        self.log.info("service {job_id}: container {container_id} exited with {exit_code}",
                      job_id=service.id, container_id=container_id[:12], exit_code=code)
        await self._dispatch(service, policy.ContainerDied(container_id, code, oom, self._random()))

    # -- reconciling -----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Bring the engine's containers and the services into agreement (see the module doc)."""
        await self.ready
        began = self._clock.seconds()
        try:
            containers = await self._with_timeout(
                self._engine.list_containers(self._owned_labels())
            )
        except (EngineError, TimeoutError) as e:
            self.log.warn("cannot reconcile services: {error}", error=str(e))
            return
        by_service: dict[str, list[ContainerSummary]] = defaultdict(list)
        for container in containers:
            by_service[container.labels.get(LABEL_JOB_ID, "")].append(container)
        work: list[Deferred[Any]] = []
        for service_id, owned in by_service.items():
            if service_id not in self._services:
                for container in owned:
                    self.log.info("removing container {container_id}: no service wants it",
                                  container_id=container.id[:12])
                    work.append(self._spawn(self._remove(container.id)))
        for service in list(self._services.values()):
            owned = by_service.get(service.id, [])
            work.append(self._spawn(self._locked(service, functools.partial(self._reconcile_one, service, owned))))
        await gatherResults(work, consumeErrors=True).addErrback(lambda _: None)
        took = self._clock.seconds() - began
        self.last_reconcile = (self._clock.seconds(), took)
        self.reconciles += 1
        self.log.info("reconciled {count} services in {took:.3f}s", count=len(self._services), took=took)
        waiters, self._reconciled_waiters = self._reconciled_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _reconcile_one(self, service: _Service, owned: list[ContainerSummary]) -> None:
        if service.gone:
            return
        status = service.status
        if status.state is State.STOPPING:
            await self._finish_delete(service)
            return
        running = [c for c in owned if c.state in ("running", "paused", "restarting")]
        keep: str | None = None
        started_at: float | None = None
        if running:
            ids = {c.id for c in running}
            if status.container_id in ids:
                keep = status.container_id
            else:
                newest = -1.0
                for c in running:
                    try:
                        seen = await self._with_timeout(self._engine.inspect_container(c.id))
                    except EngineError:
                        continue
                    when = docker_time(seen.started_at)
                    if keep is None or (when is not None and when > newest):
                        keep, newest, started_at = c.id, when if when is not None else -1.0, when
            for c in running:
                if c.id != keep:
                    self.log.info("service {job_id}: removing duplicate container {container_id}",
                                  job_id=service.id, container_id=c.id[:12])
                    await self._remove(c.id)
        if keep is not None:
            if keep == status.container_id and status.started_at is not None:
                started_at = status.started_at
            if started_at is None:
                started_at = self._clock.seconds()
            await self._dispatch(service, policy.ContainerAdopted(keep, started_at))
        elif status.state is State.RUNNING or (status.state is State.STARTING and status.container_id):
            container_id = status.container_id
            assert container_id is not None
            code: int | None = None
            oom = False
            try:
                seen = await self._with_timeout(self._engine.inspect_container(container_id))
                code, oom = seen.exit_code, seen.oom_killed
            except NoSuchContainer:
                pass
            self.log.info("service {job_id}: container {container_id} stopped while unobserved",
                          job_id=service.id, container_id=container_id[:12])
            await self._dispatch(service, policy.ContainerDied(container_id, code, oom, self._random()))
        elif status.state is State.STARTING:
            await self._dispatch(service, policy.EngineLost())
            await self._dispatch(service, policy.StartRequested())
        elif status.state is State.PENDING:
            await self._dispatch(service, policy.StartRequested())
        elif status.state is State.BACKOFF and service.timer is None and status.next_restart_at is not None:
            self._schedule(service, status.next_restart_at)
        wanted = {service.status.container_id, service.status.previous_container_id, keep}
        for c in owned:
            if c.id not in wanted and c not in running:
                await self._remove(c.id)

    async def _finish_delete(self, service: _Service) -> None:
        """Remove every container of a stopping service, then forget it."""
        try:
            leftovers = await self._with_timeout(
                self._engine.list_containers({**self._owned_labels(), LABEL_JOB_ID: service.id})
            )
        except TimeoutError:
            raise EngineUnavailable("the Docker engine did not answer") from None
        for container in leftovers:
            if container.state == "running":
                await self._stop_container(service, container.id)
            await self._remove(container.id, strict=True)
        await self._store.delete(service.id)
        service.gone = True
        self._cancel_timer(service)
        del self._services[service.id]
        if service.spec.name is not None and self._names.get(service.spec.name) == service.id:
            del self._names[service.spec.name]
        self.log.info("service {job_id} deleted", job_id=service.id)

    # -- carrying out decisions ----------------------------------------------------------------

    def _owned_labels(self) -> dict[str, str]:
        """The labels of every service container this daemon owns."""
        return {LABEL_MANAGED: "1", LABEL_JOB_TYPE: JOB_TYPE, LABEL_OWNER: self._store.instance_id}

    def _add(self, service_id: str, spec: ServiceSpec, created_at: float, status: Status,
             history: Iterable[HistoryEntry]) -> _Service:
        service = _Service(service_id, spec, created_at, status, deque(history, maxlen=HISTORY_SHOWN))
        self._services[service_id] = service
        if spec.name is not None:
            self._names[spec.name] = service_id
        return service

    async def _locked(self, service: _Service, work: Callable[[], Awaitable[None]]) -> None:
        await service.lock.acquire()
        try:
            if not service.gone:
                await work()
        finally:
            service.lock.release()

    async def _dispatch(self, service: _Service, event: policy.Event) -> None:
        """Apply one event to a service (its lock held): decide, store, act."""
        now = self._clock.seconds()
        decision = policy.decide(service.status, event, now, service.spec.restart)
        changed = decision.status != service.status
        service.status = decision.status
        notes = [a for a in decision.actions if isinstance(a, policy.Note)]
        entries = [HistoryEntry(now, n.event, dict(n.detail)) for n in notes]
        service.history.extend(entries)
        writes: list[Deferred[None]] = []
        if changed:
            writes.append(self._store.save_status(service.id, service.status))
        if entries:
            writes.append(self._store.add_history(service.id, entries))
        if service.status.state is State.STOPPING:
            # A deletion is only begun once it is on disk.
            await gatherResults(writes, consumeErrors=True)
        else:
            for write in writes:
                write.addErrback(lambda f: self.log.failure("cannot store service {job_id}", f, job_id=service.id))
        for action in decision.actions:
            if isinstance(action, policy.CreateContainer):
                await self._start(service)
            elif isinstance(action, policy.ScheduleRestart):
                self._schedule(service, action.at)
            elif isinstance(action, policy.CancelRestart):
                self._cancel_timer(service)
            elif isinstance(action, policy.StopContainer):
                await self._stop_container(service, action.container_id)
            elif isinstance(action, policy.RemoveContainer):
                await self._remove(action.container_id, strict=service.status.state is State.STOPPING)

    async def _start(self, service: _Service) -> None:
        """Create and start a container for ``service``, reporting each outcome as an event."""
        spec = container_spec(service.id, service.spec, self._store.instance_id)
        try:
            try:
                container_id = await self._with_timeout(self._engine.create_container(spec))
            except ImageNotFound:
                await self._with_timeout(self._images.ensure(service.spec.image), PULL_TIMEOUT)
                container_id = await self._with_timeout(self._engine.create_container(spec))
        except (EngineUnavailable, TimeoutError) as e:
            self.log.warn("service {job_id}: cannot reach the engine: {error}", job_id=service.id, error=str(e))
            await self._dispatch(service, policy.EngineLost())
            return
        except EngineError as e:
            self.log.warn("service {job_id}: cannot create its container: {error}", job_id=service.id,
                          error=e.message)
            await self._dispatch(service, policy.StartFailed(e.message, None, self._random()))
            return
        await self._dispatch(service, policy.ContainerCreated(container_id))
        try:
            await self._with_timeout(self._engine.start_container(container_id))
        except (EngineUnavailable, TimeoutError) as e:
            self.log.warn("service {job_id}: cannot reach the engine: {error}", job_id=service.id, error=str(e))
            await self._dispatch(service, policy.EngineLost())
            return
        except EngineError as e:
            self.log.warn("service {job_id}: cannot start {container_id}: {error}", job_id=service.id,
                          container_id=container_id[:12], error=e.message)
            await self._dispatch(service, policy.StartFailed(e.message, container_id, self._random()))
            return
        self.log.info("service {job_id}: container {container_id} started", job_id=service.id,
                      container_id=container_id[:12])
        await self._dispatch(service, policy.ContainerStarted(container_id))

    async def _stop_container(self, service: _Service, container_id: str) -> None:
        grace = service.spec.stop_grace_period
        try:
            await self._with_timeout(self._engine.stop_container(container_id, grace), grace + ENGINE_TIMEOUT)
        except NoSuchContainer:
            pass
        except TimeoutError:
            raise EngineUnavailable("the Docker engine did not stop the container in time") from None

    async def _remove(self, container_id: str, strict: bool = False) -> None:
        """Remove a container (gone already is fine); engine errors propagate only when ``strict``."""
        try:
            await self._with_timeout(self._engine.remove_container(container_id, True))
        except NoSuchContainer:
            pass
        except (EngineError, TimeoutError) as e:
            if strict:
                raise EngineUnavailable(str(e)) if isinstance(e, TimeoutError) else e
            self.log.warn("cannot remove container {container_id}: {error}", container_id=container_id[:12],
                          error=str(e))

    def _schedule(self, service: _Service, at: float) -> None:
        self._cancel_timer(service)
        delay = max(0.0, at - self._clock.seconds())

        def due() -> None:
            service.timer = None
            self._spawn(self._locked(service, lambda: self._dispatch(service, policy.RestartDue())))

        service.timer = self._clock.callLater(delay, due)

    def _cancel_timer(self, service: _Service) -> None:
        if service.timer is not None and service.timer.active():
            service.timer.cancel()
        service.timer = None

    def _with_timeout(self, d: Deferred[T], seconds: float = ENGINE_TIMEOUT) -> Deferred[T]:
        """``d`` failing with ``TimeoutError`` after ``seconds``."""
        d.addTimeout(seconds, self._clock, onTimeoutCancel=_timed_out)
        return d


def _timed_out(result: Any, timeout: float) -> Any:
    if isinstance(result, Failure) and result.check(CancelledError):
        raise TimeoutError(f"the Docker engine did not answer within {timeout:g}s")
    return result

