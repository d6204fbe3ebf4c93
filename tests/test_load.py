"""Load against real processes: bounded resources under a stalling upstream, and a soak."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter

import aiohttp

from proxy.testing.fake_sobot import FAULT_HEADER
from tests.processes import EXIT_TIMEOUT, open_fds, rss_bytes, stack

MIB = 1024 * 1024


async def test_500_clients_against_a_stalling_upstream_stay_bounded(tmp_path):
    pool, queue, clients = 100, 150, 500
    with stack(
        tmp_path,
        SOBOT_UPSTREAM_CONNECTIONS=str(pool),
        SOBOT_MAX_QUEUE=str(queue),
    ) as running:
        pid = running.proxy.process.pid
        baseline_rss, baseline_fds = rss_bytes(pid), open_fds(pid)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def call() -> int:
                url = f"{running.proxy_url}/api/slow"
                async with session.get(url, headers={FAULT_HEADER: "stall"}) as response:
                    await response.read()
                    return response.status

            async with asyncio.timeout(60):
                calls = [asyncio.create_task(call()) for _ in range(clients)]
                # Past the pool and the queue, requests are refused at once, not buffered.
                while sum(task.done() for task in calls) < clients - pool - queue:
                    await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
                refused = [task.result() for task in calls if task.done()]
                assert set(refused) == {503}
                assert len(refused) == clients - pool - queue
                # The proxy still answers its own health check at once.
                async with asyncio.timeout(2):
                    health = await session.get(f"{running.proxy_url}/healthz")
                    assert health.status == 200
                rss, fds = rss_bytes(pid), open_fds(pid)
                print(
                    f"\n{clients} clients, stalled upstream: RSS +{(rss - baseline_rss) / MIB:.1f}"
                    f" MiB, open files {baseline_fds} -> {fds}"
                )
                assert rss - baseline_rss < 64 * MIB
                # One per client connection and per upstream connection: nothing more piles up.
                assert fds <= baseline_fds + clients + pool + 20
                # Sobot goes away: everything waiting gets a clear answer, nothing hangs.
                running.fake.process.send_signal(signal.SIGTERM)
                assert running.fake.process.wait(timeout=EXIT_TIMEOUT) == 0
                statuses = Counter(await asyncio.gather(*calls))
        assert statuses == {503: clients - pool - queue, 502: pool + queue}
        # With the clients gone, the proxy is back to the files it started with.
        async with asyncio.timeout(10):
            while open_fds(pid) > baseline_fds + 2:  # noqa: ASYNC110 -- another process
                await asyncio.sleep(0.05)


async def test_soak_mixed_faults_causes_only_the_errors_it_asks_for(tmp_path):
    """Many clients for a while, each asking for a fault (or none): every answer is the one
    its fault calls for, and memory and open files do not grow from one half to the next."""
    expected = {
        "": 200,  # the echo, replayed when a rotation hit it
        "html502": 502,  # passed through
        "stall": 504,  # the read timeout
        "download=262144": 200,
        "truncate": "aborted",
    }
    rotations = 0
    with stack(tmp_path, SOBOT_UPSTREAM_TIMEOUT="0.5") as running:
        pid = running.proxy.process.pid
        unexpected: list[str] = []
        outcomes: Counter[str] = Counter()
        stop = asyncio.Event()

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def client(seed: int) -> None:
                rng = random.Random(seed)
                while not stop.is_set():
                    kind = rng.choice(list(expected))
                    headers = {FAULT_HEADER: kind} if kind else {}
                    body = rng.randbytes(rng.choice([0, 100, 70_000]))
                    try:
                        async with session.post(
                            f"{running.proxy_url}/api/soak", data=body, headers=headers
                        ) as response:
                            answer = await response.read()
                            got: int | str = response.status
                    except aiohttp.ClientPayloadError:
                        got = "aborted"
                    if got == 200 and answer.startswith(b'{"ret_code":"900002"'):
                        # A second rotation landed while the replay was on its way: the test
                        # caused it, and the client rightly sees Sobot's answer.
                        got = "rotated twice"
                    outcomes[f"{kind or 'plain'} -> {got}"] += 1
                    if got not in (expected[kind], "rotated twice"):
                        unexpected.append(f"{kind or 'plain'}: {got}")

            async def rotate() -> None:
                """Someone else rotates the token now and then: requests meet 900002."""
                nonlocal rotations
                while not stop.is_set():
                    await asyncio.sleep(2)
                    await asyncio.to_thread(running.control, "expire")
                    rotations += 1

            async def half(seconds: float) -> tuple[int, int]:
                stop.clear()
                tasks = [asyncio.create_task(client(seed)) for seed in range(40)]
                tasks.append(asyncio.create_task(rotate()))
                await asyncio.sleep(seconds)
                stop.set()
                async with asyncio.timeout(30):
                    await asyncio.gather(*tasks)
                return rss_bytes(pid), open_fds(pid)

            first = await half(10)
            second = await half(10)
    print(f"\nsoak: {sum(outcomes.values())} requests, {rotations} rotations: {dict(outcomes)}")
    print(f"RSS {first[0] / MIB:.1f} -> {second[0] / MIB:.1f} MiB, files {first[1]} -> {second[1]}")
    assert unexpected == []
    assert second[0] - first[0] < 8 * MIB
    assert second[1] <= first[1] + 10
