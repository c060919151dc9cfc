"""
Service benchmarks, through the functions of ``bench/services.py``: death-to-replacement against
Docker's own ``--restart always``, and reconciliation after the daemon is killed and restarted.
"""

from __future__ import annotations

from typing import Any

from bench.common import Context
from bench.report import Row, ratio


async def bench_services(ctx: Context, restarts: int, services: int, reconcile_runs: int) -> dict[str, Any]:
    """``bench_restart`` on the run's daemon, then ``bench_reconcile`` on a daemon of its own."""
    from bench.services import bench_reconcile, bench_restart

    restart = await bench_restart(ctx.reactor, ctx.daemon.url, ctx.docker_host, restarts)
    reconcile = await bench_reconcile(ctx.reactor, ctx.docker_host, services, reconcile_runs,
                                      killed=min(3, services))
    f, d = restart["flynnsched_ms"]["median"], restart["docker_ms"]["median"]
    wrong = reconcile["restarted"] + reconcile["duplicates"]
    rows = [
        Row("Service death to replacement, median (ms)", f, d, None, ratio(f, d), None,
            "≤ 1.1 × docker --restart always", f <= 1.1 * d),
        Row(f"Reconcile {services} services after kill -9: spawn to all running, median (s)",
            reconcile["median_spawn_to_all_running_s"], None, None, None, None,
            "no container restarted or duplicated", wrong == 0),
        Row("Reconcile: spawn to first HTTP answer, median (s)", reconcile["median_spawn_to_http_s"], None, None,
            None, None, "", None),
        Row("Reconcile: the daemon's own reconciliation, median (s)", reconcile["median_reconcile_s"], None, None,
            None, None, "", None),
    ]
    return {"restart": restart, "reconcile": reconcile, "rows": rows}
