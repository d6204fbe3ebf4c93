"""A client's own get_token is answered by the proxy and never reaches Sobot."""

from __future__ import annotations

import time

import pytest

from proxy.sobot.v5 import make_sign
from proxy.testing.fake_sobot import FakeSobot
from tests.conftest import APP_KEY, APPID, CapturedLogs, exact_url, send_raw


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


SIGNATURE_ERROR = {"ret_code": "900003", "ret_msg": "signature error"}
NO_API_CONFIGURATION = {
    "ret_code": "900004",
    "ret_msg": "no API configuration found for the company",
}
# The same query gets the same answer from the proxy and from the fake, as from Sobot.
REFUSED = [
    (signed_query(app_key="wrong-key"), SIGNATURE_ERROR),
    (signed_query(offset=-3600), SIGNATURE_ERROR),  # an old signature cannot be replayed long
    (signed_query(offset=3600), SIGNATURE_ERROR),
    ({**signed_query(), "sign": "0" * 32}, SIGNATURE_ERROR),
    ({"appid": APPID}, SIGNATURE_ERROR),
    # An appid Sobot has no API configuration for: 900004, whatever the sign and time.
    (signed_query(appid="another-appid"), NO_API_CONFIGURATION),
    (signed_query(appid="another-appid", app_key="wrong-key"), NO_API_CONFIGURATION),
    (signed_query(appid="another-appid", offset=-3600), NO_API_CONFIGURATION),
    ({"appid": "another-appid"}, NO_API_CONFIGURATION),
    ({"appid": APPID.upper(), "create_time": "x", "sign": "x"}, NO_API_CONFIGURATION),
    ({}, NO_API_CONFIGURATION),
]


@pytest.mark.parametrize(("query", "expected"), REFUSED)
async def test_a_refused_get_token_gets_sobots_code_and_no_token(
    proxy, fake: FakeSobot, query, expected
):
    response = await proxy.get("/api/get_token", params=query)
    assert response.status == 200
    assert await response.json() == expected
    assert fake.stats.get_token_calls <= 1  # only the proxy's own start-up fetch
    direct = await proxy.session.get(f"{fake.url}/api/get_token", params=query)
    assert direct.status == 200
    assert await direct.json() == expected  # the fake answers as the proxy does


NOW = int(time.time())
HOSTILE_TIMES = [
    "1" + "0" * 309,  # past a float: int - float overflows
    "1" + "0" * 5000,  # past Python's limit for int()
    str(NOW * 1000),  # milliseconds
    f"-{NOW}",
    f"+{NOW}",
    f"%20{NOW}",
    f"{NOW}.0",
    f"{NOW:_}",
    "nan",
    "inf",
    "-inf",
    "1e309",
    "%D9%A1",  # ARABIC-INDIC DIGIT ONE: int() would take it
    "%FF",
    "%",
    "",
]


@pytest.mark.parametrize("create_time", HOSTILE_TIMES)
async def test_a_hostile_create_time_gets_900003(proxy, fake: FakeSobot, create_time, logs):
    sign = make_sign(APPID, create_time, APP_KEY)  # signed right: only the time is wrong
    target = f"/api/get_token?appid={APPID}&create_time={create_time}&sign={sign}"
    answer = await send_raw(proxy, f"GET {target} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]
    assert answer.endswith(b'{"ret_code":"900003","ret_msg":"signature error"}')
    assert not logs.events("internal_error")


@pytest.mark.parametrize(
    ("query", "code"),
    [
        (b"appid=%FF&create_time=1&sign=x", b"900004"),
        (b"appid=%E4%B8%AD&create_time=1&sign=x", b"900004"),
        (b"appid=" + APPID.encode() + b"&create_time=%s&sign=%FF", b"900003"),
        (b"appid=" + APPID.encode() + b"&create_time=%s&sign=%E4%B8%AD", b"900003"),
        (b"appid=%&create_time=%zz&sign=%", b"900004"),
        (b"appid&create_time&sign", b"900004"),
        (b"appid=" + APPID.encode() + b"&appid=x&create_time=%s&sign=%%", b"900003"),
    ],
)
async def test_odd_query_encodings_get_sobots_code(proxy, fake: FakeSobot, query, code, logs):
    target = b"/api/get_token?" + query.replace(b"%s", str(NOW).encode(), 1)
    answer = await send_raw(proxy, b"GET " + target + b" HTTP/1.1\r\nHost: p\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]
    assert b'"ret_code":"' + code + b'"' in answer
    assert not logs.events("internal_error")


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
        "/api/get_token.json",  # Spring MVC's suffix patterns
        "/api/get_token%20",  # white space trimmed by older Spring path matching
        "/api/get_token;x/",
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
