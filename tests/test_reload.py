"""Reloading a running proxy (server/reload.py): secret files re-read within seconds of a
change (a Kubernetes symlink swap too), SIGHUP re-reading the TOML file's tenants, a held token
kept across a key change, a bad reload changing nothing, requests in flight finishing, the
Redis password swapped for new connections. In-process proxies and fakes on real sockets, and
a real `serve` process taking SIGHUP."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from proxy.config.settings import Settings, load_settings
from proxy.config.tenants import TenantSettings
from proxy.logs import get_logger
from proxy.server.access import AccessPolicy
from proxy.server.app import API, RELOADER, TENANTS, make_app
from proxy.server.building import TenantBuilder
from proxy.server.hangups import note_early
from proxy.server.metrics import Metrics
from proxy.server.reload import Reloader
from proxy.server.tenants import Rebuilt, SetChanges, Tenant, Tenants
from proxy.testing.fake_sobot import FakeSobot
from proxy.tokens.manager import Backoff, TokenManager
from proxy.tokens.source import token_client
from proxy.tokens.store import TokenStores
from tests.conftest import APP_KEY, APPID, CapturedLogs, RedisServer, eventually
from tests.processes import (
    STACK_APP_KEY,
    STACK_APPID,
    command_env,
    fake_sobot,
    http_get,
    running,
    wait_until_ready,
)

NEW_KEY = "rotated-app-key-0123456789abcdef"
ACME_APPID, ACME_KEY = "acme-appid", "acme-app-key-0123456789abcdef"
HEADER = "X-Sobot-Tenant"


def config_file(directory: Path, fake_url: str, *, more: str = "") -> Path:
    """A TOML file for `default` on `fake_url` with its key in a file beside it."""
    key_file = directory / "app_key"
    if not key_file.exists():
        key_file.write_text(APP_KEY + "\n")
    config = directory / "proxy.toml"
    config.write_text(
        f'appid = "{APPID}"\napp_key_file = "{key_file}"\nbase_url = "{fake_url}"\n{more}'
    )
    return config


def loader(config: Path) -> Callable[[], Settings]:
    return lambda: load_settings({"config": str(config)}, {})


async def reloading_proxy(
    aiohttp_client: Any,
    config: Path,
    logs: CapturedLogs,
    *,
    backoff: Backoff | None = None,
    **changes: Any,
) -> TestClient[Any, Any]:
    load = loader(config)
    settings = dataclasses.replace(load(), **changes)
    app = make_app(
        settings, secrets=logs.secrets, backoff=backoff, reload_with=load, watch_interval=0.1
    )
    client: TestClient[Any, Any] = await aiohttp_client(app)
    return client


def tokens(proxy: TestClient[Any, Any], tenant: str = "default") -> TokenManager:
    started = {each.name: each for each in proxy.app[TENANTS].started()}
    return started[tenant].sets.named("default").tokens


async def reloaded(logs: CapturedLogs, count: int = 1, event: str = "reloaded") -> dict[str, Any]:
    async def logged() -> bool:
        return len(logs.events(event)) >= count

    await eventually(logged, within=10)
    return logs.events(event)[count - 1]


@pytest.fixture
async def acme_host() -> AsyncIterator[FakeSobot]:
    sobot = FakeSobot(ACME_APPID, ACME_KEY)
    await sobot.start()
    yield sobot
    await sobot.stop()


# -- a secret file changed -------------------------------------------------------------------


async def test_a_rewritten_key_file_is_used_for_the_next_token_and_the_held_one_serves_on(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    proxy = await reloading_proxy(aiohttp_client, config_file(tmp_path, fake.url), logs)
    assert (await proxy.get("/api/echo")).status == 200
    held = fake.current_token
    fake.set_app_key(NEW_KEY)  # rotated in Sobot's console: only the new key is accepted now
    (tmp_path / "app_key").write_text(NEW_KEY + "\n")
    event = await reloaded(logs)
    assert event["cause"] == "files"
    assert event["keys_changed"] == ["default/default"]
    # The token held before is still the one served: no token call was made for the reload.
    assert (await proxy.get("/api/echo")).status == 200
    assert fake.received[-1].headers["token"] == held
    assert fake.stats.get_token_calls == 1
    # Sobot rejects it (it expired): the replay's fetch signs with the new key, and works.
    fake.expire_token()
    assert (await proxy.get("/api/echo")).status == 200
    assert fake.stats.get_token_calls == 2
    assert fake.received[-1].token_state == "valid"
    assert NEW_KEY.encode() not in logs.raw
    assert APP_KEY.encode() not in logs.raw


async def test_a_kubernetes_secret_swapped_through_its_symlink_is_noticed(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    """A mounted Secret: `app_key -> ..data/app_key`, `..data -> ..v1`; an update writes ..v2
    and renames a new `..data` link over the old one."""
    mount = tmp_path / "secret"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "app_key").write_text(APP_KEY)
    (mount / "..data").symlink_to("..v1")
    (mount / "app_key").symlink_to("..data/app_key")
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'appid = "{APPID}"\napp_key_file = "{mount / "app_key"}"\nbase_url = "{fake.url}"\n'
    )
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    assert (await proxy.get("/api/echo")).status == 200

    (mount / "..v2").mkdir()
    (mount / "..v2" / "app_key").write_text(NEW_KEY)
    (mount / "..data_tmp").symlink_to("..v2")
    os.replace(mount / "..data_tmp", mount / "..data")
    fake.set_app_key(NEW_KEY)
    event = await reloaded(logs)
    assert event["keys_changed"] == ["default/default"]
    fake.expire_token()
    assert (await proxy.get("/api/echo")).status == 200
    assert fake.stats.get_token_calls == 2


async def test_a_key_file_rewritten_with_the_same_key_is_an_unchanged_reload(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    proxy = await reloading_proxy(aiohttp_client, config_file(tmp_path, fake.url), logs)
    (tmp_path / "app_key").write_text(APP_KEY + "\n\n")  # an extra newline: the same key
    event = await reloaded(logs, event="reload_unchanged")
    assert (event["cause"], event["level"]) == ("files", "info")
    assert not logs.events("reloaded")
    assert (await proxy.get("/api/echo")).status == 200


async def test_an_unreadable_key_file_fails_the_reload_and_changes_nothing(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    proxy = await reloading_proxy(aiohttp_client, config_file(tmp_path, fake.url), logs)
    assert (await proxy.get("/api/echo")).status == 200
    (tmp_path / "app_key").write_text("")  # emptied: not a key
    failed = await reloaded(logs, event="reload_failed")
    assert failed["level"] == "error"
    assert "app_key" in failed["problem"]
    assert not logs.events("reloaded")
    # Still the old key: a fetch now signs with it, and the fake (which has the old) agrees.
    fake.expire_token()
    assert (await proxy.get("/api/echo")).status == 200
    assert fake.stats.get_token_calls == 2


# -- SIGHUP: the TOML file again -----------------------------------------------------------------


def acme_table(acme_host: FakeSobot, directory: Path) -> str:
    (directory / "acme_key").write_text(ACME_KEY)
    return (
        f'[tenants.acme]\nappid = "{ACME_APPID}"\napp_key_file = "{directory / "acme_key"}"\n'
        f'base_url = "{acme_host.url}"\n'
    )


async def test_sighup_adds_and_removes_tenants(
    aiohttp_client, fake: FakeSobot, acme_host: FakeSobot, logs: CapturedLogs, tmp_path
):
    config = config_file(tmp_path, fake.url)
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    assert (await proxy.get("/api/echo", headers={HEADER: "acme"})).status == 404

    config_file(tmp_path, fake.url, more=acme_table(acme_host, tmp_path))
    os.kill(os.getpid(), signal.SIGHUP)  # the in-process proxy's own handler takes it
    event = await reloaded(logs)
    assert (event["cause"], event["tenants_added"]) == ("signal", ["acme"])
    response = await proxy.get("/api/echo", headers={HEADER: "acme"})
    assert response.status == 200
    assert acme_host.received[-1].token_state == "valid"
    acme_tokens = tokens(proxy, "acme")
    assert acme_tokens.renewing

    config_file(tmp_path, fake.url)
    os.kill(os.getpid(), signal.SIGHUP)
    event = await reloaded(logs, 2)
    assert event["tenants_removed"] == ["acme"]
    response = await proxy.get("/api/echo", headers={HEADER: "acme"})
    assert response.status == 404
    assert (await response.json())["ret_code"] == "980404"
    assert not acme_tokens.renewing  # retired: renews no more
    assert (await proxy.get("/api/echo")).status == 200  # default untouched
    assert fake.stats.get_token_calls == 1
    # Its token series are gone from /metrics: the labels stay the configured names.
    assert 'tenant="acme"' not in await (await proxy.get("/metrics")).text()


async def test_a_sighup_before_the_reloader_starts_is_answered_by_one_reload_when_it_does(
    aiohttp_client, fake: FakeSobot, acme_host: FakeSobot, logs: CapturedLogs, tmp_path
):
    """The configuration is read, then a SIGHUP comes (acme was just added) before the handler
    is there: it is noted, and the proxy reloads once it can."""
    config = config_file(tmp_path, fake.url)
    load = loader(config)
    settings = load()  # as `serve` reads it at start-up
    note_early()  # as `serve` does first of all
    config_file(tmp_path, fake.url, more=acme_table(acme_host, tmp_path))
    os.kill(os.getpid(), signal.SIGHUP)
    app = make_app(settings, secrets=logs.secrets, reload_with=load, watch_interval=0.1)
    proxy = await aiohttp_client(app)
    event = await reloaded(logs)
    assert (event["cause"], event["tenants_added"]) == ("signal", ["acme"])
    assert len(logs.events("reload_requested")) == 1
    assert (await proxy.get("/api/echo", headers={HEADER: "acme"})).status == 200


async def test_a_sighup_while_shutting_down_is_ignored(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    """Once the Reloader is closed, SIGHUP no longer reloads, and its default action (the
    end of the process) must not come back while the rest is cleaned up."""
    proxy = await reloading_proxy(aiohttp_client, config_file(tmp_path, fake.url), logs)
    await proxy.app[RELOADER].close()  # the first step of the app's cleanup
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGHUP)  # ignored: this test process lives on
    assert (await proxy.get("/api/echo")).status == 200


async def test_a_broken_toml_file_on_sighup_changes_nothing_and_the_proxy_serves_on(
    aiohttp_client, fake: FakeSobot, acme_host: FakeSobot, logs: CapturedLogs, tmp_path
):
    config = config_file(tmp_path, fake.url, more=acme_table(acme_host, tmp_path))
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    config.write_text('appid = "unterminated\n[tenants.\n')
    await proxy.app[RELOADER].reload(loader(config))
    failed = logs.events("reload_failed")
    assert failed  # one line per problem
    assert {line["cause"] for line in failed} == {"signal"}
    assert all(line["level"] == "error" and line["problem"] for line in failed)
    assert not logs.events("reloaded")
    for headers in ({}, {HEADER: "acme"}):
        assert (await proxy.get("/api/echo", headers=headers)).status == 200


async def test_a_setting_that_needs_a_restart_is_named_and_the_rest_applied(
    aiohttp_client, fake: FakeSobot, acme_host: FakeSobot, logs: CapturedLogs, tmp_path
):
    config = config_file(tmp_path, fake.url)
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    config_file(tmp_path, fake.url, more="upstream_timeout = 7\n" + acme_table(acme_host, tmp_path))
    assert await proxy.app[RELOADER].reload(loader(config))
    [warning] = logs.events("reload_needs_restart")
    assert warning["settings"] == ["upstream_timeout"]
    assert "7" not in str(warning["settings"])  # names, never values
    assert logs.events("reloaded")[0]["tenants_added"] == ["acme"]
    assert proxy.app[RELOADER].settings.upstream_timeout == 30.0  # as it runs


async def test_a_reload_that_would_leave_a_kept_route_without_its_set_changes_nothing(
    aiohttp_client, logs: CapturedLogs, tmp_path
):
    """Routes need a restart: removing a route and its set at once would keep the route and
    drop the set, which start-up refuses (and every request on it would get 403)."""
    sobot = FakeSobot(APPID, APP_KEY, v6_appid="v6-appid", v6_secret="v6-secret-0123")
    await sobot.start()
    try:
        callcenter = (
            '[credentials.callcenter]\nkind = "v6"\nappid = "v6-appid"\n'
            'app_key = "v6-secret-0123"\n'
            '[[routes]]\nprefix = "/callservice/"\ncredentials = "callcenter"\n'
        )
        config = config_file(tmp_path, sobot.url, more=callcenter)
        proxy = await reloading_proxy(aiohttp_client, config, logs)
        assert (await proxy.get("/callservice/v6/echo")).status == 200
        config_file(tmp_path, sobot.url)  # the route and its set both removed
        assert not await proxy.app[RELOADER].reload(loader(config))
        [failed] = logs.events("reload_failed")
        assert "'callcenter' is not a credential set" in failed["problem"]
        assert not logs.events("reloaded")
        assert (await proxy.get("/callservice/v6/echo")).status == 200
        assert proxy.app[TENANTS].default.sets.find("callcenter") is not None
    finally:
        await sobot.stop()


# -- a new key Sobot refuses ---------------------------------------------------------------


@pytest.fixture
async def frozen_fake() -> AsyncIterator[FakeSobot]:
    """A fake whose clock stands still: its tokens never expire on its side, so the proxy's
    view of a token's life alone decides when it renews."""
    sobot = FakeSobot(APPID, APP_KEY, token_lifetime=4.0, clock=lambda: 0.0)
    await sobot.start()
    yield sobot
    await sobot.stop()


