"""
``/services``: the REST face of service jobs.

``POST /services`` (JSON body) creates, ``GET /services`` lists, ``GET /services/<id or name>``
shows, ``DELETE /services/<id or name>`` stops gracefully and forgets, and
``GET /services/<id or name>/logs[?follow=1&tail=N&previous=1]`` streams a container's output
(plain text, or one JSON record a line with ``Accept: application/x-ndjson``). Every error is JSON
``{"error": …}``; validation errors name the field.
"""

from __future__ import annotations

import codecs
import datetime
import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from flynnsched.docker.interface import ImageNotFound
from flynnsched.docker.mux import STREAM_NAMES, Demultiplexer, MuxProtocolError
from flynnsched.http.errors import RETRY_AFTER, HTTPError, read_json_body, respond, write_json
from flynnsched.services.spec import SpecError, parse_service_spec
from flynnsched.services.store import NameTaken
from flynnsched.services.supervisor import NoContainer, NoSuchService, ServiceSupervisor, ServiceView

__all__ = ["MAX_BODY", "ServicesResource", "service_json"]

log = Logger()

#: The largest ``POST /services`` body accepted, in bytes.
MAX_BODY = 64 * 1024
_NDJSON = "application/x-ndjson"
#: Content types curl and HTML forms send by default; accepted only from non-browser clients.
_FORM_TYPES = (b"application/x-www-form-urlencoded", b"text/plain")


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def service_json(view: ServiceView, now: float) -> dict[str, Any]:
    """The API's JSON for one service: its spec with every default, then its live status."""
    status = view.status
    last = status.last_exit
    body: dict[str, Any] = {"id": view.id}
    body.update(view.spec.to_json())
    body.update({
        "state": status.state.value,
        "restarts": status.restarts,
        "container_id": status.container_id,
        "previous_container_id": status.previous_container_id,
        "started_at": _iso(status.started_at),
        "last_exit": None if last is None else {
            "code": last.code, "time": _iso(last.time), "oom_killed": last.oom_killed, "error": last.error,
        },
        "next_restart_at": _iso(status.next_restart_at),
        "next_restart_in": None if status.next_restart_at is None
        else round(max(0.0, status.next_restart_at - now), 3),
        "created_at": _iso(view.created_at),
        "history": [{"time": _iso(e.time), "event": e.event, **e.detail} for e in view.history],
    })
    return body


def _as_http_error(exc: BaseException) -> HTTPError | None:
    if isinstance(exc, SpecError):
        return HTTPError(400, str(exc))
    if isinstance(exc, (NoSuchService, NoContainer)):
        return HTTPError(404, str(exc))
    if isinstance(exc, NameTaken):
        return HTTPError(409, str(exc))
    if isinstance(exc, TimeoutError):
        return HTTPError(503, str(exc), {"Retry-After": str(RETRY_AFTER)})
    return None


async def _mapped(handler: Any) -> None:
    """Run ``handler`` turning the service layer's errors into HTTP ones."""
    try:
        await handler()
    except Exception as e:
        error = _as_http_error(e)
        if error is None:
            raise
        raise error from None


def _read_body(request: Request) -> Any:
    """
    The JSON body. Like ``read_json_body``, but a body sent as a form or plain text (what
    ``curl -d`` does) is read as JSON too when no browser sent it: a request with an ``Origin``
    must say ``application/json``, so that a cross-site page cannot create services with a
    "simple" request that skips the CORS preflight.
    """
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype in _FORM_TYPES:
        if request.getHeader(b"origin") is not None:
            raise HTTPError(415, f"the body must be application/json, not {ctype.decode('latin-1')!r}")
        request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
        try:
            return read_json_body(request, MAX_BODY)
        except HTTPError as e:
            if e.status == 400:
                raise HTTPError(415, "the body is not JSON; send a JSON object with Content-Type: application/json") from None
            raise
    return read_json_body(request, MAX_BODY)


class _JSONResource(Resource):
    """A resource whose unsupported methods get a JSON 405 with ``Allow``."""

    methods: tuple[bytes, ...] = ()

    def render(self, request: Request) -> Any:
        if request.method not in self.methods and not (request.method == b"HEAD" and b"GET" in self.methods):
            allow = ", ".join(m.decode() for m in self.methods)
            write_json(request, 405, {"error": f"method {request.method.decode('latin-1')} not allowed here"},
                       {"Allow": allow})
            return NOT_DONE_YET
        return super().render(request)


class ServicesResource(_JSONResource):
    """``/services``: list and create."""

    methods = (b"GET", b"POST")

    def __init__(self, supervisor: ServiceSupervisor) -> None:
        super().__init__()
        self._supervisor = supervisor

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return ServiceResource(self._supervisor, path.decode("utf-8", "replace"))

    def render_GET(self, request: Request) -> object:
        async def handle() -> None:
            await self._supervisor.ready
            now = self._supervisor.now()
            last = self._supervisor.last_reconcile
            write_json(request, 200, {
                "services": [service_json(v, now) for v in self._supervisor.views()],
                "engine_reachable": self._supervisor.engine_available is not False,
                "last_reconcile": None if last is None else {"at": _iso(last[0]), "seconds": round(last[1], 6)},
            })

        return respond(request, lambda: _mapped(handle))

    def render_POST(self, request: Request) -> object:
        async def handle() -> None:
            spec = parse_service_spec(_read_body(request), self._supervisor.defaults)
            try:
                view = await self._supervisor.create(spec)
            except ImageNotFound as e:
                raise HTTPError(400, f"image: {e.message}") from None
            write_json(request, 201, service_json(view, self._supervisor.now()),
                       {"Location": f"/services/{view.id}"})

        return respond(request, lambda: _mapped(handle))


