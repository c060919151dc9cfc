"""
The root of the resource tree: every URL flynnsched serves starts here.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from flynnsched.http.errors import write_json


@attrs.define
class Components:
    """
    What the resource tree serves: the pieces ``flynnsched.tap.makeService`` wires together.

    Every field but ``batch`` is optional so that tests can build a tree of just what they need.
    """

    batch: Any
    services: Any = None
    pty: Any = None
    web_root: Any = None


class _NotFound(Resource):
    """A JSON 404 for any path nothing else serves."""

    isLeaf = True

    def render(self, request: Request) -> object:
        path = request.path.decode("utf-8", "replace")
        write_json(request, 404, {"error": f"no such resource: {path}"})
        return NOT_DONE_YET


class Root(Resource):
    """``/``: a short JSON index; unknown children are JSON 404s."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"" and not request.postpath:
            return self
        return _NotFound()

    def render_GET(self, request: Request) -> object:
        write_json(
            request,
            200,
            {
                "name": "flynnsched",
                "endpoints": sorted("/" + k.decode() for k in self.children if k),
            },
        )
        return NOT_DONE_YET


def build_root(components: Components) -> Resource:
    """Build the whole resource tree for ``components``."""
    from flynnsched.http.batch import BatchResource

    root = Root()
    root.putChild(b"batch", BatchResource(components.batch))
    if components.services is not None:
        from flynnsched.services.http import ServicesResource

        root.putChild(b"services", ServicesResource(components.services))
    if components.pty is not None:
        root.putChild(b"pty", components.pty)
    if components.web_root is not None:
        from flynnsched.pty.assets import StaticAssets

        root.putChild(b"static", StaticAssets(components.web_root))
    return root
