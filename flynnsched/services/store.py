"""
Where services live across restarts: their specs, supervision status and lifecycle history.

``SQLiteServiceStore`` keeps them in one SQLite file under the state directory, written through
``twisted.enterprise.adbapi`` with a single connection, so statements run in order on one thread
and never on the reactor's. Every write is a committed transaction (WAL journal, ``synchronous =
FULL``) before its Deferred fires: a ``201`` or ``204`` is answered only after the desired state
is on disk, and ``kill -9`` loses nothing that was acknowledged. The schema carries its version in
``PRAGMA user_version`` and is migrated forward on open.

``MemoryServiceStore`` is the same contract in memory, for tests driven by a fake clock; one test
suite holds both to it.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from typing import Any, Callable, Iterable, Mapping

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.python.lockfile import FilesystemLock
from zope.interface import Attribute, Interface, implementer

from flynnsched.services.policy import LastExit, State, Status
from flynnsched.services.spec import ServiceSpec

__all__ = [
    "DB_FILENAME",
    "HISTORY_KEPT",
    "SCHEMA_VERSION",
    "HistoryEntry",
    "IServiceStore",
    "MemoryServiceStore",
    "NameTaken",
    "SQLiteServiceStore",
    "StateDirLocked",
    "StoreError",
    "StoredService",
    "status_from_json",
    "status_to_json",
]

DB_FILENAME = "services.sqlite3"
#: History entries kept per service; older ones are dropped as new ones arrive.
HISTORY_KEPT = 100
#: The schema version this code writes (``PRAGMA user_version``).
SCHEMA_VERSION = 2


class StoreError(Exception):
    """The store cannot be used (a newer schema, a damaged file)."""


class NameTaken(StoreError):
    """Another service already has this name."""


class StateDirLocked(StoreError):
    """Another live daemon uses this state directory."""


@attrs.frozen
class HistoryEntry:
    """One lifecycle event of a service: when, what, and details (exit code, container id…)."""

    time: float
    event: str
    detail: Mapping[str, Any] = attrs.field(factory=dict, hash=False)


@attrs.frozen
class StoredService:
    """A service as the store holds it; ``history`` is the most recent entries, oldest first."""

    id: str
    spec: ServiceSpec
    created_at: float
    status: Status
    history: tuple[HistoryEntry, ...] = ()


def status_to_json(status: Status) -> dict[str, Any]:
    """The stored form of a ``Status``."""
    last = status.last_exit
    return {
        "state": status.state.value,
        "restarts": status.restarts,
        "attempt": status.attempt,
        "container_id": status.container_id,
        "previous_container_id": status.previous_container_id,
        "started_at": status.started_at,
        "next_restart_at": status.next_restart_at,
        "last_exit": None if last is None else {
            "code": last.code, "time": last.time, "oom_killed": last.oom_killed, "error": last.error,
        },
    }


def status_from_json(data: Mapping[str, Any]) -> Status:
    """Rebuild a ``Status`` that ``status_to_json`` stored."""
    last = data.get("last_exit")
    return Status(
        state=State(data["state"]),
        restarts=int(data.get("restarts", 0)),
        attempt=int(data.get("attempt", 0)),
        container_id=data.get("container_id"),
        previous_container_id=data.get("previous_container_id"),
        started_at=data.get("started_at"),
        next_restart_at=data.get("next_restart_at"),
        last_exit=None if last is None else LastExit(
            code=last.get("code"), time=float(last["time"]), oom_killed=bool(last.get("oom_killed")),
            error=last.get("error"),
        ),
    )


class IServiceStore(Interface):
    """Durable storage of services. Every method returns a Deferred that fires once it is durable."""

    instance_id = Attribute(
        "The identity of the daemon that owns this store (and the containers labelled with it): "
        "fixed when the store is first created."
    )

    def load(history: int):  # type: ignore[no-untyped-def]
        """
        :return: Deferred firing with every ``StoredService`` (in the order they were created), each with its last
            ``history`` entries.
        """

    def insert(service: StoredService):  # type: ignore[no-untyped-def]
        """
        Add a new service (and its history).

        :return: Deferred firing with None. Fails with ``NameTaken`` when its name is in use.
        """

    def save_status(service_id: str, status: Status):  # type: ignore[no-untyped-def]
        """Replace a service's status. Nothing happens for an unknown id."""

    def add_history(service_id: str, entries: Iterable[HistoryEntry]):  # type: ignore[no-untyped-def]
        """Append history entries, keeping the last ``HISTORY_KEPT``."""

    def delete(service_id: str):  # type: ignore[no-untyped-def]
        """Forget a service and its history. Safe to repeat."""

    def close():  # type: ignore[no-untyped-def]
        """Finish pending writes and release the store."""


# -- SQLite -------------------------------------------------------------------------------------


