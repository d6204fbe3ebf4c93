"""The token lifecycle: caching, single flight, proactive renewal, failures and backoff."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from proxy.errors import TokenUnavailable
from proxy.logs import get_logger
from proxy.sobot.credential import IssuedToken
from proxy.testing.fake_sobot import FakeSobot
from proxy.tokens.manager import Backoff, TokenManager
from proxy.tokens.source import GetTokenFailed
from tests.conftest import CapturedLogs, blackhole, eventually


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class GatedSource:
    """A token source whose fetches wait for the test to open the gate, and count."""

    def __init__(self, lifetime: float = 60.0) -> None:
        self.lifetime = lifetime
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.failure: GetTokenFailed | None = None

    async def fetch(self) -> IssuedToken:
        self.calls += 1
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return IssuedToken(f"token-{self.calls}", self.lifetime)


def manager(source: GatedSource, clock: Clock, **kwargs) -> TokenManager:
    return TokenManager(
        source, refresh_margin=300, log=get_logger(), clock=clock, wall_clock=clock, **kwargs
    )


# -- the manager on its own, with a controlled clock ------------------------------------------


async def test_the_token_is_cached_for_its_lifetime_and_never_handed_out_expired():
    clock, source = Clock(), GatedSource(lifetime=60)
    tokens = manager(source, clock)
    first = await tokens.get()
    clock.now += 59.9
    assert await tokens.get() is first
    clock.now += 0.1  # exactly at expiry: known expired
    assert tokens.current() is None
    second = await tokens.get()
    assert second.value == "token-2"
    assert source.calls == 2


async def test_concurrent_callers_share_one_fetch():
    clock, source = Clock(), GatedSource()
    source.gate.clear()
    tokens = manager(source, clock)
    waiters = [asyncio.create_task(tokens.get()) for _ in range(50)]
    await asyncio.sleep(0)  # let every waiter reach the shared fetch
    source.gate.set()
    async with asyncio.timeout(5):
        results = await asyncio.gather(*waiters)
    assert source.calls == 1
    assert len({id(token) for token in results}) == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch():
    clock, source = Clock(), GatedSource()
    source.gate.clear()
    tokens = manager(source, clock)
    leaving = asyncio.create_task(tokens.get())
    staying = asyncio.create_task(tokens.get())
    await asyncio.sleep(0)
    leaving.cancel()
    source.gate.set()
    async with asyncio.timeout(5):
        token = await staying
    assert token.value == "token-1"
    assert source.calls == 1


async def test_failures_back_off_exponentially_with_a_cap():
    clock, source = Clock(), GatedSource()
    source.failure = GetTokenFailed("get_token answered 900003", ret_code="900003")
    tokens = manager(source, clock, backoff=Backoff(first=1, cap=4))
    delays = []
    for _ in range(5):
        with pytest.raises(TokenUnavailable):
            await tokens.get()
        calls = source.calls
        with pytest.raises(TokenUnavailable) as raised:  # within the backoff: no new call
            await tokens.get()
        assert raised.value.ret_code == "900003"
        assert source.calls == calls
        delays.append(tokens.renewal_due_in())
        clock.now += delays[-1]
    assert delays == [1, 2, 4, 4, 4]
    source.failure = None
    assert (await tokens.get()).value == "token-6"
    assert tokens.status().problem is None


@pytest.mark.parametrize(
    ("lifetime", "margin", "renew_after"),
    [
        (86400, 300, 86100),  # a day-long token: a fixed margin, late in its life
        (7200, 300, 6900),
        (5, 300, 4.5),  # a short token: at 90% of its life, never at half-life
        (60, 1, 59),
    ],
)
async def test_renewal_is_due_late_in_the_tokens_life(lifetime, margin, renew_after):
    clock, source = Clock(), GatedSource(lifetime=lifetime)
    tokens = TokenManager(
        source, refresh_margin=margin, log=get_logger(), clock=clock, wall_clock=clock
    )
    await tokens.get()
    assert tokens.renewal_due_in() == pytest.approx(renew_after)


# -- through the proxy, against the fake Sobot --------------------------------------------------


async def test_the_first_token_is_fetched_at_start_up(proxy, fake: FakeSobot):
    async with asyncio.timeout(5):
        await fake.wait_for_get_token_calls(1)

    async def ready() -> bool:
        return (await proxy.get("/readyz")).status == 200

    await eventually(ready)
    assert fake.stats.api_calls == 0


async def test_concurrent_first_requests_cause_one_get_token(make_proxy, fake: FakeSobot):
    proxy = await make_proxy()
    async with asyncio.timeout(30):
        responses = await asyncio.gather(*(proxy.get("/api/echo") for _ in range(100)))
    assert [r.status for r in responses] == [200] * 100
    assert fake.stats.get_token_calls == 1


async def test_tokens_are_renewed_in_the_background_before_they_expire(make_proxy, fake: FakeSobot):
    fake.set_lifetime(1.0)
    await make_proxy()
    async with asyncio.timeout(10):
        await fake.wait_for_get_token_calls(4)
    # Each renewal came while the previous token was still valid, with no request to prompt it.
    assert fake.stats.renewals_before_expiry == fake.stats.get_token_calls - 1
    assert fake.stats.api_calls == 0


async def test_steady_load_across_renewals_sees_only_success(make_proxy, fake: FakeSobot):
    """Clients never see a 900002: at most the one request in flight at a rotation is replayed."""
    fake.set_lifetime(0.5)
    proxy = await make_proxy()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    codes = []
    async with asyncio.timeout(20):
        while loop.time() < deadline:
            response = await proxy.get("/api/echo")
            codes.append((await response.json())["ret_code"])
    assert set(codes) == {"000000"}
    assert 4 <= fake.stats.get_token_calls <= 7  # one per token lifetime, not one per request
    assert fake.stats.token_rejections <= fake.stats.get_token_calls - 1


async def test_get_token_failure_gives_502_and_backs_off(make_proxy, fake: FakeSobot):
    fake.fail_get_token("900003", times=-1)
    proxy = await make_proxy(backoff=Backoff(first=60, cap=60))
    async with asyncio.timeout(5):
        await fake.wait_for_get_token_calls(1)
    for _ in range(10):
        response = await proxy.get("/api/echo")
        assert response.status == 502
        answer = await response.json()
        assert answer["ret_code"] == "900003"
        assert "900003" in answer["ret_msg"]
    assert fake.stats.get_token_calls == 1  # not one per request
    assert fake.stats.api_calls == 0


async def test_a_wrong_configuration_is_said_plainly_in_the_log_and_readyz(
    make_proxy, fake: FakeSobot, logs: CapturedLogs
):
    fake.fail_get_token("900004", times=-1)
    proxy = await make_proxy(backoff=Backoff(first=60, cap=60))
    async with asyncio.timeout(5):
        await fake.wait_for_get_token_calls(1)

    async def reports_configuration_error() -> bool:
        answer = await (await proxy.get("/readyz")).json()
        return answer.get("configuration_error", False)

    await eventually(reports_configuration_error)
    response = await proxy.get("/readyz")
    answer = await response.json()
    assert response.status == 503
    assert answer["ret_code"] == "900004"
    assert "SOBOT_APP_KEY" in answer["ret_msg"]
    [event] = logs.events("configuration_rejected")
    assert event["level"] == "error"
    assert event["ret_code"] == "900004"


@pytest.mark.parametrize("mode", ["malformed", "http500", "disconnect"])
async def test_a_broken_get_token_answer_is_a_failed_fetch(make_proxy, fake: FakeSobot, mode):
    fake.fail_get_token(mode, times=-1)
    proxy = await make_proxy(backoff=Backoff(first=60, cap=60))
    response = await proxy.get("/api/echo")
    assert response.status == 502
    answer = await response.json()
    assert answer["ret_code"] == "980502"
    assert "get_token" in answer["ret_msg"]


async def test_the_proxy_recovers_by_itself_when_get_token_works_again(make_proxy, fake: FakeSobot):
    fake.fail_get_token("999999", times=3)
    proxy = await make_proxy(backoff=Backoff(first=0.05, cap=0.2))

    async def ready() -> bool:
        return (await proxy.get("/readyz")).status == 200

    await eventually(ready)
    assert fake.stats.get_token_calls == 4
    assert (await (await proxy.get("/api/echo")).json())["ret_code"] == "000000"


async def test_an_unreachable_upstream_gives_a_clear_502_and_the_proxy_stays_up(make_proxy):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxy = await make_proxy(base_url=f"http://127.0.0.1:{closed_port}")
    assert (await proxy.get("/healthz")).status == 200
    response = await proxy.get("/api/echo")
    assert response.status == 502
    answer = await response.json()
    assert answer["ret_code"] == "980502"
    assert "get_token" in answer["ret_msg"]
    readyz = await proxy.get("/readyz")
    assert readyz.status == 503
    assert (await readyz.json())["ret_code"] == "980502"


class BrokenSource(GatedSource):
    async def fetch(self) -> IssuedToken:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in the token source")
        return IssuedToken(f"token-{self.calls}", self.lifetime)


async def test_a_bug_in_fetching_is_a_failed_fetch_and_the_refresher_survives(
    logs: CapturedLogs,
):
    source = BrokenSource()
    tokens = TokenManager(
        source, refresh_margin=300, log=get_logger(), backoff=Backoff(first=0.01, cap=0.01)
    )
    with pytest.raises(TokenUnavailable) as raised:
        await tokens.get()
    assert "see its log" in raised.value.message
    tokens.start()
    try:
        async with asyncio.timeout(5):
            while tokens.current() is None:  # noqa: ASYNC110 -- the refresher's own backoff
                await asyncio.sleep(0.01)
    finally:
        await tokens.stop()
    assert source.calls == 2
    assert logs.events("get_token_internal_error")


# -- get_token's own exchange ---------------------------------------------------------------------


async def _echo(proxy) -> tuple[int, dict[str, str]]:
    """GET /api/echo through the proxy: its status and JSON answer, within a bounded wait."""
    async with asyncio.timeout(10):
        response = await proxy.get("/api/echo")
        return response.status, await response.json()


async def test_a_get_token_that_stalls_fails_within_the_read_timeout(make_proxy, fake: FakeSobot):
    """The read timeout is the longest wait for the next bytes, for get_token too: a get_token
    that connected and then stalled fails after it, not after connect + read timeout."""
    fake.fail_get_token("stall", times=-1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    proxy = await make_proxy(
        upstream_timeout=1.0, connect_timeout=5.0, backoff=Backoff(first=60, cap=60)
    )
    status, answer = await _echo(proxy)
    elapsed = loop.time() - started
    assert status == 502
    # Said by the read timeout, not by the whole call's limit (connect + read, 6 s).
    assert answer == {
        "ret_code": "980502",
        "ret_msg": "could not reach Sobot's get_token (no answer within 1.0 s)",
    }
    assert 1.0 <= elapsed < 5.0


async def test_a_get_token_that_cannot_connect_fails_after_the_connect_timeout(make_proxy):
    loop = asyncio.get_running_loop()
    with blackhole() as port:
        started = loop.time()
        proxy = await make_proxy(
            base_url=f"http://127.0.0.1:{port}",
            connect_timeout=0.5,
            upstream_timeout=5.0,
            backoff=Backoff(first=60, cap=60),
        )
        status, answer = await _echo(proxy)
        elapsed = loop.time() - started
    assert status == 502
    # Said by the connect timeout, not by the whole call's limit (connect + read, 5.5 s).
    assert answer == {
        "ret_code": "980502",
        "ret_msg": f"could not reach Sobot's get_token (no connection to 127.0.0.1:{port} in time)",
    }
    assert 0.5 <= elapsed < 5.0


async def test_get_token_is_never_resent_on_a_kept_alive_connection_that_drops(
    make_proxy, aiohttp_server, logs: CapturedLogs
):
    """Every get_token rotates the token, and one whose connection dropped after it was sent
    may have reached Sobot: it fails, and is never sent again (aiohttp's client would resend it
    on a new connection)."""
    arrivals: list[int] = []  # the proxy's port of each get_token's connection

    async def get_token(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        arrivals.append(request.transport.get_extra_info("peername")[1])
        if len(arrivals) == 1:
            item = {"token": "the-first-token", "expires_in": "86400"}
            return web.json_response({"ret_code": "000000", "ret_msg": "ok", "item": item})
        request.transport.abort()  # it arrived; the connection drops before an answer
        return web.Response()

    async def api(_request: web.Request) -> web.Response:
        return web.json_response({"ret_code": "900002", "ret_msg": "token expired"})

    sobot = web.Application()
    sobot.router.add_get("/api/get_token", get_token)
    sobot.router.add_route("*", "/api/{tail:.*}", api)
    server = await aiohttp_server(sobot, access_log=None)  # its log would show the sign
    proxy = await make_proxy(
        base_url=f"http://127.0.0.1:{server.port}", backoff=Backoff(first=60, cap=60)
    )
    async with asyncio.timeout(10):
        # Rejected: the proxy renews, on the connection its first get_token left open.
        response = await proxy.get("/api/echo")
        answer = await response.json()
    assert response.status == 502
    assert answer["ret_code"] == "980502"
    assert answer["ret_msg"].startswith("could not reach Sobot's get_token (")
    assert len(arrivals) == 2
    assert arrivals[0] == arrivals[1]  # the kept-alive connection: where a resend would follow
    assert b"get_token?" not in logs.raw  # the target carries the sign
