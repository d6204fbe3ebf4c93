"""Tenants and reloading on real processes: a `serve` process in front of one fake Sobot
process per tenant, under 20 s of steady load across three tenants while an app_key file is
replaced (the tenant's fake then accepts only the new key), a tenant is added and another
removed by SIGHUP, and broken files are offered on reload. Every request to a configured
tenant succeeds, and each fake only ever sees its own tenant's token."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.sobot import v5
from tests.conftest import eventually
from tests.processes import (
    HEX32,
    Running,
    command_env,
    fake_stats_of,
    running,
    wait_until_ready,
)

LOAD_SECONDS = 20.0
CLIENTS_PER_TENANT = 3
EVENT_TIMEOUT = 15.0  # a reload noticed: files are polled every ~2 s, well within 10 s
HEADER = "X-Sobot-Tenant"
PATH = "/api/ws/5/ticket/save"


@dataclass(frozen=True)
class Company:
    """One tenant's Sobot company, served by its own fake Sobot process."""

    tenant: str
    appid: str
    app_key: str

    @property
    def key_file(self) -> str:
        return f"{self.tenant}.key"


DEFAULT = Company("default", "default-appid", "default-app-key-0123456789abcdef")
ACME = Company("acme", "acme-appid", "acme-app-key-0123456789abcdef")
BETA = Company("beta", "beta-appid", "beta-app-key-0123456789abcdef")
GAMMA = Company("gamma", "gamma-appid", "gamma-app-key-0123456789abcdef")
ACME_NEW_KEY = "acme-app-key-ROTATED-0123456789"


@contextmanager
def fake_for(company: Company, cwd: Path) -> Iterator[str]:
    """A fake Sobot process knowing only `company`; its URL."""
    with running(
        "fake-sobot",
        "--port",
        "0",
        "--appid",
        company.appid,
        "--app-key",
        company.app_key,
        cwd=cwd,
    ) as fake:
        yield f"http://127.0.0.1:{fake.wait_for_event('listening')['port']}"


def write_config(directory: Path, urls: dict[str, str], tenants: list[Company]) -> Path:
    """The proxy's TOML: `default` at the top level, each of `tenants` as [tenants.NAME], every
    app_key in a file of its own (written here unless it exists: a rotated one is kept)."""
    lines = [
        f'appid = "{DEFAULT.appid}"',
        f'app_key_file = "{DEFAULT.key_file}"',
        f'base_url = "{urls[DEFAULT.tenant]}"',
        "port = 0",
    ]
    for company in (DEFAULT, *tenants):
        key_file = directory / company.key_file
        if not key_file.exists():
            key_file.write_text(company.app_key + "\n")
    for company in tenants:
        lines += [
            "",
            f"[tenants.{company.tenant}]",
            f'appid = "{company.appid}"',
            f'app_key_file = "{company.key_file}"',
            f'base_url = "{urls[company.tenant]}"',
        ]
    config = directory / "sobot-proxy.toml"
    replace_file(config, "\n".join(lines) + "\n")
    return config


def replace_file(path: Path, content: str) -> None:
    """Write `content` beside `path` and rename it over: a reader sees the old or the new."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(content)
    os.replace(fresh, path)


@dataclass
class Outcomes:
    """Every answer a tenant's clients got, with when each request started and ended."""

    answers: list[tuple[float, float, int, Any]] = field(default_factory=list)

    def statuses(self) -> Counter[str]:
        return Counter(f"{status} {code}" for _, _, status, code in self.answers)


async def load(
    session: aiohttp.ClientSession, url: str, tenant: str, outcomes: Outcomes, stop: asyncio.Event
) -> None:
    async def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with session.post(
                    f"{url}{PATH}", data=b"{}", headers={HEADER: tenant}
                ) as answer:
                    body = await answer.json(content_type=None)
                    outcome = (answer.status, body.get("ret_code"))
            except aiohttp.ClientError as exc:
                outcome = (0, repr(exc))
            outcomes.answers.append((started, time.monotonic(), *outcome))

    await asyncio.gather(*(client() for _ in range(CLIENTS_PER_TENANT)))


async def next_event(proxy: Running, name: str) -> dict[str, Any]:
    """The proxy's next log line called `name` (read in a thread: the load keeps running)."""
    return await asyncio.to_thread(proxy.wait_for_event, name)


async def token_issued(session: aiohttp.ClientSession, fake: str, *, count: int) -> None:
    """Wait until the fake at `fake` has issued `count` tokens."""

    async def issued() -> bool:
        return (await fake_stats_of(session, fake))["tokens_issued"] >= count

    await eventually(issued, within=EVENT_TIMEOUT)


async def served_token(session: aiohttp.ClientSession, url: str, company: Company, key: str) -> Any:
    """What the proxy answers a client's own get_token for `company`, signed with `key`."""
    create_time = str(int(time.time()))
    query = {
        "appid": company.appid,
        "create_time": create_time,
        "sign": v5.make_sign(company.appid, create_time, key),
    }
    async with session.get(f"{url}/api/get_token", params=query) as answer:
        return answer.status, await answer.json(content_type=None)


