"""
The HTTP side of PTY jobs: the terminal page, the WebSocket and the token re-issue endpoint.

``GET /pty/<image>?<args>`` answers the terminal page and mints a start token; it changes nothing
else, so a cross-site ``GET`` (an ``<img>``, a link) starts no container. The container starts when
the page's WebSocket opens at ``/pty/_ws`` with that token. A page that lost its connection gets a
fresh token for the same session from ``POST /pty/_sessions/<id>/token`` (JSON ``{"secret": …}``,
allowed origins only). Names starting with ``_`` cannot be image names, so these paths never
shadow an image.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from string import Template
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from flynnsched.command import InvalidCommand, parse_command, split_request_uri
from flynnsched.http.errors import RETRY_AFTER, HTTPError, read_json_body, write_json
from flynnsched.pty.origin import OriginPolicy
from flynnsched.pty.session import NoSuchSession, PtyManager, SessionLimit
from flynnsched.pty.websocket import SUBPROTOCOL, TOKEN_PREFIX, PtyWebSocketFactory
from flynnsched.reference import InvalidReference, parse_reference

#: Headers of the terminal page: no caching (it holds a token), no framing, nothing inline but
#: styles (xterm.js sets its theme with a ``<style>`` element), connections to this origin only.
PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; font-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _error(request: Request, error: HTTPError) -> bytes | int:
    write_json(request, error.status, {"error": error.message}, error.headers)
    return NOT_DONE_YET  # already finished


class _Page(Resource):
    """``GET /pty/<image>?<args>``: the terminal page for a new session."""

    isLeaf = True

    def __init__(self, parent: PtyResource, first: bytes) -> None:
        super().__init__()
        self._parent = parent
        self._first = first

    def render_GET(self, request: Request) -> bytes | int:
        try:
            return self._render(request)
        except HTTPError as e:
            return _error(request, e)

    def _render(self, request: Request) -> bytes | int:
        try:
            text = b"/".join([self._first, *(request.postpath or [])]).decode("ascii")
        except UnicodeDecodeError:
            raise HTTPError(400, "invalid image reference: it must be ASCII") from None
        if not text:
            raise HTTPError(400, "an image is required: /pty/<image>?<args>")
        try:
            reference = parse_reference(text)
        except InvalidReference as e:
            raise HTTPError(400, f"invalid image reference: {e}") from None
        try:
            cmd = parse_command(split_request_uri(request.uri)[1])
        except InvalidCommand as e:
            raise HTTPError(400, f"invalid command: {e}") from None
        manager = self._parent.manager
        try:
            token = manager.start_token(reference.for_engine, cmd)
        except SessionLimit as e:
            raise HTTPError(503, str(e), {"Retry-After": str(RETRY_AFTER)}) from None
        command = " ".join(cmd) if cmd is not None else "(the image's command)"
        body = self._parent.template.safe_substitute(
            title=html.escape(f"{text} {command if cmd is not None else ''}".strip()),
            image=html.escape(text),
            command=html.escape(command),
            config=html.escape(
                json.dumps(
                    {
                        "token": token,
                        "image": text,
                        "cmd": list(cmd) if cmd is not None else None,
                        "ws": self._parent.ws_path,
                        "sessions": self._parent.sessions_path,
                        "subprotocol": SUBPROTOCOL,
                        "tokenPrefix": TOKEN_PREFIX,
                    }
                )
            ),
            static=self._parent.static_path,
        ).encode("utf-8")
        request.setResponseCode(200)
        for name, value in PAGE_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader("Content-Length", str(len(body)))
        return body


class _SessionToken(Resource):
    """``POST /pty/_sessions/<id>/token``: a fresh WebSocket token for a live session."""

    isLeaf = True

    def __init__(self, parent: PtyResource) -> None:
        super().__init__()
        self._parent = parent

    def render_POST(self, request: Request) -> bytes | int:
        try:
            return self._render(request)
        except HTTPError as e:
            return _error(request, e)

    def _render(self, request: Request) -> bytes | int:
        path = request.postpath or []
        if len(path) != 2 or path[1] != b"token":
            raise HTTPError(404, "use POST /pty/_sessions/<id>/token")
        origin = request.getHeader("origin")
        if not self._parent.origins.allows(origin, request.getHeader("host")):
            raise HTTPError(403, "origin not allowed")
        body = read_json_body(request, 4096)
        secret = body.get("secret") if isinstance(body, dict) else None
        if not isinstance(secret, str):
            raise HTTPError(400, 'the body must be {"secret": "<the session\'s secret>"}')
        try:
            token = self._parent.manager.attach_token(path[0].decode("ascii", "replace"), secret)
        except NoSuchSession as e:
            raise HTTPError(404, str(e)) from None
        write_json(request, 200, {"token": token}, {"Cache-Control": "no-store"})
        return NOT_DONE_YET  # already finished


class PtyResource(Resource):
    """``/pty``: pages for any image, plus ``_ws`` and ``_sessions``."""

    def __init__(
        self,
        manager: PtyManager,
        origins: OriginPolicy,
        web_root: Path,
        reactor: Any,
        mount: str = "/pty",
        static_path: str = "/static",
        ping_interval: float = 15.0,
    ) -> None:
        super().__init__()
        self.manager = manager
        self.origins = origins
        self.template = Template((Path(web_root) / "pty.html").read_text("utf-8"))
        self.ws_path = f"{mount}/_ws"
        self.sessions_path = f"{mount}/_sessions"
        self.static_path = static_path
        self.factory = PtyWebSocketFactory(manager, origins, reactor, ping_interval=ping_interval)
        self._websocket = WebSocketResource(self.factory)

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"_ws":
            return self._websocket  # type: ignore[return-value]
        if path == b"_sessions":
            return _SessionToken(self)
        return _Page(self, path)

    def render_GET(self, request: Request) -> bytes | int:
        return _error(request, HTTPError(400, "an image is required: /pty/<image>?<args>"))
