"""`--workers 4`: four processes on one port share one token (through a file and an flock, or
through Redis when it is configured), and a worker that dies is restarted."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.processes import (
    HEX32,
    OPENER,
    V6_ROUTE,
    Running,
    fake_sobot,
    fake_stats_of,
    json_object,
    proxy_env,
    routes_config,
    running,
    steady_load,
    token_served_by,
    v6_token_served_by,
    wait_until_ready,
)

LIFETIME = 2.0
SECONDS = 20.0
WORKERS = 4


@pytest.mark.parametrize("store", ["file", "redis"])
async def test_workers_share_one_token_and_a_dead_one_is_restarted(tmp_path, store, request):
    settings = {}
    if store == "redis":
        settings["SOBOT_TOKEN_STORE"] = request.getfixturevalue("redis_server").url
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(fake_sobot(tmp_path, token_lifetime=LIFETIME))
        proxy = stack.enter_context(
            running(
                "serve",
                "--workers",
                str(WORKERS),
                "--port",
                "0",
                cwd=tmp_path,
                env=proxy_env(fake_url, **settings),
            )
        )
        started = proxy.wait_for_event("workers_started")
        url = f"http://127.0.0.1:{started['port']}"
        proxy.wait_for_event("listening")  # a worker is up
        wait_until_ready(url)

        outcomes: Counter[str] = Counter()
        stop = asyncio.Event()
        # A new connection per request, so the kernel spreads them over the workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            load = asyncio.create_task(
                steady_load(session, [url], per_url=6, stop=stop, outcomes=outcomes)
            )
            await asyncio.sleep(SECONDS / 2)  # the load's duration: nothing to wait for
            os.kill(started["pids"][0], signal.SIGKILL)
            await asyncio.sleep(SECONDS / 2)
            stop.set()
            async with asyncio.timeout(30):
                await load
            stats = await fake_stats_of(session, fake_url)

        restarted = proxy.wait_for_event("worker_restarted")
        assert proxy.terminate() == 0
    events = [json_object(line) or {} for line in proxy.stdout]
    serving = {event["pid"] for event in events if event.get("event") == "listening"}
    print(
        f"\n{WORKERS} workers ({store} store), {SECONDS:.0f} s, tokens living {LIFETIME:.0f} s: "
        f"{dict(outcomes)}; get_token calls {stats['get_token_calls']}; "
        f"worker processes: {len(serving)}"
    )
    assert restarted["exited_pid"] == started["pids"][0]
    assert len(serving) == WORKERS + 1  # the four, and the one that replaced the dead one
    # Requests on the killed worker's connections may fail; every other one succeeds.
    assert set(outcomes) <= {"200 000000", "connection failed"}
    assert outcomes["connection failed"] <= 64
    # One per lifetime (renewed at 90% of it) and the first, not one per worker.
    assert stats["get_token_calls"] <= SECONDS / LIFETIME / 0.9 + 3


def test_a_supervisor_killed_outright_has_its_directory_removed_by_the_next(tmp_path):
    """The workers' directory holds the token; a SIGKILLed supervisor cannot remove it, so the
    next supervisor of the same user does, and never one whose supervisor still runs."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(fake_sobot(tmp_path))
        env = proxy_env(fake_url, TMPDIR=str(temp))

        def supervisor() -> tuple[Running, set[Path]]:
            before = set(temp.glob("sobot-proxy-workers-*"))
            process = stack.enter_context(
                running("serve", "--workers", "2", "--port", "0", cwd=tmp_path, env=env)
            )
            process.wait_for_event("workers_started")
            return process, set(temp.glob("sobot-proxy-workers-*")) - before

        killed, [killed_directory] = supervisor()
        alive, [alive_directory] = supervisor()
        killed.process.kill()  # its workers end with it; its directory stays
        killed.process.wait(timeout=10)
        assert killed_directory.exists()

        third, _ = supervisor()  # it removes what it finds before it starts its workers
        events = [json_object(line) or {} for line in third.stdout]
        removed = [e["path"] for e in events if e.get("event") == "workers_directory_removed"]
        assert removed == [str(killed_directory)]
        assert not killed_directory.exists()
        assert alive_directory.exists()  # its supervisor holds its lock
        assert alive.terminate() == 0
    assert not alive_directory.exists()  # removed by its own supervisor on the way out


def test_workers_share_the_spool_limit_between_them(tmp_path):
    """They spool into one temporary directory: each keeps its share of the limit, and
    /metrics (summed over the workers) shows the limit as configured."""
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(fake_sobot(tmp_path))
        env = proxy_env(fake_url, SOBOT_SPOOL_LIMIT="256MiB", SOBOT_MAX_BODY="64MiB")
        proxy = stack.enter_context(
            running("serve", "--workers", "2", "--port", "0", cwd=tmp_path, env=env)
        )
        url = f"http://127.0.0.1:{proxy.wait_for_event('workers_started')['port']}"
        proxy.wait_for_event("listening")
        proxy.wait_for_event("listening")  # both are up
        wait_until_ready(url)
        with OPENER.open(f"{url}/metrics", timeout=5) as answer:
            page = answer.read().decode()
    [limit] = re.findall(r"^sobot_proxy_spool_limit_bytes ([0-9.e+]+)$", page, re.M)
    assert float(limit) == 256 * 1024 * 1024


