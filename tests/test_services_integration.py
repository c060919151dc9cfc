"""
Service jobs end to end: a real ``twistd flynnsched`` on the real engine, driven over HTTP the way
a user would with curl, through crashes, ``docker kill``, ``kill -9`` of the daemon and a restart
of the Docker engine (a private one, so the shared engine is never disturbed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred

from flynnsched.docker.interface import EngineError, NoSuchContainer
from flynnsched.services.store import DB_FILENAME
from flynnsched.services.supervisor import LABEL_OWNER
from tests.conftest import docker_host, make_client, need_engine_or_skip, poll

pytestmark = pytest.mark.docker

BUSYBOX = "flynn/busybox"
#: A service that exits at once on SIGTERM (as PID 1, sh ignores signals it does not trap).
POLITE = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"]


async def call(method: str, url: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Any, Any]:
    """One request: status, decoded JSON body (or None) and headers."""
    kwargs: dict[str, Any] = {"timeout": 30}
    if body is not None:
        kwargs["data"] = json.dumps(body).encode()
        kwargs["headers"] = {"Content-Type": [content_type]}
    response = await treq.request(method, url, **kwargs)
    raw = await treq.content(response)
    return response.code, (json.loads(raw) if raw else None), response.headers


async def service(url: str, service_id: str) -> dict[str, Any]:
    code, body, _ = await call("GET", f"{url}/services/{service_id}")
    assert code == 200, body
    return body  # type: ignore[no-any-return]


def instance_id(state_dir: Path) -> str | None:
    path = state_dir / DB_FILENAME
    if not path.exists():
        return None
    connection = sqlite3.connect(path)
    try:
        row = connection.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
    finally:
        connection.close()
    return None if row is None else str(row[0])


def remove_owned(host: str, state_dirs: list[Path]) -> None:
    """Force-remove every container of the daemons that used ``state_dirs``."""
    owners = [o for o in (instance_id(d) for d in state_dirs) if o]
    if not owners:
        return
    client = make_client(host)

    async def cleanup() -> None:
        try:
            for owner in owners:
                for container in await client.list_containers({LABEL_OWNER: owner}):
                    try:
                        await client.remove_container(container.id, force=True)
                    except EngineError:
                        pass
        finally:
            await client.close()

    pytest_twisted.blockon(Deferred.fromCoroutine(cleanup()))


@pytest.fixture
def services_daemon(daemon_factory: Any) -> Iterator[Any]:
    """Start daemons (``await services_daemon(*args, state_dir=…)``); afterwards their containers go."""
    started: list[Any] = []

    async def start(*args: str, state_dir: Path | None = None) -> Any:
        daemon = await daemon_factory(*args, state_dir=state_dir)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
    host = docker_host()
    if host is not None:
        remove_owned(host, [d.state_dir for d in started])


@pytest_twisted.ensureDeferred
async def test_crash_loop_restarts_with_backoff(services_daemon: Any) -> None:
    """A service that exits after 1 s is restarted again and again, 1 s then 2 s apart (curl-style POST)."""
    daemon = await services_daemon()
    code, body, headers = await call(
        "POST", daemon.url + "/services", {"image": BUSYBOX, "cmd": ["sh", "-c", "sleep 1; exit 1"]},
        content_type="application/x-www-form-urlencoded",
    )
    assert code == 201, body
    assert headers.getRawHeaders("location") == [f"/services/{body['id']}"]
    seen: list[int] = []

    async def restarted_twice() -> dict[str, Any] | None:
        shown = await service(daemon.url, body["id"])
        seen.append(shown["restarts"])
        return shown if shown["restarts"] >= 2 else None

    shown = await poll(restarted_twice, timeout=30, interval=0.2, what="two restarts")
    assert seen == sorted(seen)  # the count only rises
    assert shown["last_exit"]["code"] == 1 and shown["last_exit"]["oom_killed"] is False
    delays = [h["delay"] for h in shown["history"] if h["event"] == "backoff"]
    assert 0.9 <= delays[0] <= 1.0 and 1.8 <= delays[1] <= 2.0
    died = [h for h in shown["history"] if h["event"] == "died"]
    assert all(h["exit_code"] == 1 for h in died)


@pytest_twisted.ensureDeferred
async def test_killed_container_is_replaced(services_daemon: Any, real_engine: Any) -> None:
    """``docker kill`` of a service's container: a new one runs, and restarts and last exit say so."""
    daemon = await services_daemon()
    code, body, _ = await call("POST", daemon.url + "/services", {"image": BUSYBOX, "cmd": POLITE})
    assert code == 201, body
    shown = await poll(lambda: _running(daemon.url, body["id"]), timeout=20, what="the service to run")
    first = shown["container_id"]
    await real_engine.kill_container(first, "KILL")
    shown = await poll(lambda: _running(daemon.url, body["id"], not_container=first), timeout=20,
                       what="a replacement container")
    assert shown["restarts"] == 1
    assert shown["last_exit"]["code"] == 137
    assert shown["previous_container_id"] == first
    state = await real_engine.inspect_container(shown["container_id"])
    assert state.running


