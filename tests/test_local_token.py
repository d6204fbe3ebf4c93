"""A client's own get_token is answered by the proxy and never reaches Sobot."""

from __future__ import annotations

import time

import pytest

from proxy.fake_sobot import FakeSobot
from proxy.protocol import make_sign
from tests.conftest import APP_KEY, APPID, CapturedLogs, exact_url


def signed_query(appid: str = APPID, app_key: str = APP_KEY, offset: int = 0) -> dict[str, str]:
    create_time = str(int(time.time()) + offset)
    return {
        "appid": appid,
        "create_time": create_time,
        "sign": make_sign(appid, create_time, app_key),
    }


async def test_a_correctly_signed_client_gets_the_managed_token(proxy, fake: FakeSobot):
    response = await proxy.get("/api/get_token", params=signed_query())
    answer = await response.json()
    assert response.status == 200
    assert answer["ret_code"] == "000000"
    assert answer["item"]["token"] == fake.current_token
    assert 86390 <= int(answer["item"]["expires_in"]) <= 86400  # seconds left, as a string
    assert isinstance(answer["item"]["expires_in"], str)
    # The client's call did not rotate the shared token: only the proxy's own fetch happened.
    assert fake.stats.get_token_calls == 1
    echo = await (await proxy.get("/api/echo", headers={"token": answer["item"]["token"]})).json()
    assert echo["item"]["token"]["serial"] == 1


async def test_repeated_client_token_calls_never_rotate_the_token(proxy, fake: FakeSobot):
    for _ in range(5):
        response = await proxy.get("/api/get_token", params=signed_query())
        assert (await response.json())["ret_code"] == "000000"
    assert fake.stats.get_token_calls == 1


@pytest.mark.parametrize(
    "query",
    [
        signed_query(app_key="wrong-key"),
        signed_query(appid="another-appid"),
        signed_query(offset=-3600),  # an old signature cannot be replayed for long
        {**signed_query(), "sign": "0" * 32},
        {"appid": APPID},
        {},
    ],
)
async def test_a_wrong_signature_gets_900003_and_no_token(proxy, fake: FakeSobot, query):
    response = await proxy.get("/api/get_token", params=query)
    answer = await response.json()
    assert answer == {"ret_code": "900003", "ret_msg": "signature error"}
    assert "item" not in answer
    assert fake.stats.get_token_calls <= 1  # only the proxy's own start-up fetch


async def test_client_token_calls_are_logged_without_query(
    proxy, fake: FakeSobot, logs: CapturedLogs
):
    query = signed_query()
    await proxy.get("/api/get_token", params=query)
    [event] = logs.events("request")
    assert event["path"] == "/api/get_token"
    assert event["ret_code"] == "000000"
    assert event["attempts"] == 0
    assert query["sign"].encode() not in logs.raw


@pytest.mark.parametrize(
    "path",
    [
        "/api/get%5ftoken",
        "/api/get_t%6Fken",
        "/api/get_token;jsessionid=1",
        "/api/GET_TOKEN",
        "/api/get_token/",
        "//api/get_token",
    ],
)
async def test_every_spelling_of_get_token_is_answered_locally(proxy, fake: FakeSobot, path):
    """An upstream might decode, strip or fold any of these into get_token: never forward them."""
    query = "&".join(f"{key}={value}" for key, value in signed_query().items())
    response = await proxy.session.get(exact_url(proxy, f"{path}?{query}"))
    answer = await response.json()
    assert answer["ret_code"] == "000000"
    assert answer["item"]["token"] == fake.current_token
    wrong = await proxy.session.get(exact_url(proxy, f"{path}?appid={APPID}&sign=x"))
    assert (await wrong.json())["ret_code"] == "900003"
    assert fake.stats.get_token_calls == 1
    assert fake.stats.api_calls == 0
