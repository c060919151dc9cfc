"""
The PTY part of the daemon: the session manager as a service, and its resource.

``build_pty`` is what ``flynnsched.tap`` calls: it checks the web assets, makes the manager and the
``/pty`` resource, and returns a service that ends every session (removing its container) when the
daemon stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from flynnsched.docker.interface import IDockerEngine
from flynnsched.pty.assets import missing_assets
from flynnsched.pty.origin import OriginPolicy
from flynnsched.pty.resource import PtyResource
from flynnsched.pty.session import PtyConfig, PtyManager

log = Logger()


class PtyService(Service):
    """Ends every PTY session when the daemon stops."""

    def __init__(self, manager: PtyManager) -> None:
        self.manager = manager

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.manager.stop()


def build_pty(
    reactor: Any,
    engine: IDockerEngine,
    puller: Any,
    config: PtyConfig,
    allowed_origins: Iterable[str],
    web_root: Path,
) -> tuple[PtyService, PtyResource]:
    """
    The PTY service and the ``/pty`` resource.

    :raises ValueError: when an allowed origin is malformed or the terminal page is missing.
    """
    missing = missing_assets(web_root)
    if "pty.html" in missing:
        raise ValueError(f"the terminal page is missing from the web root {web_root}")
    if missing:
        log.warn(
            "the web root {web_root} lacks {missing}: the terminal page will not work (run `make web`)",
            web_root=str(web_root),
            missing=", ".join(missing),
        )
    manager = PtyManager(reactor, engine, config, puller)
    resource = PtyResource(manager, OriginPolicy(allowed_origins), web_root, reactor)
    return PtyService(manager), resource
