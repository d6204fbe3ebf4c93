"""The fake Sobot alone: streamed bodies, faults chosen with X-Fake-Fault, and its leak counters."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import re
import time
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.sobot.v5 import make_sign
from proxy.testing.fake_sobot import (
    FAULT_HEADER,
    KEPT_BODY_LIMIT,
    FakeSobot,
    download_bytes,
    download_sha256,
)
from tests.conftest import APP_KEY, APPID

MiB = 1024 * 1024


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def token(fake: FakeSobot, session: aiohttp.ClientSession) -> str:
    create_time = str(int(time.time()))
    query = {"appid": APPID, "create_time": create_time}
    query["sign"] = make_sign(APPID, create_time, APP_KEY)
    async with asyncio.timeout(5), session.get(f"{fake.url}/api/get_token", params=query) as r:
        answer = await r.json()
    assert answer["ret_code"] == "000000"
    value: str = answer["item"]["token"]
    return value


async def send_raw(fake: FakeSobot, token: str, fault: str):
    """Send a GET with `fault` on a raw socket, so what comes back is seen byte for byte."""
    host, port = fake.url.removeprefix("http://").split(":")
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET /api/echo HTTP/1.1\r\nHost: sobot\r\ntoken: {token}\r\n"
            f"{FAULT_HEADER}: {fault}\r\n\r\n".encode()
        )
        await writer.drain()
    return reader, writer


async def open_raw(fake: FakeSobot, token: str, fault: str):
    """send_raw, then read the status line and headers."""
    reader, writer = await send_raw(fake, token, fault)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


def header(head: bytes, name: str) -> str | None:
    found = re.search(rf"(?im)^{name}: *([^\r]*)\r$", head.decode("latin-1"))
    return found.group(1) if found else None


def first_bytes(count: int) -> bytes:
    return b"".join(download_bytes(count))


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything until the peer closes; raises ConnectionResetError on an RST."""
    received = bytearray()
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            received += chunk
    return bytes(received)


# -- bodies -------------------------------------------------------------------------------


async def test_a_64_mib_upload_is_hashed_streaming_and_not_kept(fake, session, token):
    block = bytes(range(256)) * 256  # 64 KiB
    expected = hashlib.sha256(block * 1024).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(1024):
            yield block

    tracemalloc.start()
    try:
        async with (
            asyncio.timeout(60),
            session.post(f"{fake.url}/api/upload", data=body(), headers={"token": token}) as r,
        ):
            answer = await r.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer["item"]["body_size"] == 64 * MiB
    assert answer["item"]["body_sha256"] == expected
    [received] = fake.received
    assert (received.body, received.body_size, received.body_sha256) == (None, 64 * MiB, expected)
    assert peak < 16 * MiB, f"{peak} bytes at the peak: the upload was held whole somewhere"


@pytest.mark.parametrize(("size", "kept"), [(0, True), (KEPT_BODY_LIMIT, True), (MiB + 1, False)])
async def test_bodies_up_to_the_limit_are_kept(fake, session, token, size, kept):
    body = bytes(i % 251 for i in range(size))
    data = io.BytesIO(body)  # raw bytes over 1 MiB make aiohttp warn
    async with (
        asyncio.timeout(10),
        session.post(f"{fake.url}/api/upload", data=data, headers={"token": token}) as r,
    ):
        assert r.status == 200
    [received] = fake.received
    assert received.body == (body if kept else None)
    assert received.body_size == size
    assert received.body_sha256 == hashlib.sha256(body).hexdigest()


# -- faults -------------------------------------------------------------------------------


async def test_html502_is_a_load_balancer_page(fake, session, token):
    headers = {"token": token, FAULT_HEADER: "html502"}
    async with asyncio.timeout(5), session.get(f"{fake.url}/api/echo", headers=headers) as r:
        assert r.status == 502
        assert r.content_type == "text/html"
        assert "Bad Gateway" in await r.text()
    assert fake.received[-1].headers[FAULT_HEADER] == "html502"


