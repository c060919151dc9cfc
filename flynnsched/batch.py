"""
Batch jobs: one-off containers whose output streams to a consumer while they run.

``BatchRunner.run`` admits a job (a bounded number run at once, a bounded queue waits), creates
the container (pulling its image first if the engine lacks it), attaches before starting it,
streams its output to a ``BatchSink`` with the consumer's flow control, and always removes the
container at the end — also when the consumer goes away and the run is cancelled. The result is
returned once the exit code is known; the removal follows in the background, holding the job's
slot until the container is gone.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol as TypingProtocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from flynnsched.docker.images import ImagePuller
from flynnsched.docker.interface import (
    LABEL_JOB_ID,
    LABEL_JOB_TYPE,
    LABEL_MANAGED,
    LABEL_OWNER,
    ContainerSpec,
    EngineError,
    IDockerEngine,
    ImageNotFound,
    NoSuchContainer,
)
from flynnsched.docker.mux import Demultiplexer, MuxProtocolError

log = Logger()


#: Seconds between attempts to remove a finished job's container that the engine could not remove.
REMOVE_RETRY = 10.0


class QueueFull(Exception):
    """Too many batch jobs are running and waiting already."""


class StartFailed(Exception):
    """The engine could not start the job's command (missing executable, bad arguments)."""


class BatchSink(TypingProtocol):
    """Where a batch job's output goes."""

    def attached(self, producer: IPushProducer) -> None:
        """The container's output is attached; ``producer`` pauses and resumes it."""

    def started(self, job_id: str) -> None:
        """The container runs: what follows is the job's output."""

    def output(self, stream: int, data: bytes) -> None:
        """A piece of output on ``stream`` (1 stdout, 2 stderr)."""


@attrs.frozen
class BatchConfig:
    """
    How batch jobs run: at most ``max_running`` at once with ``max_queued`` waiting, in the
    ``network`` given, with ``log_driver`` for the engine's own copy of the output (``none`` by
    default: the output streams to the client, and the container is removed after). ``timeout``
    is the longest a job may run, in seconds (None: no limit); a job may ask for less. ``owner``
    is the daemon's instance id, labelled on every container (``LABEL_OWNER``).
    """

    max_running: int = 16
    max_queued: int = 256
    network: str = "none"
    log_driver: str | None = "none"
    timeout: float | None = None
    owner: str = ""


@attrs.frozen
class BatchJob:
    """
    One job: the ``image`` (as the engine names it), its ``cmd`` (None: the image's own), bytes
    for its ``stdin`` (None: no stdin) and the ``timeout`` it asks for in seconds.
    """

    image: str
    cmd: tuple[str, ...] | None = None
    stdin: bytes | None = None
    timeout: float | None = None
    owner: str = ""


@attrs.frozen
class BatchResult:
    """How a job ended: its exit code, and whether it was killed for running past its timeout."""

    exit_code: int
    timed_out: bool = False


class _OutputProtocol(Protocol):
    """Demultiplexes the attached stream into the sink; ``ended`` fires at its end."""

    def __init__(self, sink: BatchSink) -> None:
        self._sink = sink
        self._demux = Demultiplexer()
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            pieces = self._demux.feed(data)
        except MuxProtocolError as e:
            for stream, piece in e.pieces:
                self._sink.output(stream, piece)
            log.error("batch output is not a multiplexed stream: {error}", error=str(e))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for stream, piece in pieces:
            self._sink.output(stream, piece)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if not self.ended.called:
            self.ended.callback(None)


