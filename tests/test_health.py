"""/healthz and /readyz are answered locally and never forwarded."""

from __future__ import annotations

import asyncio

from proxy.testing.fake_sobot import FakeSobot
from proxy.tokens.manager import Backoff


async def test_healthz_answers_alive(proxy, fake: FakeSobot):
    response = await proxy.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "alive"}
    assert fake.stats.api_calls == 0


async def test_readyz_is_ready_with_a_valid_token(proxy, fake: FakeSobot):
    await proxy.get("/api/echo")
    response = await proxy.get("/readyz")
    answer = await response.json()
    assert response.status == 200
    assert answer["status"] == "ready"
    assert 86000 < answer["token_expires_in"] <= 86400


async def test_readyz_is_503_with_the_reason_without_a_token(make_proxy, fake: FakeSobot):
    fake.fail_get_token("999999", times=-1)
    proxy = await make_proxy(backoff=Backoff(first=60, cap=60))
    async with asyncio.timeout(5):
        await fake.wait_for_get_token_calls(1)
    await proxy.get("/api/echo")  # waits for the failed fetch's outcome
    response = await proxy.get("/readyz")
    answer = await response.json()
    assert response.status == 503
    assert answer["ret_code"] == "999999"
    assert "999999" in answer["ret_msg"]
    assert answer["configuration_error"] is False
