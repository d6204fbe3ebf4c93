"""`--workers 4`: four processes on one port share one token (no Redis: a file and a lock),
and a worker that dies is restarted."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from contextlib import ExitStack

import aiohttp

from tests.processes import fake_sobot, http_get, proxy_env, running, wait_until_ready

LIFETIME = 2.0
SECONDS = 8.0


async def test_workers_share_one_token_and_a_dead_one_is_restarted(tmp_path):
    with ExitStack() as stack:
        _, fake_url = stack.enter_context(fake_sobot(tmp_path, token_lifetime=LIFETIME))
        env = proxy_env(fake_url)
        proxy = stack.enter_context(
            running("serve", "--workers", "4", "--port", "0", cwd=tmp_path, env=env)
        )
        started = proxy.wait_for_event("workers_started")
        url = f"http://127.0.0.1:{started['port']}"
        proxy.wait_for_event("listening")  # a worker is up
        wait_until_ready(url)

        outcomes: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SECONDS
        # A new connection per request, so the kernel spreads them over the workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def client() -> None:
                while loop.time() < deadline:
                    try:
                        async with session.get(f"{url}/api/echo") as answer:
                            body = await answer.json(content_type=None)
                            outcomes[f"{answer.status} {body.get('ret_code')}"] += 1
                    except aiohttp.ClientError:
                        outcomes["connection failed"] += 1  # on the worker being killed

            async def kill_one_worker() -> None:
                await asyncio.sleep(SECONDS / 2)
                os.kill(started["pids"][0], signal.SIGKILL)

            async with asyncio.timeout(SECONDS + 30):
                await asyncio.gather(*(client() for _ in range(6)), kill_one_worker())

        restarted = proxy.wait_for_event("worker_restarted")
        _, stats = http_get(f"{fake_url}/_fake/stats")
        assert proxy.terminate() == 0
    serving = {e["pid"] for e in map(_event, proxy.stdout) if e.get("event") == "listening"}
    print(
        f"\n4 workers, {SECONDS:.0f} s, tokens living {LIFETIME:.0f} s: {dict(outcomes)}; "
        f"get_token calls {stats['get_token_calls']}; worker processes: {len(serving)}"
    )
    assert restarted["exited_pid"] == started["pids"][0]
    # Requests on the killed worker's connections may fail; every other one succeeds.
    assert set(outcomes) <= {"200 000000", "connection failed"}
    assert outcomes["connection failed"] <= 64
    assert stats["get_token_calls"] <= SECONDS / LIFETIME / 0.9 + 3  # one per lifetime, not 4


def _event(line: str) -> dict:
    import json

    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
