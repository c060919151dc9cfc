"""
``ImagePuller``: make sure an image is in the engine, pulling it when missing.

Concurrent requests for one image share a single pull. With the ``never`` policy a missing image
is an ``ImageNotFound`` at once, without asking any registry.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from flynnsched.docker.interface import IDockerEngine, ImageNotFound

log = Logger()

#: The pull policies: pull a missing image, or never pull.
PULL_POLICIES = ("missing", "never")


class ImagePuller:
    """Ensures images for ``engine`` according to ``policy`` (``missing`` or ``never``)."""

    def __init__(self, engine: IDockerEngine, policy: str = "missing") -> None:
        if policy not in PULL_POLICIES:
            raise ValueError(f"unknown pull policy {policy!r}; use one of {', '.join(PULL_POLICIES)}")
        self._engine = engine
        self._policy = policy
        self._pulls: dict[str, list[Deferred[None]]] = {}

    def ensure(self, reference: str) -> Deferred[str]:
        """
        Fire with the image's id once ``reference`` is in the engine.

        Fails with ``ImageNotFound`` when it is missing and cannot be pulled, and with the engine's
        errors otherwise.
        """
        return Deferred.fromCoroutine(self._ensure(reference))

    def pulling(self, reference: str) -> bool:
        """Whether a pull of ``reference`` is under way."""
        return reference in self._pulls

    async def _ensure(self, reference: str) -> str:
        try:
            return str(await self._engine.inspect_image(reference))
        except ImageNotFound:
            if self._policy == "never":
                raise ImageNotFound(f"no such image: {reference} (and pulling is disabled)", 404) from None
        await self._shared_pull(reference)
        return str(await self._engine.inspect_image(reference))

    def _shared_pull(self, reference: str) -> Deferred[None]:
        # Each waiter gets its own Deferred, so one waiter's cancellation doesn't end the pull.
        mine: Deferred[None] = Deferred()
        waiters = self._pulls.get(reference)
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._pulls[reference] = [mine]
        log.info("pulling image {image}", image=reference)

        def finished(result: Any) -> None:
            del self._pulls[reference]
            for waiter in waiters:
                if waiter.called:  # this waiter was cancelled
                    continue
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)

        self._engine.pull_image(reference).addBoth(finished)
        return mine
