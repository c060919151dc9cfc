"""
``/batch/<image>?<args>``: run a batch job and stream its output as the response body.

Plain text by default (stdout and stderr interleaved as they arrive); with
``Accept: application/x-ndjson`` one JSON record a line — ``{"stream": "stdout", "data": "…"}`` —
and ``{"exit": N}`` last. Output that is not UTF-8 travels as ``{"stream": …, "data_base64": …}``.
The response carries ``Flynn-Job-Id``. A ``POST``'s body is the job's stdin; a ``Flynn-Timeout``
header (seconds) kills a job that runs longer (``{"exit": 137, "timed_out": true}``). Errors before the stream starts are JSON with a fitting
status; a client that goes away has its container killed and removed.
"""

from __future__ import annotations

import base64
import codecs
import json
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.logger import Logger
from zope.interface import implementer

from flynnsched.batch import BatchJob, BatchResult, BatchRunner, QueueFull, StartFailed
from flynnsched.command import InvalidCommand, parse_command, split_request_uri
from flynnsched.docker.interface import EngineError
from flynnsched.docker.mux import STREAM_NAMES
from flynnsched.http.errors import RETRY_AFTER, HTTPError, respond, write_json
from flynnsched.reference import InvalidReference, parse_reference

log = Logger()

NDJSON = "application/x-ndjson"

#: Output held while the container starts, before the response can begin; past it the
#: container's output is paused.
START_BUFFER = 256 * 1024


def wants_ndjson(request: Request) -> bool:
    accept = (request.getHeader(b"accept") or b"").decode("latin-1").lower()
    return any(part.split(";")[0].strip() == NDJSON for part in accept.split(","))


