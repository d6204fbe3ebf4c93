"""Property: whatever path, query and headers a client sends, the proxy never answers 500,
never forwards outside /api/, and never shows a secret (hypothesis, against real processes)."""

from __future__ import annotations

import json
import socket
import string
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sobot.v5 import make_sign
from tests.processes import STACK_APP_KEY, STACK_APPID, Stack, http_get, stack

URL_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%\\#"
PIECES = [
    "..",
    ".",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%00",
    "%25",
    "//",
    "api",
    "get_token",
    "/",
    # A Java servlet container drops `;parameters`, then resolves dot segments.
    "..;",
    "..;x=1",
    ".;",
    "%2e%2e;",
    "%2E.;jsessionid=1",
    # A fragment would end the path upstream, after `..` too; control characters, encoded.
    "..#",
    "#",
    "%09",
    "%7f",
]
HEADER_NAME = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=20)
# Printable ASCII, text beyond it (sent as UTF-8) and raw bytes that are not UTF-8 (written as
# the surrogates that surrogateescape turns back into those bytes).
HEADER_VALUE = st.text(
    string.printable.strip("\r\n\x0b\x0c") + " " + "é中" + "\udcb1\udca8\udcff", max_size=60
)


@st.composite
def targets(draw: st.DrawFn) -> str:
    # Short paths: each refused segment hides the rest, so long ones test little more.
    segment = st.one_of(st.sampled_from(PIECES), st.text(URL_CHARS, max_size=8))
    parts = draw(st.lists(segment, max_size=5))
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
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    outside_before = running.fake_stats()["outside_api_calls"]
    answer = exchange(running.proxy_url, head)
    status = answer.split(b" ", 2)[1] if answer else b"(closed)"
    assert status != b"500", answer[:300]
    assert STACK_APP_KEY.encode() not in answer
    assert managed_token(running.proxy_url).encode() not in answer
    # Outside /api/ as Sobot's servlet container would resolve the path (FakeSobot.servlet_path).
    assert running.fake_stats()["outside_api_calls"] == outside_before


# aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS=1) lets through bytes its C parser refuses.
CLIENT_KEY = "hostile-client-key-0123456789"
_KEY = f"Authorization: Bearer {CLIENT_KEY}\r\n".encode()
_NOW = str(int(time.time())).encode()
RAW_INPUTS = [
    # (request head without its final CRLF, status, ret_code)
    (b"GET /api/\xff HTTP/1.1\r\n" + _KEY, b"400", b"980400"),
    (
        b"GET /api/get_token?appid=\xff&create_time=" + _NOW + b"&sign=x HTTP/1.1\r\n" + _KEY,
        b"400",
        b"980400",
    ),
    (b"GET /\xff HTTP/1.1\r\n" + _KEY, b"400", b"980400"),
    (b"GET /api/echo HTTP/1.1\r\nAuthorization: Bearer \xff\r\n", b"401", b"980401"),
    (b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer \xb1\xa8\r\n", b"401", b"980401"),
    (
        b"GET /api/echo HTTP/1.1\r\nX-Thing: \xb1\xa8\r\nX-Request-Id: \xff\r\n" + _KEY,
        b"200",
        b"000000",
    ),
    (
        b"GET /api/get_token?appid="
        + STACK_APPID.encode()
        + b"&create_time=1"
        + b"0" * 309
        + b"&sign=x HTTP/1.1\r\n"
        + _KEY,
        b"200",
        b"900003",
    ),
]


@pytest.fixture(scope="module")
def pure_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("pure-python")
    with stack(directory, AIOHTTP_NO_EXTENSIONS="1", SOBOT_PROXY_CLIENT_KEYS=CLIENT_KEY) as s:
        yield s


@pytest.mark.parametrize(("head", "status", "ret_code"), RAW_INPUTS, ids=range(len(RAW_INPUTS)))
def test_raw_bytes_get_a_json_4xx_or_sobots_code_in_pure_python_mode(
    pure_python: Stack, head: bytes, status: bytes, ret_code: bytes
):
    answer = exchange(pure_python.proxy_url, head + b"Host: p\r\nConnection: close\r\n\r\n")
    # A crash anywhere (the log line included: it is written before the answer) is a 500.
    assert answer.split(b" ", 2)[1] == status, answer[:300]
    assert b'"ret_code":"' + ret_code + b'"' in answer


def test_header_rules_hold_whatever_the_case_of_the_clients_header_names(pure_python: Stack):
    """aiohttp's pure-Python parser keeps names as the client spelled them (its C parser gives
    the well-known ones their usual spelling): every rule must hold in lower case too."""
    head = (
        b"POST /api/echo HTTP/1.1\r\nhost: evil.example\r\n"
        + f"authorization: Bearer {CLIENT_KEY}\r\n".encode()
        + b"transfer-encoding: chunked\r\nconnection: close, x-hop\r\nx-hop: hop\r\n"
        b"proxy-connection: keep-alive\r\nx-forwarded-for: 10.1.2.3\r\nx-real-ip: 10.1.2.3\r\n"
        b"forwarded: for=10.1.2.3\r\nx-kept: kept\r\n\r\n"
    )
    answer = exchange(pure_python.proxy_url, head + b"2\r\n{}\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    echo = json.loads(answer.partition(b"\r\n\r\n")[2])["item"]
    received = {name.lower(): value for name, value in echo["headers"]}
    assert echo["body"] == "{}"
    assert received["host"] != "evil.example"
    assert received["x-kept"] == "kept"
    for dropped in (
        "authorization",
        "x-hop",
        "proxy-connection",
        "x-forwarded-for",
        "x-real-ip",
        "forwarded",
    ):
        assert dropped not in received, received
    assert CLIENT_KEY not in json.dumps(echo)


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /api/get_token?appid=a&sign=bad-http-secret-sign\tx HTTP/1.1",
        b"GET /api/get_token?appid=a&sign=bad-http-secret-sign HTTP/1.1 x",
        b"GET bad-http-secret-sign?x=1 HTTP/1.1",  # its message is the bare target
    ],
)
def test_a_request_the_parser_refuses_is_logged_without_its_bytes(
    pure_python: Stack, request_line: bytes
):
    """The pure-Python parser quotes the request in its messages, some without a colon first."""
    refused_before = len(pure_python.proxy_events("bad_http_request"))
    answer = exchange(pure_python.proxy_url, request_line + b"\r\nHost: p\r\n\r\n")
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    # A later request's line is logged after the refusal's: once it is there, so is that one.
    marker = f"/api/after-refusal-{time.monotonic_ns()}"
    exchange(
        pure_python.proxy_url,
        f"GET {marker} HTTP/1.1\r\nHost: p\r\n".encode() + _KEY + b"Connection: close\r\n\r\n",
    )
    pure_python.proxy.wait_for_line(lambda line: marker in line, timeout=10)
    assert len(pure_python.proxy_events("bad_http_request")) == refused_before + 1
    assert "bad-http-secret-sign" not in pure_python.proxy.output
