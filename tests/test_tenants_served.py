"""Tenants served, over real sockets: one fake Sobot per tenant, each seeing only its own
tenant's token; the tenant chosen by the client key or by X-Sobot-Tenant; local token requests
answered for the tenant whose appid they name; named tenants fetched on first use, and not
renewed once idle."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.routes import CredentialSettings, RouteSettings
from proxy.config.settings import Settings
from proxy.config.tenants import TenantSettings
from proxy.server.app import TENANTS
from proxy.testing.fake_sobot import FAULT_HEADER, FakeSobot
from proxy.tokens.manager import Backoff, TokenManager
from tests.conftest import (
    APP_KEY,
    CapturedLogs,
    ProxyFactory,
    eventually,
    exact_url,
    send_raw,
)
from tests.test_local_token import signed_query
from tests.test_routes import token_request

ACME_APPID, ACME_KEY = "acme-appid", "acme-app-key-0123456789abcdef"
BETA_APPID, BETA_KEY = "beta-appid", "beta-app-key-0123456789abcdef"
ACME_V6_APPID, ACME_V6_SECRET = "acme-v6-appid", "acme-v6-secret-0123456789abcdef"
KEY_DEFAULT, KEY_ACME = "client-key-default-0123456789", "client-key-acme-0123456789abcd"
HEADER = "X-Sobot-Tenant"


@pytest.fixture
async def acme_host() -> AsyncIterator[FakeSobot]:
    sobot = FakeSobot(ACME_APPID, ACME_KEY, v6_appid=ACME_V6_APPID, v6_secret=ACME_V6_SECRET)
    await sobot.start()
    yield sobot
    await sobot.stop()


@pytest.fixture
async def beta_host() -> AsyncIterator[FakeSobot]:
    sobot = FakeSobot(BETA_APPID, BETA_KEY, token_lifetime=1.0)  # short: it goes idle soon
    await sobot.start()
    yield sobot
    await sobot.stop()


@pytest.fixture
def tenant_settings(settings: Settings, acme_host: FakeSobot, beta_host: FakeSobot) -> Settings:
    """`default` on the `fake` host; acme (with a V6 call centre) and beta on their own."""
    callcenter = CredentialSettings("callcenter", "v6", ACME_V6_APPID, ACME_V6_SECRET)
    return dataclasses.replace(
        settings,
        tenants=(
            TenantSettings("acme", ACME_APPID, ACME_KEY, acme_host.url, (callcenter,)),
            TenantSettings("beta", BETA_APPID, BETA_KEY, beta_host.url),
        ),
        routes=(RouteSettings("/callservice/", None, "callcenter"),),
    )


@pytest.fixture
async def tenant_proxy(make_proxy: ProxyFactory, tenant_settings: Settings) -> TestClient[Any, Any]:
    return await make_proxy(tenants=tenant_settings.tenants, routes=tenant_settings.routes)


async def keyed_proxy(make_proxy: ProxyFactory, tenant_settings: Settings) -> TestClient[Any, Any]:
    """The tenants behind client keys: one key for `default`, one bound to acme."""
    return await make_proxy(
        tenants=tenant_settings.tenants,
        routes=tenant_settings.routes,
        client_keys=(KEY_DEFAULT, KEY_ACME),
        client_key_tenants=("default", "acme"),
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tenant_tokens(proxy: TestClient[Any, Any], tenant: str, name: str = "default") -> TokenManager:
    started = {each.name: each for each in proxy.app[TENANTS].started()}
    return started[tenant].sets.named(name).tokens


async def test_each_upstream_sees_only_its_own_tenants_token(
    tenant_proxy, fake: FakeSobot, acme_host: FakeSobot, beta_host: FakeSobot
):
    for tenant in (None, "acme", "beta"):
        headers = {} if tenant is None else {HEADER: tenant}
        response = await tenant_proxy.get("/api/ws/5/ticket/list", headers=headers)
        assert response.status == 200, tenant
    for host in (fake, acme_host, beta_host):
        [received] = host.received
        assert received.token_state == "valid"  # a token this host issued, and no other
        assert received.headers["token"] == host.current_token
        assert HEADER.lower() not in {name.lower() for name in received.headers}  # consumed
    tokens = {fake.current_token, acme_host.current_token, beta_host.current_token}
    assert len(tokens) == 3


async def test_a_route_to_the_main_upstream_goes_to_the_tenants_own(
    tenant_proxy, fake: FakeSobot, acme_host: FakeSobot
):
    """/callservice/ names no upstream: acme's goes to acme's host, with acme's V6 JWT."""
    response = await tenant_proxy.get("/callservice/v6/agents", headers={HEADER: "acme"})
    assert response.status == 200
    [received] = acme_host.received
    assert received.kind == "v6"
    assert received.token_state == "valid"
    assert not fake.received


