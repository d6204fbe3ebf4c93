"""SIGTERM and SIGINT: stop accepting, let in-flight requests finish within the grace, exit 0."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from proxy.testing.fake_sobot import FAULT_HEADER
from tests.processes import EXIT_TIMEOUT, OPENER, Stack, stack


class Call(threading.Thread):
    """One request through the proxy, in a thread, so the test can signal meanwhile."""

    def __init__(self, url: str, fault: str) -> None:
        super().__init__()
        self.request = urllib.request.Request(url, headers={FAULT_HEADER: fault})
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with OPENER.open(self.request, timeout=30) as response:
                response.read()
                self.status = response.status
        except (urllib.error.URLError, OSError) as exc:
            self.error = exc


def wait_until(check, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout} s")
        time.sleep(0.02)


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def in_flight_at_fake(running: Stack) -> bool:
    return running.fake_stats()["open_requests"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_request_in_flight_finishes_and_the_proxy_exits_0(tmp_path, signum):
    with stack(tmp_path, SOBOT_SHUTDOWN_GRACE="10") as running:
        call = Call(f"{running.proxy_url}/api/slow", "delay=1.5")
        call.start()
        wait_until(lambda: in_flight_at_fake(running), "at the fake")
        started = time.monotonic()
        running.proxy.process.send_signal(signum)
        wait_until(lambda: refuses_connections(running.proxy_url), "refusing new connections")
        call.join(timeout=30)
        assert call.status == 200, call.error
        assert running.proxy.process.wait(timeout=EXIT_TIMEOUT) == 0
        assert time.monotonic() - started < 10  # done when the request was, not at the grace
        [draining] = running.proxy_events("draining")
        assert draining["in_flight"] == 1
        assert running.proxy_events("stopped")
        [line] = [e for e in running.proxy_events("request") if e["path"] == "/api/slow"]
        assert line["status"] == 200


@pytest.mark.parametrize("grace", ["0", "1.5"])
def test_a_request_still_running_after_the_grace_is_cut_and_logged(tmp_path, grace):
    with stack(tmp_path, SOBOT_SHUTDOWN_GRACE=grace) as running:
        call = Call(f"{running.proxy_url}/api/stuck", "stall")
        call.start()
        wait_until(lambda: in_flight_at_fake(running), "at the fake")
        signalled = time.monotonic()
        running.proxy.process.send_signal(signal.SIGTERM)
        assert running.proxy.process.wait(timeout=EXIT_TIMEOUT) == 0
        # Cut when the grace runs out, not at twice it (aiohttp's own shutdown), nor never.
        assert time.monotonic() - signalled < float(grace) + 2.5
        call.join(timeout=30)
        assert call.status is None
        assert call.error is not None  # the connection was closed without an answer
        [line] = [e for e in running.proxy_events("request") if e["path"] == "/api/stuck"]
        assert line["error"] == "cut: still running when the shutdown grace ran out"
        # The cut request's upstream exchange went with it.
        wait_until(lambda: running.fake_stats()["open_requests"] == 0, "idle at the fake")


class Upload(threading.Thread):
    """A slow upload through the proxy: `size` bytes, in pieces, with pauses between them."""

    def __init__(self, url: str, size: int, pieces: int) -> None:
        super().__init__()
        self.url, self.size, self.pieces = url, size, pieces
        self.sent = threading.Event()  # the first piece is on its way
        self.status: int | None = None
        self.answer: bytes = b""
        self.error: BaseException | None = None

    def body(self):
        piece = b"u" * (self.size // self.pieces)
        for index in range(self.pieces):
            yield piece
            if index == 0:
                self.sent.set()
            time.sleep(0.1)

    def run(self) -> None:
        request = urllib.request.Request(
            self.url,
            data=self.body(),
            method="POST",
            headers={"Content-Length": str(self.size // self.pieces * self.pieces)},
        )
        try:
            with OPENER.open(request, timeout=30) as response:
                self.status, self.answer = response.status, response.read()
        except (urllib.error.URLError, OSError) as exc:
            self.error = exc


def test_an_upload_still_arriving_at_sigterm_is_received_whole_and_answered(tmp_path):
    with stack(tmp_path, SOBOT_SHUTDOWN_GRACE="10", SOBOT_UPSTREAM_TIMEOUT="2") as running:
        upload = Upload(f"{running.proxy_url}/api/5/file/upload", 2_000_000, pieces=20)
        upload.start()
        assert upload.sent.wait(10)
        running.proxy.process.send_signal(signal.SIGTERM)  # about 2 s of body still to come
        upload.join(timeout=30)
        assert upload.status == 200, upload.error
        assert b'"body_size":2000000' in upload.answer
        assert running.proxy.process.wait(timeout=EXIT_TIMEOUT) == 0
