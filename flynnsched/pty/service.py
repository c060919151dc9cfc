"""
The PTY part of the daemon: the session manager as a service, and its resource.

``build_pty`` is what ``flynnsched.tap`` calls: it checks the web assets, makes the manager and the
``/pty`` resource, and returns a service that ends every session (removing its container) when the
daemon stops. PTY containers carry their daemon's owner label (``LABEL_OWNER``, the daemon's
instance id), so that on start a daemon removes the ones an earlier run of itself left behind (after
a crash), and never another daemon's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from flynnsched.docker.interface import LABEL_OWNER, IDockerEngine
from flynnsched.pty.assets import missing_assets
from flynnsched.pty.origin import OriginPolicy
from flynnsched.pty.resource import PtyResource
from flynnsched.pty.session import PtyConfig, PtyManager

log = Logger()

class PtyService(Service):
    """Ends every PTY session when the daemon stops."""

    def __init__(self, manager: PtyManager) -> None:
        self.manager = manager

    def startService(self) -> None:
        super().startService()
        self.manager.remove_leftovers().addErrback(lambda f: log.failure("removing leftover PTY containers", f))

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
    owner: str,
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
    config = attrs.evolve(config, labels={**config.labels, LABEL_OWNER: owner})
    manager = PtyManager(reactor, engine, config, puller)
    resource = PtyResource(manager, OriginPolicy(allowed_origins), web_root, reactor)
    return PtyService(manager), resource
