"""The app_key, tokens and signatures never appear in logs or in answers, whatever happens."""

from __future__ import annotations

import time

from proxy.fake_sobot import FakeSobot
from proxy.protocol import make_sign
from proxy.tokens import Backoff
from tests.conftest import APP_KEY, APPID, CapturedLogs, tokens_of


async def test_no_secret_reaches_a_log_line_or_an_answer(
    make_proxy, fake: FakeSobot, logs: CapturedLogs
):
    started = int(time.time())
    proxy = await make_proxy(backoff=Backoff(first=0, cap=0))  # every failure is retried
    answers: list[bytes] = []

    async def call(method: str, path: str, **kwargs) -> None:
        response = await proxy.request(method, path, **kwargs)
        answers.append(await response.read())

    await call("GET", "/api/echo", headers={"token": "client-token", "Authorization": "Bearer x"})
    fake.expire_token()  # a replay
    await call("POST", "/api/echo", data=b"body")
    fake.script({"ret_code": "900002"}, times=2)  # a replay that fails again
    await call("GET", "/api/echo")
    await call("GET", "/api/get_token", params={"appid": APPID, "create_time": "1", "sign": "x"})
    for mode in ("900003", "malformed", "disconnect"):  # get_token failures
        fake.fail_get_token(mode, times=-1)
        fake.expire_token()
        await call("GET", "/api/echo")
        await call("GET", "/readyz")
        fake.fail_get_token(mode, times=0)
    await call("GET", "/api/echo")
    await call("GET", "/readyz")
    await call("GET", "/nowhere")
    ended = int(time.time())

    assert len(fake.issued_tokens) >= 4
    assert tokens_of(proxy).current() is not None
    signs = [make_sign(APPID, str(t), APP_KEY) for t in range(started - 2, ended + 3)]
    secrets = [APP_KEY, *fake.issued_tokens, *signs]
    output = logs.raw
    assert b'"event":"get_token"' in output
    for secret in secrets:
        assert secret.encode() not in output
        for answer in answers:
            assert secret.encode() not in answer


async def test_the_request_log_never_carries_credentials_even_when_asked(logs: CapturedLogs):
    """A last processor masks fields named like credentials, should code ever log one."""
    from proxy.logs import get_logger

    get_logger().info("oops", token="t-value", app_key="k-value", sign="s-value")
    [event] = logs.events("oops")
    assert (event["token"], event["app_key"], event["sign"]) == ("[redacted]",) * 3
