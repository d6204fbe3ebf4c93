"""Proxy processes sharing one Redis, against one fake Sobot that rotates its token on every
get_token: under steady load the replicas share one token and renew it once per lifetime, not
once each; Redis may stop and come back, and a replica may die holding the renewal lock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import ExitStack

import aiohttp
import redis.asyncio as aioredis

from proxy.tokens.store import StoredToken
from tests.conftest import RedisServer, eventually
from tests.processes import (
    HEX32,
    STACK_APPID,
    STACK_V6_APPID,
    V6_ROUTE,
    Running,
    fake_sobot,
    fake_stats_of,
    is_ready,
    proxy_env,
    routes_config,
    running,
    steady_load,
    token_served_by,
    v6_token_served_by,
    wait_until_ready,
)

REPLICAS = 4
CLIENTS_PER_REPLICA = 3


def start_replicas(
    stack: ExitStack, tmp_path, env: dict[str, str]
) -> tuple[list[str], list[Running]]:
    proxies = [
        stack.enter_context(running("serve", cwd=tmp_path, env=env)) for _ in range(REPLICAS)
    ]
    urls = [f"http://127.0.0.1:{proxy.wait_for_event('listening')['port']}" for proxy in proxies]
    for url in urls:
        wait_until_ready(url)
    return urls, proxies


async def tokens_held(session: aiohttp.ClientSession, urls: list[str]) -> set[str | None]:
    return {await token_served_by(session, url) for url in urls}


@contextlib.asynccontextmanager
async def under_load(
    session: aiohttp.ClientSession,
    urls: list[str],
    paths: tuple[str, ...] = ("/api/ws/5/ticket/save",),
    per_path: int = CLIENTS_PER_REPLICA,
) -> AsyncIterator[Counter[str]]:
    """Steady load on every replica, `per_path` clients on each of `paths`, while the block
    runs; the outcomes, counted."""
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    load = asyncio.gather(
        *(
            steady_load(session, urls, per_url=per_path, stop=stop, outcomes=outcomes, path=path)
            for path in paths
        )
    )
    try:
        yield outcomes
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await load


async def test_four_replicas_share_one_token_under_load(tmp_path, redis_server: RedisServer):
    lifetime, seconds = 3.0, 20.0
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(fake_sobot(tmp_path, token_lifetime=lifetime))
        env = proxy_env(fake_url, SOBOT_TOKEN_STORE=redis_server.url)
        urls, _ = start_replicas(stack, tmp_path, env)
        async with aiohttp.ClientSession() as session:
            async with under_load(session, urls) as outcomes:
                await asyncio.sleep(seconds)  # the load's duration: nothing to wait for
            stats = await fake_stats_of(session, fake_url)
    lifetimes = seconds / lifetime
    print(
        f"\n{REPLICAS} replicas, {seconds:.0f} s, tokens living {lifetime:.0f} s "
        f"({lifetimes:.1f} lifetimes): {sum(outcomes.values())} requests {dict(outcomes)}; "
        f"get_token calls {stats['get_token_calls']}; requests that met 900002 at Sobot and "
        f"were replayed {stats['token_rejections']}"
    )
    assert set(outcomes) == {"200 000000"}  # every request succeeded; no client saw 900002
    # About one per lifetime (renewed at 90% of it), plus the first: not one per replica.
    assert stats["get_token_calls"] <= lifetimes / 0.9 + 3


async def test_four_replicas_share_one_v6_token_kept_apart_from_the_v5_one(
    tmp_path, redis_server: RedisServer
):
    """A V6 set beside the default v5 set, both of one appid: the replicas share each kind's
    token through Redis under a key of its own, renewing V6's at half its life once for all."""
    lifetime, seconds = 3.0, 12.0
    v5_key = f"sobot-proxy:{STACK_APPID}:token"
    v6_key = f"sobot-proxy-v6:{STACK_V6_APPID}:token"
    assert STACK_V6_APPID == STACK_APPID  # the keys differ by kind alone
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(
            fake_sobot(tmp_path, token_lifetime=lifetime, v6_token_lifetime=lifetime)
        )
        env = proxy_env(
            fake_url,
            SOBOT_TOKEN_STORE=redis_server.url,
            SOBOT_PROXY_CONFIG=str(routes_config(tmp_path)),
        )
        urls, _ = start_replicas(stack, tmp_path, env)
        async with (
            aiohttp.ClientSession() as session,
            aioredis.Redis.from_url(redis_server.url) as store,
        ):
            paths = ("/api/ws/5/ticket/save", f"{V6_ROUTE}v6/agents")
            async with under_load(session, urls, paths, per_path=2) as outcomes:
                await asyncio.sleep(seconds)  # the load's duration: nothing to wait for
            stats = await fake_stats_of(session, fake_url)
            lifetimes = seconds / lifetime
            print(
                f"\n{REPLICAS} replicas, v5 and v6 routes, {seconds:.0f} s, tokens living "
                f"{lifetime:.0f} s ({lifetimes:.1f} lifetimes): {sum(outcomes.values())} "
                f"requests {dict(outcomes)}; get_token calls {stats['get_token_calls']}, "
                f"/tokens/company calls {stats['v6_token_calls']}; requests replayed after a "
                f"900002 {stats['token_rejections']}, after a 401 {stats['v6_token_rejections']}"
            )
            # Every request succeeded: no client saw 900002 or a 401.
            assert set(outcomes) == {"200 000000", "200 200"}
            # V6 is renewed at half its life: about two calls per lifetime for all four
            # together, plus the first; four replicas each renewing would make four times more.
            assert stats["v6_token_calls"] <= lifetimes / 0.5 + 3
            assert stats["get_token_calls"] <= lifetimes / 0.9 + 3
            # Long-lived tokens from the next renewals on: then every replica soon holds, for
            # a moment that lasts, the two tokens Redis holds.
            for kind in ("v5", "v6"):
                async with session.post(
                    f"{fake_url}/_fake/lifetime", params={"kind": kind, "seconds": "3600"}
                ) as answer:
                    assert answer.status == 200

            async def stored(key: str) -> str | None:
                raw = await store.get(key)
                record = StoredToken.decode(raw if isinstance(raw, bytes) else b"")
                return None if record is None else record.value

            async def every_replica_serves_the_stored_tokens() -> bool:
                v5_token, v6_token = await stored(v5_key), await stored(v6_key)
                served_v5 = {await token_served_by(session, url) for url in urls}
                served_v6 = {await v6_token_served_by(session, url) for url in urls}
                return None not in (v5_token, v6_token) and (served_v5, served_v6) == (
                    {v5_token},
                    {v6_token},
                )

            await eventually(every_replica_serves_the_stored_tokens, within=15)
            v5_token, v6_token = await stored(v5_key), await stored(v6_key)
            token_keys = {key.decode() async for key in store.scan_iter("*:token")}
    # One appid, two kinds, two keys: neither token ever stood in for the other.
    assert token_keys == {v5_key, v6_key}
    assert v5_token is not None
    assert HEX32.fullmatch(v5_token)
    assert v6_token is not None
    assert v6_token.count(".") == 2  # a JWT


