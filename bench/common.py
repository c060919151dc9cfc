"""
What every benchmark shares: the daemon under test, the engine as a direct client, the baselines'
ways of running a container, process sampling from ``/proc`` and the statistics.

The daemon runs as a real ``twistd -n flynnsched`` subprocess on a free loopback port, exactly as a
user would run it; the baselines run in this process (the Engine API through ``DockerClient``) or
as a ``docker`` CLI subprocess. Every container a baseline creates carries ``BENCH_LABEL`` so that
``remove_leftovers`` can find and remove it whatever happened.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Sequence

import attrs
import treq
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from flynnsched.docker.address import endpoint_factory, parse_engine_address
from flynnsched.docker.client import DockerClient
from flynnsched.docker.interface import LABEL_JOB_ID, LABEL_MANAGED, ContainerSpec, EngineError

REPO = Path(__file__).resolve().parent.parent
#: The label on every container the baselines create; its value is the run's id.
BENCH_LABEL = "io.flynnsched.bench"
IMAGE = "flynn/busybox"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024


class BenchError(Exception):
    """A benchmark could not produce a valid figure (a failed job, lost bytes, a leftover)."""


# -- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of ``values``, by linear interpolation between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float], digits: int = 2) -> dict[str, Any]:
    """Count, median, p95, p99, min and max of ``values``, and the values themselves."""
    return {
        "n": len(values),
        "median": round(percentile(values, 50), digits),
        "p95": round(percentile(values, 95), digits),
        "p99": round(percentile(values, 99), digits),
        "min": round(min(values), digits) if values else math.nan,
        "max": round(max(values), digits) if values else math.nan,
        "values": [round(v, digits) for v in values],
    }


def rotations(names: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """
    ``rounds`` orders of ``names``, each round a rotation of the last, so that each method goes
    first, second, … equally often and slow drift of the machine hits all of them alike.
    """
    names = list(names)
    for i in range(rounds):
        k = i % len(names)
        yield i, names[k:] + names[:k]


# -- the process under test ----------------------------------------------------------------------


@attrs.frozen
class ProcSample:
    """One reading of a process: resident set (bytes), its peak, and CPU seconds used so far."""

    t: float
    rss: int
    hwm: int
    cpu: float


def read_proc(pid: int) -> ProcSample:
    """Read ``pid``'s RSS, peak RSS (``VmHWM``) and user+system CPU time from ``/proc``."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # Fields 14 and 15 of stat (utime, stime); ``fields`` starts at field 3.
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return ProcSample(time.monotonic(), rss, hwm, cpu)