async def _running(url: str, service_id: str, not_container: str | None = None) -> dict[str, Any] | None:
    shown = await service(url, service_id)
    if shown["state"] == "running" and shown["container_id"] and shown["container_id"] != not_container:
        return shown
    return None


@pytest_twisted.ensureDeferred
async def test_delete_stops_gracefully_and_removes(services_daemon: Any, real_engine: Any) -> None:
    """DELETE signals, waits at most the grace period, removes the container, answers 204; then 404."""
    daemon = await services_daemon()
    created = []
    for cmd, grace in [(POLITE, 10), (["sleep", "1000"], 1)]:
        code, body, _ = await call("POST", daemon.url + "/services",
                                   {"image": BUSYBOX, "cmd": cmd, "stop_grace_period": grace})
        assert code == 201, body
        created.append(await poll(lambda b=body: _running(daemon.url, b["id"]), timeout=20, what="running"))
    timings = []
    for shown in created:
        began = time.monotonic()
        code, body, _ = await call("DELETE", f"{daemon.url}/services/{shown['id']}")
        timings.append(time.monotonic() - began)
        assert code == 204 and body is None
        with pytest.raises(NoSuchContainer):
            await real_engine.inspect_container(shown["container_id"])
        code, body, _ = await call("GET", f"{daemon.url}/services/{shown['id']}")
        assert code == 404 and shown["id"] in body["error"]
    # The polite service left on SIGTERM; the deaf one was killed after its 1 s grace period.
    assert timings[0] < 3.0
    assert 1.0 <= timings[1] < 5.0


@pytest_twisted.ensureDeferred
async def test_kill_9_of_the_daemon_loses_nothing(services_daemon: Any, real_engine: Any, tmp_path: Path) -> None:
    """
    20 services; ``kill -9`` the daemon; ``docker kill`` 3 containers meanwhile; start it again:
    the other 17 keep their containers (not restarted, not duplicated), histories are intact, and
    the 3 run again within seconds.
    """
    state_dir = tmp_path / "state"
    daemon = await services_daemon(state_dir=state_dir)
    ids = []
    for n in range(20):
        code, body, _ = await call("POST", daemon.url + "/services",
                                   {"image": BUSYBOX, "cmd": POLITE, "name": f"svc-{n}"})
        assert code == 201, body
        ids.append(body["id"])

    async def all_running() -> list[dict[str, Any]] | None:
        code, listing, _ = await call("GET", daemon.url + "/services")
        views = listing["services"]
        return views if all(v["state"] == "running" for v in views) and len(views) == 20 else None

    before = {v["id"]: v for v in await poll(all_running, timeout=60, interval=0.2, what="20 running services")}
    started_at = {sid: (await real_engine.inspect_container(v["container_id"])).started_at for sid, v in before.items()}
    daemon.stop(signal.SIGKILL)
    assert daemon.process.returncode == -signal.SIGKILL
    victims = ids[:3]
    for sid in victims:
        await real_engine.kill_container(before[sid]["container_id"], "KILL")

    async def victims_dead() -> bool:
        states = [await real_engine.inspect_container(before[sid]["container_id"]) for sid in victims]
        return not any(state.running for state in states)

    await poll(victims_dead, timeout=10, what="the killed containers to stop")

    async def all_running_again() -> list[dict[str, Any]] | None:
        views = await all_running()
        if views and all(v["container_id"] != before[v["id"]]["container_id"] for v in views if v["id"] in victims):
            return views
        return None

    began = time.monotonic()
    daemon = await services_daemon(state_dir=state_dir)
    after = {v["id"]: v for v in await poll(all_running_again, timeout=30, interval=0.1, what="all running again")}
    revived_in = time.monotonic() - began
    assert revived_in < 10.0
    for sid in ids[3:]:
        assert after[sid]["container_id"] == before[sid]["container_id"]
        assert after[sid]["restarts"] == 0
        assert after[sid]["history"] == before[sid]["history"]
        state = await real_engine.inspect_container(after[sid]["container_id"])
        assert state.running and state.started_at == started_at[sid]
    for sid in victims:
        assert after[sid]["container_id"] != before[sid]["container_id"]
        assert after[sid]["restarts"] == 1 and after[sid]["last_exit"]["code"] == 137
        assert after[sid]["history"][: len(before[sid]["history"])] == before[sid]["history"]
    owner = instance_id(state_dir)
    running = [c for c in await real_engine.list_containers({LABEL_OWNER: owner}) if c.state == "running"]
    assert len(running) == 20
    assert {c.id for c in running} == {v["container_id"] for v in after.values()}


