#!/usr/bin/env python3
"""
Benchmarks of flynnsched against Docker itself, side by side in one run.

    make bench                       the full run (about 4 minutes): writes bench/results/<date>.json
    make bench-smoke                 every benchmark at tiny sizes; checks the results' shape, not times
    .venv/bin/python bench/run.py --only latency,throughput [--out FILE]

A fresh ``twistd -n flynnsched`` is started on a free loopback port for the run; the baselines are
``docker run`` (the CLI) and the Engine API called directly from this process. The summary table
is printed as Markdown; the results file keeps every sample. See bench/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the benchmarks as the ``bench`` package from the repository root, and keep bench/ itself off
# the path so that no file in it can shadow a standard module.
REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Any, Awaitable, Callable  # noqa: E402

import attrs  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from bench import batchjobs, services_bench, terminal  # noqa: E402
from bench.common import (  # noqa: E402
    Context,
    Daemon,
    engine_client,
    remove_leftovers,
)
from bench.report import Row, check_document, markdown  # noqa: E402

MiB = 1024 * 1024

#: Sizes of the full run and of the smoke run.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "latency": {"runs": 50, "warmup": 3},
        "throughput": {"bytes_size": 256 * MiB, "lines_size": 64 * MiB, "reps": 5},
        "concurrency": {"levels": [20, 50], "rounds": 3},
        "slow_reader": {"total": 1024 * MiB, "rate": 1_000_000, "seconds": 25.0},
        "pty": {"round_trips": 200, "idle_sessions": 200},
        "services": {"restarts": 10, "services": 20, "reconcile_runs": 3},
    },
    "smoke": {
        "latency": {"runs": 3, "warmup": 1},
        "throughput": {"bytes_size": 1 * MiB, "lines_size": MiB // 4, "reps": 1},
        "concurrency": {"levels": [2, 3], "rounds": 1},
        "slow_reader": {"total": 64 * MiB, "rate": 256_000, "seconds": 1.5},
        "pty": {"round_trips": 5, "idle_sessions": 3},
        "services": {"restarts": 1, "services": 2, "reconcile_runs": 1},
    },
}

Section = Callable[..., Awaitable[dict[str, Any]]]

SECTIONS: dict[str, Section] = {
    "latency": batchjobs.latency,
    "throughput": batchjobs.throughput,
    "concurrency": batchjobs.concurrency,
    "slow_reader": batchjobs.slow_reader,
    "pty": terminal.bench_pty,
    "services": services_bench.bench_services,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; check the results' shape")
    parser.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--out", help="the results file [default: bench/results/<date>.json; smoke: a temp "
                        "file, removed when the results are well-formed]")
    parser.add_argument("--docker", help="the engine [default: $DOCKER_HOST, else scripts/docker-engine ensure]")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    args.sections = only or list(SECTIONS)
    return args


def find_engine(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    return subprocess.run(
        [str(REPO / "scripts" / "docker-engine"), "ensure"], check=True, capture_output=True, text=True
    ).stdout.strip()


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(engine_version: dict[str, Any], load_start: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker": engine_version.get("Version"),
        "docker_api": engine_version.get("ApiVersion"),
        "cpu_model": _cpu_model(),
        "load_average_start": [round(x, 2) for x in load_start],
    }


async def main(reactor: Any, args: argparse.Namespace) -> None:
    profile_name = "smoke" if args.smoke else "full"
    profile = PROFILES[profile_name]
    docker_host = find_engine(args.docker)
    label = uuid.uuid4().hex[:12]
    started = time.monotonic()
    load_start = os.getloadavg()
    engine = engine_client(reactor, docker_host)
    version = await engine.version()
    daemon = Daemon(docker_host)
    sections: dict[str, Any] = {}
    rows: list[Row] = []
    try:
        await daemon.ready(reactor)
        print(f"bench: flynnsched (pid {daemon.pid}) on {daemon.url}, engine {docker_host}", file=sys.stderr, flush=True)
        ctx = Context(reactor, docker_host, daemon, engine, label, args.smoke)
        for name, section in SECTIONS.items():
            if name not in args.sections:
                continue
            print(f"bench: {name} …", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                result = await section(ctx, **profile[name])
            except Exception as e:
                traceback.print_exc()
                result = {"error": f"{type(e).__name__}: {e}"}
            result["seconds"] = round(time.monotonic() - t0, 1)
            section_rows = result.pop("rows", [])
            if args.smoke:  # tiny sizes say nothing about targets
                section_rows = [attrs.evolve(r, met=None) for r in section_rows]
            rows += section_rows
            result["rows"] = [r.as_json() for r in section_rows]
            sections[name] = result
            if result.get("available") is False:
                print(f"bench: {name} not run: {result['reason']}", file=sys.stderr, flush=True)
    finally:
        leftovers = await remove_leftovers(reactor, engine, label)
        daemon_log = daemon.log()
        daemon.stop()
        await engine.close()
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": profile_name,
        "git": git_state(),
        "machine": {**machine(version, load_start), "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "config": {"profile": profile, "daemon_args": daemon.args, "sections": args.sections},
        "seconds": round(time.monotonic() - started, 1),
        "leftover_containers": leftovers,
        "sections": sections,
        "rows": [r.as_json() for r in rows],
    }
    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(markdown(rows))
    print(f"\nresults: {out} ({doc['seconds']} s){' (removed if well-formed)' if args.smoke and not args.out else ''}")
    problems = check_document(doc, args.sections)
    if leftovers:
        problems["document"].append(f"{leftovers} baseline containers were left behind (removed now)")
    failed = [name for name, found in problems.items() if found]
    if failed:
        listing = "\n  ".join(p for name in failed for p in problems[name])
        print(f"bench: the results are not well-formed:\n  {listing}", file=sys.stderr)
        if "Traceback" in daemon_log or args.smoke:
            print("bench: daemon log (last 3000 characters):\n" + daemon_log[-3000:], file=sys.stderr)
    checked = [name for name in problems if name != "document"]
    passed = sum(1 for name in checked if not problems[name])
    print(f"bench{'-smoke' if args.smoke else ''}: {passed} passed, {len(checked) - passed} failed"
          + ("" if not problems["document"] else " (and the document is malformed)"))
    if failed:
        raise SystemExit(1)
    if args.smoke and not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)  # a smoke run's figures mean nothing: keep no file


def output_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.smoke:
        return Path(tempfile.mkdtemp(prefix="flynnsched-bench-smoke-")) / "results.json"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d-%H%M")
    return REPO / "bench" / "results" / f"{stamp}.json"


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
