"""An app behind the proxy's own listening site (server.CoalescingSite), on a free loopback port:
for tests of what the site and its connections do, in this process."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from proxy.coalesce import WriteCoalescer
from proxy.logs import get_logger
from proxy.server.connections import ClientConnections
from proxy.server.listen import CoalescingSite, make_runner


async def start_site(
    app: web.Application,
    *,
    busy: Callable[[], bool] = lambda: False,
    connections: ClientConnections | None = None,
) -> tuple[web.AppRunner, CoalescingSite, int]:
    """The runner (clean it up), the site and its port. Writes are gathered while `busy()`."""
    runner = make_runner(app, shutdown_grace=1.0)
    await runner.setup()
    site = CoalescingSite(
        runner,
        "127.0.0.1",
        0,
        backlog=16,
        reuse_port=False,
        coalescer=WriteCoalescer(busy),
        connections=connections
        or ClientConnections(header_timeout=10, send_timeout=30, log=get_logger()),
    )
    await site.start()
    return runner, site, runner.addresses[0][1]
