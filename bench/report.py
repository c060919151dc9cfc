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


def check_document(doc: Mapping[str, Any], expected: Iterable[str] | None = None) -> dict[str, list[str]]:
    """
    What is wrong with a results document, by section (``"document"`` for the whole): missing
    sections or keys, sections that failed, rows without a value, numbers that are not finite,
    fewer samples than asked for, failed jobs. A section with no problems maps to an empty list.

    A section that could not run because its feature is not there (``"available": false`` with a
    ``reason``) is well-formed; one that ran and failed is not.
    """
    problems: dict[str, list[str]] = {"document": []}
    for key in ("date", "git", "machine", "config", "sections", "rows"):
        if key not in doc:
            problems["document"].append(f"the document has no {key!r}")
    sections = doc.get("sections", {})
    for name in expected if expected is not None else SECTIONS:
        found = problems[name] = []
        section = sections.get(name)
        if section is None:
            found.append(f"section {name} is missing")
            continue
        if section.get("error"):
            found.append(f"section {name} failed: {section['error']}")
            continue
        if section.get("available") is False:
            if not section.get("reason"):
                found.append(f"section {name} is unavailable without a reason")
            continue
        for key in SECTIONS[name]:
            if key not in section:
                found.append(f"section {name} has no {key!r}")
        rows = section.get("rows") or []
        if not rows:
            found.append(f"section {name} has no summary rows")
        for row in rows:
            if row.get("flynnsched") is None:
                found.append(f"row {row.get('figure')!r} has no flynnsched value")
        _finite_numbers(section, name, found)
        if not found:
            found += _SAMPLE_CHECKS.get(name, lambda _: [])(section)
    return problems


def _latency_samples(section: Mapping[str, Any]) -> list[str]:
    return [
        f"latency of {name}: {figures['n']} samples, not {section['runs']}"
        for name, figures in section["methods"].items()
        if figures["n"] != section["runs"]
    ]


def _throughput_samples(section: Mapping[str, Any]) -> list[str]:
    return [
        f"throughput {case} of {name}: {figures['streaming']['n']} samples, not {section['reps']}"
        for case, data in section["cases"].items()
        for name, figures in data["methods"].items()
        if figures["streaming"]["n"] != section["reps"]
    ]


def _concurrency_errors(section: Mapping[str, Any]) -> list[str]:
    return [
        f"concurrency {level} of {name}: {figures['errors']} errors {figures['error_samples']}"
        for level, data in section["levels"].items()
        for name, figures in data["methods"].items()
        if figures["errors"]
    ]


def _slow_reader_read(section: Mapping[str, Any]) -> list[str]:
    return [] if section["read"]["bytes_read"] > 0 else ["the slow reader read nothing"]


def _pty_samples(section: Mapping[str, Any]) -> list[str]:
    return [f"PTY round trips of {name}: none" for name, f in section["round_trip"].items() if not f["n"]]


def _services_samples(section: Mapping[str, Any]) -> list[str]:
    found = []
    if section["restart"]["flynnsched_ms"]["n"] != section["restart"]["runs"]:
        found.append("services: fewer restarts measured than asked for")
    if section["reconcile"]["duplicates"] or section["reconcile"]["restarted"]:
        found.append(f"services: reconciliation restarted or duplicated containers: {section['reconcile']}")
    return found


_SAMPLE_CHECKS: dict[str, Any] = {
    "latency": _latency_samples,
    "throughput": _throughput_samples,
    "concurrency": _concurrency_errors,
    "slow_reader": _slow_reader_read,
    "pty": _pty_samples,
    "services": _services_samples,
}
