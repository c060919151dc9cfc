"""
The daemon's command line: defaults, validation, and the service tree it builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IServiceCollection
from twisted.python.usage import UsageError

from flynnsched.tap import DEFAULT_LISTEN, Options, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without options: loopback port 55005, the engine of DOCKER_HOST, pulls of missing images."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/engine.sock")
    options = parse()
    assert options["listen"] == [DEFAULT_LISTEN] == ["tcp:55005:interface=127.0.0.1"]
    assert options["engine-address"].path == "/tmp/engine.sock"
    assert options["pull"] == "missing"


def test_default_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without DOCKER_HOST the engine is /var/run/docker.sock."""
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert parse()["engine-address"].path == "/var/run/docker.sock"


def test_listen_repeats() -> None:
    """--listen may be given more than once."""
    options = parse("--listen", "tcp:1234", "--listen", "unix:/tmp/f.sock")
    assert options["listen"] == ["tcp:1234", "unix:/tmp/f.sock"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--docker", "ftp://x"], "unsupported Docker engine address"),
        (["--docker", "/s.sock", "--docker-tls-ca", "ca.pem"], "only apply to a tcp"),
        (["--docker", "tcp:h:1", "--docker-tls-cert", "c.pem"], "go together"),
        (["--pull", "always"], "--pull must be one of"),
        (["--batch-network", "bridge"], "--batch-network must be none or host"),
        (["--batch-max-running", "0"], "must be at least 1"),
        (["--batch-timeout", "-3"], "--batch-timeout must not be negative"),
    ],
)
def test_bad_options(args: list[str], message: str) -> None:
    """Bad options are usage errors that name the problem."""
    with pytest.raises(UsageError, match=message.replace("-", r"\-")):
        parse(*args)


def test_make_service(tmp_path: Path) -> None:
    """makeService builds the engine service and one server per --listen, creating the state dir."""
    state = tmp_path / "state"
    options = parse("--docker", "/nonexistent.sock", "--state-dir", str(state),
                    "--listen", "tcp:0:interface=127.0.0.1", "--listen", "tcp:0:interface=127.0.0.1")
    service = makeService(options)
    assert state.is_dir()
    names = [type(s).__name__ for s in IServiceCollection(service)]
    assert names.count("StreamServerEndpointService") == 2
    assert "EngineService" in names


def test_leftover_batch_containers_of_this_daemon_only(fake_engine: Any) -> None:
    """At start the daemon removes the batch containers its earlier run left, never another daemon's."""
    from flynnsched.docker.interface import LABEL_JOB_TYPE, LABEL_MANAGED, LABEL_OWNER, ContainerSpec
    from flynnsched.tap import EngineService

    batch = {LABEL_MANAGED: "1", LABEL_JOB_TYPE: "batch"}
    for owner in ("me", "you"):
        fake_engine.create_container(ContainerSpec("flynn/busybox", labels={**batch, LABEL_OWNER: owner}))
    service = EngineService(fake_engine, "me")
    service.startService()
    left = [c.spec.labels[LABEL_OWNER] for c in fake_engine.containers.values()]
    assert left == ["you"]
