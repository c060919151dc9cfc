"""
PTY jobs as a person uses them: headless Chromium on the terminal page of a real daemon on the real
engine. Each test saves a screenshot under ``artifacts/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from flynnsched.docker.interface import LABEL_JOB_ID, NoSuchContainer
from tests.conftest import IN_CI, REPO, make_client, need_engine_or_skip, poll
from tests.test_pty_http import raw_handshake

pytestmark = [pytest.mark.docker, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO / "artifacts"
FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
    "--disable-background-networking --disable-component-update --disable-sync"
).split()


def block(coroutine: Any) -> Any:
    """Run a coroutine on the reactor from a plain test."""
    return pytest_twisted.blockon(Deferred.fromCoroutine(coroutine))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium through Debian's chromedriver, with a fresh profile."""
    if not (os.access(CHROMEDRIVER, os.X_OK) and os.access(CHROMIUM, os.X_OK)):
        message = "chromium and chromium-driver are not installed (make browser)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    options.add_argument("--window-size=1000,700")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def daemon(daemon_factory: Any) -> Any:
    """A real daemon on loopback."""
    return block(daemon_factory())


@pytest.fixture
def engine() -> Iterator[Any]:
    """A client of the real engine, for checking on containers."""
    client = make_client(need_engine_or_skip())
    yield client
    pytest_twisted.blockon(client.close())


@pytest.fixture
def job_ids(engine: Any) -> Iterator[list[str]]:
    """Job ids whose containers are removed after the test, whatever happened."""
    ids: list[str] = []
    yield ids

    async def cleanup() -> None:
        for job_id in ids:
            for container in await engine.list_containers({LABEL_JOB_ID: job_id}):
                try:
                    await engine.remove_container(container.id, force=True)
                except NoSuchContainer:
                    pass

    block(cleanup())


class TerminalPage:
    """The terminal page in the browser, read the way a person reads it."""

    def __init__(self, driver: Any, job_ids: list[str]) -> None:
        self.driver = driver
        self.job_ids = job_ids

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda: self.status("job-id"), what="a job id")
        self.job_ids.append(self.status("job-id"))

    def status(self, name: str) -> str | None:
        from selenium.webdriver.common.by import By

        value = self.driver.find_element(By.ID, "status").get_attribute(f"data-{name}")
        return str(value) if value is not None else None

    def state_text(self) -> str:
        from selenium.webdriver.common.by import By

        return str(self.driver.find_element(By.ID, "state").text)

    def rows(self) -> list[str]:
        rows = self.driver.execute_script(
            "return Array.from(document.querySelectorAll('.xterm-rows > div')).map(e => e.textContent)"
        )
        return [row.replace("\u00a0", " ").rstrip() for row in rows]

    def size(self) -> tuple[int, int]:
        return int(self.status("rows") or 0), int(self.status("cols") or 0)

    def type(self, *keys: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys(*keys)

    def wait(self, predicate: Callable[[], Any], timeout: float = 20, what: str = "the page") -> Any:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: predicate())
        except TimeoutException:
            raise AssertionError(
                f"timed out waiting for {what}; state {self.state_text()!r}, screen:\n" + "\n".join(self.rows())
            ) from None

    def wait_state(self, state: str, timeout: float = 30) -> None:
        self.wait(lambda: self.status("state") == state, timeout, f"state {state}")

    def wait_row(self, text: str, timeout: float = 20) -> None:
        self.wait(lambda: text in self.rows(), timeout, f"a line {text!r}")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture
def page(browser: Any, job_ids: list[str]) -> TerminalPage:
    """The terminal page helper."""
    return TerminalPage(browser, job_ids)


async def container_gone(engine: Any, container_id: str) -> bool:
    """Whether the engine no longer has the container."""
    try:
        await engine.inspect_container(container_id)
    except NoSuchContainer:
        return True
    return False


