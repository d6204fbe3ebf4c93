"""One token for many proxies: replicas sharing a real Redis, against one fake Sobot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from proxy.config.tenants import TenantSettings
from proxy.logs import get_logger
from proxy.server.app import TENANTS
from proxy.testing.fake_sobot import FakeSobot
from proxy.tokens.manager import TokenManager
from proxy.tokens.store import POOL_CONNECTIONS, SharedRedis, StoredToken
from tests.conftest import (
    APP_KEY,
    APPID,
    CapturedLogs,
    RedisServer,
    eventually,
    lying_peer,
    tokens_of,
)


async def same_token(*proxies) -> bool:
    held = [tokens_of(p).current() for p in proxies]
    return len({token.value if token else None for token in held}) == 1 and None not in held


async def test_a_second_replica_adopts_the_first_ones_token(
    make_proxy, fake: FakeSobot, redis_server: RedisServer
):
    first = await make_proxy(token_store=redis_server.url)
    await fake.wait_for_get_token_calls(1)
    await eventually(lambda: same_token(first))
    second = await make_proxy(token_store=redis_server.url)
    await eventually(lambda: same_token(first, second))
    for proxy in (first, second):
        assert (await (await proxy.get("/api/echo")).json())["ret_code"] == "000000"
    assert fake.stats.get_token_calls == 1


async def test_an_expiry_seen_by_every_replica_costs_one_get_token(
    make_proxy, fake: FakeSobot, redis_server: RedisServer
):
    replicas = [await make_proxy(token_store=redis_server.url) for _ in range(3)]
    await eventually(lambda: same_token(*replicas))
    fake.expire_token()

    async def call(proxy) -> str:
        return (await (await proxy.post("/api/echo", data=b"x")).json())["ret_code"]

    async with asyncio.timeout(30):
        codes = await asyncio.gather(*(call(p) for p in replicas for _ in range(20)))
    assert set(codes) == {"000000"}
    assert fake.stats.get_token_calls == 2  # the first token, and one renewal for all
    await eventually(lambda: same_token(*replicas))


async def test_replicas_renew_once_per_lifetime_not_once_each(
    make_proxy, fake: FakeSobot, redis_server: RedisServer
):
    fake.set_lifetime(1.0)
    replicas = [await make_proxy(token_store=redis_server.url) for _ in range(3)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4
    codes = []
    async with asyncio.timeout(30):
        while loop.time() < deadline:
            for proxy in replicas:
                codes.append((await (await proxy.get("/api/echo")).json())["ret_code"])
    assert set(codes) == {"000000"}
    # About one per second of lifetime (renewed at 90%), not three per second.
    assert fake.stats.get_token_calls <= 7


async def test_with_redis_down_replicas_serve_on_renew_alone_and_agree_again_after(
    make_proxy, fake: FakeSobot, redis_server: RedisServer, logs: CapturedLogs
):
    first = await make_proxy(token_store=redis_server.url)
    second = await make_proxy(token_store=redis_server.url)
    await eventually(lambda: same_token(first, second))
    redis_server.stop()
    assert (await (await first.get("/api/echo")).json())["ret_code"] == "000000"
    fake.expire_token()  # a renewal is due while the store is down
    for proxy in (first, second):
        assert (await (await proxy.get("/api/echo")).json())["ret_code"] == "000000"
    assert logs.events("token_store_unavailable")
    redis_server.start()
    await eventually(lambda: same_token(first, second))
    for proxy in (first, second):
        assert (await (await proxy.get("/api/echo")).json())["ret_code"] == "000000"
    assert logs.events("token_store_reconciled")


async def test_a_replica_that_died_holding_the_lock_holds_it_no_longer_than_its_lease(
    make_proxy, fake: FakeSobot, redis_server: RedisServer
):
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        # A replica takes the renewal lock with a 2 s lease, and dies without releasing it.
        lock = client.lock(f"sobot-proxy:{APPID}:renewal-lock", timeout=2)
        assert await lock.acquire(blocking=False)
        loop = asyncio.get_running_loop()
        started = loop.time()
        proxy = await make_proxy(token_store=redis_server.url)
        async with asyncio.timeout(20):
            response = await proxy.get("/api/echo")
        assert (await response.json())["ret_code"] == "000000"
        assert loop.time() - started >= 1.5  # it waited for the lease, then took over
        assert fake.stats.get_token_calls == 1
    finally:
        await client.aclose()


async def test_a_redis_that_comes_back_empty_gets_the_held_token_back(
    make_proxy, fake: FakeSobot, redis_server: RedisServer
):
    proxy = await make_proxy(token_store=redis_server.url)
    await eventually(lambda: same_token(proxy))
    redis_server.stop()
    redis_server.start()  # no persistence: empty
    client = aioredis.Redis.from_url(redis_server.url)
    try:

        async def stored_again() -> bool:
            return await client.get(f"sobot-proxy:{APPID}:token") is not None

        await eventually(stored_again)
    finally:
        await client.aclose()
    # A replica starting now adopts it, rather than rotating the token for the others.
    newcomer = await make_proxy(token_store=redis_server.url)
    await eventually(lambda: same_token(proxy, newcomer))
    assert fake.stats.get_token_calls == 1


async def test_an_older_token_never_overwrites_a_newer_one(redis_server: RedisServer):
    """A holder whose lease ran out mid-fetch must not put back an older token."""
    redis = SharedRedis(redis_server.url, password=None, log=get_logger())
    store = redis.store(prefix=f"sobot-proxy:{APPID}:", lease=5)
    try:
        now = time.time()
        newer = StoredToken("newer-token-value", now, 60)
        older = StoredToken("older-token-value", now - 1, 60)
        await store.save(newer)
        await store.save(older)
        stored = await store.load()
        assert stored is not None
        assert stored.value == "newer-token-value"
    finally:
        await redis.close()


async def test_an_early_renewal_waits_for_redis_while_the_token_is_still_good(
    make_proxy, fake: FakeSobot, redis_server: RedisServer, logs: CapturedLogs
):
    """Renewing alone would rotate the token under every other replica: with Redis down, a
    renewal that is merely due is postponed for as long as the held token is valid."""
    fake.set_lifetime(4.0)  # renewal due at 3.6 s
    first = await make_proxy(token_store=redis_server.url)
    second = await make_proxy(token_store=redis_server.url)
    await eventually(lambda: same_token(first, second))
    redis_server.stop()

    async def postponed() -> bool:
        return bool(logs.events("token_renewal_postponed"))

    await eventually(postponed)
    assert fake.stats.get_token_calls == 1  # nobody rotated it alone
    for proxy in (first, second):
        assert (await (await proxy.get("/api/echo")).json())["ret_code"] == "000000"
    redis_server.start()

    async def renewed_together() -> bool:
        return fake.stats.get_token_calls == 2 and await same_token(first, second)

    await eventually(renewed_together)
    assert fake.stats.token_rejections == 0


@pytest.mark.parametrize(
    "answer",
    [
        # redis-py's handshake then raises AttributeError, outside RedisError.
        b"+OK\r\n",
        # Not RESP at all: an HTTP server on the port.
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["ok-to-everything", "not-resp"],
)
async def test_a_store_that_answers_garbage_is_a_store_that_is_down(
    make_proxy, fake: FakeSobot, logs: CapturedLogs, answer: bytes
):
    """Whatever the store raises, the proxy works alone, as with a Redis that is down: ready
    with its own token, requests answered, the outage logged once, not at every retry."""
    async with lying_peer(answer) as peer:
        proxy = await make_proxy(token_store=peer.url)

        async def ready() -> bool:
            return (await proxy.get("/readyz")).status == 200

        await eventually(ready)
        assert fake.stats.get_token_calls == 1  # its own token
        async with asyncio.timeout(10):
            responses = await asyncio.gather(*(proxy.get("/api/echo") for _ in range(20)))
            answers = [(r.status, (await r.json())["ret_code"]) for r in responses]
        assert answers == [(200, "000000")] * 20

        async def retried_a_few_times() -> bool:
            return peer.connections >= 5  # the first look, the watcher, and its retries

        await eventually(retried_a_few_times)
    assert len(logs.events("token_store_unavailable")) == 1
    assert len(logs.events("token_renewing_alone")) == 1
    assert logs.events("token_store_available") == []
    assert [e["event"] for e in logs.events() if e["level"] in ("error", "critical")] == []
    assert [e["event"] for e in logs.events() if "exception" in e] == []


# -- one client and one subscriber for every tenant ------------------------------------------

TENANTS_COUNT = 50


def company(index: int) -> tuple[str, str]:
    return f"company-{index}", f"company-{index}-app-key-0123456789"


@pytest.fixture
async def companies_host() -> AsyncIterator[FakeSobot]:
    """One fake standing for Sobot in front of TENANTS_COUNT companies, and `default`'s."""
    sobot = FakeSobot(APPID, APP_KEY, companies=dict(map(company, range(TENANTS_COUNT))))
    await sobot.start()
    yield sobot
    await sobot.stop()