async def test_truncate_sends_half_the_announced_body_then_closes_cleanly(fake, token):
    reader, writer, head = await open_raw(fake, token, "truncate")
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        assert header(head, "Content-Length") == "2048"
        assert header(head, "Content-Type") == "application/octet-stream"
        assert await read_to_end(reader) == first_bytes(1024)
    finally:
        writer.close()


async def test_truncate_is_an_incomplete_payload_for_a_client(fake, session, token):
    headers = {"token": token, FAULT_HEADER: "truncate"}
    async with asyncio.timeout(5), session.get(f"{fake.url}/api/echo", headers=headers) as r:
        assert r.content_length == 2048
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_reset_aborts_the_connection_with_an_rst(fake, token):
    reader, writer, head = await open_raw(fake, token, "reset")
    try:
        assert head.startswith(b"HTTP/1.1 200 ")
        assert header(head, "Content-Length") == "2048"
        assert header(head, "Content-Type") == "application/octet-stream"
        with pytest.raises(ConnectionResetError):
            await read_to_end(reader)
    finally:
        writer.close()


async def test_stall_never_answers_until_the_client_gives_up(fake, session, token):
    headers = {"token": token, FAULT_HEADER: "stall"}
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(5):
            await session.get(f"{fake.url}/api/echo", headers=headers, timeout=timeout)
    assert fake.received[-1].headers[FAULT_HEADER] == "stall"


async def test_stall_body_stops_in_the_middle_of_the_body(fake, session, token):
    headers = {"token": token, FAULT_HEADER: "stall-body"}
    async with asyncio.timeout(5), session.get(f"{fake.url}/api/echo", headers=headers) as r:
        assert r.status == 200
        assert r.content_length == 2048
        assert r.content_type == "application/octet-stream"
        assert await r.content.readexactly(1024) == first_bytes(1024)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await r.content.read(1)


async def test_stop_is_not_held_up_by_stalled_requests(token, fake):
    body_reader, body_writer, _head = await open_raw(fake, token, "stall-body")
    reader, writer = await send_raw(fake, token, "stall")
    try:
        async with asyncio.timeout(5):
            await body_reader.readexactly(1024)
            await fake.stop()
            # Both connections end instead of hanging on.
            assert await body_reader.read() == b""
            assert await reader.read() == b""
    finally:
        writer.close()
        body_writer.close()
    assert fake.stats.open_requests == 0


@pytest.mark.parametrize("size", [0, 1, 65536, 65537, 5 * MiB])
async def test_download_is_exactly_the_pattern(fake, session, token, size):
    headers = {"token": token, FAULT_HEADER: f"download={size}"}
    digest, count = hashlib.sha256(), 0
    async with asyncio.timeout(10), session.get(f"{fake.url}/api/file", headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "application/octet-stream"
        assert r.content_length == size
        async for chunk in r.content.iter_any():
            digest.update(chunk)
            count += len(chunk)
    assert (count, digest.hexdigest()) == (size, download_sha256(size))


@pytest.mark.parametrize("size", [0, 65537, 5 * MiB])
async def test_slow_download_is_chunked(fake, session, token, size):
    headers = {"token": token, FAULT_HEADER: f"slow-download={size}"}
    digest, count = hashlib.sha256(), 0
    async with asyncio.timeout(10), session.get(f"{fake.url}/api/file", headers=headers) as r:
        assert r.status == 200
        assert "Content-Length" not in r.headers
        assert r.headers["Transfer-Encoding"] == "chunked"
        async for chunk in r.content.iter_any():
            digest.update(chunk)
            count += len(chunk)
    assert (count, digest.hexdigest()) == (size, download_sha256(size))


def test_the_download_pattern_does_not_repeat_within_a_block():
    block = first_bytes(65536)
    assert len(block) == 65536
    assert len({block[i : i + 32] for i in range(0, 65536, 32)}) == 2048
    assert first_bytes(65537) == block + block[:1]


async def test_delay_waits_then_answers_normally(fake, session, token):
    headers = {"token": token, FAULT_HEADER: "delay=0.2"}
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5), session.get(f"{fake.url}/api/echo", headers=headers) as r:
        answer = await r.json()
    assert loop.time() - started >= 0.2
    assert answer["ret_code"] == "000000"
    assert answer["item"]["token"]["state"] == "valid"


