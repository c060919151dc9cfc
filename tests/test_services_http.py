"""
``/services`` over HTTP, in memory: the resource tree on the fake engine through ``StubTreq``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from flynnsched.http.root import Components, build_root
from flynnsched.services.http import MAX_BODY
from flynnsched.services.store import MemoryServiceStore
from flynnsched.services.supervisor import ServiceSupervisor
from flynnsched.testing import FakeDockerEngine

from .conftest import result

BASE = "http://flynnsched"


class Client:
    """A ``StubTreq`` on a tree with the services resource, and helpers that flush and decode."""

    def __init__(self, clock: Clock, engine: FakeDockerEngine) -> None:
        self.supervisor = ServiceSupervisor(clock, engine, MemoryServiceStore(), random=lambda: 0.0)
        self.supervisor.startService()
        self.stub: Any = StubTreq(build_root(Components(batch=None, services=self.supervisor)))

    def request(self, method: str, path: str, **kw: Any) -> tuple[Any, bytes]:
        response = result(self.stub.request(method, BASE + path, **kw))
        self.stub.flush()
        body = result(self.stub.content(response))
        return response, body

    def json(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        response, body = self.request(method, path, **kw)
        if response.code == 204:
            assert body == b""
            return 204, None
        assert response.headers.getRawHeaders("content-type")[0] == "application/json"
        return response.code, json.loads(body)

    def post(self, body: Any, content_type: str = "application/json", **kw: Any) -> tuple[Any, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": [content_type]} if content_type else {}
        headers.update(kw.pop("headers", {}))
        response, raw = self.request("POST", "/services", data=data, headers=headers, **kw)
        return response, json.loads(raw)


@pytest.fixture
def client(clock: Clock, fake_engine: FakeDockerEngine) -> Client:
    """An in-memory HTTP client of ``/services`` on the fake engine."""
    return Client(clock, fake_engine)


def test_post_creates_a_service(client: Client, fake_engine: FakeDockerEngine) -> None:
    """POST answers 201 with a Location and the service as JSON, its container running."""
    response, body = client.post({"image": "flynn/busybox", "cmd": ["sleep", "100"], "name": "web"})
    assert response.code == 201
    assert response.headers.getRawHeaders("location") == [f"/services/{body['id']}"]
    assert body["state"] == "running" and body["restarts"] == 0 and body["name"] == "web"
    assert body["container_id"] in fake_engine.containers
    assert body["image"] == "flynn/busybox" and body["cmd"] == ["sleep", "100"]
    assert body["restart"] == {"policy": "always", "max_restarts": None, "initial_delay": 1.0,
                               "max_delay": 300.0, "reset_after": 600.0, "jitter": 0.1}
    assert body["last_exit"] is None and body["next_restart_at"] is None
    assert [h["event"] for h in body["history"]] == ["created", "started"]
    code, shown = client.json("GET", response.headers.getRawHeaders("location")[0])
    assert code == 200 and shown["id"] == body["id"]
    code, by_name = client.json("GET", "/services/web")
    assert code == 200 and by_name["id"] == body["id"]
    code, listing = client.json("GET", "/services")
    assert code == 200 and [s["id"] for s in listing["services"]] == [body["id"]]
    assert listing["engine_reachable"] is True and listing["last_reconcile"] is not None


def test_curl_style_body_is_accepted(client: Client) -> None:
    """``curl -d '{…}'`` (a form content type, no Origin) is read as JSON."""
    response, body = client.post({"image": "flynn/busybox", "cmd": ["sleep", "9"]},
                                 content_type="application/x-www-form-urlencoded")
    assert response.code == 201, body


def test_browser_form_body_is_refused(client: Client) -> None:
    """A form-typed body from a browser (it sends Origin) is 415: no cross-site creation."""
    response, body = client.post({"image": "flynn/busybox"}, content_type="text/plain",
                                 headers={"Origin": ["http://evil.example"]})
    assert response.code == 415
    assert client.supervisor.views() == []


@pytest.mark.parametrize(
    "data, content_type, status, needle",
    [
        (b"image=flynn/busybox", "application/x-www-form-urlencoded", 415, "not JSON"),
        (b"<xml/>", "application/xml", 415, "application/json"),
        (b"{nope", "application/json", 400, "not valid JSON"),
        (b"x" * (MAX_BODY + 1), "application/json", 413, "at most"),
        (b'{"image": "flynn/busybox", "replicas": 3}', "application/json", 400, "replicas: unknown field"),
        (b'{"image": "flynn/busybox", "cmd": "sleep 1"}', "application/json", 400, "cmd: must be a list"),
        (b'{"cmd": ["true"]}', "application/json", 400, "image: is required"),
        (b'{"image": "Bad Image"}', "application/json", 400, "image: "),
        (b'{"image": "flynn/busybox", "restart": {"policy": "sometimes"}}', "application/json", 400,
         "restart.policy"),
        (b'{"image": "flynn/nothere"}', "application/json", 400, "image: "),
    ],
)
def test_bad_bodies(client: Client, data: bytes, content_type: str, status: int, needle: str) -> None:
    """Bad bodies get the right status and a JSON error naming the problem; nothing is created."""
    response, body = client.post(data, content_type=content_type)
    assert response.code == status
    assert needle in body["error"]
    assert client.supervisor.views() == []


def test_name_conflict(client: Client) -> None:
    """A second service with a taken name is 409."""
    client.post({"image": "flynn/busybox", "cmd": ["sleep", "9"], "name": "one"})
    response, body = client.post({"image": "flynn/busybox", "cmd": ["sleep", "9"], "name": "one"})
    assert response.code == 409 and "one" in body["error"]


def test_restart_count_rises_with_backoff(client: Client, clock: Clock) -> None:
    """Successive GETs of a crashing service show the restart count rising as the backoff says."""
    _, body = client.post({"image": "flynn/busybox", "cmd": ["sh", "-c", "sleep 1; exit 1"]})
    path = f"/services/{body['id']}"
    clock.advance(1.0)
    _, shown = client.json("GET", path)
    assert shown["state"] == "backoff" and shown["restarts"] == 0
    assert shown["last_exit"]["code"] == 1 and shown["last_exit"]["oom_killed"] is False
    assert shown["next_restart_in"] == pytest.approx(1.0)
    assert shown["next_restart_at"].endswith("Z")
    clock.advance(1.0)
    assert client.json("GET", path)[1]["restarts"] == 1
    clock.advance(1.0)
    _, shown = client.json("GET", path)
    assert shown["state"] == "backoff" and shown["next_restart_in"] == pytest.approx(2.0)
    assert [h["event"] for h in shown["history"]][-3:] == ["started", "died", "backoff"]
    assert shown["history"][-2]["exit_code"] == 1


def test_delete(client: Client, clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """DELETE answers 204 once the container is stopped and removed; then GET is 404."""
    _, body = client.post({"image": "flynn/busybox", "cmd": ["sleep", "100"], "stop_grace_period": 0})
    pending = client.stub.delete(BASE + f"/services/{body['id']}")
    answered: list[Any] = []

    def answer(response: Any) -> Any:
        answered.append(response)
        return response

    pending.addBoth(answer)
    client.stub.flush()
    assert answered == []
    clock.advance(0)  # the grace period of 0 s
    client.stub.flush()
    response = result(pending)
    assert response.code == 204 and result(client.stub.content(response)) == b""
    assert body["container_id"] not in fake_engine.containers
    code, error = client.json("GET", f"/services/{body['id']}")
    assert code == 404 and body["id"] in error["error"]
    assert client.json("DELETE", f"/services/{body['id']}")[0] == 404


def test_methods_not_allowed(client: Client) -> None:
    """Other methods get a JSON 405 with Allow."""
    response, raw = client.request("PUT", "/services")
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["GET, POST"]
    assert "PUT" in json.loads(raw)["error"]
    response, _ = client.request("POST", "/services/abc")
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["GET, DELETE"]


def test_engine_outage(client: Client, clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """With the engine away, reads still answer; POST and DELETE are 503 with Retry-After."""
    _, body = client.post({"image": "flynn/busybox", "cmd": ["sleep", "100"]})
    fake_engine.go_down()
    assert client.json("GET", f"/services/{body['id']}")[0] == 200
    code, listing = client.json("GET", "/services")
    assert code == 200 and listing["engine_reachable"] is False
    for method, path, kw in [("DELETE", f"/services/{body['id']}", {}),
                             ("POST", "/services", {"data": b'{"image": "flynn/busybox"}',
                                                    "headers": {"Content-Type": ["application/json"]}}),
                             ("GET", f"/services/{body['id']}/logs", {})]:
        response, raw = client.request(method, path, **kw)
        assert response.code == 503, (method, raw)
        assert response.headers.getRawHeaders("retry-after") == ["5"]
    fake_engine.come_back()
    clock.advance(5)
    assert client.json("GET", "/services")[1]["engine_reachable"] is True


def test_logs(client: Client, clock: Clock, fake_engine: FakeDockerEngine) -> None:
    """Logs give the current container's output, the previous one's, a tail, and NDJSON."""
    _, body = client.post({"image": "flynn/busybox", "cmd": ["sleep", "100"]})
    path = f"/services/{body['id']}/logs"
    assert client.request("GET", path + "?previous=1")[0].code == 404
    fake_engine.emit_output(body["container_id"], b"one\n")
    fake_engine.emit_output(body["container_id"], b"two\n", stream=2)
    fake_engine.exit(body["container_id"], 1)
    clock.advance(1.0)
    _, now = client.json("GET", f"/services/{body['id']}")
    fake_engine.emit_output(now["container_id"], b"three\n")
    response, raw = client.request("GET", path)
    assert response.code == 200 and raw == b"three\n"
    assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    assert client.request("GET", path + "?previous=1")[1] == b"one\ntwo\n"
    assert client.request("GET", path + "?previous=1&tail=1")[1] == b"two\n"
    response, raw = client.request("GET", path + "?previous=1", headers={"Accept": ["application/x-ndjson"]})
    assert [json.loads(line) for line in raw.splitlines()] == [
        {"stream": "stdout", "data": "one\n"}, {"stream": "stderr", "data": "two\n"},
    ]
    assert client.request("GET", path + "?tail=many")[0].code == 400
    assert client.request("GET", path + "?follow=maybe")[0].code == 400
    assert client.request("GET", "/services/nope/logs")[0].code == 404


def test_logs_follow_streams_until_the_container_stops(client: Client, fake_engine: FakeDockerEngine) -> None:
    """``follow=1`` delivers output as it is written and ends when the container stops."""
    _, body = client.post({"image": "flynn/busybox", "cmd": ["sleep", "100"]})
    response = result(client.stub.get(BASE + f"/services/{body['id']}/logs?follow=1"))
    received: list[bytes] = []
    done = client.stub.collect(response, received.append)
    fake_engine.emit_output(body["container_id"], b"live\n")
    client.stub.flush()
    assert b"".join(received) == b"live\n"
    assert not done.called
    fake_engine.exit(body["container_id"], 0)
    client.stub.flush()
    result(done)
    assert b"".join(received) == b"live\n"
