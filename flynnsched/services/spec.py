"""
What a service is: the validated, frozen form of a ``POST /services`` body.

``parse_service_spec`` turns decoded JSON into a ``ServiceSpec`` or raises ``SpecError`` naming the
offending field (``restart.max_delay``, ``env.PORT``, ``cmd[1]``…). Unknown fields and wrong types
are errors too: a typo must not silently become a default. ``ServiceSpec.to_json`` and
``ServiceSpec.from_json`` are the stored form, which is also what the API shows.
"""

from __future__ import annotations

import math
import re
import signal
from typing import Any, Mapping

import attrs

from flynnsched.reference import parse_reference

__all__ = [
    "NETWORKS",
    "RESTART_MODES",
    "ID_PATTERN",
    "Resources",
    "RestartPolicy",
    "ServiceSpec",
    "SpecError",
    "parse_service_spec",
]

#: The networks a service may use: none at all, or the host's (no bridge addresses here).
NETWORKS = ("none", "host")
#: When a service's container is restarted after it stops.
RESTART_MODES = ("always", "on-failure", "never")
#: What a service id looks like (16 lowercase hex digits); names may not look like one.
ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_MEMORY = re.compile(r"^\s*(\d+)\s*([bkmg]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
#: Docker refuses less memory than this.
MIN_MEMORY = 6 * 1024 * 1024
MAX_GRACE_PERIOD = 3600
MAX_DELAY = 24 * 3600.0


class SpecError(ValueError):
    """A service body is invalid; ``field`` names where (dotted path) and ``problem`` says why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


@attrs.frozen
class RestartPolicy:
    """
    When and how fast a stopped container is replaced.

    ``mode``: ``always``; ``on-failure`` (a nonzero exit, an OOM kill or a failed start);
    ``never``. ``max_restarts`` restarts in a row without a healthy stretch of ``reset_after``
    seconds, then the service fails (``None``: no limit). Delays start at ``initial_delay``, double
    each time and stop growing at ``max_delay``; each is shortened by a random fraction of up to
    ``jitter`` so that services that died together do not restart in lockstep.
    """

    mode: str = "always"
    max_restarts: int | None = None
    initial_delay: float = 1.0
    max_delay: float = 300.0
    reset_after: float = 600.0
    jitter: float = 0.1

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.mode,
            "max_restarts": self.max_restarts,
            "initial_delay": self.initial_delay,
            "max_delay": self.max_delay,
            "reset_after": self.reset_after,
            "jitter": self.jitter,
        }


@attrs.frozen
class Resources:
    """Limits: ``memory`` in bytes, ``cpus`` in CPUs (fractions allowed), ``pids`` processes."""

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"memory": self.memory, "cpus": self.cpus, "pids": self.pids}


def _tuple_or_none(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _frozen_env(value: Mapping[str, str]) -> Mapping[str, str]:
    return dict(sorted(value.items()))


@attrs.frozen
class ServiceSpec:
    """A service as its owner asked for it; everything but ``image`` has a default."""

    image: str
    cmd: tuple[str, ...] | None = attrs.field(default=None, converter=_tuple_or_none)
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env, hash=False)
    restart: RestartPolicy = attrs.field(factory=RestartPolicy)
    resources: Resources = attrs.field(factory=Resources)
    network: str = "none"
    stop_signal: str = "SIGTERM"
    stop_grace_period: int = 10
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON, every default spelled out."""
        return {
            "name": self.name,
            "image": self.image,
            "cmd": None if self.cmd is None else list(self.cmd),
            "env": dict(self.env),
            "restart": self.restart.to_json(),
            "resources": self.resources.to_json(),
            "network": self.network,
            "stop_signal": self.stop_signal,
            "stop_grace_period": self.stop_grace_period,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceSpec:
        """
        Rebuild a spec that ``to_json`` produced (from the store). It is checked as strictly as a
        request body, so a damaged record is an error, not a half-read service.
        """
        return parse_service_spec(data, defaults=RestartPolicy())


# -- validation -------------------------------------------------------------------------------

_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _require_object(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(field, f"must be an object, not {_kind(value)}")
    return value


def _check_known(data: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise SpecError(where, f"unknown field (known: {', '.join(known)})")


def _string(value: Any, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise SpecError(field, f"must be a string, not {_kind(value)}")
    if not allow_empty and not value:
        raise SpecError(field, "must not be empty")
    if "\x00" in value:
        raise SpecError(field, "must not contain NUL characters")
    return value


def _integer(value: Any, field: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SpecError(field, f"must be an integer, not {_kind(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise SpecError(field, f"must be {bound}, not {value}")
    return value


def _number(value: Any, field: str, minimum: float, maximum: float, exclusive_min: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(field, f"must be a number, not {_kind(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise SpecError(field, "must be a finite number")
    if number < minimum or (exclusive_min and number == minimum) or number > maximum:
        low = f"more than {minimum:g}" if exclusive_min else f"at least {minimum:g}"
        raise SpecError(field, f"must be {low} and at most {maximum:g}, not {number:g}")
    return number


def _parse_cmd(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise SpecError("cmd", f"must be a list of strings, not {_kind(value)}")
    if not value:
        raise SpecError("cmd", "must not be empty (leave it out to run the image's own command)")
    return tuple(_string(part, f"cmd[{i}]", allow_empty=True) for i, part in enumerate(value))


def _parse_env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    env = _require_object(value, "env")
    result: dict[str, str] = {}
    for key, item in env.items():
        if not key or "=" in key or "\x00" in key:
            raise SpecError(f"env.{key}", "a variable name must be non-empty, without '=' or NUL")
        result[key] = _string(item, f"env.{key}", allow_empty=True)
    return result


def _parse_restart(value: Any, defaults: RestartPolicy) -> RestartPolicy:
    if value is None:
        return defaults
    if isinstance(value, str):
        value = {"policy": value}
    data = _require_object(value, "restart")
    known = ("policy", "max_restarts", "initial_delay", "max_delay", "reset_after", "jitter")
    _check_known(data, known, "restart")
    mode = defaults.mode
    if data.get("policy") is not None:
        mode = _string(data["policy"], "restart.policy")
        if mode not in RESTART_MODES:
            raise SpecError("restart.policy", f"must be one of {', '.join(RESTART_MODES)}, not {mode!r}")
    max_restarts = defaults.max_restarts
    if "max_restarts" in data:
        raw = data["max_restarts"]
        max_restarts = None if raw is None else _integer(raw, "restart.max_restarts", 0)
    initial = defaults.initial_delay
    if data.get("initial_delay") is not None:
        initial = _number(data["initial_delay"], "restart.initial_delay", 0.0, MAX_DELAY)
    cap = defaults.max_delay
    if data.get("max_delay") is not None:
        cap = _number(data["max_delay"], "restart.max_delay", 0.0, MAX_DELAY)
    if cap < initial:
        field = "restart.max_delay" if "max_delay" in data else "restart.initial_delay"
        raise SpecError(field, f"the cap ({cap:g} s) must not be below the initial delay ({initial:g} s)")
    reset_after = defaults.reset_after
    if data.get("reset_after") is not None:
        reset_after = _number(data["reset_after"], "restart.reset_after", 0.0, 7 * 24 * 3600.0)
    jitter = defaults.jitter
    if data.get("jitter") is not None:
        jitter = _number(data["jitter"], "restart.jitter", 0.0, 1.0)
    return RestartPolicy(mode, max_restarts, initial, cap, reset_after, jitter)


def parse_memory(value: Any, field: str = "resources.memory") -> int:
    """Bytes from an integer or a string like ``"64m"``, ``"512MiB"`` or ``"1g"``."""
    if isinstance(value, str):
        match = _MEMORY.match(value)
        if match is None:
            raise SpecError(field, f"must be a number of bytes or a size like '256m' or '1g', not {value!r}")
        number = int(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        number = _integer(value, field, 0)
    if number < MIN_MEMORY:
        raise SpecError(field, f"must be at least {MIN_MEMORY} bytes (6m), the engine's minimum")
    return number


def _parse_resources(value: Any) -> Resources:
    if value is None:
        return Resources()
    data = _require_object(value, "resources")
    _check_known(data, ("memory", "cpus", "pids"), "resources")
    memory = None if data.get("memory") is None else parse_memory(data["memory"])
    cpus = None
    if data.get("cpus") is not None:
        cpus = _number(data["cpus"], "resources.cpus", 0.0, 1024.0, exclusive_min=True)
        if cpus < 0.01:
            raise SpecError("resources.cpus", "must be at least 0.01")
    pids = None if data.get("pids") is None else _integer(data["pids"], "resources.pids", 1)
    return Resources(memory, cpus, pids)


def _parse_signal(value: Any) -> str:
    text = _string(value, "stop_signal").strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text)).name
        except ValueError:
            raise SpecError("stop_signal", f"no signal has the number {text}") from None
    name = text if text.startswith("SIG") else "SIG" + text
    if name not in signal.Signals.__members__ or name in ("SIG_DFL", "SIG_IGN"):
        raise SpecError("stop_signal", f"unknown signal {value!r} (e.g. SIGTERM, SIGINT, SIGQUIT)")
    return name


_FIELDS = (
    "name", "image", "cmd", "env", "restart", "resources", "network", "stop_signal", "stop_grace_period",
)


def parse_service_spec(body: Any, defaults: RestartPolicy | None = None) -> ServiceSpec:
    """
    Validate a decoded ``POST /services`` body.

    :param defaults: the restart policy for fields the body leaves out (the daemon's options).
    :raises SpecError: naming the first field that is wrong.
    """
    data = _require_object(body, "")
    _check_known(data, _FIELDS, "")
    if "image" not in data or data["image"] is None:
        raise SpecError("image", "is required")
    image = _string(data["image"], "image").strip()
    try:
        parse_reference(image)
    except ValueError as e:
        raise SpecError("image", str(e)) from None
    name = None
    if data.get("name") is not None:
        name = _string(data["name"], "name")
        if not _NAME.match(name):
            raise SpecError("name", "must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit")
        if ID_PATTERN.match(name):
            raise SpecError("name", "must not look like a service id (16 hex digits)")
    network = "none"
    if data.get("network") is not None:
        network = _string(data["network"], "network")
        if network not in NETWORKS:
            raise SpecError("network", f"must be one of {', '.join(NETWORKS)}, not {network!r}")
    stop_signal = "SIGTERM" if data.get("stop_signal") is None else _parse_signal(data["stop_signal"])
    grace = 10
    if data.get("stop_grace_period") is not None:
        grace = _integer(data["stop_grace_period"], "stop_grace_period", 0, MAX_GRACE_PERIOD)
    return ServiceSpec(
        image=image,
        cmd=_parse_cmd(data.get("cmd")),
        env=_parse_env(data.get("env")),
        restart=_parse_restart(data.get("restart"), defaults or RestartPolicy()),
        resources=_parse_resources(data.get("resources")),
        network=network,
        stop_signal=stop_signal,
        stop_grace_period=grace,
        name=name,
    )
