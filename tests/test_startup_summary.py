"""The start-up summary of the real `sobot-proxy serve`: upstream, listening address, token store,
workers, client keys, and whether a token was obtained; a block for people in console format,
one `started` event in json."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import urllib.parse
import urllib.request
from typing import Any

from proxy.cli.startup import announce
from proxy.config.routes import CredentialSettings
from proxy.config.settings import Settings
from proxy.logs import get_logger
from proxy.server.app import TENANTS
from proxy.testing.fake_sobot import FakeSobot
from proxy.tokens.store import describe_store
from tests.conftest import CapturedLogs
from tests.processes import (
    HEX32,
    HTTP_TIMEOUT,
    OPENER,
    STACK_APP_KEY,
    Running,
    fake_sobot,
    http_get,
    json_object,
    proxy_env,
    running,
)

OBTAINED = re.compile(r"obtained, expires in 86[34]\d\d s")
FIELDS = ["upstream", "listening", "token_store", "workers", "client_keys", "token_status"]


def control(fake_url: str, name: str, **query: str) -> None:
    """POST one of the fake Sobot process's /_fake/ controls."""
    url = f"{fake_url}/_fake/{name}?{urllib.parse.urlencode(query)}"
    with OPENER.open(urllib.request.Request(url, method="POST"), timeout=HTTP_TIMEOUT) as answer:
        assert answer.status == 200


def events(command: Running, name: str) -> list[dict[str, Any]]:
    lines = (json_object(line) for line in list(command.stdout))
    return [line for line in lines if line is not None and line.get("event") == name]


def console_block(command: Running) -> dict[str, str]:
    """The summary's lines in console format, as {label: value}, in order."""
    command.wait_for_line(lambda line: line.endswith("sobot-proxy started"))
    block = {}
    for _ in FIELDS:
        line = command.wait_for_line(lambda _line: True)
        assert line.startswith("  "), line
        label, value = re.split(r" {2,}", line.strip(), maxsplit=1)
        block[label] = value
    return block


def test_the_console_summary_is_a_block_for_people(tmp_path):
    with (
        fake_sobot(tmp_path) as (_, fake_url),
        running("serve", "--log-format", "console", cwd=tmp_path, env=proxy_env(fake_url)) as proxy,
    ):
        block = console_block(proxy)
        assert list(block) == [
            "upstream",
            "listening",
            "token store",
            "workers",
            "client keys",
            "token",
        ]
        assert block["upstream"] == fake_url
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", block["listening"])
        assert block["token store"] == "memory"
        assert block["workers"] == "1"
        assert block["client keys"] == "0"
        assert OBTAINED.fullmatch(block["token"]), block["token"]
        # The address is the real one: the proxy answers there, with the token it reported.
        status, ready = http_get(f"{block['listening']}/readyz")
        assert (status, ready["status"]) == (200, "ready")
        assert proxy.terminate() == 0
    # The block is its own: one line says "started", no JSON around it, and no secret in it.
    assert not any(json_object(line) for line in proxy.stdout)
    assert HEX32.search(proxy.output) is None
    assert STACK_APP_KEY not in proxy.output


def test_the_json_summary_is_one_started_event_after_the_first_token(tmp_path):
    with (
        fake_sobot(tmp_path) as (_, fake_url),
        running("serve", cwd=tmp_path, env=proxy_env(fake_url)) as proxy,
    ):
        listening = proxy.wait_for_event("listening")
        started = proxy.wait_for_event("started")
        assert proxy.terminate() == 0
    assert {name: started[name] for name in FIELDS} == {
        "upstream": fake_url,
        "listening": f"http://127.0.0.1:{listening['port']}",
        "token_store": "memory",
        "workers": "1",
        "client_keys": 0,
        "token_status": started["token_status"],
    }
    assert OBTAINED.fullmatch(started["token_status"]), started
    assert started["level"] == "info"
    names = [event["event"] for event in map(json_object, proxy.stdout) if event]
    assert names.index("listening") < names.index("get_token") < names.index("started")
    assert names.count("started") == 1
    assert HEX32.search(proxy.output) is None