def many_tenants(host: FakeSobot) -> tuple[TenantSettings, ...]:
    return tuple(
        TenantSettings(f"t{index}", *company(index), host.url) for index in range(TENANTS_COUNT)
    )


async def use(proxy: TestClient[Any, Any], tenant: str) -> str:
    response = await proxy.get("/api/echo", headers={"X-Sobot-Tenant": tenant})
    return str((await response.json())["ret_code"])


def tokens_of_tenant(proxy: TestClient[Any, Any], tenant: str) -> TokenManager:
    started = proxy.app[TENANTS].get(tenant)
    assert started is not None
    managed = started.sets.named("default")
    assert managed is not None
    return managed.tokens


async def proxies_connections(admin: aioredis.Redis) -> list[dict[str, str]]:
    """Redis's clients but the one asking (CLIENT LIST, one dict of fields per client)."""
    own = await admin.client_id()
    return [client for client in await admin.client_list() if int(client["id"]) != own]


async def test_many_tenants_share_one_redis_client_and_one_subscription(
    make_proxy, companies_host: FakeSobot, redis_server: RedisServer
):
    """However many tenants, a proxy holds one pub/sub connection and a bounded pool; a token
    another replica publishes for tenant K still reaches this proxy's tenant K."""
    tenants = many_tenants(companies_host)
    first = await make_proxy(
        base_url=companies_host.url, token_store=redis_server.url, tenants=tenants
    )
    async with asyncio.timeout(30):
        codes = await asyncio.gather(*(use(first, tenant.name) for tenant in tenants))
    assert set(codes) == {"000000"}
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        channels = [f"sobot-proxy:{tenant.appid}:new-token" for tenant in tenants]

        async def all_subscribed() -> bool:
            counts = await admin.pubsub_numsub(*channels)
            return all(count == 1 for _, count in counts)

        await eventually(all_subscribed)
        clients = await proxies_connections(admin)
        subscribers = [client for client in clients if int(client["sub"]) > 0]
        assert [int(client["sub"]) for client in subscribers] == [TENANTS_COUNT + 1]
        assert len(clients) <= POOL_CONNECTIONS, f"{len(clients)} connections"

        # Another replica: its tenant K adopts the stored token, then renews it after Sobot
        # rotated it; this proxy's K hears of it through the one subscription.
        second = await make_proxy(
            base_url=companies_host.url, token_store=redis_server.url, tenants=tenants
        )
        tenant = tenants[TENANTS_COUNT // 2].name
        assert await use(second, tenant) == "000000"
        held = tokens_of_tenant(first, tenant).current()
        assert held is not None
        companies_host.expire_token(appid=tenants[TENANTS_COUNT // 2].appid)
        assert await use(second, tenant) == "000000"  # 900002, renewed, stored and published
        renewed = tokens_of_tenant(second, tenant).current()
        assert renewed is not None
        assert renewed.value != held.value

        async def adopted() -> bool:
            current = tokens_of_tenant(first, tenant).current()
            return current is not None and current.value == renewed.value

        await eventually(adopted, within=5)
        rejections = companies_host.stats.token_rejections
        assert await use(first, tenant) == "000000"
        assert companies_host.stats.token_rejections == rejections  # no replay needed
    finally:
        await admin.aclose()


async def test_an_idle_tenant_keeps_no_subscription(
    make_proxy, fake: FakeSobot, redis_server: RedisServer, logs: CapturedLogs
):
    beta = FakeSobot("beta-appid", "beta-app-key-0123456789abcdef", token_lifetime=1.0)
    await beta.start()
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        proxy = await make_proxy(
            token_store=redis_server.url,
            tenants=(
                TenantSettings("beta", "beta-appid", "beta-app-key-0123456789abcdef", beta.url),
            ),
        )
        assert await use(proxy, "beta") == "000000"
        channel = "sobot-proxy:beta-appid:new-token"

        async def subscribers() -> int:
            return int((await admin.pubsub_numsub(channel))[0][1])

        await eventually(lambda: _equals(subscribers(), 1))
        await eventually(lambda: _equals(subscribers(), 0))  # unused for its token's life
        assert any(line.get("tenant") == "beta" for line in logs.events("token_renewal_paused"))
        default_channel = f"sobot-proxy:{APPID}:new-token"
        assert (await admin.pubsub_numsub(default_channel))[0][1] == 1  # `default` never idles
        assert await use(proxy, "beta") == "000000"
        await eventually(lambda: _equals(subscribers(), 1))  # watching again
    finally:
        await admin.aclose()
        await beta.stop()


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