async def pause(seconds: float) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_shell_echo_and_terminal_size(daemon: Any, page: TerminalPage) -> None:
    """In sh, `echo hello` prints hello and `stty size` matches the terminal, also after a window resize."""
    page.open(f"{daemon.url}/pty/flynn/busybox?sh")
    page.wait_state("running")
    page.type("echo hello\n")
    page.wait_row("hello")
    rows, cols = page.size()
    assert rows > 10 and cols > 40
    page.type("stty size\n")
    page.wait_row(f"{rows} {cols}")
    page.screenshot("pty-shell")

    page.driver.set_window_size(700, 420)
    page.wait(lambda: page.size() != (rows, cols), what="the terminal to follow the window")
    new_rows, new_cols = page.size()
    assert new_cols < cols
    page.type("clear; stty size\n")
    page.wait_row(f"{new_rows} {new_cols}")
    page.screenshot("pty-shell-resized")


@pytest_twisted.ensureDeferred
async def test_vi_exits_with_code_zero_and_its_container_is_removed(daemon: Any, page: TerminalPage, engine: Any) -> None:
    """vi: type text, :q!, and the page shows exit code 0 while the container is removed."""
    page.open(f"{daemon.url}/pty/flynn/busybox?vi")
    page.wait_state("running")
    container_id = page.status("container-id")
    assert container_id
    page.wait(
        lambda: sum(row.startswith("~") for row in page.rows()) > 5 and "No file" in page.rows()[-1],
        what="vi's empty buffer",
    )
    page.type("i")
    page.wait(lambda: page.rows()[-1].startswith("I"), what="insert mode")
    page.type("hello from vi")
    page.wait(lambda: any("hello from vi" in row for row in page.rows()), what="the typed text")
    page.screenshot("pty-vi")
    from selenium.webdriver.common.keys import Keys

    page.type(Keys.ESCAPE)
    page.wait(lambda: not page.rows()[-1].startswith("I"), what="command mode")
    page.type(":q!\n")
    page.wait_state("exited")
    assert page.status("exit-code") == "0"
    assert page.state_text().startswith("exited 0")
    page.screenshot("pty-vi-exited")
    await poll(lambda: container_gone(engine, container_id), 15, what="the container to be removed")


@pytest_twisted.ensureDeferred
async def test_utf8_renders_intact(daemon: Any, page: TerminalPage) -> None:
    """CJK and emoji survive the trip, even split across reads by a long burst of output."""
    page.open(f"{daemon.url}/pty/flynn/busybox?sh")
    page.wait_state("running")
    # The emoji is written as octal escapes: ChromeDriver can only type the Basic Multilingual Plane.
    page.type("S=$(printf '日本語 \\360\\237\\230\\200 ok'); yes \"$S\" | head -n 3000; echo done-$((40+2))\n")
    page.wait_row("done-42")
    rows = page.rows()
    lines = [row for row in rows if "日本語" in row and not row.startswith("/ #")]
    assert len(lines) > 5
    assert set(lines) == {"日本語 😀 ok"}
    assert not any("\ufffd" in row for row in rows)
    page.screenshot("pty-utf8")


@pytest_twisted.ensureDeferred
async def test_reload_comes_back_to_the_same_session(daemon: Any, page: TerminalPage, engine: Any) -> None:
    """Reloading the page mid-session brings back the same container with its earlier output."""
    page.open(f"{daemon.url}/pty/flynn/busybox?sh")
    page.wait_state("running")
    page.type("echo before-$((1+1))\n")
    page.wait_row("before-2")
    container_id = page.status("container-id")
    job_id = page.status("job-id")
    page.driver.refresh()
    page.wait_state("running")
    page.wait_row("before-2")
    assert page.status("container-id") == container_id
    assert page.status("job-id") == job_id
    page.type("echo after-$((2+1))\n")
    page.wait_row("after-3")
    containers = await engine.list_containers({LABEL_JOB_ID: job_id})
    assert [c.id for c in containers] == [container_id]
    page.screenshot("pty-reloaded")


