"""
Batch jobs over HTTP, in memory: the resource tree on the fake engine through ``StubTreq``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from flynnsched.batch import REMOVE_RETRY, BatchConfig, BatchJob, BatchRunner
from flynnsched.docker.images import ImagePuller
from flynnsched.docker.interface import LABEL_JOB_ID, LABEL_JOB_TYPE, LABEL_MANAGED
from flynnsched.http.root import Components, build_root
from flynnsched.testing import FakeDockerEngine

from .conftest import result


def make_stub(engine: FakeDockerEngine, **config: Any) -> tuple[StubTreq, BatchRunner]:
    runner = BatchRunner(engine, ImagePuller(engine), engine.clock, BatchConfig(**config))
    return StubTreq(build_root(Components(batch=runner))), runner


def get(stub: StubTreq, url: str, **kw: Any) -> tuple[Any, bytes]:
    response = result(stub.get("http://flynnsched" + url, **kw))
    stub.flush()
    body = result(stub.content(response))
    return response, body


def test_plain_output(fake_engine: FakeDockerEngine) -> None:
    """Plain text streams stdout and stderr as they come and names the job in Flynn-Job-Id."""
    stub, _ = make_stub(fake_engine)
    response, body = get(stub, "/batch/flynn/busybox?sh+-c+echo%20out;echo%20err%20%3E%262;exit%203")
    assert response.code == 200
    assert body == b"out\nerr\n"
    job_id = response.headers.getRawHeaders("flynn-job-id")[0]
    assert len(job_id) == 32
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")


def test_ndjson_output(fake_engine: FakeDockerEngine) -> None:
    """NDJSON gives a record per piece with its stream, and the exit code last."""
    stub, _ = make_stub(fake_engine)
    response, body = get(
        stub,
        "/batch/flynn/busybox?sh+-c+echo%20out;echo%20err%20%3E%262;exit%203",
        headers={"Accept": "application/x-ndjson"},
    )
    records = [json.loads(line) for line in body.splitlines()]
    assert records == [
        {"stream": "stdout", "data": "out\n"},
        {"stream": "stderr", "data": "err\n"},
        {"exit": 3},
    ]


def test_container_removed_and_labelled(fake_engine: FakeDockerEngine) -> None:
    """The job's container carries flynnsched's labels and is removed when the job ends."""
    stub, _ = make_stub(fake_engine)
    created: list[Any] = []
    original = fake_engine.create_container
    fake_engine.create_container = lambda spec: (created.append(spec), original(spec))[1]  # type: ignore[method-assign]
    response, _ = get(stub, "/batch/flynn/busybox?true")
    assert response.code == 200
    (spec,) = created
    assert spec.labels[LABEL_MANAGED] == "1"
    assert spec.labels[LABEL_JOB_TYPE] == "batch"
    assert spec.labels[LABEL_JOB_ID] == response.headers.getRawHeaders("flynn-job-id")[0]
    assert spec.network == "none"
    assert fake_engine.containers == {}


@pytest.mark.parametrize("path", ["/batch/UPPER/Case", "/batch/a/../b", "/batch/a//b", "/batch/", "/batch/x:"])
def test_bad_reference(fake_engine: FakeDockerEngine, path: str) -> None:
    """A malformed image reference is a 400 with a JSON error, and nothing is created."""
    stub, _ = make_stub(fake_engine)
    response, body = get(stub, path)
    assert response.code == 400
    assert "image" in json.loads(body)["error"]
    assert fake_engine.containers == {}


def test_bad_command(fake_engine: FakeDockerEngine) -> None:
    """A command that is not UTF-8 is a 400 naming the problem."""
    stub, _ = make_stub(fake_engine)
    response, body = get(stub, "/batch/flynn/busybox?echo+%FF")
    assert response.code == 400
    assert "command" in json.loads(body)["error"]


def test_missing_image(fake_engine: FakeDockerEngine) -> None:
    """An image neither present nor pullable is a 404 after a pull attempt."""
    stub, _ = make_stub(fake_engine)
    response, body = get(stub, "/batch/flynn/nothing-here?true")
    assert response.code == 404
    assert "flynn/nothing-here" in json.loads(body)["error"]
    assert fake_engine.pull_count == 1


def test_pull_when_missing(fake_engine: FakeDockerEngine) -> None:
    """A missing image that a registry has is pulled, then the job runs."""
    fake_engine.registry["flynn/pulled:latest"] = ("echo", "pulled")
    stub, _ = make_stub(fake_engine)
    response, body = get(stub, "/batch/flynn/pulled")
    assert (response.code, body) == (200, b"pulled\n")


def test_engine_down(fake_engine: FakeDockerEngine) -> None:
    """An unreachable engine is a 503 with Retry-After."""
    fake_engine.go_down()
    stub, _ = make_stub(fake_engine)
    response, body = get(stub, "/batch/flynn/busybox?true")
    assert response.code == 503
    assert response.headers.getRawHeaders("retry-after") == ["5"]
    assert "unreachable" in json.loads(body)["error"]


def test_command_cannot_start(fake_engine: FakeDockerEngine) -> None:
    """A command missing from the image is a 400 with the engine's message; the container is removed."""
    stub, _ = make_stub(fake_engine)
    response, body = get(stub, "/batch/flynn/busybox?no-such-program")
    assert response.code == 400
    assert "no-such-program" in json.loads(body)["error"]
    assert fake_engine.containers == {}