def reset_peak_rss(pid: int) -> bool:
    """Reset ``pid``'s ``VmHWM`` to its current RSS (``clear_refs`` 5); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Samples a process every ``interval`` seconds while running; ``stop`` gives the figures."""

    def __init__(self, reactor: Any, pid: int, interval: float = 0.05) -> None:
        from twisted.internet.task import LoopingCall

        self._pid = pid
        self.samples: list[ProcSample] = []
        self._loop = LoopingCall(self._sample)
        self._loop.clock = reactor
        self._interval = interval

    def _sample(self) -> None:
        self.samples.append(read_proc(self._pid))

    def start(self) -> None:
        reset_peak_rss(self._pid)
        self._loop.start(self._interval, now=True)

    def stop(self) -> dict[str, Any]:
        """Stop sampling; return baseline, peak and final RSS (MiB) and CPU used (s and %)."""
        if self._loop.running:
            self._loop.stop()
        self._sample()
        first, last = self.samples[0], self.samples[-1]
        elapsed = max(last.t - first.t, 1e-9)
        cpu = last.cpu - first.cpu
        peak = max(max(s.rss for s in self.samples), last.hwm)
        return {
            "rss_start_mib": round(first.rss / MiB, 2),
            "rss_peak_mib": round(peak / MiB, 2),
            "rss_end_mib": round(last.rss / MiB, 2),
            "rss_growth_mib": round((peak - first.rss) / MiB, 2),
            "cpu_seconds": round(cpu, 3),
            "cpu_percent": round(100.0 * cpu / elapsed, 1),
            "seconds": round(elapsed, 3),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A ``twistd -n flynnsched`` subprocess on a loopback port, with its own state directory."""

    def __init__(self, docker_host: str, args: Sequence[str] = (), state_dir: Path | None = None) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        self._own_state = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="flynnsched-bench-"))
        self.log_path = self.state_dir / "daemon.log"
        self.args = list(args)
        command = [
            str(Path(sys.executable).parent / "twistd"), "--nodaemon", "--pidfile=", "flynnsched",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--state-dir", str(self.state_dir),
            "--docker", docker_host,
            *self.args,
        ]
        env = dict(os.environ, DOCKER_HOST=docker_host, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(self.state_dir)
        )
        self.pid = self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, reactor: Any, timeout: float = 30.0) -> None:
        """Wait until the daemon answers HTTP, or fail with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the daemon exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = await treq.get(self.url + "/", timeout=2)
                await treq.content(response)
                return
            except Exception:
                await sleep(reactor, 0.05)
        raise BenchError(f"the daemon did not answer within {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the daemon (by its pid) and wait for it; remove its state if we made it."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def poll(reactor: Any, predicate: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Await ``predicate()`` until it is truthy, or raise ``BenchError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout} s waiting for {what}")
        await sleep(reactor, 0.05)


# -- the engine, directly ------------------------------------------------------------------------


def engine_client(reactor: Any, docker_host: str) -> DockerClient:
    return DockerClient(reactor, endpoint_factory(reactor, parse_engine_address(docker_host)))


class _Stream(Protocol):
    """Counts a container's attached output and times its first and last byte; ``ended`` fires at its end."""

    def __init__(self) -> None:
        self.size = 0
        self.first: float | None = None
        self.last: float | None = None
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.size += len(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if not self.ended.called:
            self.ended.callback(None)


@attrs.define
class RunResult:
    """One container run by any method: wall time, output bytes (payload only) and its timing."""

    seconds: float
    size: int
    first: float | None
    last: float | None
    exit_code: int | None = None
    #: CPU seconds of the process that reads the output (this one's thread, or this process).
    consumer_cpu: float | None = None
    #: CPU seconds of the process between the engine and the consumer (flynnsched, the CLI).
    relay_cpu: float | None = None
    #: Seconds until the exit code was known, where that is before the end (the removal after it).
    exit_seconds: float | None = None

    @property
    def streaming_seconds(self) -> float:
        """First to last byte of output."""
        if self.first is None or self.last is None:
            return math.nan
        return self.last - self.first


async def run_direct(client: DockerClient, cmd: tuple[str, ...], label: str) -> RunResult:
    """
    Run ``cmd`` the way flynnsched does, straight on the Engine API: create (no network, no
    engine-side log) → attach → start → stream to the end → wait → remove.

    Output bytes are counted as payload: the 8-byte frame headers of the multiplexed stream are
    taken off by the same demultiplexer flynnsched uses.
    """
    from flynnsched.docker.mux import Demultiplexer

    start = time.perf_counter()
    cpu = time.process_time()
    spec = ContainerSpec(image=IMAGE, cmd=cmd, labels={BENCH_LABEL: label}, network="none", log_driver="none")
    container_id = await client.create_container(spec)
    try:
        stream = _DemuxStream(Demultiplexer())
        await client.attach(container_id, stream)
        await client.start_container(container_id)
        await stream.ended
        exit_code = await client.wait_container(container_id)
        to_exit = time.perf_counter() - start
    finally:
        await client.remove_container(container_id, force=True)
    return RunResult(
        time.perf_counter() - start, stream.size, stream.first, stream.last, exit_code,
        consumer_cpu=time.process_time() - cpu, exit_seconds=to_exit,
    )


class _DemuxStream(_Stream):
    def __init__(self, demux: Any) -> None:
        super().__init__()
        self._demux = demux

    def dataReceived(self, data: bytes) -> None:
        for _, piece in self._demux.feed(data):
            super().dataReceived(piece)


def docker_run_argv(cmd: Sequence[str], label: str) -> list[str]:
    """The ``docker run`` command line that matches flynnsched's batch containers."""
    return [
        "docker", "run", "--rm", "--network", "none", "--log-driver", "none",
        "--label", f"{BENCH_LABEL}={label}", IMAGE, *cmd,
    ]


def run_cli(argv: Sequence[str], docker_host: str, read_size: int = 1 << 20) -> RunResult:
    """
    Run ``docker run …`` to its end (blocking: call it in a thread), reading its stdout as a
    consumer would, in large reads so the reader is never what limits it.
    """
    env = dict(os.environ, DOCKER_HOST=docker_host)
    start = time.perf_counter()
    cpu = time.thread_time()
    process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout is not None and process.stderr is not None
    size = 0
    first = last = None
    fd = process.stdout.fileno()
    while True:
        data = os.read(fd, read_size)
        if not data:
            break
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        size += len(data)
    consumer_cpu = time.thread_time() - cpu
    error = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    code = process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    process.stderr.close()
    if code != 0:
        raise BenchError(f"{' '.join(argv)} exited with {code}: {error.decode(errors='replace')[-500:]}")
    return RunResult(seconds, size, first, last, code, consumer_cpu, usage.ru_utime + usage.ru_stime)


class ChunkedCounter:
    """Counts the payload of an HTTP/1.1 chunked body fed in arbitrary pieces."""

    def __init__(self) -> None:
        self._pending = b""
        self._remaining = 0  # payload bytes left in the current chunk
        self._skip = 0  # bytes of the CRLF after a chunk's payload still to skip
        self.done = False

    def feed(self, data: bytes) -> int:
        """Take the next bytes; return how many of them are payload."""
        if self._pending:
            data, self._pending = self._pending + data, b""
        got = pos = 0
        size = len(data)
        while pos < size and not self.done:
            if self._remaining:
                take = min(self._remaining, size - pos)
                got += take
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._skip = 2
            elif self._skip:
                take = min(self._skip, size - pos)
                pos += take
                self._skip -= take
            else:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self._pending = data[pos:]
                    break
                length = int(data[pos:end].split(b";")[0], 16)
                pos = end + 2
                if length:
                    self._remaining = length
                else:
                    self.done = True
        return got


def send_get(sock: socket.socket, host: str, port: int, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """
    Send ``GET path`` on a connected socket and read the response head (blocking). Returns the
    status, the headers (lower-case names) and the body bytes that came with the head.
    """
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode("ascii"))
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise BenchError(f"the connection closed before the response head of {path}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(b" ", 2)[1]), headers, rest


def read_http(host: str, port: int, path: str, read_size: int = 1 << 20) -> tuple[int, RunResult, str, bool]:
    """
    GET ``path`` over a new connection and read the whole body (blocking: call it in a thread), in
    large reads and with a minimal chunked decoder, so the reader is never what limits it.

    Returns the status, the run (payload bytes, first and last byte times), ``Flynn-Job-Id`` and
    whether the body was complete (a chunked body's last chunk arrived).
    """
    start = time.perf_counter()
    cpu = time.thread_time()
    sock = socket.create_connection((host, port), timeout=120)
    try:
        status, headers, buf = send_get(sock, host, port, path)
        decoder = ChunkedCounter() if headers.get(b"transfer-encoding", b"").lower() == b"chunked" else None
        size = 0
        first = last = None
        while True:
            if not buf:
                buf = sock.recv(read_size)
                if not buf:
                    break
            got = decoder.feed(buf) if decoder is not None else len(buf)
            buf = b""
            if got:
                now = time.perf_counter()
                first = first or now
                last = now
                size += got
            if decoder is not None and decoder.done:
                break
        job_id = headers.get(b"flynn-job-id", b"").decode("ascii")
        complete = decoder.done if decoder is not None else True
    finally:
        sock.close()
    run = RunResult(time.perf_counter() - start, size, first, last, consumer_cpu=time.thread_time() - cpu)
    return status, run, job_id, complete


async def remove_leftovers(reactor: Any, client: DockerClient, label: str) -> int:
    """Force-remove every container of this run (baselines' label); return how many there were."""
    leftovers = await client.list_containers({BENCH_LABEL: label})
    for container in leftovers:
        try:
            await client.remove_container(container.id, force=True)
        except EngineError:
            pass
    return len(leftovers)


async def job_containers(client: DockerClient, job_id: str) -> list[str]:
    """The containers of flynnsched's job ``job_id`` that the engine still has."""
    found = await client.list_containers({LABEL_MANAGED: "1", LABEL_JOB_ID: job_id})
    return [c.id for c in found]


@attrs.define
class Context:
    """What a benchmark runs against: the daemon, the engine directly, and this run's label."""

    reactor: Any
    docker_host: str
    daemon: Daemon
    engine: DockerClient
    label: str
    smoke: bool
