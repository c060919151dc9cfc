"""
Service benchmarks.

``bench_restart``: time from a service container's death to its replacement running, for
flynnsched (restart policy ``always`` with an initial delay of 0) and for Docker's own
``--restart always`` on the same engine, interleaved in one run. Both times come from the
engine's event stream — the ``die`` event's timestamp to the next ``start`` event's — so neither
side's client latency or polling counts.

Both containers die the same way: SIGKILL to their main process from the host. (``docker kill``
would not do for the baseline: the engine marks a killed container as stopped by hand and does not
restart it.) That needs the engine on this machine, as it is here.

``bench_reconcile``: a daemon with N services is killed with ``kill -9``, a few of its containers
are killed while it is down, and it is started again on the same state directory: how long until
it answers, how long its reconciliation takes (its own figure), how long until every service runs
again, and whether any container was restarted or duplicated.

Run alone: ``python bench/services.py [--docker-host unix:///…] [--runs 5] [--services 20]``; it
starts its own daemon and prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__" and __package__ is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import treq  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from flynnsched.docker.address import endpoint_factory, parse_engine_address  # noqa: E402
from flynnsched.docker.client import DockerClient  # noqa: E402

from bench.common import BenchError, poll  # noqa: E402
from flynnsched.docker.interface import LABEL_JOB_ID, EngineError, Event  # noqa: E402
from flynnsched.services.store import DB_FILENAME  # noqa: E402
from flynnsched.services.supervisor import LABEL_OWNER  # noqa: E402

__all__ = ["bench_reconcile", "bench_restart", "main"]

REPO = Path(__file__).resolve().parent.parent
IMAGE = "flynn/busybox"
#: The label on the baseline's containers, so that they can be found and removed.
BENCH_LABEL = "io.flynnsched.bench"
#: A service that leaves at once on SIGTERM.
POLITE = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"]


# -- small helpers --------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "median": round(statistics.median(values), 2) if values else None,
        "min": round(ordered[0], 2) if values else None,
        "max": round(ordered[-1], 2) if values else None,
        "values": [round(v, 2) for v in values],
    }


async def _call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"timeout": 60}
    if body is not None:
        kwargs["data"] = json.dumps(body).encode()
        kwargs["headers"] = {"Content-Type": ["application/json"]}
    response = await treq.request(method, url, **kwargs)
    raw = await treq.content(response)
    return response.code, (json.loads(raw) if raw else None)


def _client(reactor: Any, docker_host: str) -> DockerClient:
    return DockerClient(reactor, endpoint_factory(reactor, parse_engine_address(docker_host)))


def _docker(docker_host: str, *args: str) -> str:
    """Run the docker CLI (setup only, never timed) and return its output."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True,
                          env=dict(os.environ, DOCKER_HOST=docker_host))
    if done.returncode != 0:
        raise BenchError(f"docker {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


async def _main_pid(docker_host: str, container_id: str) -> int:
    pid = int(await deferToThread(_docker, docker_host, "inspect", "-f", "{{.State.Pid}}", container_id))
    if pid <= 0:
        raise BenchError(f"container {container_id[:12]} is not running")
    return pid


class _EventLog:
    """Every container ``die`` and ``start`` event, in order, as the engine reports them."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    async def death_to_start(self, reactor: Any, after: int, matches: Callable[[Event], bool],
                             timeout: float = 30.0) -> float:
        """Milliseconds from the first matching ``die`` after index ``after`` to the next matching ``start``."""

        async def pair() -> tuple[Event, Event] | None:
            died = None
            for event in self.events[after:]:
                if not matches(event):
                    continue
                if died is None and event.action == "die":
                    died = event
                elif died is not None and event.action == "start":
                    return died, event
            return None

        died, started = await poll(reactor, pair, timeout, "a death and a restart")
        return (started.time_nano - died.time_nano) / 1e6


# -- death to replacement ---------------------------------------------------------------------------


def _of_service(service_id: str) -> Callable[[Event], bool]:
    """Events of any container of the service."""
    return lambda event: event.attributes.get(LABEL_JOB_ID) == service_id


def _of_container(container_id: str) -> Callable[[Event], bool]:
    """Events of one container."""
    return lambda event: event.id == container_id


async def bench_restart(reactor: Any, base_url: str, docker_host: str, runs: int = 5) -> dict[str, Any]:
    """
    Death-to-replacement time of a service container, flynnsched against Docker's
    ``--restart always``, ``runs`` times each, interleaved (which goes first alternates).

    Each run uses a fresh service and a fresh Docker container, so both restart from a clean
    backoff (Docker's first restart delay is 100 ms; flynnsched's is set to 0 here).

    :param base_url: a running daemon (``http://127.0.0.1:PORT``) on the engine ``docker_host``.
    :return: ``flynnsched_ms`` and ``docker_ms`` (``n``, ``median``, ``min``, ``max``, ``values``
        in milliseconds), ``ratio`` (flynnsched's median over Docker's: below 1 is faster), ``runs``
        and ``method`` (how the containers died and how the time was taken).
    """
    client = _client(reactor, docker_host)
    log = _EventLog()
    subscription = await client.events(log, filters={"type": ["container"], "event": ["die", "start"]})
    label = uuid.uuid4().hex[:12]
    ours: list[float] = []
    docker: list[float] = []
    try:
        for run in range(runs):
            code, body = await _call("POST", base_url + "/services", {
                "image": IMAGE, "cmd": ["sleep", "100000"], "stop_grace_period": 0,
                "restart": {"policy": "always", "initial_delay": 0, "max_delay": 0, "jitter": 0},
            })
            if code != 201:
                raise BenchError(f"POST /services answered {code}: {body}")
            service_id = body["id"]

            async def service_running(sid: str = service_id) -> str | None:
                code, shown = await _call("GET", f"{base_url}/services/{sid}")
                return shown["container_id"] if code == 200 and shown["state"] == "running" else None

            await poll(reactor, service_running, 30, "the service to run")
            baseline = await deferToThread(
                _docker, docker_host, "run", "-d", "--restart", "always", "--network", "none",
                "--label", f"{BENCH_LABEL}={label}", IMAGE, "sleep", "100000",
            )
            order = ["flynnsched", "docker"] if run % 2 == 0 else ["docker", "flynnsched"]
            for who in order:
                if who == "flynnsched":
                    target = await service_running()
                    if target is None:
                        raise BenchError("the service is not running")
                    matches = _of_service(service_id)
                else:
                    target = baseline
                    matches = _of_container(baseline)
                pid = await _main_pid(docker_host, target)
                mark = len(log.events)
                os.kill(pid, signal.SIGKILL)
                elapsed = await log.death_to_start(reactor, mark, matches)
                (ours if who == "flynnsched" else docker).append(elapsed)
            code, _ = await _call("DELETE", f"{base_url}/services/{service_id}")
            if code != 204:
                raise BenchError(f"DELETE answered {code}")
            await client.remove_container(baseline, force=True)
    finally:
        subscription.stop()
        for container in await client.list_containers({BENCH_LABEL: label}):
            try:
                await client.remove_container(container.id, force=True)
            except EngineError:
                pass
        await client.close()
    ours_stats, docker_stats = _stats(ours), _stats(docker)
    return {
        "runs": runs,
        "flynnsched_ms": ours_stats,
        "docker_ms": docker_stats,
        "ratio": round(ours_stats["median"] / docker_stats["median"], 3) if runs else None,
        "method": "SIGKILL to each container's main process; engine die-event time to start-event "
                  "time; flynnsched initial delay 0; fresh containers each run, order alternating",
    }


# -- reconciling after a daemon restart ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Daemon:
    """``twistd -n flynnsched`` on a loopback port, its state in ``state_dir``."""

    def __init__(self, docker_host: str, state_dir: Path, args: list[str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        self._log = open(state_dir / "daemon.log", "ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "twistd"), "--nodaemon", "--pidfile=", "flynnsched",
             "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--state-dir", str(state_dir),
             "--docker", docker_host, *(args or [])],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(state_dir),
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )

    async def ready(self, reactor: Any, timeout: float = 30.0) -> None:
        async def answers() -> bool:
            if self.process.poll() is not None:
                raise BenchError(f"the daemon exited with {self.process.returncode}; see {self.state_dir}/daemon.log")
            try:
                response = await treq.get(self.url + "/", timeout=2)
                await treq.content(response)
                return True
            except Exception:
                return False

        await poll(reactor, answers, timeout, "the daemon to answer")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _owner(state_dir: Path) -> str:
    connection = sqlite3.connect(state_dir / DB_FILENAME)
    try:
        return str(connection.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()[0])
    finally:
        connection.close()


async def bench_reconcile(reactor: Any, docker_host: str, services: int = 20, runs: int = 3,
                          killed: int = 3) -> dict[str, Any]:
    """
    ``runs`` times: ``kill -9`` a daemon running ``services`` services, kill ``killed`` of their
    containers meanwhile (other ones each run), start the daemon again on the same state
    directory. The killed ones come back after the default first restart delay (1 s).

    It starts and removes its own daemon (and its containers) on ``docker_host``.

    :return: per-run lists (and ``median_<name>`` for each): ``spawn_to_http_s`` (start of the process to its
        first HTTP answer), ``reconcile_s`` (the daemon's own time for its first reconciliation),
        ``spawn_to_all_running_s`` (start of the process to every service running, the killed ones
        included); and over all runs ``kept`` (containers adopted unchanged), ``restarted``
        (untouched containers that were replaced anyway: should be 0), ``duplicates`` (running
        containers beyond one per service: should be 0) and ``revived`` (killed containers
        replaced).
    """
    if not 0 <= killed <= services:
        raise ValueError("killed must be between 0 and services")
    state_dir = Path(tempfile.mkdtemp(prefix="flynnsched-bench-services-"))
    client = _client(reactor, docker_host)
    daemon = _Daemon(docker_host, state_dir)
    result: dict[str, Any] = {"services": services, "killed": killed, "runs": runs, "spawn_to_http_s": [],
                              "reconcile_s": [], "spawn_to_all_running_s": [], "kept": 0, "restarted": 0,
                              "duplicates": 0, "revived": 0}
    try:
        await daemon.ready(reactor)
        for n in range(services):
            code, body = await _call("POST", daemon.url + "/services",
                                     {"image": IMAGE, "cmd": POLITE, "name": f"bench-{n}", "stop_grace_period": 1})
            if code != 201:
                raise BenchError(f"POST /services answered {code}: {body}")

        async def all_running(url: str) -> dict[str, Any] | None:
            try:
                code, listing = await _call("GET", url + "/services")
            except Exception:
                return None
            if code != 200 or listing["last_reconcile"] is None:
                return None
            views = listing["services"]
            if len(views) == services and all(v["state"] == "running" for v in views):
                return listing
            return None

        listing = await poll(reactor, lambda: all_running(daemon.url), 120, "every service to run")
        owner = _owner(state_dir)
        for run in range(runs):
            before = {v["id"]: v["container_id"] for v in listing["services"]}
            daemon.stop(signal.SIGKILL)
            # Other victims each run, so that each comes back after its first backoff delay.
            order = list(before)
            victims = [order[(run * killed + k) % services] for k in range(killed)]
            for sid in victims:
                await client.kill_container(before[sid], "KILL")

            async def victims_dead() -> bool:
                return not any([(await client.inspect_container(before[sid])).running for sid in victims])

            await poll(reactor, victims_dead, 10, "the killed containers to stop")
            began = time.monotonic()
            daemon = _Daemon(docker_host, state_dir)
            await daemon.ready(reactor)
            result["spawn_to_http_s"].append(round(time.monotonic() - began, 3))
            async def revived(url: str = daemon.url) -> dict[str, Any] | None:
                listing = await all_running(url)
                if listing and all(v["container_id"] != before[v["id"]] for v in listing["services"] if v["id"] in victims):
                    return listing
                return None

            listing = await poll(reactor, revived, 60, "every service to run again")
            result["spawn_to_all_running_s"].append(round(time.monotonic() - began, 3))
            result["reconcile_s"].append(listing["last_reconcile"]["seconds"])
            after = {v["id"]: v["container_id"] for v in listing["services"]}
            for sid, container in before.items():
                if sid in victims:
                    result["revived"] += after[sid] != container
                elif after[sid] == container:
                    result["kept"] += 1
                else:
                    result["restarted"] += 1
            running = [c for c in await client.list_containers({LABEL_OWNER: owner}) if c.state == "running"]
            result["duplicates"] += len(running) - services
    finally:
        daemon.stop()
        try:
            owner = _owner(state_dir)
            for container in await client.list_containers({LABEL_OWNER: owner}):
                await client.remove_container(container.id, force=True)
        except (EngineError, OSError, sqlite3.Error, TypeError):
            pass
        await client.close()
        shutil.rmtree(state_dir, ignore_errors=True)
    for key in ("spawn_to_http_s", "reconcile_s", "spawn_to_all_running_s"):
        values = result[key]
        result["median_" + key] = round(statistics.median(values), 4) if values else None
    return result


# -- standalone ------------------------------------------------------------------------------------


def _default_docker_host() -> str:
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    done = subprocess.run([str(REPO / "scripts" / "docker-engine"), "ensure"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip() or "no Docker engine")
    return done.stdout.strip()


async def _standalone(reactor: Any, args: argparse.Namespace) -> None:
    docker_host = args.docker_host or _default_docker_host()
    state_dir = Path(tempfile.mkdtemp(prefix="flynnsched-bench-restart-"))
    daemon = _Daemon(docker_host, state_dir)
    results: dict[str, Any] = {"docker_host": docker_host}
    try:
        await daemon.ready(reactor)
        results["restart"] = await bench_restart(reactor, daemon.url, docker_host, args.runs)
    finally:
        daemon.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    results["reconcile"] = await bench_reconcile(reactor, docker_host, args.services, args.reconcile_runs)
    print(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> None:
    """``python bench/services.py``: both benchmarks against a daemon of their own, as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--docker-host", help="the engine [default: $DOCKER_HOST, else scripts/docker-engine ensure]")
    parser.add_argument("--runs", type=int, default=5, help="kills of each side for the restart figure")
    parser.add_argument("--services", type=int, default=20, help="services for the reconcile figure")
    parser.add_argument("--reconcile-runs", type=int, default=3, help="daemon restarts for the reconcile figure")
    args = parser.parse_args(argv)
    react(lambda reactor: Deferred.fromCoroutine(_standalone(reactor, args)))


if __name__ == "__main__":
    main()
