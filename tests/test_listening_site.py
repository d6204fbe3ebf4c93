"""What CoalescingSite (proxy/server.py) relies on in aiohttp's private `BaseSite._server`.

aiohttp offers no public way to wrap the protocol factory a site listens with, so the site
creates its server itself and stores it where aiohttp's own sites do. One test per behaviour
that depends on it, so an aiohttp release that moves it fails here, not in production.
"""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

from proxy.coalesce import CoalescedTransport
from proxy.server.listen import CoalescingSite
from tests.sites import start_site


async def _started() -> tuple[web.AppRunner, CoalescingSite]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=type(request.transport).__name__)

    app = web.Application()
    app.router.add_get("/", hello)
    runner, site, _ = await start_site(app)
    return runner, site


async def _get(port: int) -> bytes:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
    return answer


async def test_the_runner_reads_the_sites_address_from_its_server() -> None:
    """AppRunner.addresses reads each site's `_server.sockets`: the proxy logs, and a port 0
    is resolved, from there."""
    runner, _ = await _started()
    try:
        [(host, port)] = runner.addresses
        assert host == "127.0.0.1"
        assert port != 0
        answer = await _get(port)  # and it is where the site answers, through our transport
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.endswith(CoalescedTransport.__name__.encode())
    finally:
        await runner.cleanup()


async def test_stopping_the_site_closes_the_server_it_stored() -> None:
    """BaseSite.stop() closes `_server`: the listening socket goes away at SIGTERM (serve() stops
    each site first), and runner.cleanup() stops every site the same way."""
    runner, site = await _started()
    try:
        [(_, port)] = runner.addresses
        assert (await _get(port)).startswith(b"HTTP/1.1 200")
        await site.stop()
        assert runner.sites == set()
        assert runner.addresses == []
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # refused: nobody listens
    finally:
        await runner.cleanup()
