"""
Batch jobs end to end: a real ``twistd flynnsched`` on the real engine, used as a client would.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from flynnsched.docker.interface import LABEL_JOB_ID, LABEL_MANAGED

from .conftest import poll

pytestmark = pytest.mark.docker


class Chunks(Protocol):
    """Records each delivery of a response body with its arrival time."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((time.monotonic(), data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(None)

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)


@pytest_twisted.ensureDeferred
async def test_primesum_streams(daemon_factory: Any) -> None:
    """primesum 5000 streams its lines: the first arrives in a delivery before the last line exists."""
    daemon = await daemon_factory()
    response = await treq.get(daemon.url + "/batch/flynn/primesum?5000", unbuffered=True).addTimeout(60, reactor)
    assert response.code == 200
    chunks = Chunks()
    response.deliverBody(chunks)
    await chunks.done.addTimeout(60, reactor)
    lines = chunks.body.decode().splitlines()
    assert len(lines) == 5000
    assert lines[0] == "1 2 2"
    assert lines[-1] == "5000 48611 114455259"
    assert len(chunks.chunks) > 1
    assert b"5000 48611" not in chunks.chunks[0][1]
    assert response.headers.getRawHeaders("flynn-job-id")


@pytest_twisted.ensureDeferred
async def test_ndjson_streams_and_exit(daemon_factory: Any) -> None:
    """NDJSON separates stdout and stderr and ends with the exit code."""
    daemon = await daemon_factory()
    url = daemon.url + "/batch/flynn/busybox?sh+-c+echo%20out;echo%20err%3E%262;exit%203"
    response = await treq.get(url, headers={"Accept": "application/x-ndjson"}).addTimeout(30, reactor)
    records = [json.loads(line) for line in (await treq.content(response)).splitlines()]
    assert {"stream": "stdout", "data": "out\n"} in records
    assert {"stream": "stderr", "data": "err\n"} in records
    assert records[-1] == {"exit": 3}


@pytest_twisted.ensureDeferred
async def test_errors(daemon_factory: Any) -> None:
    """Bad references are 400s, a missing image a 404 after a pull attempt; all JSON, none a 500."""
    daemon = await daemon_factory()
    for path, status in [
        ("/batch/UPPER/Case", 400),
        ("/batch/a/../b", 400),
        ("/batch/flynn/busybox?%FF", 400),
        ("/batch/flynn/busybox?no-such-program", 400),
        ("/batch/127.0.0.1:9/flynn/missing", 404),
    ]:
        response = await treq.get(daemon.url + path).addTimeout(60, reactor)
        body = json.loads(await treq.content(response))
        assert (path, response.code) == (path, status)
        assert body["error"]
        assert "Traceback" not in body["error"]


@pytest_twisted.ensureDeferred
async def test_never_pull(daemon_factory: Any) -> None:
    """With --pull never, a missing image is a 404 without asking any registry."""
    daemon = await daemon_factory("--pull", "never")
    response = await treq.get(daemon.url + "/batch/flynn/not-built-here").addTimeout(30, reactor)
    assert response.code == 404
    assert "pulling is disabled" in json.loads(await treq.content(response))["error"]


@pytest_twisted.ensureDeferred
async def test_engine_unreachable(daemon_factory: Any, tmp_path: Any) -> None:
    """With no engine at the configured address, jobs are refused with 503 and Retry-After."""
    daemon = await daemon_factory("--docker", f"unix:{tmp_path}/no-engine.sock")
    response = await treq.get(daemon.url + "/batch/flynn/busybox?true").addTimeout(30, reactor)
    assert response.code == 503
    assert response.headers.getRawHeaders("retry-after") == ["5"]
    assert "unreachable" in json.loads(await treq.content(response))["error"]


@pytest_twisted.ensureDeferred
async def test_disconnect_removes_container(daemon_factory: Any, real_engine: Any) -> None:
    """A client that goes away mid-stream has its container killed and removed."""
    daemon = await daemon_factory()
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    sock.sendall(b"GET /batch/flynn/busybox?yes HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    sock.settimeout(30)
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    job_id = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"flynn-job-id:")
    )
    assert await real_engine.list_containers({LABEL_MANAGED: "1", LABEL_JOB_ID: job_id})
    for _ in range(20):
        sock.recv(65536)
    sock.close()
    await poll(
        lambda: real_engine.list_containers({LABEL_JOB_ID: job_id}).addCallback(lambda found: not found),
        timeout=5.0,
        what="the container of the abandoned job to be removed",
    )


@pytest_twisted.ensureDeferred
async def test_stdin_and_timeout(daemon_factory: Any) -> None:
    """A POST body reaches the command's stdin; a Flynn-Timeout kills a job that runs too long."""
    daemon = await daemon_factory()
    response = await treq.post(daemon.url + "/batch/flynn/busybox?wc+-l", data=b"a\nb\nc\n").addTimeout(30, reactor)
    assert (response.code, (await treq.content(response)).strip()) == (200, b"3")
    response = await treq.get(
        daemon.url + "/batch/flynn/busybox?sleep+60",
        headers={"Accept": "application/x-ndjson", "Flynn-Timeout": "1"},
    ).addTimeout(30, reactor)
    records = [json.loads(line) for line in (await treq.content(response)).splitlines()]
    assert records == [{"exit": 137, "timed_out": True}]