@pytest.mark.parametrize(
    "value",
    [
        "stal",
        "HTML502",
        "html502=1",
        "download",
        "download=",
        "download=-1",
        "download=1.5",
        "delay=x",
        "delay=-1",
        "delay=nan",
        "delay=inf",
        "",
    ],
)
async def test_an_unknown_fault_is_a_loud_400(fake, session, token, value):
    headers = {"token": token, FAULT_HEADER: value}
    async with asyncio.timeout(5), session.get(f"{fake.url}/api/echo", headers=headers) as r:
        assert r.status == 400
        assert FAULT_HEADER in await r.text()


async def test_a_token_rejection_comes_before_the_fault(fake, session, token):
    for sent, ret_code in (({}, "900001"), ({"token": "stale"}, "900002")):
        headers = {**sent, FAULT_HEADER: "html502"}
        async with asyncio.timeout(5), session.get(f"{fake.url}/api/echo", headers=headers) as r:
            assert r.status == 200
            assert (await r.json())["ret_code"] == ret_code
    assert fake.stats.token_rejections == 2


async def test_a_scripted_answer_comes_before_the_fault(fake, session, token):
    fake.script({"ret_code": "999999", "ret_msg": "scripted"})
    headers = {"token": token, FAULT_HEADER: "stall"}
    async with asyncio.timeout(5), session.get(f"{fake.url}/api/echo", headers=headers) as r:
        assert (await r.json())["ret_msg"] == "scripted"


# -- leak counters -------------------------------------------------------------------------


async def test_a_client_leaving_a_stalled_body_ends_its_handler(fake, token):
    reader, writer, _head = await open_raw(fake, token, "stall-body")
    async with asyncio.timeout(5):
        await reader.readexactly(1024)
    assert fake.stats.open_requests == 1
    writer.close()
    async with asyncio.timeout(5):
        await fake.wait_until_idle()
    assert fake.stats.open_requests == 0
    assert fake.stats.cancelled_requests == 1


async def test_a_client_timing_out_on_a_stall_ends_its_handler(fake, session, token):
    headers = {"token": token, FAULT_HEADER: "stall"}
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(5):
            await session.get(
                f"{fake.url}/api/echo", headers=headers, timeout=aiohttp.ClientTimeout(total=0.3)
            )
    async with asyncio.timeout(5):
        await fake.wait_until_idle()
    assert fake.stats.open_requests == 0
    assert fake.stats.cancelled_requests == 1


async def test_requests_that_end_normally_are_not_counted_as_cancelled(fake, session, token):
    for fault in ("html502", "truncate", "reset", "download=10", "delay=0"):
        headers = {"token": token, FAULT_HEADER: fault}
        async with asyncio.timeout(5), session.get(f"{fake.url}/api/echo", headers=headers) as r:
            with contextlib.suppress(aiohttp.ClientError):  # truncate and reset, on purpose
                await r.read()
    async with asyncio.timeout(5):
        await fake.wait_until_idle()
    assert (fake.stats.open_requests, fake.stats.cancelled_requests) == (0, 0)
    assert fake.stats.api_calls == 5


async def test_wait_until_idle_returns_at_once_when_idle(fake):
    assert fake.stats.open_requests == 0
    waiter = asyncio.create_task(fake.wait_until_idle())
    await asyncio.sleep(0)  # one step of the waiter: it must not have to wait for anything
    assert waiter.done()


async def test_reset_keeps_counting_requests_in_flight(fake, token):
    reader, writer, _head = await open_raw(fake, token, "stall-body")
    async with asyncio.timeout(5):
        await reader.readexactly(1024)
    fake.reset()
    assert fake.stats.open_requests == 1
    writer.close()
    async with asyncio.timeout(5):
        await fake.wait_until_idle()
    assert fake.stats.open_requests == 0


async def test_the_stats_endpoint_shows_the_new_counters(fake, session):
    async with asyncio.timeout(5), session.get(f"{fake.url}/_fake/stats") as r:
        stats = await r.json()
    assert stats["open_requests"] == 0
    assert stats["cancelled_requests"] == 0