async def test_a_new_key_sobot_refuses_keeps_the_valid_held_token_serving(
    aiohttp_client, frozen_fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    fake = frozen_fake
    proxy = await reloading_proxy(
        aiohttp_client,
        config_file(tmp_path, fake.url),
        logs,
        backoff=Backoff(first=60, cap=60),
    )
    assert (await proxy.get("/api/echo")).status == 200
    held = fake.current_token
    (tmp_path / "app_key").write_text("a-mistyped-key-0123456789abcdef")  # not Sobot's key
    await reloaded(logs)
    # At 90% of its 4 s, the renewal signs with the new key, and Sobot refuses it.
    rejected = await reloaded(logs, event="configuration_rejected")
    assert rejected["ret_code"] == "900003"
    assert tokens(proxy).expires_in() is not None  # the valid token is still held...
    response = await proxy.get("/api/echo")
    assert response.status == 200  # ...and serves
    assert fake.received[-1].headers["token"] == held
    response = await proxy.get("/readyz")
    assert response.status == 200
    entry = (await response.json())["credentials"]["default"]
    assert entry["configuration_error"] is True
    assert "900003" in entry["problem"]


# -- requests in flight ----------------------------------------------------------------------


async def test_requests_in_flight_finish_across_a_reload_that_rekeys_and_rebuilds(
    aiohttp_client, fake: FakeSobot, acme_host: FakeSobot, logs: CapturedLogs, tmp_path
):
    config = config_file(tmp_path, fake.url, more=acme_table(acme_host, tmp_path))
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    for headers in ({}, {HEADER: "acme"}):
        assert (await proxy.get("/api/echo", headers=headers)).status == 200
    acme_before = tokens(proxy, "acme")
    fake.hold_answers()
    acme_host.hold_answers()
    in_flight = [
        asyncio.create_task(proxy.get("/api/echo", headers=headers))
        for headers in ({}, {}, {HEADER: "acme"}, {HEADER: "acme"})
    ]
    async with asyncio.timeout(10):
        await fake.wait_for_api_calls(3)
        await acme_host.wait_for_api_calls(3)
    # default's key changes; acme moves to another region (here: the same host, by name).
    (tmp_path / "app_key").write_text(NEW_KEY)
    fake.set_app_key(NEW_KEY)
    moved = acme_table(acme_host, tmp_path).replace("127.0.0.1", "localhost")
    config_file(tmp_path, fake.url, more=moved)
    assert await proxy.app[RELOADER].reload(loader(config))
    event = logs.events("reloaded")[0]
    assert (event["sets_rebuilt"], event["upstreams_changed"]) == (["acme/default"], ["acme"])
    assert event["keys_changed"] == ["default/default"]
    assert not acme_before.renewing
    # The held answers: acme's first says its token was rejected, so that request replays on
    # the retired manager, which hands it to its successor (the same appid): one fetch.
    acme_host.script({"ret_code": "900002", "ret_msg": "token expired"})
    fake.release_answers()
    acme_host.release_answers()
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*in_flight)
    assert [answer.status for answer in answers] == [200, 200, 200, 200]
    assert acme_host.stats.get_token_calls == 2  # the replay's
    # The rebuilt acme starts on its next request, with a manager of its own.
    assert (await proxy.get("/api/echo", headers={HEADER: "acme"})).status == 200
    assert tokens(proxy, "acme") is not acme_before


