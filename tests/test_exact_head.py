"""Answer heads reach the client as Sobot's bytes, with aiohttp's C writer and its pure-Python one.

The first test pins the aiohttp behaviour server/exact_head.py relies on (a private method), so an
aiohttp upgrade that changes it fails here, not in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.helpers import NO_EXTENSIONS

from proxy.server.exact_head import ExactHeadResponse, ExactHeadStreamResponse
from proxy.testing.fake_sobot import GBK_DISPOSITION, PARTIAL_SENT, UTF8_NAME, FakeSobot
from tests.processes import stack
from tests.test_hostile_input import exchange

GBK_NAME = GBK_DISPOSITION.partition(b": ")[2]
# What aiohttp's parser (and the upstream client) makes of those bytes: surrogateescape.
GBK_TEXT = GBK_NAME.decode("utf-8", "surrogateescape")


def head_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[0]


@pytest.fixture
async def exact_app() -> AsyncIterator[str]:
    """A bare aiohttp server answering with the exact-head classes: aiohttp and nothing else."""

    async def whole(_request: web.Request) -> web.StreamResponse:
        return ExactHeadResponse(body=b"whole", headers={"Content-Disposition": GBK_TEXT})

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = ExactHeadStreamResponse(headers={"Content-Disposition": GBK_TEXT})
        await response.prepare(request)
        await response.write(b"streamed")
        await response.write_eof()
        return response

    async def ascii_only(_request: web.Request) -> web.StreamResponse:
        return ExactHeadResponse(body=b"plain", headers={"X-Plain": "ascii"})

    app = web.Application()
    app.router.add_get("/whole", whole)
    app.router.add_get("/streamed", streamed)
    app.router.add_get("/ascii", ascii_only)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


async def raw_exchange(host: str, port: int, request: bytes) -> bytes:
    """Send `request` as it is and read everything until the server closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            return await reader.read(-1)
    finally:
        writer.close()


async def raw_get(url: str, target: str, *, version: str = "1.1") -> bytes:
    host, port = url.removeprefix("http://").split(":")
    request = f"GET {target} HTTP/{version}\r\nHost: x\r\nConnection: close\r\n\r\n"
    return await raw_exchange(host, int(port), request.encode())


@pytest.mark.parametrize(
    ("target", "version", "body"),
    [
        ("/whole", "1.1", b"whole"),
        ("/streamed", "1.1", b"8\r\nstreamed\r\n0\r\n\r\n"),  # chunked, framed by aiohttp
        ("/streamed", "1.0", b"streamed"),
    ],
)
async def test_aiohttp_writes_the_head_through_the_overridden_write_headers(
    exact_app, target, version, body
):
    """Pins StreamResponse._write_headers: called once per answer after the framing headers
    are set, and the writer then sends only the body, framed as those headers say."""
    answer = await raw_get(exact_app, target, version=version)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/{version} 200 OK\r\n".encode())
    assert b"\r\nContent-Disposition: " + GBK_NAME + b"\r\n" in head + b"\r\n"
    assert b"\r\nDate: " in head  # aiohttp's _prepare_headers ran before
    assert head.count(b"HTTP/") == 1
    assert rest == body


async def test_an_ascii_head_is_left_to_aiohttp(exact_app):
    answer = await raw_get(exact_app, "/ascii")
    assert head_of(answer).startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nX-Plain: ascii" in answer
    assert answer.endswith(b"\r\n\r\nplain")


def test_the_in_process_proxy_runs_aiohttps_c_writer():
    """So that the in-process tests below cover the C writer, and the process test the other."""
    assert not NO_EXTENSIONS


@pytest.mark.parametrize(
    ("method", "fault"),
    [
        ("GET", "gbk-filename"),  # a download: streamed through
        ("GET", "gbk-filename=text/plain"),  # may be a Sobot answer: read whole, inspected
        ("GET", "gbk-filename=application/json"),
        ("HEAD", "gbk-filename"),  # no body, the length a GET would have
    ],
)
async def test_header_bytes_that_are_not_utf8_reach_the_client_exactly(
    proxy, fake: FakeSobot, method, fault
):
    answer = await raw_exchange(
        proxy.host,
        proxy.port,
        f"{method} /api/export HTTP/1.1\r\nHost: p\r\nX-Fake-Fault: {fault}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    head = head_of(answer)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
    assert b"\r\n" + GBK_DISPOSITION + b"\r\n" in head + b"\r\n"
    assert b"\r\n" + UTF8_NAME + b"\r\n" in head + b"\r\n"
    assert f"\r\nContent-Length: {PARTIAL_SENT}\r\n".encode() in head + b"\r\n"
    assert len(answer) - len(head) - 4 == (0 if method == "HEAD" else PARTIAL_SENT)


def test_header_bytes_that_are_not_utf8_reach_the_client_exactly_in_pure_python_mode(
    tmp_path: Path,
):
    """aiohttp without its C extensions (AIOHTTP_NO_EXTENSIONS=1) writes heads another way."""
    with stack(tmp_path, AIOHTTP_NO_EXTENSIONS="1") as running:
        for fault in ("gbk-filename", "gbk-filename=text/plain"):
            answer = exchange(
                running.proxy_url,
                f"GET /api/export HTTP/1.1\r\nHost: p\r\nX-Fake-Fault: {fault}\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            head = head_of(answer)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
            assert b"\r\n" + GBK_DISPOSITION + b"\r\n" in head + b"\r\n"
            assert b"\r\n" + UTF8_NAME + b"\r\n" in head + b"\r\n"
            assert len(answer) - len(head) - 4 == PARTIAL_SENT
        assert not running.proxy_events("internal_error")