def test_queue_full(fake_engine: FakeDockerEngine, clock: Clock) -> None:
    """Past the running and queued limits a job is refused with 503 and Retry-After."""
    stub, runner = make_stub(fake_engine, max_running=1, max_queued=0)
    first = stub.get("http://flynnsched/batch/flynn/busybox?sleep+10")
    stub.flush()
    assert runner.stats()["running"] == 1
    response, body = get(stub, "/batch/flynn/busybox?true")
    assert response.code == 503
    assert "queue is full" in json.loads(body)["error"]
    clock.advance(10)
    stub.flush()
    assert result(first).code == 200


def test_queued_job_runs_later(fake_engine: FakeDockerEngine, clock: Clock) -> None:
    """A job beyond the running limit waits in the queue and runs when a slot frees."""
    stub, runner = make_stub(fake_engine, max_running=1, max_queued=1)
    stub.get("http://flynnsched/batch/flynn/busybox?sleep+5")
    second = stub.get("http://flynnsched/batch/flynn/busybox?echo+later")
    answered: list[Any] = []
    second.addCallback(lambda r: answered.append(r) or r)
    stub.flush()
    assert runner.stats()["queued"] == 1
    assert answered == []
    clock.advance(5)
    stub.flush()
    response = result(second)
    assert response.code == 200
    assert result(stub.content(response)) == b"later\n"


def test_unknown_path(fake_engine: FakeDockerEngine) -> None:
    """An unknown path is a JSON 404."""
    stub, _ = make_stub(fake_engine)
    response, body = get(stub, "/nothing")
    assert response.code == 404
    assert json.loads(body)["error"] == "no such resource: /nothing"


def test_cancel_removes_container(fake_engine: FakeDockerEngine, clock: Clock) -> None:
    """Cancelling a running job (its client went away) kills and removes its container."""
    runner = BatchRunner(fake_engine, ImagePuller(fake_engine), clock)

    class Sink:
        def attached(self, producer: Any) -> None:
            pass

        def started(self, job_id: str) -> None:
            pass

        def output(self, stream: int, data: bytes) -> None:
            pass

    d = Deferred.fromCoroutine(runner.run(BatchJob("flynn/busybox:latest", ("sleep", "100")), Sink()))
    assert len(fake_engine.containers) == 1
    failures: list[Any] = []
    d.addErrback(failures.append)
    d.cancel()
    assert [f.type for f in failures] == [CancelledError]
    assert fake_engine.containers == {}
    assert runner.stats()["running"] == 0


def test_post_body_is_stdin(fake_engine: FakeDockerEngine) -> None:
    """A POST's body is the job's stdin, closed at its end."""
    stub, _ = make_stub(fake_engine)
    response = result(stub.post("http://flynnsched/batch/flynn/busybox?cat", data=b"line one\nline two\n"))
    stub.flush()
    assert response.code == 200
    assert result(stub.content(response)) == b"line one\nline two\n"


