"""
Validation of ``POST /services`` bodies: ``parse_service_spec`` and the stored form.
"""

from __future__ import annotations

from typing import Any

import pytest

from flynnsched.services.spec import RestartPolicy, ServiceSpec, SpecError, parse_memory, parse_service_spec


def error_field(body: Any) -> str:
    with pytest.raises(SpecError) as info:
        parse_service_spec(body)
    return info.value.field


def test_minimal_body_gets_every_default() -> None:
    """Only the image is required; the rest takes the documented defaults."""
    spec = parse_service_spec({"image": "flynn/busybox"})
    assert spec == ServiceSpec(image="flynn/busybox")
    assert spec.restart == RestartPolicy("always", None, 1.0, 300.0, 600.0, 0.1)
    assert spec.network == "none" and spec.stop_signal == "SIGTERM" and spec.stop_grace_period == 10
    assert spec.cmd is None and dict(spec.env) == {}


def test_full_body() -> None:
    """Every field is read and normalised (signal names, memory units, restart shorthand)."""
    spec = parse_service_spec({
        "name": "web-1",
        "image": "flynn/helloweb:latest",
        "cmd": ["httpd", "-f"],
        "env": {"PORT": "8081", "EMPTY": ""},
        "restart": {"policy": "on-failure", "max_restarts": 5, "initial_delay": 0.5, "max_delay": 30,
                    "reset_after": 60, "jitter": 0},
        "resources": {"memory": "64m", "cpus": 0.5, "pids": 100},
        "network": "host",
        "stop_signal": "int",
        "stop_grace_period": 3,
    })
    assert spec.name == "web-1" and spec.cmd == ("httpd", "-f")
    assert dict(spec.env) == {"EMPTY": "", "PORT": "8081"}
    assert spec.restart == RestartPolicy("on-failure", 5, 0.5, 30.0, 60.0, 0.0)
    assert spec.resources.memory == 64 * 1024 * 1024 and spec.resources.cpus == 0.5 and spec.resources.pids == 100
    assert spec.network == "host" and spec.stop_signal == "SIGINT" and spec.stop_grace_period == 3
    assert parse_service_spec({"image": "x", "restart": "never"}).restart.mode == "never"


def test_defaults_come_from_the_daemon() -> None:
    """Restart fields left out take the daemon's defaults; given ones win."""
    defaults = RestartPolicy(initial_delay=0.0, max_delay=5.0)
    spec = parse_service_spec({"image": "x", "restart": {"max_delay": 7}}, defaults)
    assert spec.restart.initial_delay == 0.0 and spec.restart.max_delay == 7.0


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "image"),
        ({"image": None}, "image"),
        ({"image": 5}, "image"),
        ({"image": "UPPER/case"}, "image"),
        ({"image": "flynn/busybox:"}, "image"),
        ({"image": "x", "bogus": 1}, "bogus"),
        ({"image": "x", "cmd": "sh -c true"}, "cmd"),
        ({"image": "x", "cmd": []}, "cmd"),
        ({"image": "x", "cmd": ["sh", 3]}, "cmd[1]"),
        ({"image": "x", "env": ["A=1"]}, "env"),
        ({"image": "x", "env": {"PORT": 8081}}, "env.PORT"),
        ({"image": "x", "env": {"A=B": "1"}}, "env.A=B"),
        ({"image": "x", "restart": 1}, "restart"),
        ({"image": "x", "restart": {"policy": "sometimes"}}, "restart.policy"),
        ({"image": "x", "restart": {"tries": 1}}, "restart.tries"),
        ({"image": "x", "restart": {"max_restarts": -1}}, "restart.max_restarts"),
        ({"image": "x", "restart": {"max_restarts": True}}, "restart.max_restarts"),
        ({"image": "x", "restart": {"initial_delay": "1s"}}, "restart.initial_delay"),
        ({"image": "x", "restart": {"initial_delay": 10, "max_delay": 5}}, "restart.max_delay"),
        ({"image": "x", "restart": {"initial_delay": 500}}, "restart.initial_delay"),
        ({"image": "x", "restart": {"jitter": 2}}, "restart.jitter"),
        ({"image": "x", "resources": {"memory": "lots"}}, "resources.memory"),
        ({"image": "x", "resources": {"memory": 1024}}, "resources.memory"),
        ({"image": "x", "resources": {"cpus": 0}}, "resources.cpus"),
        ({"image": "x", "resources": {"cpus": "1"}}, "resources.cpus"),
        ({"image": "x", "resources": {"pids": 0}}, "resources.pids"),
        ({"image": "x", "resources": {"disk": 1}}, "resources.disk"),
        ({"image": "x", "network": "bridge"}, "network"),
        ({"image": "x", "stop_signal": "SIGNOPE"}, "stop_signal"),
        ({"image": "x", "stop_grace_period": 1.5}, "stop_grace_period"),
        ({"image": "x", "stop_grace_period": -1}, "stop_grace_period"),
        ({"image": "x", "name": "has space"}, "name"),
        ({"image": "x", "name": "0123456789abcdef"}, "name"),
        ([], ""),
        ("image", ""),
    ],
)
def test_errors_name_the_field(body: Any, field: str) -> None:
    """Each wrong field, unknown field or wrong type is an error naming that field."""
    assert error_field(body) == field


def test_message_says_what_is_wrong() -> None:
    """The message starts with the field and says what was expected."""
    with pytest.raises(SpecError) as info:
        parse_service_spec({"image": "x", "env": {"PORT": 8081}})
    assert str(info.value) == "env.PORT: must be a string, not an integer"


@pytest.mark.parametrize("text, expected", [("6m", 6 << 20), ("512MiB", 512 << 20), ("1g", 1 << 30),
                                            (7 << 20, 7 << 20), ("8388608", 8 << 20)])
def test_memory_sizes(text: Any, expected: int) -> None:
    """Memory takes bytes or k/m/g sizes (with optional iB/B)."""
    assert parse_memory(text) == expected


def test_stored_form_round_trips() -> None:
    """``to_json`` and ``from_json`` give back an equal spec, every default spelled out."""
    spec = parse_service_spec({
        "name": "a", "image": "flynn/busybox", "cmd": ["sleep", "9"], "env": {"B": "2", "A": "1"},
        "restart": {"policy": "on-failure", "max_restarts": 3}, "resources": {"memory": "8m"},
        "stop_signal": "SIGQUIT",
    })
    data = spec.to_json()
    assert data["restart"]["policy"] == "on-failure" and data["resources"]["memory"] == 8 << 20
    again = ServiceSpec.from_json(data)
    assert again == spec and dict(again.env) == dict(spec.env)
