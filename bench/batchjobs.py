"""
Batch job benchmarks: latency, output throughput, concurrency and a slow reader, each measured for
flynnsched's ``GET /batch/…`` and for the same container run by ``docker run`` and straight on the
Engine API, interleaved in one run.

flynnsched is read by a plain blocking HTTP/1.1 client (a new connection per job, large reads, a
minimal chunked decoder), and ``docker run``'s stdout by large reads of its pipe, each in a thread
of this process; the direct runs use ``DockerClient`` in the reactor thread.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import quote

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThreadPool

from bench.common import (
    BenchError,
    Context,
    RunResult,
    Sampler,
    docker_run_argv,
    job_containers,
    poll,
    read_http,
    read_proc,
    rotations,
    run_cli,
    run_direct,
    send_get,
    summary,
)
from bench.report import Row, diff, ratio

DOCKER_RUN = "docker_run"
DIRECT = "direct_api"
#: The direct runs timed up to the exit code, without the removal that follows.
DIRECT_TO_EXIT = "direct_api_to_exit"
FLYNNSCHED = "flynnsched"
#: Attempts at one sample before the benchmark gives up; every failed attempt is recorded.
ATTEMPTS = 3


def batch_path(cmd: Sequence[str]) -> str:
    """The ``/batch`` URL path and query for ``flynn/busybox`` running ``cmd``."""
    return "/batch/flynn/busybox?" + "+".join(quote(part, safe="") for part in cmd)


async def in_thread(ctx: Context, f: Callable[..., Any], *args: Any) -> Any:
    return await deferToThreadPool(ctx.reactor, ctx.reactor.getThreadPool(), f, *args)


def human_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


Method = Callable[[], Awaitable[RunResult]]


def methods_for(ctx: Context, cmd: tuple[str, ...], expected: int | None) -> dict[str, Method]:
    """The three ways of running ``cmd``, each checking the job succeeded with ``expected`` bytes."""
    path = batch_path(cmd)
    what = " ".join(cmd)

    def check(method: str, result: RunResult) -> RunResult:
        if expected is not None and result.size != expected:
            raise BenchError(f"{method} delivered {result.size} bytes of {what!r}, not {expected}")
        return result

    async def flynnsched() -> RunResult:
        before = read_proc(ctx.daemon.pid).cpu
        status, run, _, complete = await in_thread(ctx, read_http, ctx.daemon.host, ctx.daemon.port, path)
        run.relay_cpu = read_proc(ctx.daemon.pid).cpu - before
        if status != 200 or not complete:
            raise BenchError(f"GET {path} answered {status}{'' if complete else ' and was cut short'}")
        return check(FLYNNSCHED, run)

    async def docker_run() -> RunResult:
        return check(DOCKER_RUN, await in_thread(ctx, run_cli, docker_run_argv(cmd, ctx.label), ctx.docker_host))

    async def direct() -> RunResult:
        result = await run_direct(ctx.engine, cmd, ctx.label)
        if result.exit_code != 0:
            raise BenchError(f"the direct run of {what!r} exited with {result.exit_code}")
        return check(DIRECT, result)

    return {FLYNNSCHED: flynnsched, DOCKER_RUN: docker_run, DIRECT: direct}


async def attempt(method: Method, failures: list[str]) -> RunResult:
    """
    One sample of ``method``, tried up to ``ATTEMPTS`` times: on a machine shared with other work
    a job can fail for reasons of its own (another daemon removing containers, say); each failure
    is appended to ``failures`` and the results file shows them all.
    """
    for n in range(ATTEMPTS):
        try:
            return await method()
        except BenchError as e:
            failures.append(str(e)[:300])
            if n == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


# -- 1. latency ----------------------------------------------------------------------------------


async def latency(ctx: Context, runs: int, warmup: int) -> dict[str, Any]:
    """
    ``busybox true`` end to end, ``runs`` times per method after ``warmup`` rounds, the three
    methods taking turns in rotated order.
    """
    methods = methods_for(ctx, ("true",), expected=0)
    times: dict[str, list[float]] = {name: [] for name in [*methods, DIRECT_TO_EXIT]}
    failures: list[str] = []
    for i, order in rotations(list(methods), runs + warmup):
        for name in order:
            result = await attempt(methods[name], failures)
            if i >= warmup:
                times[name].append(result.seconds * 1000)
                if name == DIRECT and result.exit_seconds is not None:
                    times[DIRECT_TO_EXIT].append(result.exit_seconds * 1000)
    figures = {name: summary(values) for name, values in times.items()}
    f, d, c, e = (figures[n]["median"] for n in (FLYNNSCHED, DOCKER_RUN, DIRECT, DIRECT_TO_EXIT))
    f95, d95, c95 = (figures[n]["p95"] for n in (FLYNNSCHED, DOCKER_RUN, DIRECT))
    rows = [
        Row("Batch latency `true`, median (ms)", f, d, c, ratio(f, d), diff(f, c, "ms"),
            "≤ 0.95 × docker run, ≤ direct + 5 ms", f <= 0.95 * d and f - c <= 5.0),
        Row("Batch latency `true`, p95 (ms)", f95, d95, c95, ratio(f95, d95), diff(f95, c95, "ms"), "", None),
        Row("Batch latency `true`, median, direct API up to its exit code (ms)", f, None, e, None,
            diff(f, e, "ms"), "(flynnsched removes after answering)", None),
    ]
    return {"unit": "ms", "runs": runs, "warmup": warmup, "methods": figures, "failures": failures, "rows": rows}


# -- 2. throughput -------------------------------------------------------------------------------


def throughput_cases(bytes_size: int, lines_size: int) -> dict[str, tuple[tuple[str, ...], int]]:
    """The output-heavy commands and how many bytes each writes."""
    return {
        "bytes": (("head", "-c", str(bytes_size), "/dev/zero"), bytes_size),
        "lines": (("sh", "-c", f"yes | head -c {lines_size}"), lines_size),
    }


def _per_gib(values: list[float | None], size: int) -> float | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return round(sorted(known)[len(known) // 2] * (1 << 30) / size, 3)


async def throughput(ctx: Context, bytes_size: int, lines_size: int, reps: int) -> dict[str, Any]:
    """
    Each case ``reps`` times per method, interleaved; MB/s (10^6 bytes) from the first byte to the
    last one the consumer reads, and end to end (from the request to the end); CPU seconds per GiB
    of the relay (flynnsched, the CLI) and of the consumer.
    """
    result: dict[str, Any] = {"unit": "MB/s", "reps": reps, "cases": {}, "failures": [], "rows": []}
    for case, (cmd, size) in throughput_cases(bytes_size, lines_size).items():
        methods = methods_for(ctx, cmd, expected=size)
        runs: dict[str, list[RunResult]] = {name: [] for name in methods}
        for _, order in rotations(list(methods), reps):
            for name in order:
                runs[name].append(await attempt(methods[name], result["failures"]))
        figures: dict[str, dict[str, Any]] = {}
        for name, samples in runs.items():
            # (Output that came in one read has no first-to-last time: its end-to-end rate stands in.)
            streaming = [size / (r.streaming_seconds if r.streaming_seconds > 0 else r.seconds) / 1e6 for r in samples]
            figures[name] = {
                "streaming": summary(streaming, 1),
                "end_to_end": summary([size / r.seconds / 1e6 for r in samples], 1),
                "relay_cpu_seconds_per_gib": _per_gib([r.relay_cpu for r in samples], size),
                "consumer_cpu_seconds_per_gib": _per_gib([r.consumer_cpu for r in samples], size),
            }
        result["cases"][case] = {"command": list(cmd), "bytes": size, "methods": figures}
        f, d, c = (figures[n]["streaming"]["median"] for n in (FLYNNSCHED, DOCKER_RUN, DIRECT))
        result["rows"].append(
            Row(f"Throughput {case} ({human_size(size)}), median (MB/s)", f, d, c, ratio(f, d), ratio(f, c),
                "≥ 1.0 × docker run, ≥ 0.95 × direct", f >= d and f >= 0.95 * c)
        )
        fr, dr = (figures[n]["relay_cpu_seconds_per_gib"] for n in (FLYNNSCHED, DOCKER_RUN))
        result["rows"].append(
            Row(f"Throughput {case}: relay CPU (s/GiB): the daemon, the CLI", fr, dr, None, ratio(fr, dr), None,
                "", None)
        )
    return result


# -- 3. concurrency ------------------------------------------------------------------------------


async def _burst(n: int, job: Method) -> dict[str, Any]:
    """Start ``n`` jobs at once; their latencies, errors, and the makespan."""
    latencies: list[float] = []
    errors: list[str] = []

    async def one() -> None:
        try:
            run = await job()
            latencies.append(run.seconds * 1000)
        except Exception as e:  # every failure is counted and shown; none stops the burst
            errors.append(f"{type(e).__name__}: {e}"[:300])

    start = time.perf_counter()
    await DeferredList([Deferred.fromCoroutine(one()) for _ in range(n)])
    return {"latencies": latencies, "errors": errors, "makespan": time.perf_counter() - start}


async def concurrency(ctx: Context, levels: Sequence[int], rounds: int) -> dict[str, Any]:
    """
    Bursts of ``level`` concurrent ``true`` jobs through flynnsched and straight on the Engine API,
    ``rounds`` each, alternating; the daemon's RSS and CPU sampled during its bursts.
    """
    ctx.reactor.suggestThreadPoolSize(max(levels) + 8)
    result: dict[str, Any] = {"levels": {}, "rows": []}
    methods = methods_for(ctx, ("true",), expected=0)
    for level in levels:
        samples: dict[str, dict[str, list[Any]]] = {
            name: {"latencies": [], "errors": [], "jobs_per_second": []} for name in (FLYNNSCHED, DIRECT)
        }
        daemon_use: list[dict[str, Any]] = []
        for _, order in rotations([FLYNNSCHED, DIRECT], rounds):
            for name in order:
                sampler = Sampler(ctx.reactor, ctx.daemon.pid) if name == FLYNNSCHED else None
                if sampler:
                    sampler.start()
                burst = await _burst(level, methods[name])
                if sampler:
                    daemon_use.append(sampler.stop())
                samples[name]["latencies"] += burst["latencies"]
                samples[name]["errors"] += burst["errors"]
                samples[name]["jobs_per_second"].append(level / burst["makespan"])
        figures: dict[str, dict[str, Any]] = {
            name: {
                "jobs_per_second": summary(s["jobs_per_second"]),
                "latency_ms": summary(s["latencies"]),
                "errors": len(s["errors"]),
                "error_samples": s["errors"][:5],
            }
            for name, s in samples.items()
        }
        result["levels"][str(level)] = {
            "methods": figures,
            "daemon": {
                "rss_peak_mib": max(u["rss_peak_mib"] for u in daemon_use),
                "rss_growth_mib": max(u["rss_growth_mib"] for u in daemon_use),
                "cpu_percent": max(u["cpu_percent"] for u in daemon_use),
                "cpu_ms_per_job": round(1000 * sum(u["cpu_seconds"] for u in daemon_use) / (level * rounds), 2),
                "bursts": daemon_use,
            },
        }
        fj, cj = figures[FLYNNSCHED]["jobs_per_second"]["median"], figures[DIRECT]["jobs_per_second"]["median"]
        errors = figures[FLYNNSCHED]["errors"] + figures[DIRECT]["errors"]
        result["rows"].append(
            Row(f"Concurrency {level}: jobs/s, median of bursts", fj, None, cj, None, ratio(fj, cj),
                "≥ 0.95 × direct, no errors", fj >= 0.95 * cj and errors == 0)
        )
        for q in ("median", "p99"):
            fl, cl = figures[FLYNNSCHED]["latency_ms"][q], figures[DIRECT]["latency_ms"][q]
            result["rows"].append(
                Row(f"Concurrency {level}: job latency {q} (ms)", fl, None, cl, None, diff(fl, cl, "ms"), "", None)
            )
        daemon = result["levels"][str(level)]["daemon"]
        result["rows"] += [
            Row(f"Concurrency {level}: daemon peak RSS (MiB)", daemon["rss_peak_mib"], None, None, None, None, "", None),
            Row(f"Concurrency {level}: daemon CPU, busiest burst (% of a core)", daemon["cpu_percent"], None, None,
                None, None, "", None),
        ]
    return result


# -- 4. slow reader ------------------------------------------------------------------------------


def _slow_read(host: str, port: int, path: str, rate: int, seconds: float) -> dict[str, Any]:
    """
    Read ``path`` at ``rate`` bytes/s for ``seconds`` over a plain socket (blocking: call it in a
    thread), then hang up. Returns the job id, the bytes read and the rate achieved.
    """
    sock = socket.create_connection((host, port), timeout=30)
    try:
        status, headers, rest = send_get(sock, host, port, path)
        if status != 200:
            raise BenchError(f"GET {path} answered {status}: {rest[:300]!r}")
        job_id = headers.get(b"flynn-job-id", b"").decode("ascii")
        received = len(rest)
        start = time.monotonic()
        chunk = 16 * 1024
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= seconds:
                break
            allowed = int(rate * elapsed) - received
            if allowed <= 0:
                time.sleep(min(chunk / rate, seconds - elapsed))
                continue
            data = sock.recv(min(chunk, allowed))
            if not data:
                break
            received += len(data)
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    return {"job_id": job_id, "bytes_read": received, "seconds": round(elapsed, 2),
            "rate_mb_s": round(received / elapsed / 1e6, 3)}


async def slow_reader(ctx: Context, total: int, rate: int, seconds: float) -> dict[str, Any]:
    """
    A job writing ``total`` bytes read at ``rate`` bytes/s for ``seconds``, then abandoned: the
    daemon's RSS sampled throughout (growth over its value just before the request), and the time
    until the job's container is gone after the hang-up.
    """
    path = batch_path(("head", "-c", str(total), "/dev/zero"))
    sampler = Sampler(ctx.reactor, ctx.daemon.pid, interval=0.25)
    sampler.start()
    read = await in_thread(ctx, _slow_read, ctx.daemon.host, ctx.daemon.port, path, rate, seconds)
    hung_up = time.monotonic()
    if not read["job_id"]:
        raise BenchError("the slow reader's response had no Flynn-Job-Id")

    async def gone() -> bool:
        return not await job_containers(ctx.engine, read["job_id"])

    await poll(ctx.reactor, gone, 30.0, f"the container of job {read['job_id']} to be removed")
    cleanup = time.monotonic() - hung_up
    use = sampler.stop()
    growth = use["rss_growth_mib"]
    row = Row(f"Slow reader {rate / 1e6:g} MB/s for {seconds:g} s: daemon RSS growth (MiB)", growth, None, None,
              None, None, "< 20 MiB", growth < 20.0)
    return {
        "job_bytes": total, "rate_bytes_per_second": rate, "read": read,
        "daemon": use, "cleanup_seconds": round(cleanup, 3), "rows": [row],
    }