async def test_a_route_naming_a_set_the_tenant_lacks_is_403_and_not_forwarded(
    tenant_proxy, fake: FakeSobot, beta_host: FakeSobot, logs: CapturedLogs
):
    for headers, host in (({}, fake), ({HEADER: "beta"}, beta_host)):
        response = await tenant_proxy.get("/callservice/v6/call", headers=headers)
        assert response.status == 403
        body = await response.json()
        assert body["ret_code"] == "980403"
        assert "'callcenter'" in body["ret_msg"]
        # The route's set is of kind v6 (in the tenants that have it): V6's fields too.
        assert (body["code"], body["status"]) == (403, "Error")
        assert body["message"] == body["ret_msg"]
        assert not host.received
    lines = [line for line in logs.events("request") if line["path"] == "/callservice/v6/call"]
    assert [line["tenant"] for line in lines] == ["default", "beta"]
    # Refused: beta was not started by it.
    assert [each.name for each in tenant_proxy.app[TENANTS].started()] == ["default"]
    assert beta_host.stats.get_token_calls == 0


async def test_a_refused_request_starts_no_tenant(
    make_proxy, tenant_settings: Settings, acme_host: FakeSobot, beta_host: FakeSobot
):
    """Whatever refuses a request (its target, a path no route serves, the allow-lists, a set
    the tenant lacks, a token request's sign, an Expect) refuses it before its tenant is built:
    no token fetched, no store opened. Its first request that is forwarded starts it."""
    proxy = await make_proxy(
        tenants=tenant_settings.tenants, routes=tenant_settings.routes, allow_methods=("GET",)
    )
    acme, beta = {HEADER: "acme"}, {HEADER: "beta"}
    refusals = [
        (await proxy.session.get(exact_url(proxy, "/api/a/%2e%2e/b"), headers=acme)).status,
        (await proxy.get("/nothing/here", headers=acme)).status,
        (await proxy.post("/api/echo", headers=acme)).status,
        (await proxy.get("/callservice/v6/call", headers=beta)).status,
        (await proxy.get("/api/echo", headers={**acme, "Expect": "bogus"})).status,
    ]
    assert refusals == [400, 404, 403, 403, 417]
    wrong_sign = await proxy.get("/api/get_token", params=signed_query(BETA_APPID, "wrong"))
    assert (await wrong_sign.json())["ret_code"] == "900003"
    assert [each.name for each in proxy.app[TENANTS].started()] == ["default"]
    assert (acme_host.stats.get_token_calls, beta_host.stats.get_token_calls) == (0, 0)
    forwarded = await proxy.get("/callservice/v6/call", headers=acme)
    assert forwarded.status == 200
    assert [each.name for each in proxy.app[TENANTS].started()] == ["default", "acme"]
    assert len(acme_host.received) == 1


async def test_an_unknown_tenant_is_404_naming_the_header_and_never_forwarded(
    tenant_proxy, fake: FakeSobot
):
    for name in ("nobody", "ACME", ""):
        response = await tenant_proxy.get("/api/ws/5/ticket/list", headers={HEADER: name})
        assert response.status == 404, name
        body = await response.json()
        assert body["ret_code"] == "980404"
        assert HEADER in body["ret_msg"]
    assert not fake.received