async def test_two_workers_share_one_v6_token_through_their_file(tmp_path):
    """With a V6 set, each worker's first token comes through the workers' file: one
    /tokens/company call for both, as one get_token; the V6 appid is the v5 one, and each
    kind keeps its own file."""
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(fake_sobot(tmp_path, v6_token_lifetime=86400.0))
        env = proxy_env(fake_url, SOBOT_PROXY_CONFIG=str(routes_config(tmp_path)))
        proxy = stack.enter_context(
            running("serve", "--workers", "2", "--port", "0", cwd=tmp_path, env=env)
        )
        url = f"http://127.0.0.1:{proxy.wait_for_event('workers_started')['port']}"
        # Each worker says `started` once every set's first token is held (or failed).
        summaries = [proxy.wait_for_event("started") for _ in range(2)]
        answers: Counter[str] = Counter()
        served: set[tuple[str | None, str | None]] = set()
        # A new connection per request, so the kernel spreads them over the workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(20):
                for path in ("/api/ws/5/ticket/list", f"{V6_ROUTE}v6/agents"):
                    async with session.get(f"{url}{path}") as answer:
                        body = await answer.json()
                    answers[f"{answer.status} {body.get('ret_code', body.get('code'))}"] += 1
                served.add(
                    (await token_served_by(session, url), await v6_token_served_by(session, url))
                )
            stats = await fake_stats_of(session, fake_url)
    assert sorted(summary["workers"] for summary in summaries) == ["1/2", "2/2"]
    for summary in summaries:
        [default, callcenter] = summary["credentials"]
        assert default.startswith("default (v5): obtained, expires in ")
        assert callcenter.startswith("callcenter (v6): obtained, expires in ")
    assert answers == {"200 000000": 20, "200 200": 20}
    assert (stats["get_token_calls"], stats["v6_token_calls"]) == (1, 1)
    # No request met a rejected token: each worker held the right token of each kind at once.
    assert (stats["token_rejections"], stats["v6_token_rejections"]) == (0, 0)
    # Both workers hand out the same two tokens: a v5 token and a JWT, never one for the other.
    [(v5_token, v6_token)] = served
    assert v5_token is not None
    assert HEX32.fullmatch(v5_token)
    assert v6_token is not None
    assert v6_token.count(".") == 2


async def test_sighup_is_passed_on_to_every_worker_and_ends_none(tmp_path):
    """The supervisor passes SIGHUP on to each worker (`reload_forwarded` names them), each
    worker takes it (`reload_requested`, its pid), and the supervisor and both workers keep
    serving: none exits or is restarted."""
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(fake_sobot(tmp_path))
        proxy = stack.enter_context(
            running("serve", "--workers", "2", "--port", "0", cwd=tmp_path, env=proxy_env(fake_url))
        )
        started = proxy.wait_for_event("workers_started")
        url = f"http://127.0.0.1:{started['port']}"
        proxy.wait_for_event("listening")
        proxy.wait_for_event("listening")  # both are up
        wait_until_ready(url)

        def events(name: str) -> list[dict[str, Any]]:
            return [
                e for line in proxy.stdout if (e := json_object(line) or {}).get("event") == name
            ]

        def passed_on(times: int, _line: str) -> bool:
            return len(events("reload_forwarded")) == times and (
                len(events("reload_requested")) == 2 * times
            )

        # The pid to send it to, as the README says: the supervisor's, from its own log line.
        assert started["supervisor_pid"] == proxy.process.pid
        for times in (1, 2):  # a second SIGHUP too: a worker that took one is still there
            os.kill(started["supervisor_pid"], signal.SIGHUP)
            proxy.wait_for_line(functools.partial(passed_on, times))
        [first, second] = events("reload_forwarded")
        assert first["pids"] == second["pids"] == started["pids"]
        assert sorted(e["pid"] for e in events("reload_requested")) == sorted(started["pids"] * 2)

        answers: Counter[int] = Counter()
        # A new connection per request, so the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(20):
                async with (
                    asyncio.timeout(10),
                    session.get(f"{url}/api/ws/5/ticket/list") as answer,
                ):
                    answers[answer.status] += 1
        assert answers == {200: 20}
        for pid in started["pids"]:
            os.kill(pid, 0)  # alive: raises if not
        assert proxy.process.poll() is None
        assert proxy.terminate() == 0
    assert events("worker_exited") == []
    assert events("worker_restarted") == []