class ServiceResource(_JSONResource):
    """``/services/<id or name>``: show and delete."""

    methods = (b"GET", b"DELETE")

    def __init__(self, supervisor: ServiceSupervisor, key: str) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._key = key

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"logs":
            return ServiceLogsResource(self._supervisor, self._key)
        if path == b"":
            return self
        return _Missing()

    def render_GET(self, request: Request) -> object:
        async def handle() -> None:
            await self._supervisor.ready
            view = self._supervisor.get(self._key)
            write_json(request, 200, service_json(view, self._supervisor.now()))

        return respond(request, lambda: _mapped(handle))

    def render_DELETE(self, request: Request) -> object:
        async def handle() -> None:
            await self._supervisor.delete(self._key)
            request.setResponseCode(204)
            request.finish()

        return respond(request, lambda: _mapped(handle))


class _Missing(Resource):
    isLeaf = True

    def render(self, request: Request) -> object:
        write_json(request, 404, {"error": f"no such resource: {request.path.decode('utf-8', 'replace')}"})
        return NOT_DONE_YET


def _arg(request: Request, name: bytes) -> list[bytes] | None:
    args: dict[bytes, list[bytes]] = request.args or {}
    return args.get(name)


def _flag(request: Request, name: bytes) -> bool:
    values = _arg(request, name)
    if not values:
        return False
    value = values[-1].decode("utf-8", "replace").lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise HTTPError(400, f"{name.decode()}: must be 1 or 0, not {value!r}")


def _tail(request: Request) -> int | None:
    values = _arg(request, b"tail")
    if not values:
        return None
    value = values[-1].decode("utf-8", "replace")
    if value == "all":
        return None
    if not value.isdigit():
        raise HTTPError(400, f"tail: must be a number of lines or 'all', not {value!r}")
    return int(value)


@implementer(IPushProducer)
class _Backpressure:
    """Registered on the response: forwards pause, resume and stop to the engine's log stream."""

    def __init__(self) -> None:
        self.upstream: IPushProducer | None = None
        self.paused = False
        self.stopped = False

    def attach(self, upstream: IPushProducer) -> None:
        self.upstream = upstream
        if self.stopped:
            upstream.stopProducing()
        elif self.paused:
            upstream.pauseProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        if self.upstream is not None:
            self.upstream.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.upstream is not None:
            self.upstream.resumeProducing()

    def stopProducing(self) -> None:
        self.stopped = True
        if self.upstream is not None:
            self.upstream.stopProducing()


class _LogStream(Protocol):
    """Receives Docker's multiplexed log stream and writes it to the response."""

    def __init__(self, request: Request, ndjson: bool) -> None:
        self.request = request
        self.ndjson = ndjson
        self.done: Deferred[None] = Deferred()
        self._demux = Demultiplexer()
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAM_NAMES}

    def dataReceived(self, data: bytes) -> None:
        try:
            pieces = self._demux.feed(data)
        except MuxProtocolError as e:
            log.warn("log stream is not multiplexed: {error}", error=str(e))
            pieces = e.pieces
        if self.request.finished or getattr(self.request, "_disconnected", False):
            return
        for stream, chunk in pieces:
            if self.ndjson:
                text = self._decoders[stream].decode(chunk)
                if text:
                    record = {"stream": STREAM_NAMES[stream], "data": text}
                    self.request.write(json.dumps(record).encode() + b"\n")
            else:
                self.request.write(chunk)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.ndjson and not self.request.finished:
            for stream, decoder in self._decoders.items():
                text = decoder.decode(b"", final=True)
                if text:
                    self.request.write(json.dumps({"stream": STREAM_NAMES[stream], "data": text}).encode() + b"\n")
        if not self.done.called:
            self.done.callback(None)


class ServiceLogsResource(_JSONResource):
    """``/services/<id or name>/logs``: a container's output, streamed."""

    methods = (b"GET",)
    isLeaf = True

    def __init__(self, supervisor: ServiceSupervisor, key: str) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._key = key

    def render_GET(self, request: Request) -> object:
        async def handle() -> None:
            follow = _flag(request, b"follow")
            previous = _flag(request, b"previous")
            tail = _tail(request)
            accept = (request.getHeader(b"accept") or b"").decode("latin-1")
            ndjson = _NDJSON in accept
            await self._supervisor.ready
            self._supervisor.get(self._key)
            request.setHeader(b"Content-Type", _NDJSON.encode() if ndjson else b"text/plain; charset=utf-8")
            request.setHeader(b"X-Content-Type-Options", b"nosniff")
            stream = _LogStream(request, ndjson)
            backpressure = _Backpressure()
            request.registerProducer(backpressure, True)
            try:
                producer = await self._supervisor.logs(self._key, stream, follow, tail, previous)
                backpressure.attach(producer)
                # Send the headers now: a followed stream may stay quiet for a long time.
                request.write(b"")
                try:
                    await stream.done
                except CancelledError:
                    producer.stopProducing()
                    raise
            finally:
                request.unregisterProducer()
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()

        return respond(request, lambda: _mapped(handle))
