"""
The service store contract, held against both stores, plus what only SQLite has: durability
across ``kill -9``, schema versions and the state directory lock.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_twisted

from flynnsched.services.policy import LastExit, State, Status
from flynnsched.services.spec import parse_service_spec
from flynnsched.services.store import (
    DB_FILENAME,
    HISTORY_KEPT,
    SCHEMA_VERSION,
    HistoryEntry,
    MemoryServiceStore,
    NameTaken,
    SQLiteServiceStore,
    StateDirLocked,
    StoreError,
    StoredService,
)

REPO = Path(__file__).resolve().parent.parent


def record(service_id: str, name: str | None = None, created_at: float = 1.0) -> StoredService:
    body: dict[str, Any] = {"image": "flynn/busybox", "cmd": ["sleep", "60"], "env": {"A": "1"}}
    if name is not None:
        body["name"] = name
    return StoredService(service_id, parse_service_spec(body), created_at, Status(),
                         (HistoryEntry(created_at, "created", {}),))


@pytest_twisted.async_yield_fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, reactor: Any) -> AsyncIterator[Any]:
    """Each store implementation in turn."""
    if request.param == "memory":
        s: Any = MemoryServiceStore()
    else:
        s = await SQLiteServiceStore.open(reactor, str(tmp_path))
    yield s
    await s.close()


@pytest_twisted.ensureDeferred
async def test_insert_and_load(store: Any) -> None:
    """A stored service comes back with its spec, status and history, oldest first."""
    await store.insert(record("b" * 16, created_at=2.0))
    await store.insert(record("a" * 16, name="web", created_at=1.0))
    loaded = await store.load(10)
    assert [s.id for s in loaded] == ["a" * 16, "b" * 16]
    assert loaded[0].spec == record("a" * 16, name="web").spec
    assert loaded[0].status == Status()
    assert loaded[0].history == (HistoryEntry(1.0, "created", {}),)


@pytest_twisted.ensureDeferred
async def test_names_are_unique(store: Any) -> None:
    """A second service with a taken name is refused with NameTaken; unnamed ones never clash."""
    await store.insert(record("a" * 16, name="web"))
    with pytest.raises(NameTaken):
        await store.insert(record("b" * 16, name="web"))
    await store.insert(record("c" * 16))
    await store.insert(record("d" * 16))
    assert len(await store.load(0)) == 3


@pytest_twisted.ensureDeferred
async def test_status_and_history_updates(store: Any) -> None:
    """save_status replaces the status; history keeps the last HISTORY_KEPT entries."""
    await store.insert(record("a" * 16))
    status = Status(state=State.BACKOFF, restarts=4, attempt=2, previous_container_id="c" * 64,
                    last_exit=LastExit(137, 9.5, True, None), next_restart_at=12.25)
    await store.save_status("a" * 16, status)
    await store.add_history("a" * 16, [HistoryEntry(float(i), "died", {"exit_code": i}) for i in range(HISTORY_KEPT + 5)])
    (loaded,) = await store.load(HISTORY_KEPT + 50)
    assert loaded.status == status
    assert len(loaded.history) == HISTORY_KEPT
    assert loaded.history[-1] == HistoryEntry(float(HISTORY_KEPT + 4), "died", {"exit_code": HISTORY_KEPT + 4})
    (short,) = await store.load(3)
    assert [h.detail["exit_code"] for h in short.history] == [HISTORY_KEPT + 2, HISTORY_KEPT + 3, HISTORY_KEPT + 4]


@pytest_twisted.ensureDeferred
async def test_delete(store: Any) -> None:
    """A deleted service is gone with its history; deleting again is harmless."""
    await store.insert(record("a" * 16, name="web"))
    await store.delete("a" * 16)
    await store.delete("a" * 16)
    assert await store.load(10) == []
    await store.insert(record("b" * 16, name="web"))


@pytest_twisted.ensureDeferred
async def test_sqlite_survives_reopen(tmp_path: Path, reactor: Any) -> None:
    """What one SQLite store wrote, the next one opened on the directory reads."""
    first = await SQLiteServiceStore.open(reactor, str(tmp_path))
    await first.insert(record("a" * 16, name="kept"))
    await first.save_status("a" * 16, Status(state=State.RUNNING, container_id="x" * 64, started_at=3.0))
    await first.close()
    second = await SQLiteServiceStore.open(reactor, str(tmp_path))
    try:
        (loaded,) = await second.load(10)
        assert loaded.spec.name == "kept" and loaded.status.container_id == "x" * 64
        assert await second.schema_version() == SCHEMA_VERSION
        assert second.instance_id == first.instance_id and len(first.instance_id) == 16
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_refuses_a_newer_schema(tmp_path: Path, reactor: Any) -> None:
    """A database from a newer flynnsched is refused with a clear error, not misread."""
    connection = sqlite3.connect(tmp_path / DB_FILENAME)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(StoreError, match="newer"):
        await SQLiteServiceStore.open(reactor, str(tmp_path))
    # The failed open released the directory.
    connection = sqlite3.connect(tmp_path / DB_FILENAME)
    connection.execute("PRAGMA user_version = 0")
    connection.close()
    store = await SQLiteServiceStore.open(reactor, str(tmp_path))
    await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_state_dir_is_exclusive(tmp_path: Path, reactor: Any) -> None:
    """Two daemons cannot share a state directory; the lock goes with the store."""
    first = await SQLiteServiceStore.open(reactor, str(tmp_path))
    with pytest.raises(StateDirLocked):
        await SQLiteServiceStore.open(reactor, str(tmp_path))
    await first.close()
    second = await SQLiteServiceStore.open(reactor, str(tmp_path))
    await second.close()


_WRITER = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from flynnsched.services.policy import State, Status
    from flynnsched.services.spec import parse_service_spec
    from flynnsched.services.store import HistoryEntry, SQLiteServiceStore, StoredService

    async def main():
        store = await SQLiteServiceStore.open(reactor, sys.argv[1])
        spec = parse_service_spec({"image": "flynn/busybox", "name": "durable"})
        await store.insert(StoredService("f" * 16, spec, 1.0, Status(), (HistoryEntry(1.0, "created", {}),)))
        await store.save_status("f" * 16, Status(state=State.RUNNING, container_id="c" * 64, started_at=2.0))
        await store.add_history("f" * 16, [HistoryEntry(2.0, "started", {"container_id": "c" * 64})])
        print("acknowledged", flush=True)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
    reactor.run()
    """
)


