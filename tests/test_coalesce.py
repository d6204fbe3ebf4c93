"""Writes gathered to the end of the event loop's pass (coalesce.py), on real sockets.

Whether bytes have left is read from the peer's end of a socket pair without yielding to the
loop: a write that leaves at once is already there, one that was gathered is not until the
loop's pass ends.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from proxy.coalesce import LIMIT, CoalescedTransport, WriteCoalescer
from proxy.logs import get_logger
from proxy.server.connections import ClientConnections
from proxy.server.handler import ApiHandler
from proxy.upstream.client import _Pool
from tests.sites import start_site

Pair = tuple[asyncio.Transport, socket.socket]


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[], asyncio.Future[Pair]]]:
    """Make connected pairs: our transport on one end, a plain socket (the peer) on the other."""
    made: list[Pair] = []
    loop = asyncio.get_running_loop()

    async def one() -> Pair:
        ours, theirs = socket.socketpair()
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        theirs.settimeout(5)
        made.append((transport, theirs))
        return transport, theirs

    yield one  # type: ignore[misc]
    for transport, theirs in made:
        transport.abort()
        theirs.close()


def arrived(peer: socket.socket) -> bytes:
    """What the peer can read now, without waiting ("" when nothing has left yet)."""
    readable, _, _ = select.select([peer], [], [], 0)
    return peer.recv(1 << 20) if readable else b""


async def next_pass() -> None:
    """Let the loop finish its current pass: callbacks queued before this one run first."""
    await asyncio.sleep(0)


async def test_a_write_leaves_at_once_when_nothing_else_is_in_flight(connect) -> None:
    transport, peer = await connect()
    coalescer = WriteCoalescer(lambda: False)
    coalescer.write(transport, b"alone")
    assert arrived(peer) == b"alone"


async def test_writes_while_busy_leave_together_at_the_end_of_the_pass(connect) -> None:
    (first, first_peer), (second, second_peer) = await connect(), await connect()
    coalescer = WriteCoalescer(lambda: True)
    coalescer.write(first, b"one")
    coalescer.write(second, b"two")
    coalescer.write_parts(first, [b" and", b" more"])
    assert arrived(first_peer) == b""
    assert arrived(second_peer) == b""
    await next_pass()
    assert arrived(first_peer) == b"one and more"
    assert arrived(second_peer) == b"two"


async def test_one_connections_bytes_keep_their_order_when_the_load_drops(connect) -> None:
    transport, peer = await connect()
    busy = True
    coalescer = WriteCoalescer(lambda: busy)
    coalescer.write(transport, b"first ")
    busy = False
    # Nothing else in flight now, but "first " is still waiting: this must not overtake it.
    coalescer.write(transport, b"second")
    assert arrived(peer) == b""
    await next_pass()
    assert arrived(peer) == b"first second"


async def test_a_connections_bytes_leave_at_once_past_the_limit(connect) -> None:
    transport, peer = await connect()
    coalescer = WriteCoalescer(lambda: True, limit=10)
    coalescer.write(transport, b"12345")
    assert arrived(peer) == b""
    coalescer.write(transport, b"67890")  # 10 bytes gathered: the limit
    assert arrived(peer) == b"1234567890"


async def test_a_callers_buffer_may_change_once_written(connect) -> None:
    transport, peer = await connect()
    coalescer = WriteCoalescer(lambda: True)
    buffer = bytearray(b"as written")
    CoalescedTransport(transport, coalescer).write(buffer)
    buffer[:] = b"overwritten"
    await next_pass()
    assert arrived(peer) == b"as written"


async def test_closing_sends_what_was_gathered_first(connect) -> None:
    transport, peer = await connect()
    wrapped = CoalescedTransport(transport, WriteCoalescer(lambda: True))
    wrapped.write(b"last words")
    wrapped.close()
    received = b""
    async with asyncio.timeout(5):
        while chunk := await asyncio.to_thread(peer.recv, 1024):
            received += chunk
    assert received == b"last words"


async def test_aborting_drops_what_was_gathered(connect) -> None:
    transport, peer = await connect()
    wrapped = CoalescedTransport(transport, WriteCoalescer(lambda: True))
    wrapped.write(b"never sent")
    wrapped.abort()
    await next_pass()
    async with asyncio.timeout(5):
        assert await asyncio.to_thread(peer.recv, 1024) == b""


async def test_bytes_for_a_connection_lost_meanwhile_are_dropped(connect) -> None:
    transport, peer = await connect()
    coalescer = WriteCoalescer(lambda: True)
    coalescer.write(transport, b"too late")
    transport.abort()
    await next_pass()  # the flush finds the transport closing, and writes nothing to it
    async with asyncio.timeout(5):
        assert await asyncio.to_thread(peer.recv, 1024) == b""


class _Unwritable(asyncio.Transport):
    """A transport whose every write fails."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("cannot write")

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


