"""
Shared fixtures: the fake and the real engine, per-test labels with clean-up, and a real daemon.

The real engine is the one ``DOCKER_HOST`` names (``make test`` sets it). Without one, tests that
need it are skipped on a developer's machine and fail under ``CI=true``: a missing engine must
never pass for green.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater

from flynnsched.docker.address import endpoint_factory, parse_engine_address
from flynnsched.docker.client import DockerClient
from flynnsched.docker.interface import EngineError
from flynnsched.testing import FakeDockerEngine

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: The label that marks every container a test run creates, so that a finalizer can remove them.
TEST_LABEL = "io.flynnsched.test"


def docker_host() -> str | None:
    return os.environ.get("DOCKER_HOST") or None


def need_engine_or_skip() -> str:
    """The engine address, or a skip (a failure under CI)."""
    host = docker_host()
    if host is None:
        message = "no Docker engine: DOCKER_HOST is not set (run the suite with `make test`)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return host


@pytest.fixture
def reactor() -> Any:
    """The global reactor, for tests that talk to the real world."""
    return _reactor


@pytest.fixture
def clock() -> Clock:
    """A fake clock for unit tests."""
    return Clock()


@pytest.fixture
def fake_engine(clock: Clock) -> FakeDockerEngine:
    """A fake engine with the demo images present."""
    engine = FakeDockerEngine(clock)
    engine.add_image("flynn/busybox", ("sh",))
    engine.add_image("flynn/primesum", ("primesum", "10"))
    return engine


def make_client(host: str) -> DockerClient:
    return DockerClient(_reactor, endpoint_factory(_reactor, parse_engine_address(host)))


@pytest.fixture
def real_engine() -> Iterator[DockerClient]:
    """A ``DockerClient`` on ``$DOCKER_HOST``; its pool is closed afterwards."""
    client = make_client(need_engine_or_skip())
    yield client
    pytest_twisted.blockon(client.close())


@pytest.fixture
def labels(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """
    Labels unique to this test; any container carrying them is force-removed afterwards.
    """
    value = uuid.uuid4().hex[:12]
    yield {TEST_LABEL: value}
    host = docker_host()
    if host is None:
        return
    client = make_client(host)

    async def cleanup() -> None:
        for container in await client.list_containers({TEST_LABEL: value}):
            try:
                await client.remove_container(container.id, force=True)
            except EngineError:
                pass
        await client.close()

    pytest_twisted.blockon(Deferred.fromCoroutine(cleanup()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A ``twistd -n flynnsched`` subprocess on a loopback port."""

    def __init__(self, state_dir: Path, args: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        self.log_path = state_dir / "daemon.log"
        command = [
            str(Path(sys.executable).parent / "twistd"), "--nodaemon", "--pidfile=", "flynnsched",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--state-dir", str(state_dir),
            *args,
        ]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(state_dir)
        )
        self.pid = self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, timeout: float = 20.0) -> None:
        """Wait until the daemon answers HTTP, or fail with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = await treq.get(self.url + "/", timeout=2)
                await treq.content(response)
                return
            except Exception:
                await deferLater(_reactor, 0.05, lambda: None)
        raise AssertionError(f"the daemon did not answer within {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """
    Start real daemons: ``await daemon_factory(*args)`` gives a ready ``Daemon`` on the real
    engine; all are stopped (by pid) afterwards.
    """
    host = need_engine_or_skip()
    started: list[Daemon] = []

    async def start(*args: str, state_dir: Path | None = None) -> Daemon:
        env = dict(os.environ, DOCKER_HOST=host, PYTHONUNBUFFERED="1")
        directory = state_dir or tmp_path / f"state{len(started)}"
        directory.mkdir(parents=True, exist_ok=True)
        daemon = Daemon(directory, list(args), env)
        started.append(daemon)
        await daemon.ready()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def result(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must have fired already."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (taken modulo its length, in order)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = []
    start = 0
    for point in points + [len(data)]:
        chunks.append(data[start:point])
        start = point
    return chunks


async def poll(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Call ``predicate`` (sync or async) until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(_reactor, interval, lambda: None)