async def test_three_tenants_under_load_through_a_key_rotation_and_sighup_reloads(
    tmp_path: Path,
) -> None:
    with ExitStack() as stack:
        urls = {
            company.tenant: stack.enter_context(fake_for(company, tmp_path))
            for company in (DEFAULT, ACME, BETA, GAMMA)
        }
        config = write_config(tmp_path, urls, [ACME, BETA])
        proxy = stack.enter_context(
            running("serve", "--config", str(config), cwd=tmp_path, env=command_env())
        )
        url = f"http://127.0.0.1:{proxy.wait_for_event('listening')['port']}"
        wait_until_ready(url)

        outcomes = {company.tenant: Outcomes() for company in (DEFAULT, ACME, BETA, GAMMA)}
        stop = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            asyncio.timeout(LOAD_SECONDS + 60),
            aiohttp.ClientSession(timeout=timeout) as session,
        ):
            loads = [
                asyncio.create_task(
                    load(session, url, company.tenant, outcomes[company.tenant], stop)
                )
                for company in (DEFAULT, ACME, BETA)
            ]
            began = time.monotonic()

            # 1. acme's key is rotated in Sobot's console: its fake takes only the new key from
            # now on (tokens issued stay valid), and then the operator replaces the file.
            await asyncio.sleep(2)  # load first: the rotation happens under it
            async with session.post(
                f"{urls['acme']}/_fake/app-key", data=ACME_NEW_KEY.encode()
            ) as answer:
                assert answer.status == 200
            replace_file(tmp_path / ACME.key_file, ACME_NEW_KEY + "\n")
            reloaded = await next_event(proxy, "reloaded")
            assert reloaded["keys_changed"] == ["acme/default"], reloaded
            # The held token still serves; the next fetch signs with the new key: make it due.
            async with session.post(f"{urls['acme']}/_fake/expire") as answer:
                assert answer.status == 200
            await token_issued(session, urls["acme"], count=2)  # signed with the new key
            # A client's own get_token is now checked against the new key too.
            status, granted = await served_token(session, url, ACME, ACME_NEW_KEY)
            assert (status, granted["ret_code"]) == (200, v5.OK), granted

            # 2. A broken secret file on reload changes nothing: acme keeps its new key.
            replace_file(tmp_path / BETA.key_file, "")
            failed = await next_event(proxy, "reload_failed")
            assert BETA.key_file in str(failed), failed
            replace_file(tmp_path / BETA.key_file, BETA.app_key + "\n")
            await next_event(proxy, "reload_unchanged")  # the key it had kept

            # 3. SIGHUP: gamma added, beta removed.
            write_config(tmp_path, urls, [ACME, GAMMA])
            sighup_sent = time.monotonic()
            proxy.process.send_signal(signal.SIGHUP)
            reloaded = await next_event(proxy, "reloaded")
            beta_gone = time.monotonic()
            assert (reloaded["tenants_added"], reloaded["tenants_removed"]) == (["gamma"], ["beta"])
            loads.append(asyncio.create_task(load(session, url, "gamma", outcomes["gamma"], stop)))

            # 4. SIGHUP with a broken TOML file: nothing changes, the proxy keeps serving.
            good = config.read_text()
            replace_file(config, good + "[tenants.broken\n")
            proxy.process.send_signal(signal.SIGHUP)
            failed = await next_event(proxy, "reload_failed")
            assert failed["cause"] == "signal", failed
            replace_file(config, good)

            await asyncio.sleep(max(0.0, began + LOAD_SECONDS - time.monotonic()))
            stop.set()
            await asyncio.gather(*loads)

            stats = {tenant: await fake_stats_of(session, fake) for tenant, fake in urls.items()}
            assert proxy.process.poll() is None, proxy.output

    for tenant in ("default", "acme", "gamma"):
        statuses = outcomes[tenant].statuses()
        assert set(statuses) == {f"200 {v5.OK}"}, (tenant, statuses)
        assert sum(statuses.values()) > 100, (tenant, statuses)
    # beta: served until the reload that removed it, refused after (404 naming the header); a
    # request under way as the signal went out may have reached the proxy before or after.
    refused = 0
    for started, ended, status, code in outcomes["beta"].answers:
        if ended < sighup_sent:
            assert (status, code) == (200, v5.OK), (ended - sighup_sent, status, code)
        elif started > beta_gone:
            assert (status, code) == (404, "980404"), (started - beta_gone, status, code)
            refused += 1
        else:
            assert (status, code) in {(200, v5.OK), (404, "980404")}, (status, code)
    assert refused > 0
    # Each fake only ever saw its own tenant's token: a foreign token would be rejected there.
    # acme's own token was expired once on purpose: only the requests then in flight met it.
    for tenant in ("default", "beta", "gamma"):
        assert stats[tenant]["token_rejections"] == 0, (tenant, stats[tenant])
    assert stats["acme"]["token_rejections"] <= CLIENTS_PER_TENANT + 1, stats["acme"]
    assert stats["gamma"]["api_calls"] > 0
    assert not HEX32.search(proxy.output.replace(ACME.appid, ""))
