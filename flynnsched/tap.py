"""
``twistd flynnsched``: the daemon's options and the service tree they make.

This is the only module that reads options, the environment or the global reactor; everything
it builds takes what it needs as arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from flynnsched.batch import BatchConfig, BatchRunner
from flynnsched.docker.address import BadEngineAddress, endpoint_factory, parse_engine_address
from flynnsched.docker.client import DockerClient
from flynnsched.docker.images import PULL_POLICIES, ImagePuller
from flynnsched.docker.interface import LABEL_JOB_TYPE, LABEL_MANAGED, LABEL_OWNER, EngineError, IDockerEngine
from flynnsched.http.root import Components, build_root

log = Logger()

DEFAULT_LISTEN = "tcp:55005:interface=127.0.0.1"
DEFAULT_SOCKET = "/var/run/docker.sock"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


class Options(usage.Options):
    """The command line of ``twistd flynnsched``."""

    synopsis = "[options]"
    longdesc = (
        "flynnsched runs batch, service and PTY jobs on a Docker engine and serves them over HTTP. "
        "GET /batch/<image>?<arg>+<arg> streams a batch job's output."
    )

    optParameters = [
        ["docker", None, None,
         "The Docker engine: a socket path, unix:PATH, or tcp:HOST:PORT "
         f"[default: $DOCKER_HOST, else {DEFAULT_SOCKET}]"],
        ["docker-tls-ca", None, None, "PEM CA certificate that a tcp engine's certificate must chain to (enables TLS)."],
        ["docker-tls-cert", None, None, "PEM client certificate for a tcp engine that verifies clients."],
        ["docker-tls-key", None, None, "PEM private key of --docker-tls-cert."],
        ["state-dir", None, "/var/lib/flynnsched", "Where the daemon keeps its files."],
        ["web-root", None, None, "The web assets to serve [default: the ones installed with flynnsched]."],
        ["pull", None, "missing", f"When to pull images: {' or '.join(PULL_POLICIES)}."],
        ["batch-max-running", None, 16, "Batch jobs that run at once; more wait in the queue.", _positive],
        ["batch-max-queued", None, 256, "Batch jobs that may wait; beyond that, 503.", int],
        ["batch-network", None, "none", "The network of batch containers: none or host."],
        ["batch-timeout", None, 0.0, "The most seconds a batch job may run; 0 for no limit.", float],
        ["pty-linger", None, 60.0, "Seconds a PTY session runs on with no browser attached.", float],
        ["pty-max-sessions", None, 16, "PTY sessions at most at once; beyond that, 503.", _positive],
        ["pty-idle-timeout", None, 3600.0, "Seconds without input or output that end a PTY session; 0 for never.", float],
        ["pty-history", None, 256 * 1024, "Bytes of recent output a PTY session keeps for a page that reconnects.", _positive],
        ["pty-network", None, "none", "The network of PTY containers: none or host."],
        ["restart-initial-delay", None, 1.0, "Services' first restart delay in seconds (doubling).", float],
        ["restart-max-delay", None, 300.0, "Services' longest restart delay in seconds.", float],
        ["restart-reset-after", None, 600.0, "Seconds of healthy running that reset a service's backoff.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allowed-origin"] = []

    def opt_listen(self, description: str) -> None:
        """A Twisted endpoint to serve HTTP on; repeat for more [default: tcp:55005:interface=127.0.0.1]."""
        self["listen"].append(description)

    def opt_allowed_origin(self, origin: str) -> None:
        """An origin (scheme://host[:port]) besides the daemon's own that may open terminals; repeatable."""
        self["allowed-origin"].append(origin)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["docker"] is None:
            self["docker"] = os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
        try:
            self["engine-address"] = parse_engine_address(self["docker"])
        except BadEngineAddress as e:
            raise usage.UsageError(str(e)) from None
        tls = [self[k] for k in ("docker-tls-ca", "docker-tls-cert", "docker-tls-key")]
        if any(tls) and self["engine-address"].path is not None:
            raise usage.UsageError("--docker-tls-* options only apply to a tcp engine address")
        if bool(tls[1]) != bool(tls[2]):
            raise usage.UsageError("--docker-tls-cert and --docker-tls-key go together")
        if self["pull"] not in PULL_POLICIES:
            raise usage.UsageError(f"--pull must be one of {', '.join(PULL_POLICIES)}, not {self['pull']!r}")
        if self["batch-network"] not in ("none", "host"):
            raise usage.UsageError(f"--batch-network must be none or host, not {self['batch-network']!r}")
        if self["batch-timeout"] < 0:
            raise usage.UsageError("--batch-timeout must not be negative")
        if self["batch-max-queued"] < 0:
            raise usage.UsageError("--batch-max-queued must not be negative")
        if self["pty-linger"] < 0 or self["pty-idle-timeout"] < 0:
            raise usage.UsageError("--pty-linger and --pty-idle-timeout must not be negative")
        if self["pty-network"] not in ("none", "host"):
            raise usage.UsageError(f"--pty-network must be none or host, not {self['pty-network']!r}")
        from flynnsched.pty.origin import normalize_origin

        for origin in self["allowed-origin"]:
            if normalize_origin(origin) is None:
                raise usage.UsageError(f"--allowed-origin must be scheme://host[:port], not {origin!r}")


class EngineService(Service):
    """
    Owns the engine client: on start, removes batch containers that a previous run of this
    daemon (``owner``) left behind (their clients are gone); on stop, closes the connection pool.
    """

    def __init__(self, client: DockerClient, owner: str) -> None:
        self.client = client
        self.owner = owner

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._remove_orphans())

    async def _remove_orphans(self) -> None:
        try:
            leftovers = await self.client.list_containers(
                {LABEL_MANAGED: "1", LABEL_JOB_TYPE: "batch", LABEL_OWNER: self.owner}
            )
            for container in leftovers:
                log.info("removing batch container {container_id} left from an earlier run",
                         container_id=container.id)
                await self.client.remove_container(container.id, force=True)
        except EngineError as e:
            log.warn("could not look for leftover batch containers: {error}", error=e.message)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.client.close()


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def default_web_root() -> Path:
    """The web assets installed with the package (or beside it, in a checkout)."""
    from flynnsched.pty.assets import default_web_root as installed_web_root

    return installed_web_root()