async def test_one_connection_failing_at_the_flush_does_not_keep_the_others_waiting(
    connect,
) -> None:
    transport, peer = await connect()
    broken = _Unwritable()
    coalescer = WriteCoalescer(lambda: True)
    coalescer.write(broken, b"lost")
    coalescer.write(transport, b"delivered")
    await next_pass()
    assert arrived(peer) == b"delivered"
    assert broken.aborted


async def test_upstream_requests_are_gathered_only_with_another_exchange_in_progress() -> None:
    pool = _Pool(limit=10)
    in_use = [object(), object()]
    pool.open.add(in_use[0])  # type: ignore[arg-type]
    assert not pool.busy()  # one exchange: its request leaves at once
    pool.open.add(in_use[1])  # type: ignore[arg-type]
    assert pool.busy()
    pool.idle.append(in_use[1])  # type: ignore[arg-type]
    assert not pool.busy()  # an idle connection is not an exchange


def _connections() -> ClientConnections:
    return ClientConnections(header_timeout=10, send_timeout=30, log=get_logger())


# --- the server's site --------------------------------------------------------------------------


async def test_the_site_gives_aiohttp_coalesced_transports_and_answers_arrive_whole() -> None:
    """Many requests at once, with every answer gathered: each arrives whole, kept-alive or
    closing, small or streamed past the limit."""
    big = bytes(range(256)) * (3 * LIMIT // 256 + 7)

    async def small(request: web.Request) -> web.Response:
        assert isinstance(request.transport, CoalescedTransport)
        return web.Response(text=request.query["n"])

    async def closing(request: web.Request) -> web.Response:
        response = web.Response(text="bye")
        response.force_close()
        return response

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for start in range(0, len(big), 10_000):
            await response.write(big[start : start + 10_000])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/closing", closing)
    app.router.add_get("/streamed", streamed)
    runner, _, port = await start_site(app, busy=lambda: True)
    base = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(30), aiohttp.ClientSession() as session:

            async def get(path: str) -> bytes:
                async with session.get(base + path) as response:
                    assert response.status == 200
                    return await response.read()

            answers = await asyncio.gather(
                *(get(f"/small?n={n}") for n in range(50)),
                *(get("/closing") for _ in range(5)),
                *(get("/streamed") for _ in range(3)),
            )
    finally:
        await runner.cleanup()
    assert answers[:50] == [str(n).encode() for n in range(50)]
    assert answers[50:55] == [b"bye"] * 5
    assert answers[55:] == [big] * 3


class _Answering(asyncio.Protocol):
    """Answers each read at once, through the transport it was given (a CoalescedTransport)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"answer to " + data)


async def test_what_is_gathered_leaves_when_the_client_half_closes() -> None:
    """A client may send its request and shut its side down. Told of the EOF, the transport
    closes itself once its buffer is sent (the loop does this when the protocol's eof_received
    says so), so what was gathered must be in that buffer by then, not waiting for the pass."""
    ours, theirs = socket.socketpair()
    answering = _Answering()
    protocol = _connections().factory(lambda: answering, WriteCoalescer(lambda: True))()
    transport, _ = await asyncio.get_running_loop().create_connection(lambda: protocol, sock=ours)
    try:
        answering.transport.write(b"late answer")
        assert arrived(theirs) == b""
        protocol.eof_received()  # as the loop calls it when the peer's FIN is read
        assert arrived(theirs) == b"late answer"
    finally:
        transport.abort()
        theirs.close()


async def test_a_request_waits_for_others_in_flight_but_not_for_itself() -> None:
    """The proxy's criterion (ApiHandler.others_in_flight): a streamed answer, written while its
    own request is in flight, leaves at once when it is the only one."""
    handler = ApiHandler(
        access=None,  # type: ignore[arg-type]
        forwarder=None,  # type: ignore[arg-type]
        tenants=None,  # type: ignore[arg-type]
        prefixes=(),
        local_token=None,  # type: ignore[arg-type]
        metrics=None,  # type: ignore[arg-type]
        log=None,  # type: ignore[arg-type]
    )
    release = asyncio.Event()
    seen: list[bool] = []

    async def request() -> None:
        task = asyncio.current_task()
        assert task is not None
        handler._running.add(task)
        seen.append(handler.others_in_flight())
        await release.wait()
        seen.append(handler.others_in_flight())
        handler._running.discard(task)

    async with asyncio.timeout(5):
        first = asyncio.create_task(request())
        await next_pass()
        assert seen == [False]  # alone
        second = asyncio.create_task(request())
        await next_pass()
        assert seen == [False, True]  # the second sees the first
        assert handler.others_in_flight()  # and so does an answer written after its request
        release.set()
        await asyncio.gather(first, second)
    assert seen[2:] == [True, False]  # the first saw the second; the second, alone at last
    assert not handler.others_in_flight()
