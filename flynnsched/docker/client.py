"""
``DockerClient``: the ``IDockerEngine`` that talks to a real Docker engine.

Plain requests go through treq with one persistent connection pool over the engine's socket (a
unix socket, or TCP with TLS); attaches go through the raw hijacking protocol in
``flynnsched.docker.attach``. This module is the only one that knows Docker's URLs and JSON.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlencode

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import IProtocol, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from flynnsched.docker.attach import hijack_attach
from flynnsched.docker.events import EventLineParser, EventParseError
from flynnsched.docker.interface import (
    Conflict,
    ContainerSpec,
    ContainerState,
    ContainerSummary,
    EngineError,
    EngineUnavailable,
    Event,
    IDockerEngine,
    IEventSubscription,
    ImageNotFound,
    NoSuchContainer,
)

log = Logger()

#: The Engine API version every request names (Docker 20.10 and later speak it).
API_VERSION = "v1.41"

#: Seconds an output-only attach waits after small reads before reading again (see ``Attachment``):
#: it cuts the CPU a relayed stream costs by about two thirds, for at most this delay per read
#: (the reactor's poll has millisecond granularity: a shorter delay would be a millisecond too).
GATHER_OUTPUT = 0.001

#: Errors that mean the engine could not be reached or the connection broke.
_UNREACHABLE = (ConnectError, DNSLookupError, ConnectionLost, ResponseFailed, OSError)


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    """Every URL goes to the engine's one endpoint; the host in the URL is ignored."""

    def __init__(self, endpoint_factory: Callable[[], IStreamClientEndpoint]) -> None:
        self._endpoint_factory = endpoint_factory

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self._endpoint_factory()