def _open_store(reactor: Any, options: Options) -> Any:
    """The daemon's SQLite store in its state directory; its instance id names the daemon."""
    from flynnsched.services.store import SQLiteServiceStore, StoreError

    try:
        return SQLiteServiceStore.open_now(reactor, options["state-dir"])
    except StoreError as e:
        raise SystemExit(f"flynnsched: {e}") from None


def _services(reactor: Any, engine: IDockerEngine, puller: ImagePuller, options: Options, store: Any) -> Service:
    """The service-job supervisor on ``store``."""
    from flynnsched.services.spec import RestartPolicy
    from flynnsched.services.supervisor import ServiceSupervisor

    defaults = RestartPolicy(initial_delay=options["restart-initial-delay"],
                             max_delay=options["restart-max-delay"],
                             reset_after=options["restart-reset-after"])
    if not 0 <= defaults.initial_delay <= defaults.max_delay or defaults.reset_after < 0:
        raise SystemExit("flynnsched: --restart-* delays must satisfy 0 <= initial <= max, reset-after >= 0")
    return ServiceSupervisor(reactor, engine, store, puller, defaults)


def _pty(reactor: Any, engine: IDockerEngine, puller: ImagePuller, options: Options, web_root: Path,
         owner: str) -> Any:
    """The PTY session service and the ``/pty`` resource."""
    from flynnsched.pty.service import build_pty
    from flynnsched.pty.session import PtyConfig

    config = PtyConfig(
        linger=options["pty-linger"],
        idle_timeout=options["pty-idle-timeout"],
        max_sessions=options["pty-max-sessions"],
        ring_bytes=options["pty-history"],
        network=options["pty-network"],
    )
    try:
        return build_pty(reactor, engine, puller, config, options["allowed-origin"], web_root, owner)
    except ValueError as e:
        raise SystemExit(f"flynnsched: {e}") from None


def makeService(options: Options) -> IService:
    """Build the daemon from its options."""
    from twisted.internet import reactor

    state_dir = Path(options["state-dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    top = MultiService()

    client = DockerClient(
        reactor,
        endpoint_factory(
            reactor,
            options["engine-address"],
            _read(options["docker-tls-ca"]),
            _read(options["docker-tls-cert"]),
            _read(options["docker-tls-key"]),
        ),
    )
    store = _open_store(reactor, options)
    owner: str = store.instance_id
    EngineService(client, owner).setServiceParent(top)
    engine: IDockerEngine = client
    puller = ImagePuller(engine, options["pull"])
    batch = BatchRunner(
        engine,
        puller,
        reactor,
        BatchConfig(
            max_running=options["batch-max-running"],
            max_queued=options["batch-max-queued"],
            network=options["batch-network"],
            timeout=options["batch-timeout"] or None,
            owner=owner,
        ),
    )
    services = _services(reactor, engine, puller, options, store)
    services.setServiceParent(top)
    web_root = Path(options["web-root"]) if options["web-root"] else default_web_root()
    pty_service, pty = _pty(reactor, engine, puller, options, web_root, owner)
    pty_service.setServiceParent(top)
    components = Components(batch=batch, services=services, web_root=web_root, pty=pty)

    site = Site(build_root(components))
    site.displayTracebacks = False
    for description in options["listen"]:
        strports.service(description, site).setServiceParent(top)
    log.info("flynnsched on {listen}, engine {engine}", listen=options["listen"], engine=str(options["engine-address"]))
    return top


__all__ = ["Options", "makeService"]