class BatchRunner:
    """Runs batch jobs on ``engine``."""

    def __init__(
        self, engine: IDockerEngine, puller: ImagePuller, clock: IReactorTime, config: BatchConfig = BatchConfig()
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._puller = puller
        self.config = config
        self._slots = DeferredSemaphore(config.max_running)
        self.running: dict[str, str] = {}
        self._unremoved: set[str] = set()

    @property
    def queued(self) -> int:
        """How many jobs wait for a slot."""
        return len(self._slots.waiting)

    def new_job_id(self) -> str:
        return uuid.uuid4().hex

    def effective_timeout(self, asked: float | None) -> float | None:
        """The timeout a job gets: what it asks for, at most the configured limit."""
        limits = [t for t in (asked, self.config.timeout) if t is not None]
        return min(limits) if limits else None

    async def run(self, job: BatchJob, sink: BatchSink, job_id: str | None = None) -> BatchResult:
        """
        Run one job to its end and say how it ended.

        Fails before ``sink.started`` with ``QueueFull``, ``ImageNotFound``, ``StartFailed`` or the
        engine's errors; cancelling the returned coroutine's Deferred kills and removes the container.
        """
        if self._slots.tokens == 0 and len(self._slots.waiting) >= self.config.max_queued:
            raise QueueFull(
                f"{self.config.max_running} batch jobs are running and {self.queued} are waiting"
            )
        job_id = job_id or self.new_job_id()
        await self._slots.acquire()
        removal: list[Deferred[None]] = []
        try:
            return await self._run(job_id, job, sink, removal)
        finally:
            # The job's result goes out as soon as it is known; its slot stays taken until its
            # container is gone, so no more than ``max_running`` containers exist at once.
            if removal:
                removal[0].addBoth(lambda _: self._slots.release())
            else:
                self._slots.release()

    async def _run(self, job_id: str, job: BatchJob, sink: BatchSink, removal: list[Deferred[None]]) -> BatchResult:
        spec = ContainerSpec(
            image=job.image,
            cmd=job.cmd,
            labels={
                LABEL_MANAGED: "1", LABEL_JOB_ID: job_id, LABEL_JOB_TYPE: "batch", LABEL_OWNER: self.config.owner,
            },
            network=self.config.network,
            log_driver=self.config.log_driver,
            open_stdin=job.stdin is not None,
            stdin_once=job.stdin is not None,
        )
        try:
            container_id = await self._engine.create_container(spec)
        except ImageNotFound:
            # Create first and pull only when the image is missing, as ``docker run`` does: the
            # usual case costs no image inspection.
            await self._puller.ensure(job.image)
            container_id = await self._engine.create_container(spec)
        self.running[job_id] = container_id
        log.info("batch job {job_id} created container {container_id}", job_id=job_id, container_id=container_id)
        timer = None
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            log.info("batch job {job_id} ran past its timeout", job_id=job_id)
            self._engine.kill_container(container_id).addErrback(lambda f: f.trap(EngineError))

        try:
            output = _OutputProtocol(sink)
            attachment = await self._engine.attach(container_id, output, stdin=job.stdin is not None)
            sink.attached(attachment)
            try:
                await self._engine.start_container(container_id)
            except NoSuchContainer:
                raise
            except EngineError as e:
                if e.status == 400 or "executable file not found" in e.message or "no such file" in e.message:
                    raise StartFailed(e.message) from None
                raise
            timeout = self.effective_timeout(job.timeout)
            if timeout is not None:
                timer = self._clock.callLater(timeout, expire)
            sink.started(job_id)
            if job.stdin is not None:
                attachment.write(job.stdin)
                attachment.close_stdin()
            await output.ended
            exit_code = int(await self._engine.wait_container(container_id))
            log.info("batch job {job_id} exited with {exit_code}", job_id=job_id, exit_code=exit_code)
            return BatchResult(exit_code, timed_out)
        finally:
            if timer is not None and timer.active():
                timer.cancel()
            del self.running[job_id]
            # Removed in the background: a cancelled job can't stop it, and the result need not wait.
            removal.append(Deferred.fromCoroutine(self._remove(job_id, container_id)))

    async def _remove(self, job_id: str, container_id: str) -> None:
        """
        Remove the container whatever happened, without letting a cancellation stop it. When the
        engine cannot do it now, try again every ``REMOVE_RETRY`` seconds until it can.
        """
        try:
            await self._engine.remove_container(container_id, force=True)
        except NoSuchContainer:
            self._unremoved.discard(container_id)
        except (EngineError, CancelledError) as e:
            log.warn("could not remove container {container_id} of job {job_id} yet: {error}",
                     container_id=container_id, job_id=job_id, error=str(e))
            self._unremoved.add(container_id)
            self._clock.callLater(REMOVE_RETRY, lambda: Deferred.fromCoroutine(self._remove(job_id, container_id)))
        else:
            self._unremoved.discard(container_id)

    def stats(self) -> dict[str, Any]:
        """Counts for the index page and metrics."""
        return {
            "running": len(self.running),
            "queued": self.queued,
            "max_running": self.config.max_running,
            "awaiting_removal": len(self._unremoved),
        }