def _message(body: bytes, status: int) -> str:
    try:
        return str(json.loads(body.decode("utf-8"))["message"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").strip() or f"HTTP {status}"


def _container_body(spec: ContainerSpec) -> dict[str, Any]:
    host: dict[str, Any] = {"NetworkMode": spec.network}
    if spec.memory is not None:
        host["Memory"] = spec.memory
    if spec.nano_cpus is not None:
        host["NanoCpus"] = spec.nano_cpus
    if spec.pids_limit is not None:
        host["PidsLimit"] = spec.pids_limit
    if spec.log_driver is not None:
        host["LogConfig"] = {"Type": spec.log_driver, "Config": {}}
    body: dict[str, Any] = {
        "Image": spec.image,
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "Labels": dict(spec.labels),
        "Tty": spec.tty,
        "OpenStdin": spec.open_stdin,
        "StdinOnce": spec.stdin_once,
        "AttachStdin": spec.open_stdin,
        "AttachStdout": True,
        "AttachStderr": True,
        "HostConfig": host,
    }
    if spec.cmd is not None:
        body["Cmd"] = list(spec.cmd)
    if spec.stop_signal is not None:
        body["StopSignal"] = spec.stop_signal
    if spec.stop_timeout is not None:
        body["StopTimeout"] = spec.stop_timeout
    return body


@implementer(IEventSubscription)
class _EventStream(Protocol):
    """Feeds the events body to the parser and the callback; ``done`` fires at its end."""

    def __init__(self, callback: Callable[[Event], None]) -> None:
        self._callback = callback
        self._parser = EventLineParser(on_error=self._bad_line)
        self.done: Deferred[None] = Deferred()

    @staticmethod
    def _bad_line(error: EventParseError) -> None:
        log.warn("skipping a malformed event from the engine: {error}", error=str(error))

    def dataReceived(self, data: bytes) -> None:
        for event in self._parser.feed(data):
            try:
                self._callback(event)
            except Exception:
                log.failure("event callback failed for {action} {container_id}",
                            action=event.action, container_id=event.id)

    def connectionLost(self, reason: Failure = Failure(ConnectionLost())) -> None:
        if not self.done.called:
            self.done.callback(None)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


@implementer(IDockerEngine)
class DockerClient:
    """
    A Docker engine at ``endpoint_factory()`` (called for every new connection).

    Call ``close`` when done: it closes the pooled connections.
    """

    def __init__(self, reactor: Any, endpoint_factory: Callable[[], IStreamClientEndpoint]) -> None:
        self._reactor = reactor
        self._endpoint_factory = endpoint_factory
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 16
        # A pooled connection the engine closed (say, on its restart) is retried for safe methods.
        agent = Agent.usingEndpointFactory(reactor, _FixedEndpoint(endpoint_factory), pool=self._pool)
        self._http = HTTPClient(agent)

    def close(self) -> Deferred[None]:
        """Close every pooled connection."""
        return self._pool.closeCachedConnections()

    # -- plumbing --------------------------------------------------------------------------

    def _url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        url = f"http://docker/{API_VERSION}{path}"
        if params:
            url += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        return url

    async def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        unbuffered: bool = False,
    ) -> IResponse:
        kwargs: dict[str, Any] = {"unbuffered": unbuffered}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode("utf-8")
            kwargs["headers"] = {b"Content-Type": [b"application/json"]}
        try:
            return await self._http.request(method, self._url(path, params), **kwargs)
        except _UNREACHABLE as e:
            raise EngineUnavailable(f"cannot reach the Docker engine: {e}") from None

    async def _call(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        not_found: type[EngineError] = NoSuchContainer,
    ) -> Any:
        """Send a request and return its decoded JSON body (None when empty), or raise a named error."""
        response = await self._send(method, path, params, body)
        try:
            content = await treq.content(response)
        except _UNREACHABLE as e:
            raise EngineUnavailable(f"the Docker engine's answer was cut: {e}") from None
        self._check(response.code, content, not_found)
        if not content.strip():
            return None
        try:
            return json.loads(content.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise EngineError(f"the engine answered {path} with non-JSON", response.code) from None

    @staticmethod
    def _check(status: int, content: bytes, not_found: type[EngineError]) -> None:
        if status < 400:
            return
        message = _message(content, status)
        if status == 404:
            raise not_found(message, status)
        if status == 409:
            raise Conflict(message, status)
        raise EngineError(message, status)

    def _deferred(self, coro: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(coro)

    # -- IDockerEngine ---------------------------------------------------------------------

    def ping(self) -> Deferred[None]:
        async def ping() -> None:
            response = await self._send("GET", "/_ping")
            content = await treq.content(response)
            if response.code != 200:
                raise EngineUnavailable(f"the engine answered its ping with {response.code}: {content[:200]!r}")

        return self._deferred(ping())

    def version(self) -> Deferred[dict[str, Any]]:
        return self._deferred(self._call("GET", "/version"))

    def inspect_image(self, reference: str) -> Deferred[str]:
        async def inspect() -> str:
            info = await self._call("GET", f"/images/{quote(reference, safe='/:@')}/json", not_found=ImageNotFound)
            return str(info["Id"])

        return self._deferred(inspect())

    def pull_image(self, reference: str) -> Deferred[None]:
        async def pull() -> None:
            name, tag = _split_for_pull(reference)
            response = await self._send("POST", "/images/create", {"fromImage": name, "tag": tag})
            try:
                content = await treq.content(response)
            except _UNREACHABLE as e:
                raise EngineUnavailable(f"the pull of {reference} was cut: {e}") from None
            if response.code >= 400:
                raise ImageNotFound(f"cannot pull {reference}: {_message(content, response.code)}", response.code)
            # Errors after the 200 come as records with an "error" field in the progress stream.
            for line in content.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("error"):
                    raise ImageNotFound(f"cannot pull {reference}: {record['error']}", response.code)

        return self._deferred(pull())

    def create_container(self, spec: ContainerSpec) -> Deferred[str]:
        async def create() -> str:
            params = {"name": spec.name} if spec.name else None
            result = await self._call("POST", "/containers/create", params, _container_body(spec), ImageNotFound)
            return str(result["Id"])

        return self._deferred(create())

    def attach(self, container_id: str, protocol: IProtocol, stdin: bool = False) -> Deferred[Any]:
        query = "stream=1&stdout=1&stderr=1" + ("&stdin=1" if stdin else "")
        path = f"/{API_VERSION}/containers/{quote(container_id, safe='')}/attach?{query}"
        try:
            endpoint = self._endpoint_factory()
        except Exception as e:  # a bad address fails the Deferred, never raises
            return _failed(EngineUnavailable(f"cannot reach the Docker engine: {e}"))
        # Output-only attaches gather the engine's small frames into larger reads; interactive
        # ones (with stdin) read every byte as soon as it comes.
        return hijack_attach(endpoint, path, container_id, protocol, self._reactor, 0.0 if stdin else GATHER_OUTPUT)

    def start_container(self, container_id: str) -> Deferred[None]:
        async def start() -> None:
            await self._call("POST", f"/containers/{quote(container_id, safe='')}/start")

        return self._deferred(start())

    def wait_container(self, container_id: str) -> Deferred[int]:
        async def wait() -> int:
            result = await self._call("POST", f"/containers/{quote(container_id, safe='')}/wait")
            return int(result["StatusCode"])

        return self._deferred(wait())

    def resize(self, container_id: str, height: int, width: int) -> Deferred[None]:
        async def resize() -> None:
            try:
                await self._call("POST", f"/containers/{quote(container_id, safe='')}/resize", {"h": height, "w": width})
            except EngineError as e:
                # Older engines answer 500 for a container that is not running.
                if type(e) is EngineError and "is not running" in e.message:
                    raise Conflict(e.message, e.status) from None
                raise

        return self._deferred(resize())

    def kill_container(self, container_id: str, signal: str = "KILL") -> Deferred[None]:
        async def kill() -> None:
            await self._call("POST", f"/containers/{quote(container_id, safe='')}/kill", {"signal": signal})

        return self._deferred(kill())

    def stop_container(self, container_id: str, timeout: int) -> Deferred[None]:
        async def stop() -> None:
            await self._call("POST", f"/containers/{quote(container_id, safe='')}/stop", {"t": timeout})

        return self._deferred(stop())

    def remove_container(self, container_id: str, force: bool = True) -> Deferred[None]:
        async def remove() -> None:
            params = {"force": "1" if force else "0", "v": "1"}
            await self._call("DELETE", f"/containers/{quote(container_id, safe='')}", params)

        return self._deferred(remove())

    def inspect_container(self, container_id: str) -> Deferred[ContainerState]:
        async def inspect() -> ContainerState:
            info = await self._call("GET", f"/containers/{quote(container_id, safe='')}/json")
            state = info.get("State") or {}
            config = info.get("Config") or {}
            return ContainerState(
                id=info["Id"],
                name=str(info.get("Name", "")).lstrip("/"),
                image=str(config.get("Image", "")),
                status=str(state.get("Status", "")),
                running=bool(state.get("Running")),
                exit_code=int(state.get("ExitCode") or 0),
                oom_killed=bool(state.get("OOMKilled")),
                started_at=str(state.get("StartedAt", "")),
                finished_at=str(state.get("FinishedAt", "")),
                labels=dict(config.get("Labels") or {}),
                tty=bool(config.get("Tty")),
            )

        return self._deferred(inspect())

    def list_containers(self, labels: Mapping[str, str]) -> Deferred[list[ContainerSummary]]:
        async def listing() -> list[ContainerSummary]:
            wanted = [f"{k}={v}" if v else k for k, v in labels.items()]
            params = {"all": "1", "filters": json.dumps({"label": wanted})}
            result = await self._call("GET", "/containers/json", params)
            return [
                ContainerSummary(
                    id=c["Id"], image=str(c.get("Image", "")), state=str(c.get("State", "")),
                    labels=dict(c.get("Labels") or {}),
                )
                for c in result or []
            ]

        return self._deferred(listing())

    def logs(
        self, container_id: str, protocol: IProtocol, follow: bool = False, tail: int | None = None
    ) -> Deferred[IPushProducer]:
        async def logs() -> IPushProducer:
            params = {
                "stdout": "1", "stderr": "1", "follow": "1" if follow else "0",
                "tail": "all" if tail is None else str(tail),
            }
            response = await self._send(
                "GET", f"/containers/{quote(container_id, safe='')}/logs", params, unbuffered=True
            )
            if response.code >= 400:
                self._check(response.code, await treq.content(response), NoSuchContainer)
            response.deliverBody(protocol)
            return protocol.transport  # type: ignore[attr-defined, no-any-return]

        return self._deferred(logs())

    def events(
        self,
        callback: Callable[[Event], None],
        filters: Mapping[str, list[str]] | None = None,
        since: int | None = None,
    ) -> Deferred[IEventSubscription]:
        async def events() -> IEventSubscription:
            params: dict[str, Any] = {}
            if filters:
                params["filters"] = json.dumps(dict(filters))
            if since is not None:
                params["since"] = str(since)
            response = await self._send("GET", "/events", params, unbuffered=True)
            if response.code >= 400:
                self._check(response.code, await treq.content(response), EngineError)
            stream = _EventStream(callback)
            response.deliverBody(stream)
            return stream

        return self._deferred(events())


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


def _split_for_pull(reference: str) -> tuple[str, str]:
    """Split a reference into Docker's ``fromImage`` and ``tag`` (a digest travels in ``tag``)."""
    if "@" in reference:
        name, _, digest = reference.partition("@")
        return name, digest
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return reference[:colon], reference[colon + 1 :]
    return reference, "latest"


__all__ = ["API_VERSION", "DockerClient"]
