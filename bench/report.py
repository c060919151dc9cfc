"""
The summary of a run: one ``Row`` per headline figure, printed as a Markdown table and kept in the
results file, and the checks that a smoke run applies to a results document (shape, never time).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import attrs

Comparison = Mapping[str, Any]


def ratio(value: float | None, baseline: float | None) -> Comparison | None:
    """``value`` as a multiple of ``baseline`` (1.0 is the same)."""
    if value is None or baseline is None or not baseline or math.isnan(value) or math.isnan(baseline):
        return None
    return {"ratio": round(value / baseline, 3)}


def diff(value: float | None, baseline: float | None, unit: str) -> Comparison | None:
    """``value`` minus ``baseline``, in ``unit``."""
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline):
        return None
    return {"diff": round(value - baseline, 2), "unit": unit}


@attrs.frozen
class Row:
    """
    One headline figure: flynnsched's value, the baselines' values (None where a baseline does not
    apply), flynnsched compared to each, the target and whether this run met it (None: no target).
    """

    figure: str
    flynnsched: float | None
    docker_run: float | None
    direct: float | None
    vs_docker_run: Comparison | None
    vs_direct: Comparison | None
    target: str
    met: bool | None

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _comparison(c: Comparison | None) -> str:
    if not c:
        return "–"
    if "ratio" in c:
        return f"{c['ratio']:.2f}×"
    sign = "+" if c["diff"] >= 0 else "−"
    return f"{sign}{abs(c['diff']):.1f} {c['unit']}"


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: ""}[met]


def markdown(rows: Iterable[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| Figure | flynnsched | docker run | direct API | vs docker run | vs direct | target | met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.figure} | {_number(r.flynnsched)} | {_number(r.docker_run)} | {_number(r.direct)} | "
            f"{_comparison(r.vs_docker_run)} | {_comparison(r.vs_direct)} | {r.target} | {_met(r.met)} |"
        )
    return "\n".join(lines)


# -- well-formedness ----------------------------------------------------------------------------

#: Every section a run has, and the keys each must carry when it ran.
SECTIONS: dict[str, tuple[str, ...]] = {
    "latency": ("methods", "runs"),
    "throughput": ("cases", "reps"),
    "concurrency": ("levels",),
    "slow_reader": ("daemon", "read", "cleanup_seconds"),
    "pty": ("round_trip", "idle"),
    "services": ("restart", "reconcile"),
}


def _finite_numbers(value: Any, where: str, problems: list[str]) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where} is {value}")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _finite_numbers(v, f"{where}.{k}", problems)
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _finite_numbers(v, f"{where}[{i}]", problems)


def check_document(doc: Mapping[str, Any]) -> list[str]:
    """
    What is wrong with a results document: missing sections or keys, sections that failed, rows
    without a value, numbers that are not finite, samples fewer than asked for. Empty when well-formed.

    A section that could not run because its feature is not there yet (``"available": false``
    with a ``reason``) is well-formed; one that ran and failed is not.
    """
    problems: list[str] = []
    for key in ("date", "git", "machine", "config", "sections", "rows"):
        if key not in doc:
            problems.append(f"the document has no {key!r}")
    sections = doc.get("sections", {})
    for name, keys in SECTIONS.items():
        section = sections.get(name)
        if section is None:
            problems.append(f"section {name} is missing")
            continue
        if section.get("error"):
            problems.append(f"section {name} failed: {section['error']}")
            continue
        if section.get("available") is False:
            if not section.get("reason"):
                problems.append(f"section {name} is unavailable without a reason")
            continue
        for key in keys:
            if key not in section:
                problems.append(f"section {name} has no {key!r}")
        if not section.get("rows"):
            problems.append(f"section {name} has no summary rows")
        _finite_numbers(section, name, problems)
    for row in doc.get("rows", []):
        if row.get("flynnsched") is None:
            problems.append(f"row {row.get('figure')!r} has no flynnsched value")
    problems += _sample_counts(sections)
    return problems


def _sample_counts(sections: Mapping[str, Any]) -> list[str]:
    """Every sampled figure has as many samples as the run asked for, and no job failed."""
    problems: list[str] = []
    latency = sections.get("latency", {})
    for name, figures in latency.get("methods", {}).items():
        if figures["n"] != latency["runs"]:
            problems.append(f"latency of {name}: {figures['n']} samples, not {latency['runs']}")
    throughput = sections.get("throughput", {})
    for case, data in throughput.get("cases", {}).items():
        for name, figures in data["methods"].items():
            if figures["streaming"]["n"] != throughput["reps"]:
                problems.append(f"throughput {case} of {name}: {figures['streaming']['n']} samples")
    for level, data in sections.get("concurrency", {}).get("levels", {}).items():
        for name, figures in data["methods"].items():
            if figures["errors"]:
                problems.append(f"concurrency {level} of {name}: {figures['errors']} errors {figures['error_samples']}")
    slow = sections.get("slow_reader", {})
    if slow.get("read") is not None and slow["read"]["bytes_read"] <= 0:
        problems.append("the slow reader read nothing")
    return problems
