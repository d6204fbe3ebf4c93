"""Routes and credential sets, end to end over real sockets: each v5 family forwarded with the
v5 token, a route to a second Sobot host, a route that injects nothing, and the V6 call centre's
JWT fetched, injected, refreshed on 401 and replayed once."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from proxy.cli.prove import probe_problem
from proxy.config.routes import CredentialSettings, RouteSettings
from proxy.config.settings import Settings
from proxy.logs import Secrets, get_logger
from proxy.server.routing import Route, RouteTable
from proxy.sobot.v6 import V6Credential
from proxy.testing.fake_sobot import FakeSobot
from proxy.tokens.source import CredentialTokenSource, token_client
from tests.conftest import (
    APP_KEY,
    APPID,
    CapturedLogs,
    ProxyFactory,
    eventually,
    exact_url,
    send_raw,
    tokens_of,
)

V6_APPID = "v6-appid-0001"
V6_SECRET = "v6-secret-0123456789abcdef"
CALLCENTER = CredentialSettings("callcenter", "v6", V6_APPID, V6_SECRET)
V5_FAMILIES = ("/api/", "/chat-facebook/api/", "/chat-third/api/", "/comm-open/api/")


@pytest.fixture
async def fake() -> AsyncIterator[FakeSobot]:
    """The main Sobot host, serving v5 and V6."""
    sobot = FakeSobot(APPID, APP_KEY, v6_appid=V6_APPID, v6_secret=V6_SECRET)
    await sobot.start()
    yield sobot
    await sobot.stop()


@pytest.fixture
async def second_host(fake: FakeSobot) -> AsyncIterator[FakeSobot]:
    """Another Sobot host of the same company (as api-c.soboten.com is for the AI agent): it
    accepts the main host's tokens."""
    sobot = FakeSobot(APPID, APP_KEY, same_company_as=fake)
    await sobot.start()
    yield sobot
    await sobot.stop()


async def v6_proxy(make_proxy: ProxyFactory, **changes: Any) -> TestClient[Any, Any]:
    return await make_proxy(
        credentials=(CALLCENTER,),
        routes=(RouteSettings("/callservice/", None, "callcenter"),),
        **changes,
    )


def sign_v6(appid: str, secret: str, current_ms: str) -> str:
    return hashlib.md5(f"{appid}{current_ms}token{secret}".encode()).hexdigest()


def token_request(appid: str = V6_APPID, secret: str = V6_SECRET) -> dict[str, str]:
    current = str(int(time.time() * 1000))
    return {
        "responseType": "token",
        "appId": appid,
        "currentTime": current,
        "sign": sign_v6(appid, secret, current),
    }


@pytest.mark.parametrize("family", V5_FAMILIES)
async def test_every_v5_family_is_forwarded_with_the_v5_token(proxy, fake: FakeSobot, family):
    response = await proxy.post(f"{family}5/order/receive_order_data?x=1", data=b"{}")
    assert response.status == 200
    echo = await response.json()
    assert echo["ret_code"] == "000000"
    [received] = fake.received
    assert received.path == f"{family}5/order/receive_order_data"
    assert received.token_state == "valid"


async def test_a_double_leading_slash_is_folded_under_every_family(proxy, fake: FakeSobot):
    response = await proxy.session.post(
        exact_url(proxy, "//comm-open/api/call/5/record"), data=b"{}"
    )
    assert response.status == 200
    assert fake.received[0].path == "/comm-open/api/call/5/record"


async def test_a_path_no_route_serves_is_404_and_never_forwarded(proxy, fake: FakeSobot):
    for path in ("/text/ai-agent-open/ask/ask_init", "/callservice/v6/x", "/apix/5/user"):
        response = await proxy.get(path)
        assert response.status == 404, path
        body = await response.json()
        assert body["ret_code"] == "980404"
        assert "/chat-facebook/api/" in body["ret_msg"]  # it says what is forwarded
    assert fake.stats.api_calls == fake.stats.outside_api_calls == 0