def test_credentials_sobot_refuses_are_summarised_as_no_token_yet(tmp_path):
    with fake_sobot(tmp_path) as (_, fake_url):
        env = {**proxy_env(fake_url), "SOBOT_APP_KEY": "not-the-right-app-key"}
        with running("serve", cwd=tmp_path, env=env) as proxy:
            listening = proxy.wait_for_event("listening")
            started = proxy.wait_for_event("started")
            url = f"http://127.0.0.1:{listening['port']}"
            # Still serving: alive, not ready, and it says why.
            assert http_get(f"{url}/healthz")[0] == 200
            status, ready = http_get(f"{url}/readyz")
            assert (status, ready["ret_code"]) == (503, "900003")
            assert proxy.terminate() == 0
    token_status = started["token_status"]
    assert token_status.startswith("not yet: "), token_status
    assert "900003" in token_status
    assert "SOBOT_APP_KEY" in token_status  # what to check
    assert "not-the-right-app-key" not in proxy.output


def test_the_console_summary_says_no_token_yet_too(tmp_path):
    with fake_sobot(tmp_path) as (_, fake_url):
        env = {**proxy_env(fake_url), "SOBOT_APP_KEY": "not-the-right-app-key"}
        with running("serve", "--log-format", "console", cwd=tmp_path, env=env) as proxy:
            block = console_block(proxy)
            assert proxy.terminate() == 0
    assert block["token"].startswith("not yet: ")
    assert "900003" in block["token"]


def test_each_worker_summarises_itself(tmp_path):
    with (
        fake_sobot(tmp_path) as (_, fake_url),
        running("serve", "--workers", "2", cwd=tmp_path, env=proxy_env(fake_url)) as proxy,
    ):
        workers = proxy.wait_for_event("workers_started")
        summaries = [proxy.wait_for_event("started"), proxy.wait_for_event("started")]
        assert proxy.terminate() == 0
    assert sorted(summary["workers"] for summary in summaries) == ["1/2", "2/2"]
    for summary in summaries:
        assert summary["listening"] == f"http://127.0.0.1:{workers['port']}"
        assert summary["token_store"] == "a file shared by the workers (no SOBOT_TOKEN_STORE)"
        assert OBTAINED.fullmatch(summary["token_status"]), summary


def test_a_proxy_stopped_before_its_first_token_stops_cleanly_without_a_summary(tmp_path):
    with fake_sobot(tmp_path) as (_, fake_url):
        control(fake_url, "fail-get-token", mode="stall", times="-1")  # never answers
        with running("serve", cwd=tmp_path, env=proxy_env(fake_url)) as proxy:
            proxy.wait_for_event("listening")
            assert proxy.terminate() == 0
    names = [event["event"] for event in map(json_object, proxy.stdout) if event]
    assert "started" not in names
    assert names[-1] == "stopped"


# --- in process: what each field says ------------------------------------------------------


async def test_a_region_a_redis_store_and_client_keys_are_described(
    proxy, fake: FakeSobot, settings: Settings, logs: CapturedLogs
):
    described = dataclasses.replace(
        settings,
        base_url="https://sg.sobot.io",
        token_store="redis://:store-password-0123@redis.internal:6380/2",
        client_keys=("client-key-one-0123456789", "client-key-two-0123456789"),
    )
    await announce(
        proxy.app[TENANTS].default.sets,
        proxy.app[TENANTS].default.routes,
        described,
        get_logger(),
        url="http://0.0.0.0:8080",
        worker=None,
        token_store=describe_store(described.token_store),
    )
    [started] = logs.events("started")
    assert started["upstream"] == "https://sg.sobot.io (sg)"
    assert started["listening"] == "http://0.0.0.0:8080"
    assert started["token_store"] == "redis://redis.internal:6380/2"  # no password
    assert started["client_keys"] == 2
    assert started["workers"] == "1"
    assert OBTAINED.fullmatch(started["token_status"])
    assert b"store-password" not in logs.raw
    assert b"client-key" not in logs.raw


async def test_a_set_no_route_uses_is_summarised_as_not_fetched(
    make_proxy, fake: FakeSobot, settings: Settings, logs: CapturedLogs
):
    """The summary does not wait for a token nobody fetches: a set no route names is fetched
    only when a client asks for its token."""
    idle = CredentialSettings("callcenter", "v6", "v6-appid", "v6-secret-0123456789")
    proxy = await make_proxy(credentials=(idle,))
    async with asyncio.timeout(10):
        await announce(
            proxy.app[TENANTS].default.sets,
            proxy.app[TENANTS].default.routes,
            dataclasses.replace(settings, credentials=(idle,)),
            get_logger(),
            url="http://127.0.0.1:8080",
            worker=None,
            token_store="memory",
        )
    [started] = logs.events("started")
    default, callcenter = started["credentials"]
    assert OBTAINED.search(default)
    assert callcenter.startswith("callcenter (v6): not fetched: no route uses it")
