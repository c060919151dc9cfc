"""
Short-lived, single-use tokens that let one WebSocket open.

A token is handed out with the terminal page (to start a session) or by the re-issue endpoint (to
reattach to a session that exists). It is good for one WebSocket handshake within ``ttl`` seconds;
redeeming it, successfully or not, uses it up. Tokens are kept only as SHA-256 digests and looked
up by digest, so neither the store nor its timing reveals them.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Union

import attrs
from twisted.internet.interfaces import IReactorTime


@attrs.frozen
class StartGrant:
    """Permission to start one new session running ``cmd`` (``None``: the image's CMD) in ``image``."""

    image: str
    cmd: tuple[str, ...] | None


@attrs.frozen
class AttachGrant:
    """Permission to attach to the existing session ``session_id``."""

    session_id: str


Grant = Union[StartGrant, AttachGrant]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenStore:
    """
    Mints and redeems tokens.

    At most ``max_pending`` unredeemed tokens are kept; minting beyond that forgets the oldest, so
    page loads alone cannot grow the store without bound.
    """

    def __init__(self, clock: IReactorTime, ttl: float = 60.0, max_pending: int = 1024) -> None:
        self._clock = clock
        self.ttl = ttl
        self.max_pending = max_pending
        # digest -> (expiry time, grant); insertion order is minting order.
        self._pending: dict[bytes, tuple[float, Grant]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def mint(self, grant: Grant) -> str:
        """A fresh token for ``grant``."""
        self._prune()
        while len(self._pending) >= self.max_pending:
            del self._pending[next(iter(self._pending))]
        token = secrets.token_urlsafe(32)
        self._pending[_digest(token)] = (self._clock.seconds() + self.ttl, grant)
        return token

    def redeem(self, token: str) -> Grant | None:
        """The grant of ``token`` if it is known and unexpired (using it up), else ``None``."""
        entry = self._pending.pop(_digest(token), None)
        if entry is None:
            return None
        expiry, grant = entry
        if self._clock.seconds() > expiry:
            return None
        return grant

    def revoke_session(self, session_id: str) -> None:
        """Forget every unredeemed token that attaches to ``session_id``."""
        for key, (_, grant) in list(self._pending.items()):
            if isinstance(grant, AttachGrant) and grant.session_id == session_id:
                del self._pending[key]

    def _prune(self) -> None:
        now = self._clock.seconds()
        for key, (expiry, _) in list(self._pending.items()):
            if now <= expiry:
                break
            del self._pending[key]