@implementer(IPushProducer)
class StreamingSink:
    """
    A ``BatchSink`` writing to an HTTP response, with the response's flow control.

    Output that comes before the container has started (the attach precedes the start) is held,
    bounded by pausing the container's output, and written once the response begins.
    """

    def __init__(self, request: Request, ndjson: bool) -> None:
        self._request = request
        self._ndjson = ndjson
        self._producer: IPushProducer | None = None
        self._held: list[tuple[int, bytes]] = []
        self._held_size = 0
        self._open = False
        self._paused_by_client = False
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")() for s in STREAM_NAMES}

    # -- BatchSink -----------------------------------------------------------------------

    def attached(self, producer: IPushProducer) -> None:
        self._producer = producer

    def started(self, job_id: str) -> None:
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"Flynn-Job-Id", job_id.encode("ascii"))
        request.setHeader(b"Content-Type", (NDJSON if self._ndjson else "text/plain; charset=utf-8").encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-store")
        request.registerProducer(self, True)
        self._open = True
        held, self._held = self._held, []
        for stream, data in held:
            self._write(stream, data)
        if not held:
            # Send the headers now, so the client knows the job runs before any output.
            request.write(b"")
        if self._held_size >= START_BUFFER and not self._paused_by_client and self._producer is not None:
            self._producer.resumeProducing()
        self._held_size = 0

    def output(self, stream: int, data: bytes) -> None:
        if self._open:
            self._write(stream, data)
            return
        self._held.append((stream, data))
        before = self._held_size
        self._held_size += len(data)
        if before < START_BUFFER <= self._held_size and self._producer is not None:
            self._producer.pauseProducing()

    def finish(self, result: BatchResult) -> None:
        if self._ndjson:
            for stream in STREAM_NAMES:
                self._flush_decoder(stream)
            record: dict[str, Any] = {"exit": result.exit_code}
            if result.timed_out:
                record["timed_out"] = True
            self._record(record)
        self._close()

    @property
    def streaming(self) -> bool:
        """Whether the response has begun, so errors can no longer change its status."""
        return self._open

    def fail(self, message: str) -> None:
        """
        End a response that has begun after a failure: NDJSON gets an ``{"error": …}`` record; a
        plain-text stream is cut without its last chunk, so the client sees it is incomplete.
        """
        if getattr(self._request, "_disconnected", False) or self._request.finished:
            return
        if self._ndjson:
            self._record({"error": message})
            self._close()
            return
        self._request.unregisterProducer()
        self._request.channel.transport.abortConnection()  # type: ignore[union-attr]

    def _close(self) -> None:
        if self._open:
            self._request.unregisterProducer()
        if not self._request.finished and not getattr(self._request, "_disconnected", False):
            self._request.finish()

    # -- writing -------------------------------------------------------------------------

    def _write(self, stream: int, data: bytes) -> None:
        if getattr(self._request, "_disconnected", False):
            return
        if not self._ndjson:
            self._request.write(data)
            return
        name = STREAM_NAMES.get(stream, str(stream))
        try:
            text = self._decoders[stream].decode(data)
        except UnicodeDecodeError:
            self._decoders[stream].reset()
            self._record({"stream": name, "data_base64": base64.b64encode(data).decode("ascii")})
            return
        if text:
            self._record({"stream": name, "data": text})

    def _flush_decoder(self, stream: int) -> None:
        try:
            text = self._decoders[stream].decode(b"", final=True)
        except UnicodeDecodeError as e:
            self._record({"stream": STREAM_NAMES[stream], "data_base64": base64.b64encode(e.object).decode()})
            return
        if text:
            self._record({"stream": STREAM_NAMES[stream], "data": text})

    def _record(self, record: dict[str, Any]) -> None:
        self._request.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")

    # -- IPushProducer: the client's flow control, passed on to the container's output ----

    def pauseProducing(self) -> None:
        self._paused_by_client = True
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused_by_client = False
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()


class BatchJobResource(Resource):
    """One batch job request: the image is the rest of the path, the command the query."""

    isLeaf = True

    def __init__(self, runner: BatchRunner) -> None:
        super().__init__()
        self._runner = runner

    def render_POST(self, request: Request) -> object:
        return respond(request, lambda: self._run(request, stdin=_body(request)))

    def render_GET(self, request: Request) -> object:
        return respond(request, lambda: self._run(request, stdin=None))

    def render_HEAD(self, request: Request) -> object:
        # A HEAD must not start a job, as a GET would.
        request.setHeader(b"Allow", b"GET, POST")
        write_json(request, 405, {"error": "use GET or POST to run a batch job"})
        return NOT_DONE_YET

    async def _run(self, request: Request, stdin: bytes | None) -> None:
        path, query = split_request_uri(request.uri)
        image_text = path[len(b"/batch/"):] if path.startswith(b"/batch/") else b""
        try:
            image = parse_reference(_percent_decode(image_text))
        except InvalidReference as e:
            raise HTTPError(400, f"invalid image reference: {e}") from None
        try:
            cmd = parse_command(query)
        except InvalidCommand as e:
            raise HTTPError(400, f"invalid command: {e}") from None
        timeout = _timeout(request)
        sink = StreamingSink(request, wants_ndjson(request))
        job = BatchJob(image=image.for_engine, cmd=cmd, stdin=stdin, timeout=timeout)
        try:
            result = await self._runner.run(job, sink)
        except QueueFull as e:
            raise HTTPError(503, f"the batch queue is full: {e}", {"Retry-After": str(RETRY_AFTER)}) from None
        except StartFailed as e:
            raise HTTPError(400, f"the command could not start: {e}") from None
        except EngineError as e:
            if not sink.streaming:
                raise
            log.warn("batch job lost its engine mid-stream: {error}", error=e.message)
            sink.fail(f"the Docker engine failed during the job: {e.message}")
            return
        sink.finish(result)


def _body(request: Request) -> bytes | None:
    """A POST's body, the job's stdin; None when there is none."""
    content = request.content
    if content is None:
        return None
    content.seek(0)
    data = content.read()
    return data or None


def _timeout(request: Request) -> float | None:
    """The ``Flynn-Timeout`` header: the most seconds the job may run."""
    raw = request.getHeader(b"flynn-timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e9:
        raise HTTPError(400, f"Flynn-Timeout must be a positive number of seconds, not {raw.decode('latin-1')!r}")
    return value


def _percent_decode(raw: bytes) -> str:
    from urllib.parse import unquote_to_bytes

    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid image reference: not UTF-8") from None


class BatchResource(Resource):
    """``/batch``: every child path is a job; ``/batch`` itself tells how to use it."""

    def __init__(self, runner: BatchRunner) -> None:
        super().__init__()
        self._runner = runner

    def getChild(self, path: bytes, request: Request) -> Resource:
        return BatchJobResource(self._runner)

    def render_GET(self, request: Request) -> object:
        write_json(request, 400, {"error": "name an image: /batch/<image>?<arg>+<arg>..."})
        return NOT_DONE_YET
