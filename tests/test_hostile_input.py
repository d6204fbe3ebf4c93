"""Property: whatever path, query and headers a client sends, the proxy never answers 500,
never forwards outside /api/, and never shows a secret (hypothesis, against real processes)."""

from __future__ import annotations

import socket
import string
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol import make_sign
from tests.processes import STACK_APP_KEY, STACK_APPID, Stack, http_get, stack

URL_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%\\"
PIECES = ["..", ".", "%2e", "%2E", "%2f", "%2F", "%5c", "%00", "%25", "//", "api", "get_token", "/"]
HEADER_NAME = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=20)
HEADER_VALUE = st.text(string.printable.strip("\r\n\x0b\x0c") + " ", max_size=60)


@st.composite
def targets(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(st.sampled_from(PIECES), st.text(URL_CHARS, max_size=8))))
    prefix = draw(st.sampled_from(["/", "//", "/api/", "//api/", "/api", "/API/", ""]))
    path = prefix + "/".join(parts)
    query = draw(st.one_of(st.none(), st.text(URL_CHARS + "?=&", max_size=30)))
    return path if query is None else f"{path}?{query}"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("hostile")) as started:
        yield started


def managed_token(proxy_url: str) -> str:
    """The token, as a client that proves it knows the app_key may see it."""
    create_time = str(int(time.time()))
    sign = make_sign(STACK_APPID, create_time, STACK_APP_KEY)
    query = f"appid={STACK_APPID}&create_time={create_time}&sign={sign}"
    status, answer = http_get(f"{proxy_url}/api/get_token?{query}")
    assert status == 200
    return str(answer["item"]["token"])


def exchange(proxy_url: str, request: bytes) -> bytes:
    host, port = proxy_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "TRACE"]),
    target=targets(),
    headers=st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=6),
)
def test_no_input_gets_a_500_a_forward_outside_api_or_a_secret(
    running: Stack, method: str, target: str, headers: list[tuple[str, str]]
):
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() != "content-length"]
    answer = exchange(running.proxy_url, ("\r\n".join(lines) + "\r\n\r\n").encode())
    status = answer.split(b" ", 2)[1] if answer else b"(closed)"
    assert status != b"500", answer[:300]
    assert STACK_APP_KEY.encode() not in answer
    assert managed_token(running.proxy_url).encode() not in answer
    assert running.fake_stats()["outside_api_calls"] == 0