async def test_redis_stopped_and_restarted_under_load(tmp_path, redis_server: RedisServer):
    """An outage within one token's life loses nothing, and after it the replicas renew
    together again: one get_token per lifetime, one token held by all."""
    lifetime, outage = 6.0, 2.0
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(fake_sobot(tmp_path, token_lifetime=lifetime))
        env = proxy_env(fake_url, SOBOT_TOKEN_STORE=redis_server.url)
        urls, proxies = start_replicas(stack, tmp_path, env)
        async with aiohttp.ClientSession() as session:

            async def renewed_and_shared(calls: int) -> bool:
                stats = await fake_stats_of(session, fake_url)
                return (
                    stats["get_token_calls"] >= calls and len(await tokens_held(session, urls)) == 1
                )

            async with under_load(session, urls) as outcomes:
                # The outage starts once every replica holds a freshly renewed token, so the
                # token outlives it: the outage a replica can ride out with the token it holds.
                await eventually(lambda: renewed_and_shared(2), within=30)
                redis_server.stop()
                await asyncio.sleep(outage)  # the outage's length: nothing to wait for
                redis_server.start()  # the same port, empty: nothing was persisted
                # Two more renewals, each shared by all through the restarted store.
                await eventually(lambda: renewed_and_shared(4), within=30)
            stats = await fake_stats_of(session, fake_url)
            held = await tokens_held(session, urls)
            # Every replica noticed the outage (its watcher lost the connection) and came back.
            for proxy in proxies:
                proxy.wait_for_event("token_store_unavailable")
                proxy.wait_for_event("token_store_available")
    print(
        f"\n{REPLICAS} replicas, Redis down {outage:.0f} s, tokens living {lifetime:.0f} s: "
        f"{sum(outcomes.values())} requests {dict(outcomes)}; get_token calls "
        f"{stats['get_token_calls']}; tokens held at the end: {len(held)}"
    )
    assert set(outcomes) == {"200 000000"}  # nothing lost, no client saw 900002
    assert stats["get_token_calls"] == 4  # the first, and one per lifetime: never one each
    assert len(held) == 1
    assert None not in held


async def test_a_replica_killed_holding_the_renewal_lock_is_replaced_after_its_lease(
    tmp_path, redis_server: RedisServer
):
    lock_key = f"sobot-proxy:{STACK_APPID}:renewal-lock"
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(fake_sobot(tmp_path))
        # Lease: connect + read timeout + 5 s = 10 s; the stalled get_token outlives the kill.
        env = proxy_env(
            fake_url,
            SOBOT_TOKEN_STORE=redis_server.url,
            SOBOT_CONNECT_TIMEOUT="1",
            SOBOT_UPSTREAM_TIMEOUT="4",
        )
        store = aioredis.Redis.from_url(redis_server.url)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{fake_url}/_fake/fail-get-token", params={"mode": "stall", "times": "1"}
            ) as answer:
                assert answer.status == 200
            holder = stack.enter_context(running("serve", cwd=tmp_path, env=env))

            async def holding() -> bool:
                stats = await fake_stats_of(session, fake_url)
                return stats["get_token_calls"] == 1 and bool(await store.exists(lock_key))

            await eventually(holding)
            os.kill(holder.process.pid, signal.SIGKILL)  # mid-renewal, the lock held
            holder.process.wait(timeout=10)
            lease_left_ms = await store.pttl(lock_key)
            assert lease_left_ms > 0  # nobody released it: the lease will end it

            successor = stack.enter_context(running("serve", cwd=tmp_path, env=env))
            url = f"http://127.0.0.1:{successor.wait_for_event('listening')['port']}"
            assert not await is_ready(session, url)  # waiting for the lease, not fetching
            await eventually(lambda: is_ready(session, url), within=30)
            stats = await fake_stats_of(session, fake_url)
            async with session.get(f"{url}/api/echo") as answer:
                assert (await answer.json())["ret_code"] == "000000"
        await store.aclose()
    print(
        f"\nlease left when the holder died: {lease_left_ms} ms; "
        f"get_token calls {stats['get_token_calls']}"
    )
    assert stats["get_token_calls"] == 2  # the dead holder's, then the successor's