def test_timeout_kills(fake_engine: FakeDockerEngine, clock: Clock) -> None:
    """A job running past its Flynn-Timeout is killed, and the NDJSON exit record says so."""
    stub, _ = make_stub(fake_engine)
    d = stub.get(
        "http://flynnsched/batch/flynn/busybox?sleep+60",
        headers={"Accept": "application/x-ndjson", "Flynn-Timeout": "2.5"},
    )
    stub.flush()
    clock.advance(2.4)
    assert len(fake_engine.containers) == 1
    clock.advance(0.2)
    stub.flush()
    body = result(stub.content(result(d)))
    assert [json.loads(line) for line in body.splitlines()] == [{"exit": 137, "timed_out": True}]
    assert fake_engine.containers == {}


def test_daemon_timeout_caps_request(fake_engine: FakeDockerEngine) -> None:
    """A job gets the smaller of the timeout it asks for and the daemon's limit."""
    runner = BatchRunner(fake_engine, ImagePuller(fake_engine), fake_engine.clock, BatchConfig(timeout=10))
    assert runner.effective_timeout(None) == 10
    assert runner.effective_timeout(30) == 10
    assert runner.effective_timeout(3) == 3
    unlimited = BatchRunner(fake_engine, ImagePuller(fake_engine), fake_engine.clock)
    assert unlimited.effective_timeout(None) is None


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_bad_timeout(fake_engine: FakeDockerEngine, value: str) -> None:
    """A Flynn-Timeout that is not a positive number is a 400 naming the header."""
    stub, _ = make_stub(fake_engine)
    response, body = get(stub, "/batch/flynn/busybox?true", headers={"Flynn-Timeout": value})
    assert response.code == 400
    assert "Flynn-Timeout" in json.loads(body)["error"]
    assert fake_engine.containers == {}


def test_head_runs_nothing(fake_engine: FakeDockerEngine) -> None:
    """A HEAD request never starts a job."""
    stub, _ = make_stub(fake_engine)
    response = result(stub.head("http://flynnsched/batch/flynn/busybox?true"))
    stub.flush()
    assert response.code == 405
    assert fake_engine.containers == {} and fake_engine.pull_count == 0


def test_engine_lost_mid_stream(fake_engine: FakeDockerEngine, clock: Clock) -> None:
    """An engine lost after the stream began ends NDJSON with an error record instead of an exit."""
    stub, runner = make_stub(fake_engine)
    d = stub.get("http://flynnsched/batch/flynn/busybox?sleep+30", headers={"Accept": "application/x-ndjson"})
    stub.flush()
    (container,) = fake_engine.containers.values()
    fake_engine.go_down()
    container.exited(137)
    stub.flush()
    records = [json.loads(line) for line in result(stub.content(result(d))).splitlines()]
    assert len(records) == 1 and "engine failed during the job" in records[0]["error"]
    # The container could not be removed while the engine was away; it is once the engine is back.
    assert runner.stats()["awaiting_removal"] == 1
    fake_engine.come_back()
    clock.advance(REMOVE_RETRY)
    assert fake_engine.containers == {}
    assert runner.stats()["awaiting_removal"] == 0


def test_slot_held_until_container_removed(fake_engine: FakeDockerEngine) -> None:
    """A job answers before its container is removed, but the next job starts only once it is gone."""
    stub, runner = make_stub(fake_engine, max_running=1, max_queued=1)
    gate: Deferred[None] = Deferred()
    remove = fake_engine.remove_container
    fake_engine.remove_container = lambda cid, force=True: gate.addCallback(  # type: ignore[method-assign]
        lambda _: remove(cid, force)
    )
    first, _ = get(stub, "/batch/flynn/busybox?echo+first")
    assert first.code == 200
    second = stub.get("http://flynnsched/batch/flynn/busybox?echo+second")
    stub.flush()
    assert runner.stats()["queued"] == 1 and len(fake_engine.containers) == 1
    fake_engine.remove_container = remove  # type: ignore[method-assign]
    gate.callback(None)
    stub.flush()
    response = result(second)
    assert result(stub.content(response)) == b"second\n"
    assert fake_engine.containers == {}
