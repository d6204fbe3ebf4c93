"""SIGTERM and SIGINT: stop accepting, let in-flight requests finish within the grace, exit 0."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from proxy.fake_sobot import FAULT_HEADER
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


def test_a_request_still_running_after_the_grace_is_cut_and_logged(tmp_path):
    with stack(tmp_path, SOBOT_SHUTDOWN_GRACE="0.5") as running:
        call = Call(f"{running.proxy_url}/api/stuck", "stall")
        call.start()
        wait_until(lambda: in_flight_at_fake(running), "at the fake")
        running.proxy.process.send_signal(signal.SIGTERM)
        assert running.proxy.process.wait(timeout=EXIT_TIMEOUT) == 0
        call.join(timeout=30)
        assert call.status is None
        assert call.error is not None  # the connection was closed without an answer
        [line] = [e for e in running.proxy_events("request") if e["path"] == "/api/stuck"]
        assert line["error"].startswith("cancelled")
        # The cut request's upstream exchange went with it.
        wait_until(lambda: running.fake_stats()["open_requests"] == 0, "idle at the fake")