async def test_a_reload_that_adds_an_unrelated_set_keeps_the_held_token_and_its_manager(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    """Adding a set no route uses changes nothing `default`'s token depends on: the requests
    in flight and those after it are served with the one token, no token call, no rejection."""
    config = config_file(tmp_path, fake.url)
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    assert (await proxy.get("/api/echo")).status == 200
    before, held = tokens(proxy), fake.current_token
    fake.hold_answers()
    in_flight = [asyncio.create_task(proxy.get("/api/echo")) for _ in range(3)]
    async with asyncio.timeout(10):
        await fake.wait_for_api_calls(4)
    other = '[credentials.other]\nkind = "v5"\nappid = "other-appid"\napp_key = "other-key-0123"\n'
    config_file(tmp_path, fake.url, more=other)
    assert await proxy.app[RELOADER].reload(loader(config))
    fake.release_answers()
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*in_flight)
    assert [answer.status for answer in answers] == [200, 200, 200]
    assert (await proxy.get("/api/echo")).status == 200
    assert (fake.stats.get_token_calls, fake.stats.token_rejections) == (1, 0)
    assert fake.received[-1].headers["token"] == held
    assert tokens(proxy) is before
    assert before.renewing
    event = logs.events("reloaded")[0]
    assert (event["sets_added"], event["sets_rebuilt"]) == (["default/other"], [])