def _migrate_to_1(cursor: sqlite3.Cursor) -> None:
    cursor.execute(
        """
        CREATE TABLE services (
            id TEXT PRIMARY KEY,
            name TEXT UNIQUE,
            spec TEXT NOT NULL,
            created_at REAL NOT NULL,
            state TEXT NOT NULL,
            status TEXT NOT NULL
        )
        """
    )
    cursor.execute(
        """
        CREATE TABLE history (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            service_id TEXT NOT NULL,
            time REAL NOT NULL,
            event TEXT NOT NULL,
            detail TEXT NOT NULL
        )
        """
    )
    cursor.execute("CREATE INDEX history_by_service ON history (service_id, seq)")


def _migrate_to_2(cursor: sqlite3.Cursor) -> None:
    # The daemon's identity: its containers carry it, so that daemons sharing an engine (with
    # separate state directories) never take each other's containers for their own.
    cursor.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    cursor.execute("INSERT INTO meta (key, value) VALUES ('instance_id', ?)", (secrets.token_hex(8),))


#: ``MIGRATIONS[n]`` brings a database at version ``n`` to version ``n + 1``.
MIGRATIONS: tuple[Callable[[sqlite3.Cursor], None], ...] = (_migrate_to_1, _migrate_to_2)
assert len(MIGRATIONS) == SCHEMA_VERSION


def _configure(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA busy_timeout = 5000")


def _migrate(cursor: sqlite3.Cursor) -> str:
    """Bring the schema up to date; return the instance id."""
    version = cursor.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the service store has schema version {version}, newer than this flynnsched "
            f"understands ({SCHEMA_VERSION}); use a newer flynnsched or another --state-dir"
        )
    for step in range(version, SCHEMA_VERSION):
        MIGRATIONS[step](cursor)
        cursor.execute(f"PRAGMA user_version = {step + 1}")
    return str(cursor.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()[0])


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _insert_history(cursor: sqlite3.Cursor, service_id: str, entries: Iterable[HistoryEntry]) -> None:
    rows = [(service_id, e.time, e.event, _dumps(dict(e.detail))) for e in entries]
    if not rows:
        return
    cursor.executemany("INSERT INTO history (service_id, time, event, detail) VALUES (?, ?, ?, ?)", rows)
    cursor.execute(
        """
        DELETE FROM history WHERE service_id = ? AND seq <= (
            SELECT seq FROM history WHERE service_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?
        )
        """,
        (service_id, service_id, HISTORY_KEPT),
    )


