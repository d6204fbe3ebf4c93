"""Running an application until SIGTERM or SIGINT, with a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import structlog
from aiohttp import web
from yarl import URL

from proxy.coalesce import WriteCoalescer
from proxy.server.connections import ClientConnections

# Once drained, closing the idle connections left is all aiohttp's shutdown has to do.
DRAINED_CLOSE: Final = 1.0


class CoalescingSite(web.BaseSite):
    """A TCP site like aiohttp's TCPSite, whose connections write through a WriteCoalescer and
    are held to the timeouts of `connections` (server/connections.py).

    aiohttp has no public way to wrap the protocol factory a site listens with, so this site
    creates its server itself and stores it in BaseSite's private `_server`, as TCPSite does:
    BaseSite.stop() closes it there, and AppRunner.addresses reads its sockets there
    (tests/test_listening_site.py pins both).
    """

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        backlog: int,
        reuse_port: bool,
        coalescer: WriteCoalescer,
        connections: ClientConnections,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._factory = runner.server
        self._host, self._port = host, port
        self._listen_backlog = backlog
        self._reuse_port = reuse_port
        self._coalescer = coalescer
        self._connections = connections

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        assert self._factory is not None  # the runner is set up
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.factory(self._factory, self._coalescer),
            self._host,
            self._port,
            backlog=self._listen_backlog,
            reuse_port=self._reuse_port or None,
        )


def make_runner(
    app: web.Application, *, shutdown_grace: float, keepalive_timeout: float = 75.0
) -> web.AppRunner:
    """The runner for `app`: in-flight requests get `shutdown_grace` seconds when stopping, and
    a kept-alive connection idle for `keepalive_timeout` seconds is closed (nginx's default,
    75 s; aiohttp's own is an hour, long enough for idle connections to use up descriptors)."""
    return web.AppRunner(
        app,
        keepalive_timeout=keepalive_timeout,
        # Our own request line replaces aiohttp's access log (one line a request, not two).
        access_log=None,
        # A client that goes away cancels its request, and with it the upstream exchange.
        handler_cancellation=True,
        shutdown_timeout=shutdown_grace,
    )


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_grace: float,
    log: structlog.typing.FilteringBoundLogger,
    connections: ClientConnections | None = None,
    reuse_port: bool = False,
    busy: Callable[[], bool] = lambda: False,
    on_listening: Callable[[str, int], Coroutine[Any, Any, None]] | None = None,
    drain: Callable[[float], Awaitable[None]] | None = None,
    **listening_fields: object,
) -> int:
    """Serve `app` until SIGTERM or SIGINT; exit status 0 after a clean stop, 1 if it can't bind.

    Stopping: the listening socket closes first; then `drain(grace)` lets requests in flight
    finish, their connections still fully open (aiohttp's own shutdown would stop reading a
    request body still on its way, and waits up to twice its timeout); then the rest is closed.
    Without `drain`, aiohttp's shutdown gets the grace period.

    While `busy()` (another request in flight), answers leave at the end of the event loop's
    pass, together (coalesce.py). Client connections are held to the timeouts of `connections`
    (connections.py; by default a 10 s header timeout, a 30 s send timeout and a 75 s keep-alive
    timeout).
    """
    # Signals are taken from the start: a SIGTERM during start-up stops cleanly too.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    connections = connections or ClientConnections(header_timeout=10, send_timeout=30, log=log)
    runner = make_runner(
        app,
        shutdown_grace=DRAINED_CLOSE if drain else shutdown_grace,
        keepalive_timeout=connections.keepalive_timeout,
    )
    await runner.setup()
    try:
        site = CoalescingSite(
            runner,
            host,
            port,
            backlog=1024,
            reuse_port=reuse_port,
            coalescer=WriteCoalescer(busy),
            connections=connections,
        )
        await site.start()
    except OSError as exc:
        log.error("cannot_listen", host=host, port=port, reason=exc.strerror or str(exc))
        await runner.cleanup()
        return 1
    bound_host, bound_port = runner.addresses[0][:2]
    log.info("listening", host=bound_host, port=bound_port, pid=os.getpid(), **listening_fields)
    # Alongside serving (it may wait for the first token), and never past a stop.
    announcing: asyncio.Task[None] | None = None
    if on_listening is not None:
        announcing = asyncio.create_task(on_listening(bound_host, bound_port))

        def report(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("on_listening_failed", exc_info=task.exception())

        announcing.add_done_callback(report)  # at once, not at the stop
    await stop.wait()
    if announcing is not None:
        announcing.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # reported already
            await announcing
    log.info("stopping", grace_s=shutdown_grace)
    for running_site in list(runner.sites):
        await running_site.stop()
    if drain is not None:
        await drain(shutdown_grace)
    await runner.cleanup()
    log.info("stopped")
    return 0


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop where it is available."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if sys.platform != "win32":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)
