"""
The browser assets: where they are installed and the ``/static`` resource that serves them.

The assets live in the repository's ``web/`` folder, installed as the package data of
``flynnsched.web`` (a regular install) or found beside the package (a checkout or an editable
install). Only an explicit set of files is served: the top-level ``.html``, ``.js`` and ``.css``
files of the web root and the three run-time files of xterm.js from ``node_modules``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.static import File

from flynnsched.http.errors import write_json

#: ``/static/<name>`` for the third-party files, and where they are under the web root.
VENDOR_FILES = {
    "xterm.js": "node_modules/@xterm/xterm/lib/xterm.js",
    "xterm.css": "node_modules/@xterm/xterm/css/xterm.css",
    "addon-fit.js": "node_modules/@xterm/addon-fit/lib/addon-fit.js",
}
#: The suffixes of the web root's own files that are served.
OWN_SUFFIXES = (".html", ".js", ".css", ".svg", ".png", ".ico")


def default_web_root() -> Path:
    """The installed assets (``flynnsched.web``), or the ``web/`` folder beside the package."""
    spec = importlib.util.find_spec("flynnsched.web")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "pty.html").is_file():
                return Path(location)
    return Path(__file__).resolve().parent.parent.parent / "web"


def missing_assets(web_root: Path) -> list[str]:
    """The run-time files the terminal page needs that ``web_root`` lacks."""
    needed = ["pty.html", "pty.js", "pty.css", *VENDOR_FILES.values()]
    return [name for name in needed if not (web_root / name).is_file()]


class _Missing(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        write_json(request, 404, {"error": f"no such asset: {request.path.decode('utf-8', 'replace')}"})
        return NOT_DONE_YET  # already finished


class StaticAssets(Resource):
    """``/static/<name>``: the assets in ``web_root``, revalidated on every use."""

    def __init__(self, web_root: Path) -> None:
        super().__init__()
        self.web_root = Path(web_root)

    def _path(self, name: str) -> Path | None:
        if name in VENDOR_FILES:
            return self.web_root / VENDOR_FILES[name]
        if "/" in name or name.startswith(".") or not name.endswith(OWN_SUFFIXES):
            return None
        return self.web_root / name

    def getChild(self, path: bytes, request: Request) -> Resource:
        if request.postpath:
            return _Missing()
        path_ = self._path(path.decode("utf-8", "replace"))
        if path_ is None or not path_.is_file():
            return _Missing()
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        asset = File(str(path_))
        asset.isLeaf = True
        return asset

    def render(self, request: Request) -> bytes | int:
        return _Missing().render(request)