@implementer(IServiceStore)
class SQLiteServiceStore:
    """The services of one daemon, in ``<state dir>/services.sqlite3``."""

    def __init__(self, reactor: IReactorCore, path: str, instance_id: str) -> None:
        self.path = path
        self.instance_id = instance_id
        self._pool = adbapi.ConnectionPool(
            "sqlite3", path, check_same_thread=False, cp_min=1, cp_max=1, cp_reactor=reactor,
            cp_openfun=_configure, cp_noisy=False,
        )
        self._lock: FilesystemLock | None = None

    @classmethod
    async def open(cls, reactor: IReactorCore, state_dir: str) -> SQLiteServiceStore:
        """
        Open (creating and migrating as needed) the store in ``state_dir``.

        Fails with ``StateDirLocked`` when another live daemon holds the directory, and with
        ``StoreError`` for a schema newer than this code.
        """
        os.makedirs(state_dir, exist_ok=True)
        lock = FilesystemLock(os.path.join(state_dir, "services.lock"))
        if not lock.lock():
            raise StateDirLocked(f"another flynnsched is using the state directory {state_dir}")
        store = cls(reactor, os.path.join(state_dir, DB_FILENAME), "")
        store._lock = lock
        try:
            store.instance_id = await store._pool.runInteraction(_migrate)
        except BaseException:
            await store.close()
            raise
        return store

    @classmethod
    def open_now(cls, reactor: IReactorCore, state_dir: str) -> SQLiteServiceStore:
        """
        ``open``, done at once on the calling thread: for start-up, before the reactor runs, so
        that a locked directory or a newer schema stops the daemon before it serves anything.
        """
        os.makedirs(state_dir, exist_ok=True)
        lock = FilesystemLock(os.path.join(state_dir, "services.lock"))
        if not lock.lock():
            raise StateDirLocked(f"another flynnsched is using the state directory {state_dir}")
        path = os.path.join(state_dir, DB_FILENAME)
        try:
            connection = sqlite3.connect(path)
            try:
                _configure(connection)
                with connection:
                    instance_id = _migrate(connection.cursor())
            finally:
                connection.close()
        except sqlite3.DatabaseError as e:
            lock.unlock()
            raise StoreError(f"cannot use the service store {path}: {e}") from None
        except BaseException:
            lock.unlock()
            raise
        store = cls(reactor, path, instance_id)
        store._lock = lock
        return store

    async def schema_version(self) -> int:
        """The schema version on disk."""
        rows = await self._pool.runQuery("PRAGMA user_version")
        return int(rows[0][0])

    def load(self, history: int = 20) -> Deferred[list[StoredService]]:
        def load(cursor: sqlite3.Cursor) -> list[StoredService]:
            services = []
            rows = cursor.execute(
                "SELECT id, spec, created_at, status FROM services ORDER BY created_at, rowid"
            ).fetchall()
            for service_id, spec, created_at, status in rows:
                entries = cursor.execute(
                    "SELECT time, event, detail FROM history WHERE service_id = ? ORDER BY seq DESC LIMIT ?",
                    (service_id, history),
                ).fetchall()
                services.append(StoredService(
                    id=service_id,
                    spec=ServiceSpec.from_json(json.loads(spec)),
                    created_at=created_at,
                    status=status_from_json(json.loads(status)),
                    history=tuple(HistoryEntry(t, e, json.loads(d)) for t, e, d in reversed(entries)),
                ))
            return services

        return self._pool.runInteraction(load)

    def insert(self, service: StoredService) -> Deferred[None]:
        def insert(cursor: sqlite3.Cursor) -> None:
            try:
                cursor.execute(
                    "INSERT INTO services (id, name, spec, created_at, state, status) VALUES (?, ?, ?, ?, ?, ?)",
                    (service.id, service.spec.name, _dumps(service.spec.to_json()), service.created_at,
                     service.status.state.value, _dumps(status_to_json(service.status))),
                )
            except sqlite3.IntegrityError as e:
                if "name" in str(e):
                    raise NameTaken(f"a service named {service.spec.name!r} exists already") from None
                raise
            _insert_history(cursor, service.id, service.history)

        return self._pool.runInteraction(insert)

    def save_status(self, service_id: str, status: Status) -> Deferred[None]:
        return self._pool.runOperation(
            "UPDATE services SET state = ?, status = ? WHERE id = ?",
            (status.state.value, _dumps(status_to_json(status)), service_id),
        )

    def add_history(self, service_id: str, entries: Iterable[HistoryEntry]) -> Deferred[None]:
        entries = list(entries)
        return self._pool.runInteraction(lambda cursor: _insert_history(cursor, service_id, entries))

    def delete(self, service_id: str) -> Deferred[None]:
        def delete(cursor: sqlite3.Cursor) -> None:
            cursor.execute("DELETE FROM history WHERE service_id = ?", (service_id,))
            cursor.execute("DELETE FROM services WHERE id = ?", (service_id,))

        return self._pool.runInteraction(delete)

    def close(self) -> Deferred[None]:
        # ``close`` joins the pool's one thread, which first finishes the writes queued before it.
        self._pool.close()
        if self._lock is not None and self._lock.locked:
            self._lock.unlock()
        return succeed(None)


# -- memory ---------------------------------------------------------------------------------


@implementer(IServiceStore)
class MemoryServiceStore:
    """The store contract in memory (nothing survives the process): for tests on a fake clock."""

    def __init__(self, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or secrets.token_hex(8)
        self.services: dict[str, StoredService] = {}
        self.histories: dict[str, list[HistoryEntry]] = {}
        self.closed = False

    def load(self, history: int = 20) -> Deferred[list[StoredService]]:
        ordered = sorted(self.services.values(), key=lambda s: s.created_at)
        return succeed([
            attrs.evolve(s, history=tuple(self.histories[s.id][-history:] if history else ())) for s in ordered
        ])

    def insert(self, service: StoredService) -> Deferred[None]:
        if service.spec.name is not None and any(
            s.spec.name == service.spec.name for s in self.services.values()
        ):
            return fail(NameTaken(f"a service named {service.spec.name!r} exists already"))
        if service.id in self.services:
            return fail(StoreError(f"duplicate service id {service.id}"))
        self.services[service.id] = attrs.evolve(service, history=())
        self.histories[service.id] = []
        return self.add_history(service.id, service.history)

    def save_status(self, service_id: str, status: Status) -> Deferred[None]:
        if service_id in self.services:
            self.services[service_id] = attrs.evolve(self.services[service_id], status=status)
        return succeed(None)

    def add_history(self, service_id: str, entries: Iterable[HistoryEntry]) -> Deferred[None]:
        if service_id in self.histories:
            kept = self.histories[service_id]
            kept.extend(entries)
            del kept[:-HISTORY_KEPT]
        return succeed(None)

    def delete(self, service_id: str) -> Deferred[None]:
        self.services.pop(service_id, None)
        self.histories.pop(service_id, None)
        return succeed(None)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)