async def test_a_repeated_tenant_header_is_400_naming_it_and_never_forwarded(
    make_proxy, tenant_settings: Settings, fake: FakeSobot, acme_host: FakeSobot
):
    """Sent twice (in any case, even naming one tenant twice), X-Sobot-Tenant names no tenant
    for sure: refused, with client keys or without, before anything is forwarded."""
    keyed = await keyed_proxy(make_proxy, tenant_settings)
    open_proxy = await make_proxy(tenants=tenant_settings.tenants, routes=tenant_settings.routes)
    for proxy, key in ((open_proxy, b""), (keyed, b"Authorization: Bearer " + KEY_ACME.encode())):
        for second in (b"x-sobot-tenant: beta", b"X-Sobot-Tenant: acme"):
            answer = await send_raw(
                proxy,
                b"GET /api/echo HTTP/1.1\r\nHost: x\r\nX-Sobot-Tenant: acme\r\n"
                + second
                + b"\r\n"
                + (key + b"\r\n" if key else b"")
                + b"Connection: close\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 400"), answer
            body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["ret_code"] == "980400"
            assert HEADER in body["ret_msg"]
    assert not acme_host.received
    assert not fake.received


async def test_the_header_is_consumed_even_when_it_names_default(tenant_proxy, fake: FakeSobot):
    answer = await send_raw(
        tenant_proxy,
        b"GET /api/echo HTTP/1.1\r\nHost: x\r\nX-Sobot-Tenant: default\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    [received] = fake.received
    assert "x-sobot-tenant" not in {name.lower() for name in received.headers}


async def test_a_client_key_decides_the_tenant_and_cannot_reach_another(
    make_proxy, tenant_settings: Settings, fake: FakeSobot, acme_host: FakeSobot
):
    proxy = await keyed_proxy(make_proxy, tenant_settings)
    response = await proxy.get("/api/ws/5/ticket/list", headers=bearer(KEY_ACME))
    assert response.status == 200
    assert len(acme_host.received) == 1
    assert not fake.received
    # The key's own tenant named: fine. Another: 403, nothing forwarded anywhere; an operator
    # key (`default`'s) included, and a name no tenant has too (not 404: no probing for names).
    same = {**bearer(KEY_ACME), HEADER: "acme"}
    assert (await proxy.get("/api/ws/5/ticket/list", headers=same)).status == 200
    refused = ("default", "beta", "nobody")
    for key, other in [(KEY_ACME, name) for name in refused] + [
        (KEY_DEFAULT, "acme"),
        (KEY_DEFAULT, "nobody"),
    ]:
        response = await proxy.get("/api/ws/5/ticket/list", headers={**bearer(key), HEADER: other})
        assert response.status == 403, (key, other)
        assert (await response.json())["ret_code"] == "980403"
    assert len(acme_host.received) == 2
    assert not fake.received


async def test_a_client_key_cannot_take_another_tenants_token_nor_learn_its_appid(
    make_proxy, tenant_settings: Settings, acme_host: FakeSobot
):
    """Another tenant's appid, signed right or wrong, is answered as an appid no tenant has
    (v5 900004, V6 its unknown appId), and starts nothing."""
    proxy = await keyed_proxy(make_proxy, tenant_settings)

    async def v5(appid: str, key: str, client_key: str) -> tuple[int, bytes]:
        query = signed_query(appid, key)
        answer = await proxy.get("/api/get_token", params=query, headers=bearer(client_key))
        return answer.status, await answer.read()

    async def v6(appid: str, secret: str, client_key: str) -> tuple[int, bytes]:
        body = token_request(appid, secret)
        answer = await proxy.post("/tokens/company", json=body, headers=bearer(client_key))
        return answer.status, await answer.read()

    for ask, appid, key in ((v5, ACME_APPID, ACME_KEY), (v6, ACME_V6_APPID, ACME_V6_SECRET)):
        unknown = await ask("nobody-appid", key, KEY_DEFAULT)
        assert await ask(appid, key, KEY_DEFAULT) == unknown
        assert await ask(appid, "wrong-key-0123456789", KEY_DEFAULT) == unknown
    assert orjson.loads((await v5(ACME_APPID, ACME_KEY, KEY_DEFAULT))[1])["ret_code"] == "900004"
    assert (await v6(ACME_V6_APPID, ACME_V6_SECRET, KEY_DEFAULT))[0] == 401
    assert [each.name for each in proxy.app[TENANTS].started()] == ["default"]
    _, granted = await v5(ACME_APPID, ACME_KEY, KEY_ACME)
    assert orjson.loads(granted)["item"]["token"] == acme_host.current_token


async def test_a_client_get_token_gets_the_token_of_the_tenant_its_appid_names(
    tenant_proxy, fake: FakeSobot, beta_host: FakeSobot, acme_host: FakeSobot, logs: CapturedLogs
):
    response = await tenant_proxy.get("/api/get_token", params=signed_query(BETA_APPID, BETA_KEY))
    answer = await response.json()
    assert answer["ret_code"] == "000000"
    assert answer["item"]["token"] == beta_host.current_token != fake.current_token
    # V6: acme's call centre, by the body's appId.
    response = await tenant_proxy.post(
        "/tokens/company", json=token_request(ACME_V6_APPID, ACME_V6_SECRET)
    )
    assert (await response.json())["access_token"] == acme_host.current_v6_token
    # The sign is checked with the named tenant's key: beta's appid signed with default's.
    wrong = await tenant_proxy.get("/api/get_token", params=signed_query(BETA_APPID, APP_KEY))
    assert (await wrong.json())["ret_code"] == "900003"
    unknown = await tenant_proxy.get("/api/get_token", params=signed_query("nobody", APP_KEY))
    assert (await unknown.json())["ret_code"] == "900004"
    lines = [line for line in logs.events("request") if line["path"] == "/api/get_token"]
    assert [line.get("tenant") for line in lines[:2]] == ["beta", "beta"]


async def test_named_tenants_fetch_their_token_on_first_use_only(
    tenant_proxy, fake: FakeSobot, acme_host: FakeSobot, beta_host: FakeSobot
):
    await fake.wait_for_get_token_calls(1)  # default: at start-up, as ever
    assert (acme_host.stats.get_token_calls, beta_host.stats.get_token_calls) == (0, 0)
    assert [each.name for each in tenant_proxy.app[TENANTS].started()] == ["default"]
    # A wrongly signed token request for acme starts nothing either.
    await tenant_proxy.get("/api/get_token", params=signed_query(ACME_APPID, "wrong"))
    assert acme_host.stats.get_token_calls == 0
    for _ in range(3):
        response = await tenant_proxy.get("/api/ws/5/ticket/list", headers={HEADER: "acme"})
        assert response.status == 200
    # One v5 fetch for acme (its V6 set too, since a route uses it); beta still untouched.
    assert acme_host.stats.get_token_calls == 1
    assert beta_host.stats.get_token_calls == 0


async def test_an_idle_tenant_is_not_renewed_and_fetches_again_when_next_used(
    tenant_proxy, beta_host: FakeSobot, logs: CapturedLogs
):
    """beta's tokens live 1 s: renewed while used, not once unused for longer than that."""
    assert (await tenant_proxy.get("/api/echo", headers={HEADER: "beta"})).status == 200
    tokens = tenant_tokens(tenant_proxy, "beta")

    async def paused() -> bool:
        return any(line.get("tenant") == "beta" for line in logs.events("token_renewal_paused"))

    await eventually(paused, within=10)
    calls = beta_host.stats.get_token_calls
    assert not tokens.renewing

    async def expired() -> bool:
        return tokens.current() is None

    # Had renewal gone on, a token would be held throughout: it runs out instead.
    await eventually(expired, within=10)
    assert beta_host.stats.get_token_calls == calls
    # Used again: a fetch for that request, and renewing from then on.
    assert (await tenant_proxy.get("/api/echo", headers={HEADER: "beta"})).status == 200
    assert beta_host.stats.get_token_calls == calls + 1
    assert tokens.renewing


async def test_a_tenant_refused_by_sobot_stays_not_ready_once_idle(
    make_proxy, tenant_settings: Settings, beta_host: FakeSobot, logs: CapturedLogs
):
    """beta's app_key is wrong: its retries stop once it is idle, and /readyz?tenant=beta and
    the summary still say why, rather than reading "idle" as fine."""
    wrong = dataclasses.replace(tenant_settings.tenants[1], app_key="wrong-key-0123456789abcdef")
    proxy = await make_proxy(
        tenants=(tenant_settings.tenants[0], wrong),
        routes=tenant_settings.routes,
        backoff=Backoff(first=0.05, cap=0.2),
    )
    assert (await proxy.get("/api/echo", headers={HEADER: "beta"})).status == 502

    async def paused() -> bool:
        return any(line.get("tenant") == "beta" for line in logs.events("token_renewal_paused"))

    await eventually(paused, within=10)
    assert not tenant_tokens(proxy, "beta").renewing
    beta = await proxy.get("/readyz", params={"tenant": "beta"})
    assert beta.status == 503
    report = await beta.json()
    assert report["status"] == "not ready"
    assert report["configuration_error"] is True
    entry = report["credentials"]["default"]
    assert entry["configuration_error"] is True
    assert entry["idle"] is True
    assert "tenants.beta" in entry["problem"]
    summary = await proxy.get("/readyz")
    assert summary.status == 200  # `default` decides
    assert set((await summary.json())["tenants"]["problems"]) == {"beta"}


async def test_with_client_keys_only_an_operator_key_learns_which_tenants_there_are(
    make_proxy, tenant_settings: Settings, acme_host: FakeSobot
):
    """Plain /readyz stays open and counts; the names (?tenant=, the summary's problems, the
    metrics) are for a key bound to `default`. A tenant's key may ask about its own tenant, and
    gets one answer for every other name, configured or not."""
    key_beta = "client-key-beta-0123456789abcd"
    wrong = dataclasses.replace(tenant_settings.tenants[1], app_key="wrong-key-0123456789abcdef")
    proxy = await make_proxy(
        tenants=(tenant_settings.tenants[0], wrong),
        routes=tenant_settings.routes,
        client_keys=(KEY_DEFAULT, KEY_ACME, key_beta),
        client_key_tenants=("default", "acme", "beta"),
    )
    assert (await proxy.get("/api/echo", headers=bearer(key_beta))).status == 502
    assert (await proxy.get("/api/echo", headers=bearer(KEY_ACME))).status == 200

    for headers in ({}, bearer("not-a-key-0123456789"), bearer(KEY_ACME)):
        summary = await proxy.get("/readyz", headers=headers)
        assert summary.status == 200
        body = await summary.json()
        assert body["tenants"] == {"configured": 3, "started": 3, "failing": 1}
        assert b"beta" not in await summary.read()
    operator = await (await proxy.get("/readyz", headers=bearer(KEY_DEFAULT))).json()
    assert set(operator["tenants"]["problems"]) == {"beta"}

    async def about(name: str, headers: dict[str, str]) -> tuple[int, bytes]:
        answer = await proxy.get("/readyz", params={"tenant": name}, headers=headers)
        return answer.status, await answer.read()

    # Without a key, or with another tenant's: the same answer for every name.
    for headers, status in (({}, 401), (bearer(KEY_ACME), 403)):
        answers = {await about(name, headers) for name in ("beta", "nobody", "default")}
        assert len(answers) == 1
        [(got, body)] = answers
        assert got == status
        assert orjson.loads(body)["ret_code"] == f"980{status}"
    assert (await about("acme", bearer(KEY_ACME)))[0] == 200
    assert (await about("beta", bearer(key_beta)))[0] == 503
    assert (await about("beta", bearer(KEY_DEFAULT)))[0] == 503
    assert (await about("nobody", bearer(KEY_DEFAULT)))[0] == 404

    assert (await proxy.get("/metrics")).status == 401
    refused = await proxy.get("/metrics", headers=bearer(KEY_ACME))
    assert refused.status == 403
    assert (await refused.json())["ret_code"] == "980403"
    assert (await proxy.get("/metrics", headers=bearer(KEY_DEFAULT))).status == 200


async def test_every_line_logged_within_a_request_names_its_tenant(
    tenant_proxy, acme_host: FakeSobot, logs: CapturedLogs
):
    """A line logged mid-request (here `upstream_aborted`: acme's answer broken off) carries the
    tenant as the request line does; the next request on the connection does not inherit it."""
    response = await tenant_proxy.get(
        "/api/file", headers={HEADER: "acme", FAULT_HEADER: "truncate"}
    )
    with pytest.raises(aiohttp.ClientPayloadError):  # the body never completes
        await response.read()
    [aborted] = logs.events("upstream_aborted")
    assert aborted["tenant"] == "acme"
    for _ in range(2):  # kept alive: handled in the same task as the one before
        assert (await tenant_proxy.get("/api/echo", headers={HEADER: "acme"})).status == 200
    assert (await tenant_proxy.get("/api/echo", headers={HEADER: "nobody"})).status == 404
    assert "tenant" not in logs.events("request")[-1]


async def test_readyz_names_twenty_failing_tenants_at_most_and_counts_them_all(
    make_proxy, fake: FakeSobot
):
    """25 tenants refused by Sobot (their appids are not the fake's): the summary stays short."""
    tenants = tuple(
        TenantSettings(f"t{i}", f"appid-{i}", f"app-key-{i:02d}-0123456789abcdef", fake.url)
        for i in range(25)
    )
    proxy = await make_proxy(tenants=tenants, backoff=Backoff(first=60, cap=60))
    for tenant in tenants:
        assert (await proxy.get("/api/echo", headers={HEADER: tenant.name})).status == 502
    summary = (await (await proxy.get("/readyz")).json())["tenants"]
    assert (summary["configured"], summary["started"], summary["failing"]) == (26, 26, 25)
    assert len(summary["problems"]) == 20
    assert set(summary["problems"]) <= {tenant.name for tenant in tenants}
    one = await proxy.get("/readyz", params={"tenant": "t24"})
    assert one.status == 503


async def test_the_default_tenant_keeps_renewing_however_idle(make_proxy, settings: Settings):
    """Only named tenants pause: `default` is renewed whether used or not."""
    proxy = await make_proxy()
    assert tenant_tokens(proxy, "default").renewing


async def test_metrics_and_readyz_report_tenants(
    tenant_proxy, fake: FakeSobot, acme_host: FakeSobot
):
    await tenant_proxy.get("/api/ws/5/ticket/list", headers={HEADER: "acme"})
    await tenant_proxy.get("/api/ws/5/ticket/list", headers={HEADER: "nobody"})
    page = await (await tenant_proxy.get("/metrics")).text()
    families = {family.name: family for family in text_string_to_metric_families(page)}
    requests = {
        (sample.labels["tenant"], sample.labels["status"])
        for sample in families["sobot_proxy_requests"].samples
        if sample.name.endswith("_total")
    }
    assert ("acme", "200") in requests
    assert ("none", "404") in requests
    gauges = {
        (sample.labels["tenant"], sample.labels["credentials"])
        for sample in families["sobot_proxy_token_expires_in_seconds"].samples
    }
    assert gauges == {("default", "default"), ("acme", "default"), ("acme", "callcenter")}

    ready = await (await tenant_proxy.get("/readyz")).json()
    assert ready["status"] == "ready"
    # `failing` is there at 0 too; `problems` only when some fail.
    assert ready["tenants"] == {"configured": 3, "started": 2, "failing": 0}
    acme = await tenant_proxy.get("/readyz", params={"tenant": "acme"})
    report = await acme.json()
    assert acme.status == 200
    assert set(report["credentials"]) == {"default", "callcenter"}
    beta = await (await tenant_proxy.get("/readyz", params={"tenant": "beta"})).json()
    assert beta["status"] == "not started"
    assert (await tenant_proxy.get("/readyz", params={"tenant": "nobody"})).status == 404
