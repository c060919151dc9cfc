"""
JSON responses and the one place that maps errors to HTTP statuses.

Resources raise ``HTTPError`` (or let an engine error through); ``respond`` turns any outcome of an
``async`` render into a response: a JSON ``{"error": …}`` body with a fitting status, never a
traceback. Anything unexpected is logged with an incident id and answered 500 with that id.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Awaitable, Callable, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from flynnsched.docker.interface import (
    Conflict,
    EngineError,
    EngineUnavailable,
    ImageNotFound,
    NoSuchContainer,
)

log = Logger()

#: Seconds a client should wait before retrying a 503.
RETRY_AFTER = 5


class HTTPError(Exception):
    """An expected error with its status, message and extra response headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def write_json(request: Request, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
    """Write a complete JSON response and finish the request."""
    data = json.dumps(body, indent=None, separators=(",", ":")).encode("utf-8") + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(data)).encode("ascii"))
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("ascii"), value.encode("utf-8"))
    if request.method != b"HEAD":
        request.write(data)
    request.finish()


def as_http_error(exc: BaseException) -> HTTPError | None:
    """
    The HTTP error for an expected exception, or None for one that is a bug.

    Engine errors map to 404 (missing image or container), 409 (conflict), 503 (engine
    unreachable, with ``Retry-After``) and 502 (anything else the engine said).
    """
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, ImageNotFound):
        return HTTPError(404, exc.message)
    if isinstance(exc, NoSuchContainer):
        return HTTPError(404, exc.message)
    if isinstance(exc, Conflict):
        return HTTPError(409, exc.message)
    if isinstance(exc, EngineUnavailable):
        return HTTPError(
            503,
            f"the Docker engine is unreachable: {exc.message}",
            {"Retry-After": str(RETRY_AFTER)},
        )
    if isinstance(exc, EngineError):
        return HTTPError(502, f"the Docker engine failed: {exc.message}")
    return None


def write_error(request: Request, failure: Failure) -> None:
    """
    Answer ``failure`` as a JSON error, if the response has not started yet.

    Unexpected failures are logged with an incident id that the response names.
    """
    if failure.check(CancelledError) or getattr(request, "_disconnected", False):
        return
    error = as_http_error(failure.value)
    if error is None:
        incident = uuid.uuid4().hex[:12]
        log.failure("unhandled error, incident {incident}", failure, incident=incident)
        error = HTTPError(500, f"internal error (incident {incident})")
    if request.startedWriting:
        # The stream had begun: all that is left is to end it.
        if not request.finished:
            request.finish()
        return
    write_json(request, error.status, {"error": error.message}, error.headers)


def respond(request: Request, handler: Callable[[], Awaitable[Any]]) -> object:
    """
    Run an ``async`` handler for ``request`` and return ``NOT_DONE_YET``.

    The handler writes its own response; if it raises, ``write_error`` answers. A client that goes
    away cancels the handler.
    """
    d: Deferred[Any] = Deferred.fromCoroutine(handler())  # type: ignore[arg-type]
    request.notifyFinish().addErrback(lambda _: d.cancel())
    d.addErrback(lambda f: write_error(request, f))
    return NOT_DONE_YET


def read_json_body(request: Request, max_bytes: int) -> Any:
    """
    The request's body as JSON: 415 unless it is JSON, 413 when over ``max_bytes``, 400 when it
    does not parse.
    """
    ctype = (request.getHeader(b"content-type") or b"application/json").split(b";")[0].strip().lower()
    if ctype not in (b"application/json", b"text/json"):
        raise HTTPError(415, f"the body must be application/json, not {ctype.decode('latin-1')!r}")
    content = request.content
    if content is None:
        raise HTTPError(400, "a JSON body is required")
    content.seek(0, 2)
    size = content.tell()
    if size > max_bytes:
        raise HTTPError(413, f"the body is {size} bytes; at most {max_bytes} are accepted")
    content.seek(0)
    raw = content.read()
    if not raw.strip():
        raise HTTPError(400, "a JSON body is required")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON: {e}") from None