async def test_a_reload_changing_one_sets_appid_rebuilds_that_set_only(
    aiohttp_client, logs: CapturedLogs, tmp_path
):
    sobot = FakeSobot(
        APPID, APP_KEY, companies={"other-1": "other-key-1", "other-2": "other-key-2"}
    )
    await sobot.start()
    try:

        def other(appid: str) -> str:
            return (
                f'[credentials.other]\nkind = "v5"\nappid = "{appid}"\n'
                f'app_key = "other-key-{appid[-1]}"\n'
                '[[routes]]\nprefix = "/chat-third/api/"\ncredentials = "other"\n'
            )

        config = config_file(tmp_path, sobot.url, more=other("other-1"))
        proxy = await reloading_proxy(aiohttp_client, config, logs)
        assert (await proxy.get("/api/echo")).status == 200
        assert (await proxy.get("/chat-third/api/echo")).status == 200
        default = proxy.app[TENANTS].default.sets
        held, other_before = sobot.current_token, default.named("other").tokens
        calls = sobot.stats.get_token_calls  # default's and other-1's

        config_file(tmp_path, sobot.url, more=other("other-2"))
        assert await proxy.app[RELOADER].reload(loader(config))
        now = proxy.app[TENANTS].default.sets
        assert now.default.tokens is default.default.tokens  # kept, with its token
        assert now.named("other").tokens is not other_before
        assert not other_before.renewing
        event = logs.events("reloaded")[0]
        assert (event["sets_rebuilt"], event["keys_changed"]) == (["default/other"], [])
        assert (await proxy.get("/api/echo")).status == 200
        assert sobot.received[-1].headers["token"] == held
        assert (await proxy.get("/chat-third/api/echo")).status == 200
        assert sobot.stats.get_token_calls == calls + 1  # other-2's only
        assert sobot.stats.token_rejections == 0
    finally:
        await sobot.stop()