async def test_forward_prefixes_replace_the_default_families(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(forward_prefixes=("/chat-facebook/api/",))
    assert (await proxy.get("/chat-facebook/api/messenger/send")).status == 200
    assert (await proxy.get("/api/ws/5/ticket/list")).status == 404
    assert fake.stats.api_calls == 1


async def test_a_route_to_a_second_host_carries_the_default_sets_token(
    make_proxy, fake: FakeSobot, second_host: FakeSobot
):
    """The token comes from the set's own upstream (the main host) whatever host the route
    goes to: one token per set."""
    proxy = await make_proxy(
        routes=(RouteSettings("/text/ai-agent-open/", second_host.url, "default"),)
    )
    response = await proxy.get("/text/ai-agent-open/ask/ask_init?q=hi")
    assert response.status == 200
    [received] = second_host.received
    assert received.path == "/text/ai-agent-open/ask/ask_init"
    assert received.query == "q=hi"
    # The main host issued it; the second host never saw a get_token.
    assert received.headers["token"] == fake.current_token
    assert second_host.stats.get_token_calls == 0
    assert fake.stats.api_calls == 0


async def test_a_route_with_no_credentials_injects_nothing(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(routes=(RouteSettings("/comm-open/api/", None, None),))
    response = await proxy.get("/comm-open/api/call/5/record", headers={"token": "clients-own"})
    [received] = fake.received
    assert received.headers["token"] == "clients-own"  # the client's, untouched
    assert received.token_state != "valid"
    assert (await response.json())["ret_code"] == "900002"  # Sobot's answer, not replayed
    assert fake.stats.api_calls == 1
    bare = await proxy.get("/comm-open/api/call/5/record")
    assert (await bare.json())["ret_code"] == "900001"
    assert "token" not in fake.received[1].headers


async def test_the_longest_prefix_wins(make_proxy, fake: FakeSobot, second_host: FakeSobot):
    proxy = await make_proxy(routes=(RouteSettings("/api/ws/", second_host.url, "default"),))
    await proxy.get("/api/ws/5/ticket/list")
    await proxy.get("/api/5/user/get")
    assert [r.path for r in second_host.received] == ["/api/ws/5/ticket/list"]
    assert [r.path for r in fake.received] == ["/api/5/user/get"]


async def test_prefixes_match_whole_segments(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy)
    assert (await proxy.get("/callservicex/v6/x")).status == 404
    assert fake.stats.v6_api_calls == 0


async def test_the_log_line_names_the_route_and_its_credentials(
    make_proxy, fake: FakeSobot, logs: CapturedLogs
):
    proxy = await v6_proxy(make_proxy)
    await proxy.get("/callservice/v6/agents")
    await proxy.get("/chat-third/api/5/x")
    lines = [
        (line["path"], line.get("route"), line.get("credentials"))
        for line in logs.events("request")
    ]
    assert lines == [
        ("/callservice/v6/agents", "/callservice/", "callcenter"),
        ("/chat-third/api/5/x", "/chat-third/api/", "default"),
    ]


# --- V6 ---------------------------------------------------------------------------------------


async def test_a_v6_route_gets_the_jwt_as_a_bearer_token(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy)
    response = await proxy.get(
        "/callservice/v6/agents?page=1", headers={"Authorization": "Bearer clients-own"}
    )
    assert response.status == 200
    body = await response.json()
    assert body["code"] == 200
    assert body["data"]["authorization_form"] == "bearer"
    [received] = fake.received
    assert received.token_state == "valid"
    assert received.headers["Authorization"] == f"Bearer {fake.current_v6_token}"
    assert "token" not in received.headers  # no v5 token on a v6 route
    assert fake.stats.v6_token_calls == 1


async def test_authorization_scheme_empty_sends_the_bare_jwt(make_proxy, fake: FakeSobot):
    import dataclasses

    bare = dataclasses.replace(CALLCENTER, authorization_scheme="")
    proxy = await make_proxy(
        credentials=(bare,), routes=(RouteSettings("/callservice/", None, "callcenter"),)
    )
    response = await proxy.get("/callservice/v6/agents")
    assert (await response.json())["data"]["authorization_form"] == "bare"
    assert fake.received[0].headers["Authorization"] == fake.current_v6_token


async def test_a_401_refreshes_the_jwt_once_and_replays_the_identical_request(
    make_proxy, fake: FakeSobot
):
    proxy = await v6_proxy(make_proxy)
    assert (await proxy.get("/callservice/v6/warm")).status == 200
    await asyncio.sleep(0)  # nothing to wait for: the token is held
    fake.expire_token("v6")
    body = orjson.dumps({"callee": "+6512345678", "n": list(range(100))})
    response = await proxy.post("/callservice/v6/calls?x=1", data=body)
    assert response.status == 200
    assert (await response.json())["code"] == 200
    first, second = list(fake.received)[1:]
    assert first.token_state != "valid"
    assert second.token_state == "valid"
    assert first.body == second.body == body
    assert first.query == second.query == "x=1"
    assert fake.stats.v6_token_calls == 2


async def test_a_second_401_is_passed_to_the_client_not_retried(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy)
    assert (await proxy.get("/callservice/v6/warm")).status == 200
    # Every answer under the prefix is now a 401 of Sobot's: one replay, then the 401 as it came.
    fake.script({"code": 401, "message": "expired"}, times=5, status=401)
    response = await proxy.get("/callservice/v6/agents")
    assert response.status == 401
    assert (await response.json())["message"] == "expired"
    assert fake.stats.v6_api_calls == 3  # the warm-up, the attempt, the one replay


async def test_no_other_status_is_replayed_on_a_v6_route(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy)
    for status in (403, 500, 502):
        fake.script({"code": status}, times=1, status=status)
        response = await proxy.get("/callservice/v6/agents")
        assert response.status == status
    assert fake.stats.v6_api_calls == 3
    assert fake.stats.v6_token_calls == 1


async def test_a_900002_on_a_v6_route_is_not_a_v6_rejection(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy)
    fake.script({"ret_code": "900002"}, times=1)
    response = await proxy.get("/callservice/v6/agents")
    assert (await response.json())["ret_code"] == "900002"
    assert fake.stats.v6_api_calls == 1


async def test_100_concurrent_401s_cost_one_token_call(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy)
    assert (await proxy.get("/callservice/v6/warm")).status == 200
    fake.expire_token("v6")
    async with asyncio.timeout(30):
        responses = await asyncio.gather(
            *(proxy.get(f"/callservice/v6/agents?i={i}") for i in range(100))
        )
    assert [response.status for response in responses] == [200] * 100
    assert fake.stats.v6_token_calls == 2  # the first, and one refresh for all hundred


async def test_a_v6_token_is_renewed_at_half_its_life(make_proxy, fake: FakeSobot):
    fake.set_lifetime(4.0, "v6")
    proxy = await v6_proxy(make_proxy)
    tokens = tokens_of(proxy, "callcenter")
    first = await tokens.get()
    async with asyncio.timeout(10):
        await fake.wait_for_v6_token_calls(2)
    renewed_after = fake.v6_issue_times[1] - fake.v6_issue_times[0]
    assert 1.5 < renewed_after < 3.0, renewed_after  # at half of 4 s, not at 90 %

    async def renewed() -> bool:
        return (await tokens.get()).value != first.value

    await eventually(renewed, within=5)


# --- a client's own token requests ------------------------------------------------------------


async def test_a_clients_own_tokens_company_gets_the_managed_jwt(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy)
    response = await proxy.post("/tokens/company", json=token_request())
    assert response.status == 200
    body = await response.json()
    assert body["access_token"] == fake.current_v6_token
    assert 86_000_000 < body["expires_in"] <= 86_400_000  # milliseconds, as the vendor's
    assert fake.stats.v6_token_calls == 1  # the proxy's own; the client's never reached Sobot


@pytest.mark.parametrize(
    ("request_body", "status"),
    [
        (token_request(secret="wrong-secret"), 401),
        (token_request(appid="someone-else"), 401),
        ({"responseType": "token"}, 400),
    ],
)
async def test_a_wrong_tokens_company_gets_a_v6_error_and_no_token(
    make_proxy, fake: FakeSobot, request_body, status
):
    proxy = await v6_proxy(make_proxy)
    response = await proxy.post("/tokens/company", json=request_body)
    assert response.status == status
    body = await response.json()
    assert set(body) >= {"code", "message"}
    assert "access_token" not in body
    assert fake.stats.v6_token_calls == 1


async def test_tokens_company_is_a_path_like_any_other_without_a_v6_set(proxy, fake: FakeSobot):
    response = await proxy.post("/tokens/company", json=token_request())
    assert response.status == 404
    assert fake.stats.v6_token_calls == 0


async def test_get_token_still_answers_for_the_default_set(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy)
    create_time = str(int(time.time()))
    sign = hashlib.md5(f"{APPID}{create_time}{APP_KEY}".encode()).hexdigest()
    response = await proxy.get(
        "/api/get_token", params={"appid": APPID, "create_time": create_time, "sign": sign}
    )
    assert (await response.json())["item"]["token"] == fake.current_token
    assert fake.stats.get_token_calls == 1


# --- readiness ----------------------------------------------------------------------------------


async def test_readyz_reports_every_set_and_needs_all_of_them(make_proxy, fake: FakeSobot):
    fake.fail_get_token("http500", times=-1, kind="v6")
    proxy = await v6_proxy(make_proxy)
    async with asyncio.timeout(10):
        await tokens_of(proxy, "callcenter").first_outcome()
    response = await proxy.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["credentials"]["default"]["ready"] is True
    assert body["credentials"]["callcenter"]["ready"] is False
    assert body["ret_msg"].startswith("callcenter: ")


# --- the proxy's own errors, per kind -----------------------------------------------------------


async def test_the_proxys_errors_on_a_v6_route_carry_the_v6_fields_too(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(
        credentials=(CALLCENTER,),
        routes=(RouteSettings("/callservice/", "http://127.0.0.1:9", "callcenter"),),
        allow_methods=("GET",),
    )
    unreachable = await proxy.get("/callservice/v6/agents")
    assert unreachable.status == 502
    body = await unreachable.json()
    assert body["ret_code"] == "980502"
    assert body["code"] == 502
    assert body["message"] == body["ret_msg"]
    assert body["message"].startswith("cannot connect to Sobot at 127.0.0.1:9")
    forbidden = await proxy.post("/callservice/v6/agents")
    assert forbidden.status == 403
    assert (await forbidden.json())["code"] == 403


async def test_the_proxys_errors_on_a_v5_route_keep_sobots_v5_shape(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(allow_methods=("GET",))
    forbidden = await proxy.post("/chat-facebook/api/messenger/send")
    assert forbidden.status == 403
    assert set(await forbidden.json()) == {"ret_code", "ret_msg"}


def peak_while(call: Callable[[str], object], paths: list[str]) -> int:
    """The peak of traced memory while `call` is made on each of `paths`, above the start."""
    each = iter(paths)  # made beforehand: the loop itself allocates nothing
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for path in each:
            call(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def test_a_route_lookup_allocates_nothing():
    """The route table is built once; matching a path against it creates no object, not even a
    short-lived one: the peak of traced memory moves no more than for a call that does nothing."""
    table = RouteTable(
        Route.to(prefix, "https://sg.sobot.io", None)
        for prefix in (*V5_FAMILIES, "/callservice/", "/text/ai-agent-open/")
    )
    paths = ["/api/ws/5/ticket/list", "/callservice/v6/agents", "/nowhere/at/all"] * 1000
    assert peak_while(table.match, paths) == peak_while(lambda _path: None, paths)
    matched = table.match("/callservice/v6/agents")
    assert matched is not None
    assert matched.prefix == "/callservice/"


async def test_a_clients_token_request_is_logged_and_counted_under_its_route(
    make_proxy, fake: FakeSobot, logs: CapturedLogs
):
    proxy = await v6_proxy(make_proxy)
    assert (await proxy.post("/tokens/company", json=token_request())).status == 200
    create_time = str(int(time.time()))
    sign = hashlib.md5(f"{APPID}{create_time}{APP_KEY}".encode()).hexdigest()
    query = {"appid": APPID, "create_time": create_time, "sign": sign}
    assert (await proxy.get("/api/get_token", params=query)).status == 200
    lines = [(line["route"], line.get("credentials")) for line in logs.events("request")]
    assert lines == [("/tokens/company", "callcenter"), ("/api/", "default")]


# --- found in review ----------------------------------------------------------------------------


async def test_a_client_that_stalls_its_token_request_body_gets_408(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy, upstream_timeout=0.5)
    answer = await send_raw(
        proxy,
        b"POST /tokens/company HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"a"',
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    answer = orjson.loads(body)
    assert answer["ret_code"] == "980408"
    assert answer["code"] == 408  # a V6 request: V6's fields too
    assert fake.stats.v6_token_calls == 1  # the proxy's own


async def test_a_token_request_too_large_is_refused_before_its_body_is_invited(
    make_proxy, fake: FakeSobot
):
    proxy = await v6_proxy(make_proxy)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(
            b"POST /tokens/company HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413 ")  # not 100 Continue first


async def test_a_token_request_that_cannot_be_answered_carries_v6_fields(
    make_proxy, fake: FakeSobot
):
    fake.fail_get_token("http500", times=-1, kind="v6")
    proxy = await v6_proxy(make_proxy)
    response = await proxy.post("/tokens/company", json=token_request())
    assert response.status == 502
    body = await response.json()
    assert body["ret_code"] == "500"  # the token endpoint's own code: its HTTP status
    assert body["code"] == 502
    assert "access_token" not in body


async def test_a_set_no_route_names_is_fetched_only_when_a_client_asks(make_proxy, fake: FakeSobot):
    """Every token call may rotate the token the appid's other users hold: a set nothing routes
    to is not fetched at start-up, nor renewed, and does not decide readiness."""
    proxy = await make_proxy(credentials=(CALLCENTER,))
    await tokens_of(proxy).get()
    ready = await proxy.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["credentials"]["callcenter"] == {
        "kind": "v6",
        "ready": False,
        "in_use": False,
    }
    assert fake.stats.v6_token_calls == 0
    response = await proxy.post("/tokens/company", json=token_request())
    assert (await response.json())["access_token"] == fake.current_v6_token
    assert fake.stats.v6_token_calls == 1


async def test_a_v6_route_does_not_carry_a_clients_v5_token(make_proxy, fake: FakeSobot):
    proxy = await v6_proxy(make_proxy)
    await proxy.get("/callservice/v6/agents", headers={"token": "a-v5-token-it-holds"})
    assert "token" not in fake.received[0].headers


@pytest.mark.parametrize(
    "path",
    [
        "/text/ai-agent-open/%73elf/ask",  # %73 is "s"
        "/text/ai-agent-open/self;x=1/ask",  # a servlet container drops `;x=1`
        "/text/ai-agent-open/sel%66;jsessionid=2/ask",
    ],
)
async def test_a_deeper_route_cannot_be_bypassed_by_spelling(
    make_proxy, fake: FakeSobot, second_host: FakeSobot, path
):
    """The route is chosen from the path as the upstream will take it: an encoded or
    parametered spelling of `/text/ai-agent-open/self/` goes along that route (here: no
    credentials), never along the shorter one, and the allow-list sees the same path."""
    proxy = await make_proxy(
        routes=(
            RouteSettings("/text/ai-agent-open/", second_host.url, "default"),
            RouteSettings("/text/ai-agent-open/self/", second_host.url, None),
        ),
        allow_paths=("/text/ai-agent-open/self/",),
    )
    await proxy.session.get(exact_url(proxy, path))
    [received] = second_host.received
    assert "token" not in received.headers  # the `none` route's: nothing injected
    shorter = await proxy.session.get(exact_url(proxy, "/text/ai-agent-open/%6fther"))
    assert shorter.status == 403  # `/text/ai-agent-open/other` is outside the allow-list


async def test_an_encoded_newline_is_refused_by_the_proxy_not_aiohttps_router(proxy, fake):
    response = await proxy.session.get(exact_url(proxy, "/api/a%0ab"))
    assert response.status == 400
    assert (await response.json())["ret_code"] == "980400"
    assert "X-Request-Id" in response.headers  # answered (and logged) by the proxy's handler
    assert fake.stats.api_calls == 0


async def test_the_v6_token_call_sends_one_accept(fake: FakeSobot):
    """The kind's own headers replace the defaults: one Accept, application/json (seen on the
    wire, by a server that records the request's head)."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        body = b'{"access_token": "opaque", "expires_in": 3600}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = token_client(
        Settings(APPID, APP_KEY, "http://127.0.0.1"), ssl.create_default_context()
    )
    try:
        source = CredentialTokenSource(
            client,
            V6Credential(V6_APPID, V6_SECRET),
            base_url=f"http://127.0.0.1:{port}",
            deadline=10,
            log=get_logger(),
            secrets=Secrets(),
        )
        async with asyncio.timeout(10):
            assert (await source.fetch()).lifetime == 3600
    finally:
        await client.close()
        server.close()
    [head] = heads
    accepts = [line for line in head.split(b"\r\n") if line.lower().startswith(b"accept:")]
    assert accepts == [b"Accept: application/json"]


def test_a_probe_path_is_folded_as_the_proxy_folds_it():
    settings = Settings(APPID, APP_KEY, "https://sg.sobot.io")
    assert probe_problem(settings, "//api/5/user/get") is None
    assert probe_problem(settings, "//nowhere/x") == "no route serves it"
