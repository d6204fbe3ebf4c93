"""GET /metrics: what a Prometheus scrape of a real proxy sees, parsed by prometheus-client's own
parser. Label values stay bounded whatever the clients send."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.server.metrics import MAX_RET_CODES
from proxy.testing.fake_sobot import FAULT_HEADER, FakeSobot
from proxy.tokens.manager import Backoff
from tests.conftest import RedisServer, eventually, send_raw
from tests.processes import fake_sobot, proxy_env, rss_bytes, running, stack, wait_until_ready

KEY = "metrics-client-key-0123456789"


class Scrape:
    """One /metrics page, parsed."""

    def __init__(self, text: str) -> None:
        self.samples: list[Sample] = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def series(self, name: str) -> list[Sample]:
        return [sample for sample in self.samples if sample.name == name]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
        return sum(
            sample.value
            for sample in self.series(name)
            if all(sample.labels.get(key) == value for key, value in labels.items())
        )

    def label_values(self, name: str, label: str) -> Counter[str]:
        """The total of `name` for each value of `label`."""
        values: Counter[str] = Counter()
        for sample in self.series(name):
            values[sample.labels[label]] += int(sample.value)
        return values


async def scrape(proxy: TestClient[Any, Any], **headers: str) -> Scrape:
    response = await proxy.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return Scrape(await response.text())


REQUESTS = "sobot_proxy_requests_total"
REPLAYS = "sobot_proxy_replays_total"
GET_TOKEN = "sobot_proxy_get_token_calls_total"
IN_FLIGHT = "sobot_proxy_in_flight_requests"
EXPIRES_IN = "sobot_proxy_token_expires_in_seconds"
STORE_ERRORS = "sobot_proxy_token_store_errors_total"
DURATION = "sobot_proxy_request_duration_seconds"
UPSTREAM = "sobot_proxy_upstream_duration_seconds"


# --- what is counted --------------------------------------------------------------------------


async def test_a_forwarded_request_is_counted_by_route_method_status_and_ret_code(
    proxy, fake: FakeSobot
):
    assert (await proxy.get("/api/ws/5/ticket/list?page=1")).status == 200
    fake.script({"retCode": "700046", "ret_msg": "edition"}, status=403)
    assert (await proxy.post("/api/5/user/save", data=b"{}")).status == 403
    series = {
        (s.labels["route"], s.labels["method"], s.labels["status"], s.labels["ret_code"]): s.value
        for s in (await scrape(proxy)).series(REQUESTS)
    }
    assert series == {("/api/", "GET", "200", "000000"): 1, ("/api/", "POST", "403", "700046"): 1}


async def test_an_answer_without_a_ret_code_counts_as_none(proxy, fake: FakeSobot):
    response = await proxy.get("/api/file", headers={FAULT_HEADER: "download=5000"})
    assert len(await response.read()) == 5000
    fake.script(b"<html>oops</html>", status=502, headers={"Content-Type": "text/html"})
    assert (await proxy.get("/api/echo")).status == 502
    metrics = await scrape(proxy)
    assert metrics.value(REQUESTS, status="200", ret_code="none") == 1
    assert metrics.value(REQUESTS, status="502", ret_code="none") == 1


async def test_the_proxys_own_answers_are_counted_with_their_codes(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(allow_paths=("/api/ws/",))
    assert (await proxy.get("/nowhere")).status == 404
    assert (await proxy.get("/api/5/user/get")).status == 403
    metrics = await scrape(proxy)
    assert metrics.value(REQUESTS, route="other", status="404", ret_code="980404") == 1
    assert metrics.value(REQUESTS, route="/api/", status="403", ret_code="980403") == 1
    assert fake.stats.api_calls == 0


async def test_a_replay_after_900002_is_counted_with_its_second_get_token(proxy, fake: FakeSobot):
    assert (await proxy.get("/api/echo")).status == 200
    fake.expire_token()
    response = await proxy.get("/api/echo")
    assert (await response.json())["ret_code"] == "000000"
    metrics = await scrape(proxy)
    assert metrics.value(REPLAYS, route="/api/") == 1
    assert metrics.value(GET_TOKEN, result="ok") == 2
    # The client saw one answer each time: the 900002 it never saw is not counted.
    assert metrics.value(REQUESTS) == 2
    assert metrics.value(REQUESTS, ret_code="900002") == 0


async def test_every_get_token_result_is_reported_from_the_start(proxy, fake: FakeSobot):
    await fake.wait_for_get_token_calls(1)
    metrics = await scrape(proxy)
    results = {sample.labels["result"]: sample.value for sample in metrics.series(GET_TOKEN)}
    assert set(results) == {"ok", "refused", "unreachable", "malformed"}
    assert metrics.value(STORE_ERRORS) == 0


@pytest.mark.parametrize(
    ("mode", "result"),
    [
        ("900003", "refused"),
        ("900004", "refused"),
        ("disconnect", "unreachable"),
        ("malformed", "malformed"),
        ("http500", "malformed"),
    ],
)
async def test_failed_get_token_calls_are_counted_by_result(
    make_proxy, fake: FakeSobot, mode, result
):
    fake.fail_get_token(mode, times=-1)
    # A long backoff: the first call is the only one while the test runs.
    proxy = await make_proxy(backoff=Backoff(first=60))
    response = await proxy.get("/api/echo")
    assert response.status == 502
    metrics = await scrape(proxy)
    assert metrics.value(GET_TOKEN, result=result) == 1
    assert metrics.value(GET_TOKEN) == 1
    assert metrics.value(EXPIRES_IN) == 0


async def test_an_upstream_that_cannot_be_reached_counts_as_unreachable(make_proxy):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = await make_proxy(base_url=f"http://127.0.0.1:{port}", backoff=Backoff(first=60))
    assert (await proxy.get("/api/echo")).status == 502
    metrics = await scrape(proxy)
    assert metrics.value(GET_TOKEN, result="unreachable") == 1


async def test_token_expires_in_is_the_held_tokens_remaining_life(proxy, fake: FakeSobot):
    async def ready() -> bool:
        return (await proxy.get("/readyz")).status == 200

    await eventually(ready)
    metrics = await scrape(proxy)
    assert 86_000 < metrics.value(EXPIRES_IN) <= 86_400


async def test_token_expires_in_is_zero_until_a_token_is_held(make_proxy, fake: FakeSobot):
    fake.fail_get_token("stall", times=-1)  # the first get_token never answers
    proxy = await make_proxy()
    await fake.wait_for_get_token_calls(1)
    metrics = await scrape(proxy)
    assert metrics.value(EXPIRES_IN) == 0
    assert metrics.value(GET_TOKEN) == 0  # not finished: not counted yet


async def test_in_flight_counts_requests_being_handled(proxy, fake: FakeSobot):
    assert (await proxy.get("/api/echo")).status == 200
    assert (await scrape(proxy)).value(IN_FLIGHT) == 0
    fake.hold_answers()
    held = asyncio.create_task(proxy.get("/api/slow"))
    try:

        async def arrived() -> bool:
            return fake.stats.api_calls == 2

        await eventually(arrived)
        assert (await scrape(proxy)).value(IN_FLIGHT) == 1
    finally:
        fake.release_answers()
    async with asyncio.timeout(10):
        assert (await held).status == 200
    assert (await scrape(proxy)).value(IN_FLIGHT) == 0


async def test_latency_histograms_count_every_request_in_its_bucket(proxy, fake: FakeSobot):
    for _ in range(3):
        assert (await proxy.get("/api/echo")).status == 200
    slow = await proxy.get("/api/echo", headers={FAULT_HEADER: "delay=0.3"})
    assert slow.status == 200
    metrics = await scrape(proxy)
    for histogram in (DURATION, UPSTREAM):
        assert metrics.value(f"{histogram}_count", route="/api/") == 4
        assert metrics.value(f"{histogram}_bucket", route="/api/", le="+Inf") == 4
        # The one slow answer lies above 0.25 s, the three quick ones below.
        assert metrics.value(f"{histogram}_bucket", route="/api/", le="0.25") == 3
        assert metrics.value(f"{histogram}_bucket", route="/api/", le="0.5") == 4
        assert metrics.value(f"{histogram}_sum", route="/api/") >= 0.3
    # The whole request takes at least as long as Sobot's share of it.
    assert metrics.value(f"{DURATION}_sum") >= metrics.value(f"{UPSTREAM}_sum")


async def test_requests_answered_locally_have_no_upstream_latency(proxy, fake: FakeSobot):
    assert (await proxy.get("/api/get_token?appid=x&create_time=1&sign=y")).status == 200
    assert (await proxy.get("/nowhere")).status == 404
    metrics = await scrape(proxy)
    assert metrics.value(f"{DURATION}_count") == 2
    assert metrics.value(f"{UPSTREAM}_count") == 0


# --- bounded labels -----------------------------------------------------------------------------


async def test_paths_are_never_a_label(proxy, fake: FakeSobot):
    for i in range(50):
        assert (await proxy.get(f"/api/ws/5/ticket/{i}?id={i}")).status == 200
    metrics = await scrape(proxy)
    [series] = metrics.series(REQUESTS)
    assert series.labels["route"] == "/api/"
    assert series.value == 50
    for sample in metrics.samples:
        assert "path" not in sample.labels
        assert not any("ticket" in value for value in sample.labels.values()), sample


async def test_paths_seen_are_not_kept_in_memory(tmp_path):
    """Clients choose paths (up to 8 KiB each, authenticated or not): a proxy that kept what it
    saw, even only to group it faster, would grow by the megabyte under a scan."""
    with stack(tmp_path) as running_stack:
        url, pid = running_stack.proxy_url, running_stack.proxy.process.pid
        connector = aiohttp.TCPConnector(limit=20)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def scan(start: int, count: int) -> None:
                async def client(first: int) -> None:
                    for i in range(first, start + count, 20):
                        async with session.get(f"{url}/{i:06d}{'a' * 6000}") as answer:
                            assert answer.status == 404

                await asyncio.gather(*(client(start + k) for k in range(20)))

            await scan(0, 1000)  # allocator and buffers at their working size
            before = rss_bytes(pid)
            await scan(1000, 8000)  # 48 MB of distinct paths
            grown = rss_bytes(pid) - before
        assert running_stack.proxy.terminate() == 0
    assert grown < 16 * 1024 * 1024, f"grew by {grown / 1e6:.1f} MB"


async def test_routes_group_requests_by_the_longest_configured_prefix(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(metrics_routes=("/api/ws/", "/api/ws/5/ticket/"))
    for path in ("/api/ws/5/ticket/list", "/api/ws/5/ticket/get", "/api/ws/5/user", "/api/5/x"):
        assert (await proxy.get(path)).status == 200
    assert (await proxy.get("/nowhere")).status == 404
    metrics = await scrape(proxy)
    assert metrics.label_values(REQUESTS, "route") == {
        "/api/ws/5/ticket/": 2,
        "/api/ws/": 1,
        "/api/": 1,
        "other": 1,
    }
    assert metrics.value(f"{DURATION}_count", route="/api/ws/5/ticket/") == 2


async def test_methods_outside_the_standard_ones_count_as_other(proxy, fake: FakeSobot):
    for method in ("PROPFIND", "MKCOL", "GET", "DELETE"):
        assert (await proxy.request(method, "/api/echo")).status == 200
    assert [r.method for r in fake.received] == ["PROPFIND", "MKCOL", "GET", "DELETE"]
    metrics = await scrape(proxy)
    assert metrics.label_values(REQUESTS, "method") == {"other": 2, "GET": 1, "DELETE": 1}


async def test_ret_codes_are_capped_then_counted_as_other(proxy, fake: FakeSobot):
    extra = 5
    for i in range(MAX_RET_CODES + extra):
        fake.script({"ret_code": f"7{i:05d}", "ret_msg": "made up"})
    async with asyncio.timeout(60):
        for _ in range(MAX_RET_CODES + extra):
            assert (await proxy.get("/api/echo")).status == 200
        # A code seen before the cap keeps its own series; a new one after it does not.
        fake.script({"ret_code": "700000"})
        await proxy.get("/api/echo")
        assert (await (await proxy.get("/api/echo")).json())["ret_code"] == "000000"
    codes = (await scrape(proxy)).label_values(REQUESTS, "ret_code")
    assert len(codes) == MAX_RET_CODES + 1
    assert codes["700000"] == 2
    assert codes["other"] == extra + 1  # the last five made-up ones, and 000000


@pytest.mark.parametrize(
    "ret_code",
    ["x" * 40, "has space", 'quo"te', "line\nbreak", "中文"],
    ids=["long", "space", "quote", "newline", "non-ascii"],
)
async def test_odd_ret_codes_count_as_other(proxy, fake: FakeSobot, ret_code):
    fake.script({"ret_code": ret_code})
    assert (await proxy.get("/api/echo")).status == 200
    assert (await scrape(proxy)).label_values(REQUESTS, "ret_code") == {"other": 1}


async def test_a_client_that_leaves_is_counted_as_cancelled(proxy, fake: FakeSobot):
    assert (await proxy.get("/api/echo")).status == 200
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(f"GET /api/slow HTTP/1.1\r\nHost: p\r\n{FAULT_HEADER}: stall\r\n\r\n".encode())
    await writer.drain()

    async def arrived() -> bool:
        return fake.stats.open_requests == 1

    await eventually(arrived)
    writer.close()

    async def counted() -> bool:
        return (await scrape(proxy)).value(REQUESTS, status="cancelled") == 1

    await eventually(counted)
    metrics = await scrape(proxy)
    assert metrics.value(REQUESTS, status="cancelled", ret_code="none", method="GET") == 1
    assert metrics.value(IN_FLIGHT) == 0


# --- who may scrape -----------------------------------------------------------------------------


async def test_metrics_need_the_client_key_when_keys_are_configured(make_proxy, fake: FakeSobot):
    proxy = await make_proxy(client_keys=(KEY,))
    for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}):
        response = await proxy.get("/metrics", headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = await response.json()
        assert body["ret_code"] == "980401"
        assert "sobot_proxy" not in await response.text()
    metrics = await scrape(proxy, Authorization=f"Bearer {KEY}")
    assert metrics.series(GET_TOKEN)
    # Health stays open: a probe carries no key.
    assert (await proxy.get("/healthz")).status == 200
    assert (await proxy.get("/readyz")).status != 401


async def test_metrics_are_not_forwarded_and_not_counted_as_requests(proxy, fake: FakeSobot):
    for _ in range(3):
        await scrape(proxy)
    metrics = await scrape(proxy)
    assert metrics.value(REQUESTS) == 0
    assert fake.stats.outside_api_calls == fake.stats.api_calls == 0


async def test_a_head_or_post_to_metrics_is_not_an_api_call(proxy, fake: FakeSobot):
    assert (await proxy.head("/metrics")).status == 200
    answer = await send_raw(
        proxy,
        b"POST /metrics HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 404")
    assert fake.stats.outside_api_calls == fake.stats.api_calls == 0


# --- the token store ----------------------------------------------------------------------------


async def test_token_store_errors_are_counted_while_redis_is_down(
    make_proxy, fake: FakeSobot, redis_server: RedisServer
):
    proxy = await make_proxy(token_store=redis_server.url)

    async def ready() -> bool:
        return (await proxy.get("/readyz")).status == 200

    await eventually(ready)
    assert (await scrape(proxy)).value(STORE_ERRORS) == 0
    redis_server.stop()
    fake.expire_token()  # a renewal, which needs the store
    assert (await (await proxy.get("/api/echo")).json())["ret_code"] == "000000"

    async def counted() -> bool:
        return (await scrape(proxy)).value(STORE_ERRORS) >= 1

    await eventually(counted)


# --- several workers ----------------------------------------------------------------------------


async def test_with_workers_any_scrape_counts_every_workers_requests(tmp_path):
    """Each request on a new connection, so the kernel spreads them over both workers (all 40
    on one has a chance of 2^-39); every scrape, whichever worker answers it, reports them all."""
    requests = 40
    with (
        fake_sobot(tmp_path) as (_, fake_url),
        running(
            "serve", "--workers", "2", "--port", "0", cwd=tmp_path, env=proxy_env(fake_url)
        ) as proxy,
    ):
        started = proxy.wait_for_event("workers_started")
        url = f"http://127.0.0.1:{started['port']}"
        for _ in range(2):  # both workers listen
            proxy.wait_for_event("listening")
        wait_until_ready(url)
        connector = aiohttp.TCPConnector(force_close=True)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for i in range(requests):
                async with session.get(f"{url}/api/echo?i={i}") as answer:
                    assert answer.status == 200
            async with session.get(f"{fake_url}/_fake/stats") as answer:
                get_token_calls = (await answer.json())["get_token_calls"]
            totals = []
            for _ in range(10):
                async with session.get(f"{url}/metrics") as answer:
                    assert answer.status == 200
                    metrics = Scrape(await answer.text())
                totals.append(metrics.value(REQUESTS, status="200", ret_code="000000"))
                assert metrics.value(f"{DURATION}_count") == requests
                assert metrics.value(GET_TOKEN, result="ok") == get_token_calls
                assert metrics.value(IN_FLIGHT) == 0
        assert proxy.terminate() == 0
    assert totals == [requests] * 10