async def test_a_replay_on_a_retired_set_takes_its_successors_token(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    """`default` moves to another upstream (the same host, by name): its new manager fetches
    at once, which rotates the token the requests in flight carry. Their replays take the new
    manager's token rather than fetching one more, which would rotate it in turn."""
    config = config_file(tmp_path, fake.url)
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    assert (await proxy.get("/api/echo")).status == 200
    before = tokens(proxy)
    fake.hold_answers()
    in_flight = [asyncio.create_task(proxy.get("/api/echo")) for _ in range(2)]
    async with asyncio.timeout(10):
        await fake.wait_for_api_calls(3)
    config_file(tmp_path, fake.url.replace("127.0.0.1", "localhost"))
    assert await proxy.app[RELOADER].reload(loader(config))
    async with asyncio.timeout(10):
        await fake.wait_for_get_token_calls(2)  # the new manager's, at once
    fake.script({"ret_code": "900002", "ret_msg": "token expired"}, times=2)
    fake.release_answers()
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*in_flight)
    assert [answer.status for answer in answers] == [200, 200]
    assert (await proxy.get("/api/echo")).status == 200
    assert fake.stats.get_token_calls == 2
    assert fake.received[-1].token_state == "valid"
    assert tokens(proxy) is not before
    assert not before.renewing