# -- a restart of the Docker engine, on a private engine -----------------------------------------


class PrivateEngine:
    """A dockerd of our own in a temporary directory (no bridge, no firewall changes)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fsd", dir="/tmp"))
        self.socket = self.dir / "d.sock"
        self.host = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.dir / "dockerd.log", "ab")
        self.process = subprocess.Popen(
            ["dockerd", "--host", self.host, "--data-root", str(self.dir / "data"),
             "--exec-root", str(self.dir / "e"), "--pidfile", str(self.dir / "d.pid"),
             "--iptables=false", "--bridge=none", "--storage-driver=overlay2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while subprocess.run(["curl", "-sf", "--unix-socket", str(self.socket), "http://d/_ping"],
                             capture_output=True).returncode != 0:
            assert self.process.poll() is None, (self.dir / "dockerd.log").read_text()
            assert time.monotonic() < deadline, "the private dockerd did not answer"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture
def private_engine() -> Iterator[PrivateEngine]:
    """A private engine with flynn/busybox loaded from the shared one; stopped and deleted afterwards."""
    shared = need_engine_or_skip()
    if shutil.which("dockerd") is None:
        message = "dockerd is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    engine = PrivateEngine()
    try:
        engine.start()
        save = subprocess.Popen(["docker", "save", BUSYBOX], stdout=subprocess.PIPE,
                                env=dict(os.environ, DOCKER_HOST=shared))
        subprocess.run(["docker", "load", "-q"], stdin=save.stdout, check=True, capture_output=True,
                       env=dict(os.environ, DOCKER_HOST=engine.host))
        assert save.wait() == 0
        yield engine
    finally:
        engine.stop()
        unmount_below(engine.dir)
        shutil.rmtree(engine.dir, ignore_errors=True)


def unmount_below(directory: Path) -> None:
    """Unmount what a stopped dockerd left below ``directory`` (container layers, its netns), deepest first."""
    prefix = str(directory.resolve()) + "/"
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@pytest_twisted.ensureDeferred
async def test_engine_restart_under_a_running_daemon(private_engine: PrivateEngine, daemon_factory: Any) -> None:
    """The engine goes away: the daemon stays up, reads work, writes are 503; back, every service runs."""
    daemon = await daemon_factory("--docker", private_engine.host)
    ids = []
    for _ in range(3):
        code, body, _ = await call("POST", daemon.url + "/services",
                                   {"image": BUSYBOX, "cmd": POLITE, "stop_grace_period": 1})
        assert code == 201, body
        ids.append(body["id"])
    before = {sid: (await poll(lambda s=sid: _running(daemon.url, s), timeout=20, what="running"))["container_id"]
              for sid in ids}

    private_engine.stop()

    async def engine_unreachable() -> bool:
        code, listing, _ = await call("GET", daemon.url + "/services")
        return code == 200 and listing["engine_reachable"] is False

    await poll(engine_unreachable, timeout=20, what="the daemon to notice the engine is gone")
    assert daemon.process.poll() is None
    assert [v["id"] for v in (await call("GET", daemon.url + "/services"))[1]["services"]] == ids
    for method, path, body in [("POST", "/services", {"image": BUSYBOX}), ("DELETE", f"/services/{ids[0]}", None),
                               ("GET", f"/services/{ids[0]}/logs", None)]:
        code, error, headers = await call(method, daemon.url + path, body)
        assert code == 503, (method, path, error)
        assert headers.getRawHeaders("retry-after") == ["5"]

    private_engine.start()
    client = make_client(private_engine.host)
    try:
        async def all_back() -> bool:
            for sid in ids:
                shown = await _running(daemon.url, sid)
                if shown is None:
                    return False
                state = await client.inspect_container(shown["container_id"])
                if not state.running:
                    return False
            return True

        await poll(all_back, timeout=30, interval=0.2, what="every service to run again")
        listing = (await call("GET", daemon.url + "/services"))[1]
        assert listing["engine_reachable"] is True
        for view in listing["services"]:
            assert view["container_id"] != before[view["id"]]
            # One restart at least; more when a restart raced the engine's own shutdown.
            assert view["restarts"] >= 1, view["history"]
        assert daemon.process.poll() is None
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_benchmarks_measure_what_they_document(services_daemon: Any, reactor: Any) -> None:
    """bench/services.py's functions run against the real engine and return their documented keys."""
    from bench.services import bench_reconcile, bench_restart

    host = need_engine_or_skip()
    daemon = await services_daemon()
    restart = await bench_restart(reactor, daemon.url, host, runs=1)
    assert restart["flynnsched_ms"]["n"] == 1 and restart["docker_ms"]["n"] == 1
    assert 0 < restart["flynnsched_ms"]["median"] < 5000 and 0 < restart["docker_ms"]["median"] < 5000
    assert restart["ratio"] == pytest.approx(restart["flynnsched_ms"]["median"] / restart["docker_ms"]["median"], rel=0.01)
    reconcile = await bench_reconcile(reactor, host, services=2, runs=1, killed=1)
    assert reconcile["kept"] == 1 and reconcile["revived"] == 1
    assert reconcile["restarted"] == 0 and reconcile["duplicates"] == 0
    assert 0 < reconcile["median_reconcile_s"] < reconcile["median_spawn_to_all_running_s"]


