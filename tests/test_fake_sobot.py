"""The fake Sobot alone: streamed bodies, faults chosen with X-Fake-Fault, its leak counters, the
prefixes it serves, V6, and two fakes side by side."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import re
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.sobot import v6
from proxy.sobot.v5 import make_sign
from proxy.sobot.v6 import V6Credential
from proxy.testing.fake_sobot import (
    FAULT_HEADER,
    KEPT_BODY_LIMIT,
    FakeSobot,
    download_bytes,
    download_sha256,
    read_companies,
)
from tests.conftest import APP_KEY, APPID
from tests.processes import command_env, http_get, run_command, running

MiB = 1024 * 1024


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def token(fake: FakeSobot, session: aiohttp.ClientSession) -> str:
    return await issue_token(session, fake)


async def issue_token(
    session: aiohttp.ClientSession, fake: FakeSobot, appid: str = APPID, app_key: str = APP_KEY
) -> str:
    """A v5 token from get_token."""
    create_time = str(int(time.time()))
    query = {"appid": appid, "create_time": create_time}
    query["sign"] = make_sign(appid, create_time, app_key)
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


# -- more prefixes, and V6 ------------------------------------------------------------------

V6_APPID = "v6-appid"
V6_SECRET = "v6-secret-0123456789"


@pytest.fixture
async def v6_fake() -> AsyncIterator[FakeSobot]:
    sobot = FakeSobot(APPID, APP_KEY, v6_appid=V6_APPID, v6_secret=V6_SECRET)
    await sobot.start()
    yield sobot
    await sobot.stop()


async def post_token_request(
    session: aiohttp.ClientSession, fake: FakeSobot, body: bytes
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    async with (
        asyncio.timeout(5),
        session.post(f"{fake.url}{v6.TOKEN_PATH}", data=body, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)


async def issue_v6_token(
    session: aiohttp.ClientSession,
    fake: FakeSobot,
    appid: str = V6_APPID,
    secret: str = V6_SECRET,
) -> tuple[int, Any]:
    """/tokens/company, signed as the proxy signs it."""
    request = V6Credential(appid, secret).token_request(time.time())
    assert request.body is not None
    return await post_token_request(session, fake, request.body)


async def v6_call(
    session: aiohttp.ClientSession,
    fake: FakeSobot,
    authorization: str | None,
    path: str = "/callservice/v6/agent/list",
    **headers: str,
) -> tuple[int, Any]:
    if authorization is not None:
        headers["Authorization"] = authorization
    async with asyncio.timeout(5), session.get(f"{fake.url}{path}", headers=headers) as r:
        return r.status, await r.json(content_type=None)


def jwt_claims(token: str) -> Any:
    payload = token.split(".")[1]
    return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def test_a_v6_token_is_a_jwt_and_each_new_one_supersedes_the_last(v6_fake, session):
    status, first = await issue_v6_token(session, v6_fake)
    assert status == 200
    assert first["response_type"] == "token"
    assert first["expires_in"] == 86_400_000  # milliseconds, as the vendor's page shows
    claims = jwt_claims(first["access_token"])
    assert claims["appId"] == V6_APPID
    assert claims["serial"] == 1
    assert 86_399 < claims["exp"] - time.time() <= 86_400.001  # exp is rounded to the ms
    # The proxy's own parser reads the lifetime from the JWT.
    issued = V6Credential(V6_APPID, V6_SECRET).parse_token_answer(
        200, orjson.dumps(first), time.time()
    )
    assert 86_399 < issued.lifetime <= 86_400.001

    _, second = await issue_v6_token(session, v6_fake)
    assert second["access_token"] != first["access_token"]
    assert jwt_claims(second["access_token"])["serial"] == 2
    assert v6_fake.issued_v6_tokens == [first["access_token"], second["access_token"]]
    assert v6_fake.current_v6_token == second["access_token"]

    status, answer = await v6_call(session, v6_fake, f"Bearer {second['access_token']}")
    assert status == 200
    assert answer["data"]["token"] == {"state": "valid", "serial": 2}
    status, answer = await v6_call(session, v6_fake, f"Bearer {first['access_token']}")
    assert status == 401
    assert answer == {
        "code": 401,
        "message": "token has been replaced by a newer one",
        "status": "Error",
    }
    assert v6_fake.received[-1].token_state == "superseded"
    stats = v6_fake.stats
    assert (stats.v6_token_calls, stats.v6_tokens_issued) == (2, 2)
    assert stats.v6_renewals_before_expiry == 1
    assert (stats.v6_api_calls, stats.v6_token_rejections) == (2, 1)
    assert (stats.get_token_calls, stats.api_calls) == (0, 0)  # v5 counts only v5


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"appId": V6_APPID, "secret": "not-the-secret"}, 401, 401002),
        ({"appId": "other-appid", "secret": V6_SECRET}, 401, 401001),
        (b"appId=v6-appid", 400, 400001),
    ],
)
async def test_a_v6_token_request_that_does_not_verify_is_refused(
    v6_fake, session, body, status, code
):
    if isinstance(body, bytes):
        answer = await post_token_request(session, v6_fake, body)
    else:
        answer = await issue_v6_token(session, v6_fake, body["appId"], body["secret"])
    assert answer[0] == status
    assert answer[1]["code"] == code
    assert answer[1]["status"] == "Error"
    assert "access_token" not in answer[1]
    assert v6_fake.issued_v6_tokens == []
    assert v6_fake.stats.v6_token_calls == 1


@pytest.mark.parametrize("state", ["missing", "empty", "unknown", "expired", "superseded"])
async def test_a_v6_call_without_a_valid_token_is_a_401(v6_fake, session, state):
    _, answer = await issue_v6_token(session, v6_fake)
    token = answer["access_token"]
    authorization = {"missing": None, "empty": "Bearer ", "unknown": "Bearer not-a-token"}.get(
        state, f"Bearer {token}"
    )
    if state == "expired":
        v6_fake.expire_token("v6")
    if state == "superseded":
        await issue_v6_token(session, v6_fake)
    status, answer = await v6_call(session, v6_fake, authorization, **{FAULT_HEADER: "html502"})
    assert status == 401  # before the fault
    assert answer["code"] == 401
    assert answer["status"] == "Error"
    assert v6_fake.received[-1].token_state == ("missing" if state == "empty" else state)
    assert v6_fake.stats.v6_token_rejections == 1


@pytest.mark.parametrize(
    ("scheme", "form"), [("Bearer ", "bearer"), ("bearer ", "bearer"), ("", "bare")]
)
async def test_a_v6_call_takes_the_token_with_or_without_bearer(v6_fake, session, scheme, form):
    _, answer = await issue_v6_token(session, v6_fake)
    token = answer["access_token"]
    async with (
        asyncio.timeout(5),
        session.post(
            f"{v6_fake.url}/callservice/tm/task/add?x=1",
            data=b'{"task": 1}',
            headers={"Authorization": f"{scheme}{token}"},
        ) as r,
    ):
        text = await r.text()
    assert r.status == 200
    assert token not in text
    answer = orjson.loads(text)
    assert {key: answer[key] for key in ("apiVersion", "status", "message", "code")} == {
        "apiVersion": "6.2",
        "status": "Success",
        "message": "ok",
        "code": 200,
    }
    echo = answer["data"]
    assert (echo["method"], echo["path"], echo["query"]) == (
        "POST",
        "/callservice/tm/task/add",
        "x=1",
    )
    assert echo["body"] == '{"task": 1}'
    assert echo["authorization_form"] == form
    assert "authorization" not in {name.lower() for name, _value in echo["headers"]}
    received = v6_fake.received[-1]
    assert (received.kind, received.prefix, received.authorization_form) == (
        "v6",
        "/callservice/",
        form,
    )


async def test_the_v6_lifetime_is_set_over_http_and_its_token_expires(session):
    clock = [1000.0]
    fake = FakeSobot(APPID, APP_KEY, v6_appid=V6_APPID, v6_secret=V6_SECRET, clock=lambda: clock[0])
    await fake.start()
    try:
        async with (
            asyncio.timeout(5),
            session.post(f"{fake.url}/_fake/lifetime?seconds=2.5&kind=v6") as r,
        ):
            assert r.status == 200
        _, answer = await issue_v6_token(session, fake)
        assert answer["expires_in"] == 2500
        assert 2.4 < jwt_claims(answer["access_token"])["exp"] - time.time() <= 2.501
        assert fake.current_token is None  # the v5 token is another matter
        clock[0] += 2.4
        assert (await v6_call(session, fake, answer["access_token"]))[0] == 200
        clock[0] += 0.1
        status, _ = await v6_call(session, fake, answer["access_token"])
        assert status == 401
        assert fake.received[-1].token_state == "expired"
    finally:
        await fake.stop()


async def test_expire_over_http_takes_a_kind(v6_fake, session):
    _, answer = await issue_v6_token(session, v6_fake)
    for kind, status in (("v7", 400), ("v5", 200)):
        async with (
            asyncio.timeout(5),
            session.post(f"{v6_fake.url}/_fake/expire?kind={kind}") as r,
        ):
            assert r.status == status
    assert v6_fake.current_v6_token == answer["access_token"]  # v5's expiry is not v6's
    async with asyncio.timeout(5), session.post(f"{v6_fake.url}/_fake/expire?kind=v6") as r:
        assert r.status == 200
    assert v6_fake.current_v6_token is None


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [("http500", 500, None), ("401", 401, 401), ("10002", 200, 10002), ("malformed", 200, None)],
)
async def test_v6_token_calls_fail_as_told(v6_fake, session, mode, status, code):
    async with (
        asyncio.timeout(5),
        session.post(f"{v6_fake.url}/_fake/fail-get-token?mode={mode}&times=1&kind=v6") as r,
    ):
        assert r.status == 200
    request = V6Credential(V6_APPID, V6_SECRET).token_request(time.time())
    async with (
        asyncio.timeout(5),
        session.post(f"{v6_fake.url}{v6.TOKEN_PATH}", data=request.body) as r,
    ):
        assert r.status == status
        text = await r.text()
    assert "access_token" not in text
    if code is not None:
        assert orjson.loads(text) == {"code": code, "message": "refused", "status": "Error"}
    status, answer = await issue_v6_token(session, v6_fake)  # only once
    assert (status, answer["response_type"]) == (200, "token")
    assert v6_fake.stats.v6_token_calls == 2


async def test_a_v6_failure_mode_must_be_known(v6_fake, session):
    with pytest.raises(ValueError, match="v6 failure mode"):
        v6_fake.fail_get_token("sign-error", kind="v6")
    async with (
        asyncio.timeout(5),
        session.post(f"{v6_fake.url}/_fake/fail-get-token?mode=oops&kind=v6") as r,
    ):
        assert r.status == 400


async def test_a_v6_disconnect_drops_the_token_call(v6_fake, session):
    v6_fake.fail_get_token("disconnect", kind="v6")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await issue_v6_token(session, v6_fake)
    assert v6_fake.issued_v6_tokens == []


async def test_wait_for_v6_token_calls_returns_on_the_call(v6_fake, session):
    waiter = asyncio.create_task(v6_fake.wait_for_v6_token_calls(1))
    await asyncio.sleep(0)
    assert not waiter.done()
    await issue_v6_token(session, v6_fake)
    async with asyncio.timeout(5):
        await waiter


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        ("/api/5/user/get", "/api/"),
        ("/chat-facebook/api/messenger/send", "/chat-facebook/api/"),
        ("/chat-third/api/5/order/receive_order_data", "/chat-third/api/"),
        ("/comm-open/api/call/5/record", "/comm-open/api/"),
        ("/text/ai-agent-open/ask/ask_init", "/text/ai-agent-open/"),
    ],
)
async def test_every_v5_prefix_checks_the_token_and_echoes(fake, session, token, path, prefix):
    for sent, ret_code in (({}, "900001"), ({"token": "stale"}, "900002")):
        async with asyncio.timeout(5), session.post(f"{fake.url}{path}", headers=sent) as r:
            assert (r.status, (await r.json())["ret_code"]) == (200, ret_code)
    async with (
        asyncio.timeout(5),
        session.post(f"{fake.url}{path}", headers={"token": token}) as r,
    ):
        answer = await r.json()
    assert answer["ret_code"] == "000000"
    assert answer["item"]["path"] == path
    assert answer["item"]["token"] == {"state": "valid", "serial": 1}
    assert (fake.received[-1].kind, fake.received[-1].prefix) == ("v5", prefix)
    assert (fake.stats.api_calls, fake.stats.outside_api_calls) == (3, 0)


@pytest.mark.parametrize(
    "path", ["/callservice/v6/x", "/tokens/company", "/apix/a", "/chat-facebook/x", "/"]
)
async def test_paths_outside_the_served_prefixes_are_404(fake, session, token, path):
    # `fake` has no V6 credential: its v6 prefixes and /tokens/company are not served.
    async with (
        asyncio.timeout(5),
        session.post(f"{fake.url}{path}", headers={"token": token}) as r,
    ):
        assert r.status == 404
    stats = fake.stats
    assert (stats.outside_api_calls, stats.api_calls, stats.v6_api_calls) == (1, 0, 0)


async def test_a_path_that_leaves_its_prefix_for_the_servlet_container_is_counted(v6_fake, session):
    _, answer = await issue_v6_token(session, v6_fake)
    # aiohttp keeps %2F in the path it routes by; a servlet container decodes it, then
    # resolves the dot segment: /api/x, which the V6 token must never reach.
    await v6_call(session, v6_fake, answer["access_token"], "/callservice/..%2Fapi/x")
    assert v6_fake.received[-1].prefix == "/callservice/"
    assert v6_fake.stats.outside_api_calls == 1


@pytest.mark.parametrize("fault", ["html502", "download=10", "stall-x"])
async def test_the_fault_header_works_under_v6_and_chat_facebook(v6_fake, session, fault):
    token = await issue_token(session, v6_fake)
    _, answer = await issue_v6_token(session, v6_fake)
    for path, credential in (
        ("/callservice/v6/x", {"Authorization": f"Bearer {answer['access_token']}"}),
        ("/chat-facebook/api/messenger/send", {"token": token}),
    ):
        headers = {**credential, FAULT_HEADER: fault}
        async with asyncio.timeout(5), session.get(f"{v6_fake.url}{path}", headers=headers) as r:
            body = await r.read()
        if fault == "html502":
            assert (r.status, r.content_type) == (502, "text/html")
        elif fault == "download=10":
            assert (r.status, body) == (200, first_bytes(10))
        else:
            assert r.status == 400
            assert FAULT_HEADER.encode() in body
    assert (v6_fake.stats.api_calls, v6_fake.stats.v6_api_calls) == (1, 1)


async def test_a_scripted_answer_comes_under_v6_and_chat_facebook_too(v6_fake, session):
    async with (
        asyncio.timeout(5),
        session.post(
            f"{v6_fake.url}/_fake/script?times=2&status=503", json={"code": 503, "scripted": True}
        ) as r,
    ):
        assert r.status == 200
    for path in ("/callservice/v6/x", "/chat-facebook/api/messenger/send"):
        # Scripted whatever the token: none is sent.
        async with asyncio.timeout(5), session.get(f"{v6_fake.url}{path}") as r:
            assert (r.status, await r.json()) == (503, {"code": 503, "scripted": True})
    status, _answer = await v6_call(session, v6_fake, None)
    assert status == 401  # the script is used up


async def test_two_fakes_with_different_credentials_each_see_only_their_own(session):
    first = FakeSobot(APPID, APP_KEY, v6_appid=V6_APPID, v6_secret=V6_SECRET)
    second = FakeSobot("second-appid", "second-key", v6_appid="second-v6", v6_secret="s6")
    await first.start()
    await second.start()
    try:
        assert first.url != second.url
        tokens = {}
        for fake, appid, key, v6_appid, v6_secret in (
            (first, APPID, APP_KEY, V6_APPID, V6_SECRET),
            (second, "second-appid", "second-key", "second-v6", "s6"),
        ):
            v5_token = await issue_token(session, fake, appid, key)
            _, answer = await issue_v6_token(session, fake, v6_appid, v6_secret)
            tokens[fake.url] = (v5_token, answer["access_token"])
            # The other fake's credentials are unknown here.
            other_v6 = (V6_APPID, V6_SECRET) if fake is second else ("second-v6", "s6")
            status, refused = await issue_v6_token(session, fake, *other_v6)
            assert (status, refused["code"]) == (401, 401001)

        for fake, other in ((first, second), (second, first)):
            own_v5, own_v6 = tokens[fake.url]
            other_v5, other_v6 = tokens[other.url]
            async with (
                asyncio.timeout(5),
                session.get(f"{fake.url}/api/echo", headers={"token": own_v5}) as r,
            ):
                assert (await r.json())["ret_code"] == "000000"
            async with (
                asyncio.timeout(5),
                session.get(f"{fake.url}/api/echo", headers={"token": other_v5}) as r,
            ):
                assert (await r.json())["ret_code"] == "900002"
            assert (await v6_call(session, fake, f"Bearer {own_v6}"))[0] == 200
            assert (await v6_call(session, fake, f"Bearer {other_v6}"))[0] == 401
            assert fake.received[-1].token_state == "unknown"
            stats = fake.stats
            assert (stats.get_token_calls, stats.v6_token_calls) == (1, 2)
            assert (stats.api_calls, stats.v6_api_calls) == (2, 2)
            assert (stats.tokens_issued, stats.v6_tokens_issued) == (1, 1)
    finally:
        await first.stop()
        await second.stop()


async def test_the_stats_endpoint_shows_the_v6_counters(v6_fake, session):
    await issue_v6_token(session, v6_fake)
    async with asyncio.timeout(5), session.get(f"{v6_fake.url}/_fake/stats") as r:
        stats = await r.json()
    counters = ("v6_token_calls", "v6_tokens_issued", "v6_token_serial", "v6_api_calls")
    assert [stats[name] for name in counters] == [1, 1, 1, 0]
    assert stats["token_serial"] == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"v6_appid": "a"}, "go together"),
        ({"v6_secret": "s"}, "go together"),
        ({"prefixes": ("/api",)}, "starts and ends"),
        ({"prefixes": ("api/",)}, "starts and ends"),
        ({"prefixes": ("/a/", "/a/")}, "served once"),
        ({"v6_appid": "a", "v6_secret": "s", "v6_prefixes": ("/api/",)}, "served once"),
    ],
)
def test_a_fake_is_built_with_consistent_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        FakeSobot(APPID, APP_KEY, **arguments)


async def test_the_served_prefixes_are_chosen_and_the_longest_wins(session):
    fake = FakeSobot(
        APPID,
        APP_KEY,
        v6_appid=V6_APPID,
        v6_secret=V6_SECRET,
        prefixes=("/api/",),
        v6_prefixes=("/api/6.0.0/",),
    )
    await fake.start()
    try:
        for path, status in (("/api/6.0.0/x", 401), ("/api/5/x", 200), ("/comm-open/api/x", 404)):
            async with asyncio.timeout(5), session.get(f"{fake.url}{path}") as r:
                assert r.status == status
        assert [r.kind for r in fake.received] == ["v6", "v5"]
    finally:
        await fake.stop()


# -- many companies on one fake ------------------------------------------------------------

COMPANIES = {"appid-b": "key-b", "appid-c": "key-c"}


@pytest.fixture
async def companies_fake() -> AsyncIterator[FakeSobot]:
    sobot = FakeSobot(
        APPID,
        APP_KEY,
        companies=COMPANIES,
        v6_appid=V6_APPID,
        v6_secret=V6_SECRET,
        v6_companies={"v6-b": "secret-b"},
    )
    await sobot.start()
    yield sobot
    await sobot.stop()


async def echo_token(session: aiohttp.ClientSession, fake: FakeSobot, token: str) -> Any:
    """The ret_code of an API call with `token`, and the token state and serial it echoes."""
    async with (
        asyncio.timeout(5),
        session.get(f"{fake.url}/api/echo", headers={"token": token}) as r,
    ):
        answer = await r.json()
    item = answer.get("item") or {}
    return answer["ret_code"], item.get("token")


async def token_call(
    session: aiohttp.ClientSession, fake: FakeSobot, appid: str, app_key: str
) -> str:
    """The ret_code of a get_token for `appid` signed with `app_key`."""
    create_time = str(int(time.time()))
    query = {"appid": appid, "create_time": create_time}
    query["sign"] = make_sign(appid, create_time, app_key)
    async with asyncio.timeout(5), session.get(f"{fake.url}/api/get_token", params=query) as r:
        code: str = (await r.json())["ret_code"]
    return code


async def test_each_company_has_its_own_tokens_and_none_supersedes_another(companies_fake, session):
    fake = companies_fake
    own = await issue_token(session, fake)
    first_b = await issue_token(session, fake, "appid-b", "key-b")
    # Both current: a company's token call leaves the others' tokens alone.
    assert await echo_token(session, fake, own) == ("000000", {"state": "valid", "serial": 1})
    assert await echo_token(session, fake, first_b) == ("000000", {"state": "valid", "serial": 1})

    second_b = await issue_token(session, fake, "appid-b", "key-b")
    assert len({own, first_b, second_b}) == 3
    assert (await echo_token(session, fake, first_b))[0] == "900002"  # b's earlier one only
    assert await echo_token(session, fake, second_b) == ("000000", {"state": "valid", "serial": 2})
    assert await echo_token(session, fake, own) == ("000000", {"state": "valid", "serial": 1})
    assert fake.current_token == own
    assert fake.stats.renewals_before_expiry == 1  # b's second call, not a's after b's

    # Each company's key signs its own calls only; an appid no company has is 900004.
    assert await token_call(session, fake, "appid-c", "key-b") == "900003"
    assert await token_call(session, fake, "appid-d", "key-c") == "900004"
    assert fake.stats.tokens_issued == 3

    # The controls take a company: expiring b's token leaves a's.
    fake.expire_token(appid="appid-b")
    assert (await echo_token(session, fake, second_b))[0] == "900002"
    assert (await echo_token(session, fake, own))[0] == "000000"
    with pytest.raises(ValueError, match="no v5 company 'appid-d'"):
        fake.expire_token(appid="appid-d")


async def test_each_v6_company_has_its_own_tokens(companies_fake, session):
    fake = companies_fake
    _, own = await issue_v6_token(session, fake)
    _, first_b = await issue_v6_token(session, fake, "v6-b", "secret-b")
    _, second_b = await issue_v6_token(session, fake, "v6-b", "secret-b")
    assert jwt_claims(second_b["access_token"])["appId"] == "v6-b"
    assert (await v6_call(session, fake, f"Bearer {own['access_token']}"))[0] == 200
    assert (await v6_call(session, fake, f"Bearer {second_b['access_token']}"))[0] == 200
    assert (await v6_call(session, fake, f"Bearer {first_b['access_token']}"))[0] == 401
    assert fake.received[-1].token_state == "superseded"
    status, refused = await issue_v6_token(session, fake, "v6-b", V6_SECRET)
    assert (status, refused["code"]) == (401, 401002)  # the wrong sign


@pytest.mark.parametrize("over_http", [False, True])
async def test_a_changed_app_key_refuses_the_old_key_and_keeps_tokens_issued(
    companies_fake, session, over_http
):
    fake = companies_fake
    held = await issue_token(session, fake, "appid-b", "key-b")
    held_own = await issue_token(session, fake)
    if over_http:
        async with (
            asyncio.timeout(5),
            session.post(f"{fake.url}/_fake/app-key?appid=appid-b", data=b"new-key-b\n") as r,
        ):
            assert r.status == 200
    else:
        fake.set_app_key("new-key-b", appid="appid-b")

    assert await token_call(session, fake, "appid-b", "key-b") == "900003"  # a wrong sign
    # The token issued before the change still serves, until a new one supersedes it.
    assert await echo_token(session, fake, held) == ("000000", {"state": "valid", "serial": 1})
    assert await token_call(session, fake, "appid-b", "new-key-b") == "000000"
    assert (await echo_token(session, fake, held))[0] == "900002"
    # The other companies' keys are unchanged.
    assert await token_call(session, fake, APPID, APP_KEY) == "000000"
    assert (await echo_token(session, fake, held_own))[0] == "900002"  # superseded just now


async def test_a_changed_v6_secret_refuses_the_old_one(companies_fake, session):
    fake = companies_fake
    _, held = await issue_v6_token(session, fake, "v6-b", "secret-b")
    async with (
        asyncio.timeout(5),
        session.post(f"{fake.url}/_fake/app-key?appid=v6-b&kind=v6", data=b"secret-b2") as r,
    ):
        assert r.status == 200
    status, refused = await issue_v6_token(session, fake, "v6-b", "secret-b")
    assert (status, refused["code"]) == (401, 401002)
    assert (await v6_call(session, fake, f"Bearer {held['access_token']}"))[0] == 200
    status, granted = await issue_v6_token(session, fake, "v6-b", "secret-b2")
    assert (status, granted["response_type"]) == (200, "token")
    assert (await issue_v6_token(session, fake))[0] == 200  # the fake's own V6 company: as it was


@pytest.mark.parametrize(
    ("query", "body", "message"),
    [
        ("appid=appid-b", b"", "empty"),
        ("appid=appid-d", b"k", "no v5 company"),
        ("appid=appid-b&kind=v7", b"k", "kind must be v5 or v6"),
    ],
)
async def test_the_app_key_control_refuses_what_it_cannot_do(
    companies_fake, session, query, body, message
):
    async with (
        asyncio.timeout(5),
        session.post(f"{companies_fake.url}/_fake/app-key?{query}", data=body) as r,
    ):
        assert r.status == 400
        assert message in await r.text()
    assert await token_call(session, companies_fake, "appid-b", "key-b") == "000000"


def test_the_companies_file_is_read_and_its_mistakes_name_the_line(tmp_path):
    path = tmp_path / "companies"
    path.write_text("# appid app_key\n\nappid-b key-b\n  appid-c   key-c  \n")
    assert read_companies(str(path)) == COMPANIES
    for text, message in (
        ("appid-b key-b\nappid-c\n", "line 2: expected `appid app_key`"),
        ("appid-b key-b extra-word\n", "line 1: expected `appid app_key`"),
        ("appid-b key-b\nappid-b other\n", "line 2: that appid is on an earlier line"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)) as raised:
            read_companies(str(path))
        assert "key-b" not in str(raised.value)
        assert "other" not in str(raised.value)


def test_fake_sobot_serves_the_companies_of_its_companies_file(tmp_path):
    companies = tmp_path / "companies"
    companies.write_text("appid-b key-b\n")
    arguments = ("--port", "0", "--appid", "A", "--app-key", "K")
    with running(
        "fake-sobot", *arguments, "--companies-file", str(companies), cwd=tmp_path
    ) as fake:
        base = f"http://127.0.0.1:{fake.wait_for_event('listening')['port']}/api/get_token"
        now = str(int(time.time()))
        for appid, key, code in (
            ("A", "K", "000000"),
            ("appid-b", "key-b", "000000"),
            ("appid-b", "K", "900003"),
        ):
            status, answer = http_get(
                f"{base}?appid={appid}&create_time={now}&sign={make_sign(appid, now, key)}"
            )
            assert (status, answer["ret_code"]) == (200, code), appid
        assert fake.terminate() == 0


def test_fake_sobot_refuses_a_wrong_companies_file_as_a_usage_error(tmp_path):
    companies = tmp_path / "companies"
    companies.write_text("appid-b\n")
    result = run_command(
        "fake-sobot", "--companies-file", str(companies), cwd=tmp_path, env=command_env()
    )
    assert result.returncode == 2
    assert "line 1: expected `appid app_key`" in result.stderr