# -- a reload is all or nothing --------------------------------------------------------------


class FailingOn:
    """The real builder, whose rebuild of one tenant fails (as a bug would)."""

    def __init__(self, builder: TenantBuilder, tenant: str) -> None:
        self._builder, self._tenant = builder, tenant

    def build(self, config: TenantSettings) -> Tenant:
        return self._builder.build(config)

    def rebuild(self, tenant: Tenant, config: TenantSettings, changes: SetChanges) -> Rebuilt:
        if config.name == self._tenant:
            raise RuntimeError("a bug")
        return self._builder.rebuild(tenant, config, changes)

    def commit(self, rebuilt: Rebuilt) -> None:
        self._builder.commit(rebuilt)


async def test_a_reload_whose_last_rebuild_fails_switches_no_source(
    fake: FakeSobot, acme_host: FakeSobot, logs: CapturedLogs, tmp_path
):
    """`default`'s key changes and acme's rebuild fails: `default` is worked out before acme,
    and must still sign with its old key, which Sobot still has."""
    config = config_file(tmp_path, fake.url, more=acme_table(acme_host, tmp_path))
    settings = loader(config)()
    client = token_client(settings, ssl.create_default_context())
    stores = TokenStores(settings, log=get_logger())
    builder = TenantBuilder(
        settings, client, Metrics(), get_logger(), logs.secrets, Backoff(), stores
    )
    tenants = Tenants(settings.all_tenants, FailingOn(builder, "acme"))
    try:
        assert tenants.get("acme") is not None
        default = tenants.default.sets.default.tokens
        async with asyncio.timeout(10):
            held = await default.get()
        (tmp_path / "app_key").write_text(NEW_KEY)  # Sobot does not know it
        moved = acme_table(acme_host, tmp_path).replace("127.0.0.1", "localhost")
        config_file(tmp_path, fake.url, more=moved)
        with pytest.raises(RuntimeError):
            tenants.reconfigure(loader(config)().all_tenants)
        assert tenants.default.sets.default.tokens is default
        async with asyncio.timeout(10):
            renewed = await default.replace(held)  # a fetch, signed with the key in force
        assert renewed.value == fake.current_token
        assert fake.stats.get_token_calls == 2
    finally:
        for tenant in tenants.started():
            for managed in tenant.sets:
                await managed.tokens.stop()
        await client.close()


class RefusingKeys(AccessPolicy):
    """An access policy whose key table cannot be swapped (as a bug would have it)."""

    def use(self, bindings: Iterable[tuple[str, str]]) -> None:
        raise RuntimeError("a bug")