@pytest_twisted.ensureDeferred
async def test_helloweb_demo(services_daemon: Any) -> None:
    """The README's example: flynn/helloweb as a host-network service answers on its PORT until deleted."""
    from tests.conftest import free_port

    daemon = await services_daemon()
    port = free_port()
    code, body, _ = await call("POST", daemon.url + "/services", {
        "image": "flynn/helloweb", "network": "host", "env": {"PORT": str(port)}, "name": "hello",
    }, content_type="application/x-www-form-urlencoded")
    assert code == 201, body

    async def page() -> bytes | None:
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/", timeout=2)
            return await treq.content(response) if response.code == 200 else None
        except Exception:
            return None

    assert b"Hello from flynnsched" in await poll(page, timeout=20, what="the helloweb page")
    code, _, _ = await call("DELETE", daemon.url + "/services/hello")
    assert code == 204
    assert await page() is None


@pytest_twisted.ensureDeferred
async def test_logs_on_the_real_engine(services_daemon: Any, real_engine: Any) -> None:
    """Logs: tail of the current container, the previous one's after a kill, and a live follow."""
    daemon = await services_daemon()
    script = "echo boot $HOSTNAME; sleep 0.2; echo oops >&2; while true; do sleep 0.2; done"
    code, body, _ = await call("POST", daemon.url + "/services", {"image": BUSYBOX, "cmd": ["sh", "-c", script]})
    assert code == 201, body
    first = (await poll(lambda: _running(daemon.url, body["id"]), timeout=20, what="running"))["container_id"]
    logs = f"{daemon.url}/services/{body['id']}/logs"

    async def text(url: str, **kw: Any) -> bytes:
        response = await treq.get(url, timeout=10, **kw)
        assert response.code == 200
        return await treq.content(response)  # type: ignore[no-any-return]

    async def both_lines() -> bytes | None:
        output = await text(logs)
        return output if output.count(b"\n") >= 2 else None

    assert await poll(both_lines, timeout=10, what="output") == f"boot {first[:12]}\noops\n".encode()
    assert await text(logs + "?tail=1") == b"oops\n"
    ndjson = await text(logs, headers={"Accept": ["application/x-ndjson"]})
    assert [json.loads(line)["stream"] for line in ndjson.splitlines()] == ["stdout", "stderr"]
    await real_engine.kill_container(first, "KILL")
    second = (await poll(lambda: _running(daemon.url, body["id"], not_container=first), timeout=20,
                         what="a replacement"))["container_id"]
    assert await text(logs + "?previous=1") == f"boot {first[:12]}\noops\n".encode()
    response = await treq.get(logs + "?follow=1", timeout=10, unbuffered=True)
    received: list[bytes] = []
    done = treq.collect(response, received.append)
    await poll(lambda: b"".join(received).count(b"\n") >= 2, timeout=10, what="follow output")
    assert not done.called
    await real_engine.kill_container(second, "KILL")
    await done
    assert b"".join(received) == f"boot {second[:12]}\noops\n".encode()
