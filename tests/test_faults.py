"""Upstream faults, injected per request by the fake Sobot: each ends in a clear, honest answer."""

from __future__ import annotations

import asyncio
import hashlib
import socket

import aiohttp
import pytest

from proxy.testing.fake_sobot import FAULT_HEADER, FakeSobot, download_sha256
from tests.conftest import CapturedLogs, blackhole, tokens_of


def fault(value: str) -> dict[str, str]:
    return {FAULT_HEADER: value}


async def sha256_of(response: aiohttp.ClientResponse) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    async for chunk in response.content.iter_chunked(1 << 16):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


async def test_an_html_error_page_passes_through_unchanged(proxy, fake: FakeSobot):
    response = await proxy.get("/api/echo", headers=fault("html502"))
    assert response.status == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert b"502 Bad Gateway" in await response.read()
    assert fake.stats.api_calls == 1  # an upstream's 5xx is never retried


@pytest.mark.parametrize("kind", ["truncate", "reset"])
async def test_an_answer_cut_short_aborts_the_clients_answer(
    proxy, fake: FakeSobot, logs: CapturedLogs, kind
):
    response = await proxy.get("/api/file", headers=fault(kind))
    assert response.status == 200
    assert response.headers["Content-Length"] == "2048"
    with pytest.raises(aiohttp.ClientPayloadError):  # never a short body that looks whole
        await response.read()
    [aborted] = logs.events("upstream_aborted")
    assert aborted["path"] == "/api/file"
    [line] = [e for e in logs.events("request") if e["path"] == "/api/file"]
    assert "broke off" in line["error"]


async def test_a_stalled_answer_gives_504(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(upstream_timeout=0.3)
    async with asyncio.timeout(10):
        response = await proxy.get("/api/echo", headers=fault("stall"))
    assert response.status == 504
    assert (await response.json())["ret_code"] == "980504"


async def test_a_body_that_stalls_midway_is_aborted_after_the_read_timeout(
    make_proxy, fake: FakeSobot, logs: CapturedLogs
):
    proxy = await make_proxy(upstream_timeout=0.3)
    async with asyncio.timeout(10):
        response = await proxy.get("/api/file", headers=fault("stall-body"))
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert logs.events("upstream_aborted")


@pytest.mark.parametrize("kind", ["download", "slow-download"])
async def test_large_downloads_are_byte_exact(proxy, fake: FakeSobot, kind):
    size = 48 * 1024 * 1024 + 7
    async with asyncio.timeout(60):
        response = await proxy.get("/api/file", headers=fault(f"{kind}={size}"))
        assert response.status == 200
        if kind == "download":
            assert response.headers["Content-Length"] == str(size)
        else:
            assert response.headers["Transfer-Encoding"] == "chunked"
        assert await sha256_of(response) == (download_sha256(size), size)


async def test_a_client_that_goes_away_cancels_its_upstream_request(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    await proxy.get("/api/echo")
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(f"GET /api/slow HTTP/1.1\r\nHost: p\r\n{FAULT_HEADER}: stall\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(10):
        await fake.wait_for_api_calls(2)
        writer.close()
        await fake.wait_until_idle()
    assert fake.stats.cancelled_requests == 1
    [line] = [e for e in logs.events("request") if e["path"] == "/api/slow"]
    assert line["error"].startswith("cancelled")


async def test_the_proxy_recovers_by_itself_when_sobot_comes_back(make_proxy, fake: FakeSobot):
    proxy = await make_proxy()
    assert (await proxy.get("/api/echo")).status == 200
    port = int(fake.url.rsplit(":", 1)[1])
    await fake.stop()
    response = await proxy.get("/api/echo")
    assert response.status == 502
    assert (await response.json())["ret_code"] == "980502"
    await fake.start(port=port)
    response = await proxy.get("/api/echo")
    assert (await response.json())["ret_code"] == "000000"


async def test_a_connection_refused_fails_fast_with_502(make_proxy):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = await make_proxy(base_url=f"http://127.0.0.1:{port}", connect_timeout=30)
    async with asyncio.timeout(5):  # refused at once, not after the connect timeout
        response = await proxy.get("/api/echo")
    assert response.status == 502


async def test_a_connection_that_never_completes_gives_504_after_the_connect_timeout(
    make_proxy, fake: FakeSobot
):
    proxy = await make_proxy(connect_timeout=0.3, upstream_timeout=30)
    assert (await proxy.get("/api/echo")).status == 200  # a token is held
    port = int(fake.url.rsplit(":", 1)[1])
    await fake.stop()
    with blackhole(port):
        async with asyncio.timeout(10):
            response = await proxy.get("/api/echo")
    assert response.status == 504
    answer = await response.json()
    assert answer == {"ret_code": "980504", "ret_msg": "could not connect to Sobot in time"}


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "POST"])
async def test_a_connection_dropped_without_an_answer_is_never_resent(
    proxy, fake: FakeSobot, method
):
    """aiohttp would resend an idempotent request on a failed kept-alive connection; the
    request may already have reached Sobot, so the proxy never does."""
    await proxy.get("/api/echo")  # a kept-alive connection to reuse
    response = await proxy.request(method, "/api/drop", headers=fault("drop"))
    assert response.status == 502
    assert [r.path for r in fake.received].count("/api/drop") == 1


async def test_a_full_pool_never_keeps_the_token_from_being_renewed(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(upstream_connections=1)
    await proxy.get("/api/echo")
    stalled = asyncio.create_task(proxy.get("/api/slow", headers=fault("stall")))
    async with asyncio.timeout(10):
        await fake.wait_for_api_calls(2)
        fake.expire_token()
        calls = fake.stats.get_token_calls
        # The only pooled connection is taken, and still a new token comes at once.
        held = tokens_of(proxy).current()
        assert held is not None
        await tokens_of(proxy).replace(held)
        assert fake.stats.get_token_calls == calls + 1
    stalled.cancel()