async def test_the_file_watch_survives_a_failing_reload_and_keeps_watching(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    keys = tmp_path / "client_keys"
    keys.write_text("first-client-key-0123456789abcdef\n")
    config = config_file(tmp_path, fake.url, more=f'client_keys_file = "{keys}"\n')
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    settings = proxy.app[RELOADER].settings
    reloader = Reloader(
        settings,
        tenants=proxy.app[TENANTS],
        access=RefusingKeys(settings),
        store_password=None,
        secrets=logs.secrets,
        metrics=Metrics(),
        log=get_logger(),
        settled=proxy.app[API].settled,
    )
    reloader.start(loader(config), interval=0.05)
    try:
        for number, key in enumerate(("second", "third"), start=1):
            keys.write_text(f"{key}-client-key-0123456789abcdef\n")
            # The app's own reloader takes the change; ours fails each time, and watches on.
            failed = await reloaded(logs, number, event="reload_failed")
            assert (failed["cause"], failed["problem"]) == ("files", "internal error")
    finally:
        await reloader.close()


# -- client keys and the Redis password ------------------------------------------------------


async def test_client_keys_are_replaced_whole(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path
):
    keys = tmp_path / "client_keys"
    keys.write_text("old-client-key-0123456789abcdef\n")
    config = config_file(tmp_path, fake.url, more=f'client_keys_file = "{keys}"\n')
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    old = {"Authorization": "Bearer old-client-key-0123456789abcdef"}
    new = {"Authorization": "Bearer new-client-key-0123456789abcdef"}
    assert (await proxy.get("/api/echo", headers=old)).status == 200
    keys.write_text("new-client-key-0123456789abcdef\n")
    event = await reloaded(logs)
    assert event["client_keys_changed"] is True
    assert (await proxy.get("/api/echo", headers=old)).status == 401
    assert (await proxy.get("/api/echo", headers=new)).status == 200
    assert b"new-client-key" not in logs.raw


async def test_a_new_redis_password_is_used_for_new_connections(
    aiohttp_client, fake: FakeSobot, logs: CapturedLogs, tmp_path, redis_server: RedisServer
):
    admin = redis.Redis(host="127.0.0.1", port=redis_server.port)
    admin.config_set("requirepass", "first-password-0123")
    admin = redis.Redis(host="127.0.0.1", port=redis_server.port, password="first-password-0123")
    password = tmp_path / "redis_password"
    password.write_text("first-password-0123")
    config = config_file(
        tmp_path,
        fake.url,
        more=f'token_store = "{redis_server.url}"\ntoken_store_password_file = "{password}"\n',
    )
    proxy = await reloading_proxy(aiohttp_client, config, logs)
    assert (await proxy.get("/api/echo")).status == 200

    admin.config_set("requirepass", "second-password-0123")
    password.write_text("second-password-0123")
    event = await reloaded(logs)
    assert event["store_password_changed"] is True
    # Every connection the proxy had is cut: the next ones must authenticate afresh.
    admin = redis.Redis(host="127.0.0.1", port=redis_server.port, password="second-password-0123")
    admin.client_kill_filter(_type="normal", skipme=True)
    fake.expire_token()  # the replay's fetch saves the new token through a new connection
    assert (await proxy.get("/api/echo")).status == 200
    stored = admin.get(f"sobot-proxy:{APPID}:token")
    assert stored is not None
    assert fake.current_token is not None
    assert fake.current_token.encode() in stored
    assert not logs.events("token_store_unavailable")
    assert b"second-password" not in logs.raw


# -- a real process --------------------------------------------------------------------------


def test_a_serve_process_reloads_on_sighup_and_never_exits_on_a_bad_reload(tmp_path):
    with fake_sobot(tmp_path) as (_, fake_url):
        (tmp_path / "app_key").write_text(STACK_APP_KEY)
        config = tmp_path / "proxy.toml"
        base = f'appid = "{STACK_APPID}"\napp_key_file = "app_key"\nbase_url = "{fake_url}"\n'
        config.write_text(base)
        env = command_env(SOBOT_PROXY_PORT="0")
        with running("serve", "--config", str(config), cwd=tmp_path, env=env) as proxy:
            listening = proxy.wait_for_event("listening")
            assert listening["pid"] == proxy.process.pid  # whom the README says to signal
            url = f"http://127.0.0.1:{listening['port']}"
            wait_until_ready(url)
            acme = '[tenants.acme]\nappid = "acme"\napp_key = "acme-key-0123456789"\n'
            config.write_text(base + "upstream_timeout = 7\n" + acme)
            os.kill(listening["pid"], signal.SIGHUP)
            assert proxy.wait_for_event("reload_needs_restart")["settings"] == ["upstream_timeout"]
            assert proxy.wait_for_event("reloaded")["tenants_added"] == ["acme"]
            config.write_text("not = [toml")
            proxy.process.send_signal(signal.SIGHUP)
            assert proxy.wait_for_event("reload_failed")["cause"] == "signal"
            status, body = http_get(f"{url}/readyz")
            assert (status, body["tenants"]["configured"]) == (200, 2)
            assert proxy.terminate() == 0
