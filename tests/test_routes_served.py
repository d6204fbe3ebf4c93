"""A real `sobot-proxy serve --config routes.toml` in front of two Sobot hosts of one company: the
main one (v5 and the V6 call centre) and a second one for the AI agent, reached along a
`[[routes]]` upstream. What a client, the log, /readyz and /metrics see of the route table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.testing.fake_sobot import FakeSobot
from tests.conftest import eventually
from tests.processes import (
    STACK_APP_KEY,
    STACK_APPID,
    STACK_V6_APPID,
    STACK_V6_SECRET,
    V6_ROUTE,
    Running,
    is_ready,
    json_object,
    proxy_env,
    routes_config,
    running,
)

AI_AGENT = "/text/ai-agent-open/"
V5_FAMILIES = ("/api/", "/chat-facebook/api/", "/chat-third/api/", "/comm-open/api/")
# (path called, its route's prefix, its credential set, the host that must get it)
CALLS = [
    *((f"{family}5/x/list", family, "default", "main") for family in V5_FAMILIES),
    (f"{AI_AGENT}ask/ask_init", AI_AGENT, "default", "second"),
    (f"{V6_ROUTE}v6/agents", V6_ROUTE, "callcenter", "main"),
]


@pytest.fixture
async def hosts() -> AsyncIterator[dict[str, FakeSobot]]:
    """The main Sobot host (v5 and V6), and a second host that accepts its tokens."""
    main = FakeSobot(STACK_APPID, STACK_APP_KEY, v6_appid=STACK_V6_APPID, v6_secret=STACK_V6_SECRET)
    await main.start()
    second = FakeSobot(STACK_APPID, STACK_APP_KEY, same_company_as=main)
    await second.start()
    yield {"main": main, "second": second}
    await second.stop()
    await main.stop()


def request_lines(proxy: Running) -> list[dict[str, Any]]:
    events = (json_object(line) for line in list(proxy.stdout))
    return [event for event in events if event is not None and event.get("event") == "request"]


def samples(page: str, name: str) -> list[Sample]:
    """The samples of `name` on a /metrics page, read by prometheus-client's own parser."""
    families = text_string_to_metric_families(page)
    return [sample for family in families for sample in family.samples if sample.name == name]


def metric_value(page: str, name: str, **labels: str) -> float:
    """The value of the one sample of `name` with exactly these labels."""
    [value] = [sample.value for sample in samples(page, name) if sample.labels == labels]
    return value


async def test_each_route_reaches_its_host_with_its_credential_and_says_so(
    tmp_path, hosts: dict[str, FakeSobot]
):
    main, second = hosts["main"], hosts["second"]
    config = routes_config(
        tmp_path, more=f'\n[[routes]]\nprefix = "{AI_AGENT}"\nupstream = "{second.url}"\n'
    )
    # The fakes answer on this loop: the process is watched from threads, never blocking it.
    with running("serve", "--config", str(config), cwd=tmp_path, env=proxy_env(main.url)) as proxy:
        listening = await asyncio.to_thread(proxy.wait_for_event, "listening")
        url = f"http://127.0.0.1:{listening['port']}"
        async with aiohttp.ClientSession() as session:
            await eventually(lambda: is_ready(session, url))
            for path, _, _, _ in CALLS:
                async with session.post(f"{url}{path}?q=1", data=b"{}") as answer:
                    assert answer.status == 200, path
                    body = await answer.json()
                assert body.get("ret_code", body.get("code")) in ("000000", 200), (path, body)
            async with session.get(f"{url}/readyz") as answer:
                assert answer.status == 200
                ready = await answer.json()
            async with session.get(f"{url}/metrics") as answer:
                assert answer.status == 200
                page = await answer.text()
        await eventually(lambda: asyncio.to_thread(lambda: len(request_lines(proxy)) >= 6))
        assert proxy.terminate() == 0

    # Each host got its calls, each with a valid token of the right kind.
    received = {
        name: [(r.path, r.kind, r.token_state) for r in host.received]
        for name, host in hosts.items()
    }
    for path, _, credentials, host in CALLS:
        kind = "v6" if credentials == "callcenter" else "v5"
        assert (path, kind, "valid") in received[host], received
    assert len(received["main"]) == 5
    assert len(received["second"]) == 1
    # One token per set, both from the main host: the second host never issued one.
    assert (main.stats.get_token_calls, main.stats.v6_token_calls) == (1, 1)
    assert second.stats.get_token_calls == 0
    assert main.stats.outside_api_calls == second.stats.outside_api_calls == 0

    # The log line of each request names its route and credential set.
    logged = [
        (line["path"], line.get("route"), line.get("credentials")) for line in request_lines(proxy)
    ]
    assert logged == [(path, prefix, credentials) for path, prefix, credentials, _ in CALLS]

    # /readyz reports both sets.
    assert ready["status"] == "ready"
    assert set(ready["credentials"]) == {"default", "callcenter"}
    for name, kind in (("default", "v5"), ("callcenter", "v6")):
        report = ready["credentials"][name]
        assert (report["kind"], report["ready"]) == (kind, True)
        assert report["token_expires_in"] > 86_000

    # /metrics: routes labelled by their prefixes; the V6 set's token and its one call.
    routes = {sample.labels["route"] for sample in samples(page, "sobot_proxy_requests_total")}
    assert routes == {prefix for _, prefix, _, _ in CALLS}
    expires_in = metric_value(
        page, "sobot_proxy_token_expires_in_seconds", tenant="default", credentials="callcenter"
    )
    assert 86_000 < expires_in <= 86_400
    calls = {"tenant": "default", "credentials": "callcenter", "result": "ok"}
    assert metric_value(page, "sobot_proxy_get_token_calls_total", **calls) == 1

    # Nothing secret in anything the process wrote.
    for secret in (STACK_APP_KEY, STACK_V6_SECRET, *main.issued_tokens, *main.issued_v6_tokens):
        assert secret not in proxy.output