@pytest_twisted.ensureDeferred
async def test_sqlite_acknowledged_writes_survive_kill_9(tmp_path: Path, reactor: Any) -> None:
    """Writes whose Deferreds fired are on disk even when the process is SIGKILLed at once."""
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                             cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"acknowledged\n"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    store = await SQLiteServiceStore.open(reactor, str(tmp_path))
    try:
        (loaded,) = await store.load(10)
        assert loaded.spec.name == "durable"
        assert loaded.status.state is State.RUNNING and loaded.status.container_id == "c" * 64
        assert [h.event for h in loaded.history] == ["created", "started"]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_migrates_an_older_schema(tmp_path: Path, reactor: Any) -> None:
    """A version-1 database keeps its services when opened, and gains an instance id."""
    from flynnsched.services.store import _migrate_to_1

    connection = sqlite3.connect(tmp_path / DB_FILENAME)
    _migrate_to_1(connection.cursor())
    connection.execute(
        "INSERT INTO services (id, name, spec, created_at, state, status) VALUES (?, ?, ?, ?, ?, ?)",
        ("a" * 16, "old", '{"image": "flynn/busybox"}', 1.0, "running",
         '{"state": "running", "container_id": "c", "started_at": 1.0}'),
    )
    connection.execute("PRAGMA user_version = 1")
    connection.commit()
    connection.close()
    store = SQLiteServiceStore.open_now(reactor, str(tmp_path))
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        (loaded,) = await store.load(5)
        assert loaded.spec.image == "flynn/busybox" and loaded.status.container_id == "c"
        assert len(store.instance_id) == 16
    finally:
        await store.close()


def test_sqlite_damaged_file_is_a_clear_error(tmp_path: Path, reactor: Any) -> None:
    """A file that is not a database stops the daemon with a message naming it."""
    (tmp_path / DB_FILENAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=DB_FILENAME):
        SQLiteServiceStore.open_now(reactor, str(tmp_path))
