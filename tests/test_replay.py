"""The one replay: on 900002 / 900001 for the injected token, refresh once and replay once."""

from __future__ import annotations

import asyncio
import os

import pytest

from proxy.testing.fake_sobot import FakeSobot
from tests.conftest import CapturedLogs, tokens_of


async def test_expired_token_is_refreshed_and_the_request_replayed(proxy, fake: FakeSobot):
    await proxy.get("/api/echo")
    fake.expire_token()
    response = await proxy.get("/api/echo")
    assert (await response.json())["ret_code"] == "000000"
    assert fake.stats.get_token_calls == 2
    assert [r.token_state for r in fake.received] == ["valid", "expired", "valid"]


async def test_hundred_concurrent_requests_after_expiry_make_one_get_token(proxy, fake: FakeSobot):
    await proxy.get("/api/echo")
    fake.expire_token()

    async def call(i: int) -> str:
        response = await proxy.post(f"/api/echo?i={i}", data=str(i))
        return (await response.json())["ret_code"]

    async with asyncio.timeout(30):
        codes = await asyncio.gather(*(call(i) for i in range(100)))
    assert codes == ["000000"] * 100
    assert fake.stats.get_token_calls == 2  # the first token, and exactly one refresh
    valid = [r for r in fake.received if r.token_state == "valid"]
    assert len(valid) == 101
    assert {r.token_serial for r in valid[1:]} == {2}


async def test_replayed_body_is_byte_identical(proxy, fake: FakeSobot):
    await proxy.get("/api/echo")
    fake.expire_token()
    body = os.urandom(512 * 1024)
    headers = {"Content-Type": "application/octet-stream", "X-Trace": "t-1"}
    response = await proxy.put("/api/5/file/upload?name=a.bin", data=body, headers=headers)
    assert (await response.json())["ret_code"] == "000000"
    first, replay = list(fake.received)[1:]
    assert (first.token_state, replay.token_state) == ("expired", "valid")
    assert first.body == replay.body == body
    assert (first.method, first.path, first.query) == (replay.method, replay.path, replay.query)
    assert first.headers["X-Trace"] == replay.headers["X-Trace"] == "t-1"
    assert first.headers["Content-Type"] == replay.headers["Content-Type"]


async def test_a_second_900002_goes_to_the_client_without_a_loop(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    await proxy.get("/api/echo")
    fake.script({"ret_code": "900002", "ret_msg": "token has expired"}, times=5)
    response = await proxy.get("/api/echo")
    assert response.status == 200
    assert await response.json() == {"ret_code": "900002", "ret_msg": "token has expired"}
    assert fake.stats.api_calls == 3  # the first call, then one attempt and one replay
    assert fake.stats.get_token_calls == 2
    assert logs.events("request")[-1]["attempts"] == 2


@pytest.mark.parametrize(
    "rejection",
    [
        {"ret_code": "900001", "ret_msg": "token is empty"},
        {"retCode": "900002", "retMsg": "expired"},
        {"ret_code": 900002},
    ],
)
async def test_every_spelling_of_a_rejected_token_is_replayed(proxy, fake: FakeSobot, rejection):
    await proxy.get("/api/echo")
    fake.script(rejection)
    response = await proxy.get("/api/echo")
    assert (await response.json())["ret_code"] == "000000"
    assert fake.stats.api_calls == 3


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ({"ret_code": "999999", "ret_msg": "unknown"}, 200),
        ({"ret_code": "900003", "ret_msg": "signature"}, 200),
        ({"ret_code": "000000"}, 500),
        ({"ret_code": "000000"}, 502),
    ],
)
async def test_nothing_else_is_ever_retried(proxy, fake: FakeSobot, answer, status):
    fake.script(answer, status=status)
    response = await proxy.post("/api/5/user/save", data=b"once")
    assert response.status == status
    assert fake.stats.api_calls == 1
    assert fake.stats.get_token_calls == 1


async def test_a_newer_token_already_held_is_used_without_a_refresh(proxy, fake: FakeSobot):
    """Requests that failed with T, after another request already replaced T, just replay."""
    tokens = tokens_of(proxy)
    stale = await tokens.get()
    fresh = await tokens.replace(stale)
    assert fresh.serial == stale.serial + 1
    assert await tokens.replace(stale) is fresh
    assert fake.stats.get_token_calls == 2


async def test_the_upstreams_own_errors_for_a_replay_reach_the_client(proxy, fake: FakeSobot):
    await proxy.get("/api/echo")
    fake.expire_token()
    fake.fail_get_token("900004")
    response = await proxy.get("/api/echo")
    assert response.status == 502
    assert (await response.json())["ret_code"] == "900004"
    assert fake.stats.api_calls == 2  # the request was not replayed without a token


async def test_rejections_rotate_the_token_at_most_once_a_second(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    """An endpoint that rejects every token must not rotate it for everyone on every call."""
    await proxy.get("/api/echo")
    fake.script({"ret_code": "900001", "ret_msg": "token is empty"}, times=100)
    async with asyncio.timeout(20):
        for _ in range(3):
            response = await proxy.get("/api/odd/endpoint")
            assert (await response.json())["ret_code"] == "900001"
    assert fake.stats.get_token_calls == 4
    gaps = [b - a for a, b in zip(fake.issue_times, fake.issue_times[1:], strict=False)]
    assert min(gaps) >= 0.9
    assert logs.events("young_token_rejected")