@pytest_twisted.ensureDeferred
async def test_flood_keeps_daemon_memory_bounded_and_ctrl_c_stops_it(daemon: Any, page: TerminalPage) -> None:
    """`yes` for 10 s keeps the daemon's RSS bounded (reported), and Ctrl-C stops it."""
    page.open(f"{daemon.url}/pty/flynn/busybox?sh")
    page.wait_state("running")
    page.type("echo ready\n")
    page.wait_row("ready")
    baseline = rss_kib(daemon.pid)
    page.type("yes\n")
    page.wait(lambda: page.rows().count("y") > 5, what="yes's output")
    samples = []
    started = time.monotonic()
    while time.monotonic() - started < 10:
        samples.append(rss_kib(daemon.pid))
        await pause(0.25)
    page.screenshot("pty-yes")
    from selenium.webdriver.common.keys import Keys

    page.type(Keys.CONTROL, "c")
    page.type(Keys.NULL, "echo stopped-$((3+4))\n")
    page.wait_row("stopped-7", timeout=60)
    after = rss_kib(daemon.pid)
    peak = max(samples)
    report = (
        f"daemon RSS (VmRSS, KiB): before {baseline}, peak during 10 s of yes {peak}, "
        f"after Ctrl-C {after}; growth {peak - baseline} KiB over {len(samples)} samples\n"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "pty-yes-rss.txt").write_text(report)
    print(report)
    assert peak - baseline < 64 * 1024, report
    page.screenshot("pty-yes-stopped")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest_twisted.ensureDeferred
async def test_linger_then_removal_when_the_page_is_gone(daemon_factory: Any, page: TerminalPage, engine: Any) -> None:
    """With no page attached past --pty-linger the container is killed and removed."""
    daemon = await daemon_factory("--pty-linger", "2")
    page.open(f"{daemon.url}/pty/flynn/busybox?sh")
    page.wait_state("running")
    container_id = page.status("container-id")
    page.driver.get("about:blank")
    assert not await container_gone(engine, container_id)
    await poll(lambda: container_gone(engine, container_id), 20, what="the lingering container to be removed")


@pytest_twisted.ensureDeferred
async def test_real_daemon_refuses_foreign_origin_and_bad_tokens(daemon: Any, reactor: Any) -> None:
    """The real daemon answers 403 to a WebSocket from another origin or without a valid token, and starts nothing."""
    import json
    import re
    from html import unescape

    import treq

    async def token() -> str:
        response = await treq.get(daemon.url + "/pty/flynn/busybox?sh")
        body = (await treq.content(response)).decode()
        return str(json.loads(unescape(re.search(r'data-config="([^"]*)"', body).group(1)))["token"])  # type: ignore[union-attr]

    valid = await token()
    protocols = ["flynnsched.pty.v1", "flynnsched.token." + valid]
    assert (await raw_handshake(reactor, daemon.port, "http://evil.example", protocols)) == 403
    assert (await raw_handshake(reactor, daemon.port, daemon.url, ["flynnsched.pty.v1"])) == 403
    assert (await raw_handshake(reactor, daemon.port, daemon.url, ["flynnsched.pty.v1", "flynnsched.token.x"])) == 403
    assert "starting PTY session" not in daemon.log()


#: A TCP forwarder that cuts every connection on SIGUSR1: a network failure on demand.
PROXY = r"""
import asyncio, signal, sys
listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
pairs = set()

async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()

async def handle(client_reader, client_writer):
    server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
    pair = (client_writer, server_writer)
    pairs.add(pair)
    await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
    pairs.discard(pair)

def cut():
    for client_writer, server_writer in list(pairs):
        client_writer.transport.abort()
        server_writer.transport.abort()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, cut)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


@pytest.fixture
def cuttable(daemon: Any) -> Iterator[Any]:
    """A forwarder to the daemon whose connections can be cut; yields (url, cut)."""
    import signal
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", PROXY, str(port), str(daemon.port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{port}", lambda: process.send_signal(signal.SIGUSR1)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest_twisted.ensureDeferred
async def test_page_reconnects_by_itself_after_a_network_failure(cuttable: Any, page: TerminalPage) -> None:
    """When the connection is cut the page reconnects to the same session and continues without repeating output."""
    url, cut = cuttable
    page.open(f"{url}/pty/flynn/busybox?sh")
    page.wait_state("running")
    page.type("echo before-$((2+2))\n")
    page.wait_row("before-4")
    container_id = page.status("container-id")
    assert page.status("connections") == "1"
    cut()
    page.wait(lambda: page.status("connections") == "2" and page.status("state") == "running", what="a reconnection")
    assert page.status("container-id") == container_id
    page.type("echo after-$((5+5))\n")
    page.wait_row("after-10")
    assert page.rows().count("before-4") == 1
    page.screenshot("pty-reconnected")
