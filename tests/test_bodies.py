"""Request bodies: streamed to Sobot as they arrive, kept for the one replay, bounded in memory."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
from pathlib import Path

import pytest

from proxy.testing.fake_sobot import FAULT_HEADER, FakeSobot
from tests.conftest import send_raw


def open_files_under(directory: Path) -> list[str]:
    """This process's open files in `directory` (anonymous temp files show as deleted ones)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


async def chunks(data: bytes, size: int = 256 * 1024):
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("size", [1, 1024 * 1024, 1024 * 1024 + 1, 12 * 1024 * 1024])
async def test_a_replayed_upload_reaches_sobot_intact_at_any_size(
    make_proxy, fake: FakeSobot, tmp_path, size
):
    proxy = await make_proxy(temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    fake.expire_token()
    data = os.urandom(size)
    response = await proxy.post("/api/5/file/upload", data=io.BytesIO(data))
    assert (await response.json())["ret_code"] == "000000"
    first, replay = list(fake.received)[1:]
    assert (first.token_state, replay.token_state) == ("expired", "valid")
    digest = hashlib.sha256(data).hexdigest()
    assert first.body_sha256 == replay.body_sha256 == digest
    assert first.body_size == replay.body_size == size
    assert open_files_under(tmp_path) == []


async def test_a_chunked_upload_is_replayed_intact(make_proxy, fake: FakeSobot, tmp_path):
    proxy = await make_proxy(temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    fake.expire_token()
    data = os.urandom(3 * 1024 * 1024)
    response = await proxy.post("/api/5/file/upload", data=chunks(data))
    assert (await response.json())["ret_code"] == "000000"
    first, replay = list(fake.received)[1:]
    assert first.body_sha256 == replay.body_sha256 == hashlib.sha256(data).hexdigest()
    assert replay.headers["Transfer-Encoding"] == "chunked"


async def test_a_large_body_is_spooled_to_an_anonymous_file_that_goes_away(
    make_proxy, fake: FakeSobot, tmp_path
):
    proxy = await make_proxy(temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    fake.hold_answers()
    upload = asyncio.create_task(
        proxy.post("/api/5/file/upload", data=io.BytesIO(os.urandom(3 << 20)))
    )
    async with asyncio.timeout(10):
        await fake.wait_for_received(2)
    [spool] = open_files_under(tmp_path)
    assert spool.endswith("(deleted)")  # unlinked from the start: nothing to leak on disk
    assert list(tmp_path.iterdir()) == []
    fake.release_answers()
    async with asyncio.timeout(10):
        response = await upload
    assert response.status == 200
    assert open_files_under(tmp_path) == []


async def test_a_small_body_never_touches_the_disk(make_proxy, fake: FakeSobot, tmp_path):
    proxy = await make_proxy(temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    fake.hold_answers()
    upload = asyncio.create_task(proxy.post("/api/5/user/save", data=os.urandom(1 << 20)))
    async with asyncio.timeout(10):
        await fake.wait_for_received(2)
    assert open_files_under(tmp_path) == []
    fake.release_answers()
    async with asyncio.timeout(10):
        assert (await upload).status == 200


async def test_a_chunked_body_over_the_cap_gets_413(make_proxy, fake: FakeSobot, tmp_path):
    proxy = await make_proxy(max_body=2 * 1024 * 1024, temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    async with asyncio.timeout(10):
        response = await proxy.post("/api/5/file/upload", data=chunks(os.urandom(3 << 20)))
    assert response.status == 413
    answer = await response.json()
    assert answer["ret_code"] == "980413"
    assert str(2 * 1024 * 1024) in answer["ret_msg"]
    assert response.headers["Connection"] == "close"
    assert open_files_under(tmp_path) == []
    assert [r.token_state for r in fake.received] == ["valid"]  # the cut upload never completed


async def test_a_declared_body_over_the_cap_is_refused_before_it_is_read(
    make_proxy, fake: FakeSobot
):
    proxy = await make_proxy(max_body=1000)
    answer = await send_raw(
        proxy,
        b"POST /api/5/file HTTP/1.1\r\nHost: p\r\nContent-Length: 1001\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413")
    assert fake.stats.api_calls == 0


async def test_a_client_that_stops_sending_its_body_gets_408(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(upstream_timeout=0.3)
    await proxy.get("/api/echo")
    answer = await send_raw(
        proxy,
        b"POST /api/5/user/save HTTP/1.1\r\nHost: p\r\nContent-Length: 100\r\n\r\nonly part",
    )
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"ret_code":"980408"' in answer


async def test_a_slow_upload_that_keeps_moving_is_not_cut(make_proxy, fake: FakeSobot):
    """The read timeout bounds each wait for bytes, not the whole upload."""
    proxy = await make_proxy(upstream_timeout=0.5)
    await proxy.get("/api/echo")

    async def trickle():
        for _ in range(8):
            yield b"x" * 1000
            await asyncio.sleep(0.15)  # a slow client: 1.2 s in all, never 0.5 s without bytes

    async with asyncio.timeout(20):
        response = await proxy.post("/api/5/user/save", data=trickle())
    assert (await response.json())["ret_code"] == "000000"
    assert fake.received[-1].body_size == 8000


async def test_past_the_pool_and_queue_requests_get_503_at_once(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(upstream_connections=1, max_queue=1)
    await proxy.get("/api/echo")
    fake.hold_answers()
    waiting = [asyncio.create_task(proxy.get("/api/echo")) for _ in range(2)]
    async with asyncio.timeout(10):
        await fake.wait_for_api_calls(2)  # the other waits in the proxy's queue
        refused = await proxy.get("/api/echo")
        assert refused.status == 503
        assert (await refused.json())["ret_code"] == "980503"
        assert (await proxy.get("/healthz")).status == 200
        fake.release_answers()
        assert [(await task).status for task in waiting] == [200, 200]
    assert fake.stats.api_calls == 3


async def test_bytes_move_upstream_before_the_client_has_sent_them_all(make_proxy, fake: FakeSobot):
    proxy = await make_proxy()
    await proxy.get("/api/echo")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(
            b"POST /api/5/user/save HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n"
            b"Connection: close\r\n\r\nfirst"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            # Sobot is already receiving the request while half the body is still to come.
            await fake.wait_for_api_calls(2)
            assert fake.stats.open_requests == 1
            writer.write(b"-last")
            await writer.drain()
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert fake.received[-1].body == b"first-last"


async def test_a_client_that_leaves_mid_upload_leaves_no_file_task_or_request_behind(
    make_proxy, fake: FakeSobot, tmp_path
):
    proxy = await make_proxy(temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    tasks_before = len(asyncio.all_tasks())
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"POST /api/5/file/upload HTTP/1.1\r\nHost: p\r\nContent-Length: 10000000\r\n\r\n"
        + os.urandom(3 << 20)
    )
    await writer.drain()
    async with asyncio.timeout(10):
        while not open_files_under(tmp_path):  # noqa: ASYNC110 -- the proxy has no event
            await asyncio.sleep(0.01)
        writer.close()
        await fake.wait_until_idle()
        while open_files_under(tmp_path) or len(asyncio.all_tasks()) > tasks_before:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert fake.stats.cancelled_requests == 1


@pytest.mark.parametrize(
    ("changes", "headers", "status"),
    [
        ({"max_body": 1000}, b"Content-Length: 5000\r\n", b"413"),
        ({"client_keys": ("k" * 20,)}, b"Content-Length: 5\r\n", b"401"),
        ({"allow_methods": ("GET",)}, b"Content-Length: 5\r\n", b"403"),
    ],
)
async def test_expect_100_continue_is_refused_before_the_body_is_sent(
    make_proxy, fake: FakeSobot, changes, headers, status
):
    proxy = await make_proxy(**changes)
    # The final answer comes at once: the body is never sent.
    answer = await send_raw(
        proxy,
        b"POST /api/5/file HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n" + headers + b"\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert b"Connection: close" in answer
    assert b"100 Continue" not in answer
    assert b'"ret_code":"980' in answer
    assert fake.stats.api_calls == 0


async def test_an_expectation_other_than_100_continue_gets_417(proxy, fake: FakeSobot):
    answer = await send_raw(
        proxy,
        b"POST /api/5/file HTTP/1.1\r\nHost: p\r\nExpect: teapot\r\nContent-Length: 5\r\n\r\nhello",
    )
    assert answer.startswith(b"HTTP/1.1 417")
    assert b'"ret_code":"980417"' in answer
    assert fake.stats.api_calls == 0


async def test_an_answer_that_comes_before_the_body_is_sent_is_relayed(make_proxy, fake: FakeSobot):
    """Sobot may answer before reading a body; the rest of the upload must not break it."""
    proxy = await make_proxy(upstream_timeout=2)
    await proxy.get("/api/echo")
    async with asyncio.timeout(20):
        response = await proxy.post(
            "/api/5/file/upload",
            data=chunks(os.urandom(8 << 20)),
            headers={FAULT_HEADER: "early"},
        )
        answer = await response.json()
    assert answer["ret_code"] == "000000"
    assert answer["item"]["body_size"] == 0


# --- the spool budget (SOBOT_SPOOL_LIMIT) ----------------------------------------------------

MIB = 1024 * 1024


async def spool_reserved(proxy) -> float:
    page = await (await proxy.get("/metrics")).text()
    found = re.search(r"^sobot_proxy_spool_reserved_bytes ([0-9.e+]+)$", page, re.M)
    assert found is not None, page
    return float(found.group(1))


async def until_received(fake: FakeSobot, count: int) -> None:
    """Until the fake has read `count` requests whole (it reads a body before recording it)."""
    async with asyncio.timeout(10):
        while len(fake.received) < count:  # noqa: ASYNC110 -- the fake has no event for this
            await asyncio.sleep(0.01)


async def test_a_chunked_body_reserves_max_body_until_it_is_in(
    make_proxy, fake: FakeSobot, tmp_path
):
    proxy = await make_proxy(max_body=4 * MIB, spool_limit=4 * MIB, temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    fake.hold_answers()
    chunked = asyncio.create_task(
        proxy.post("/api/5/file/upload", data=chunks(os.urandom(2 * MIB)))
    )
    await until_received(fake, 2)
    # All in: of the 4 MiB it reserved, it keeps what it put on disk.
    assert await spool_reserved(proxy) == 2 * MIB
    async with asyncio.timeout(10):
        # Another chunked body might be 4 MiB: no room for that.
        refused = await proxy.post("/api/5/file/upload", data=chunks(os.urandom(2 * MIB)))
        assert refused.status == 503
        assert (await refused.json())["ret_code"] == "980503"
        # One that says it is 2 MiB fits beside the first.
        declared = asyncio.create_task(
            proxy.post("/api/5/file/upload", data=io.BytesIO(os.urandom(2 * MIB)))
        )
        await until_received(fake, 3)
        assert await spool_reserved(proxy) == 4 * MIB
        fake.release_answers()
        assert [(await task).status for task in (chunked, declared)] == [200, 200]
    assert await spool_reserved(proxy) == 0


async def test_a_small_body_is_taken_when_the_spool_is_full(make_proxy, fake: FakeSobot, tmp_path):
    """A body kept in memory needs no room on disk: a full spool does not refuse it."""
    proxy = await make_proxy(max_body=2 * MIB, spool_limit=2 * MIB, temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    fake.hold_answers()
    large = asyncio.create_task(
        proxy.post("/api/5/file/upload", data=io.BytesIO(os.urandom(2 * MIB)))
    )
    await until_received(fake, 2)
    small = asyncio.create_task(proxy.post("/api/5/user/save", data=os.urandom(MIB)))
    await until_received(fake, 3)
    fake.release_answers()
    async with asyncio.timeout(10):
        assert [(await task).status for task in (large, small)] == [200, 200]


async def read_interim(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):
        return await reader.readuntil(b"\r\n\r\n")


async def test_the_room_given_at_100_continue_is_the_requests_own(
    make_proxy, fake: FakeSobot, tmp_path
):
    """aiohttp hands the request its expect handler saw to the handler: the room reserved
    there is used, not reserved twice (the budget here holds one body, not two)."""
    proxy = await make_proxy(max_body=2 * MIB, spool_limit=2 * MIB, temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    head = (
        b"POST /api/5/file/upload HTTP/1.1\r\nHost: p\r\nContent-Length: 2097152\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(head)
        assert await read_interim(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
        # Its room is taken: the next one is refused instead of invited.
        refused = await send_raw(proxy, head)
        assert refused.startswith(b"HTTP/1.1 503")
        assert b'"ret_code":"980503"' in refused
        assert b"100 Continue" not in refused
        body = os.urandom(2 * MIB)
        writer.write(body)
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert fake.received[-1].body_sha256 == hashlib.sha256(body).hexdigest()
    assert await spool_reserved(proxy) == 0


@pytest.mark.parametrize(
    "request_head",
    [
        pytest.param(b"Content-Length: 3145728\r\n\r\n" + b"x" * 100, id="mid-body"),
        pytest.param(b"Content-Length: 3145728\r\nExpect: 100-continue\r\n\r\n", id="after-100"),
        pytest.param(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", id="chunked"),
    ],
)
async def test_the_room_comes_back_when_the_client_goes_away(
    make_proxy, fake: FakeSobot, tmp_path, request_head
):
    proxy = await make_proxy(max_body=3 * MIB, spool_limit=3 * MIB, temp_dir=str(tmp_path))
    await proxy.get("/api/echo")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"POST /api/5/file/upload HTTP/1.1\r\nHost: p\r\n" + request_head)
    await writer.drain()
    async with asyncio.timeout(10):
        if b"Expect" in request_head:
            await read_interim(reader)
        while await spool_reserved(proxy) != 3 * MIB:  # noqa: ASYNC110 -- no event for this
            await asyncio.sleep(0.01)
        writer.close()
        while await spool_reserved(proxy):  # noqa: ASYNC110 -- no event for this
            await asyncio.sleep(0.01)
    # And it is all there for the next one.
    response = await proxy.post("/api/5/file/upload", data=chunks(os.urandom(3 * MIB)))
    assert response.status == 200
