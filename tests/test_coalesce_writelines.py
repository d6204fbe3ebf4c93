"""Gathered parts written to a client that stops reading pause the writer (CVE-2024-12254).

The stdlib loop's writelines() of Python 3.12 before 3.12.9 and 3.13 before 3.13.2 buffers
without ever pausing the protocol: aiohttp's request handler would never wait for the client,
and the proxy's memory would grow with every part. Each loop runs on its own here, over a real
socket whose peer does not read.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
import uvloop

from proxy.coalesce import CoalescedTransport, WriteCoalescer

PART = bytes(range(256)) * 256  # 64 KiB
PARTS = 64  # 4 MiB in all: far past the kernel's buffers and the transport's high-water mark
HIGH_WATER = 64 * 1024

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "stdlib": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}


class _Writer(asyncio.Protocol):
    """The server's side: records being paused and resumed, as aiohttp's handler would obey."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.connected = asyncio.Event()
        self.paused = False
        self.resumed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connected.set()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.resumed.set()


async def _write_many_parts_to_a_peer_that_does_not_read(busy: bool) -> None:
    loop = asyncio.get_running_loop()
    writer = _Writer()
    server = await loop.create_server(lambda: writer, "127.0.0.1", 0)
    peer = socket.socket()
    try:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.setblocking(False)
        async with asyncio.timeout(10):
            await loop.sock_connect(peer, server.sockets[0].getsockname())
            await writer.connected.wait()
            assert writer.transport is not None
            writer.transport.set_write_buffer_limits(high=HIGH_WATER)
            # As aiohttp writes an answer's parts: through the connection's CoalescedTransport.
            coalesced = CoalescedTransport(writer.transport, WriteCoalescer(lambda: busy))
            coalesced.writelines([PART] * PARTS)
            await asyncio.sleep(0)  # the end of the pass, where gathered parts leave
            assert writer.transport.get_write_buffer_size() > HIGH_WATER
            assert writer.paused, "buffered past the high-water mark without pausing the writer"
            # Once the peer reads, everything arrives, in order, and the writer may go on.
            received = bytearray()
            while len(received) < len(PART) * PARTS:
                received += await loop.sock_recv(peer, 1 << 20)
            assert received == PART * PARTS
            await writer.resumed.wait()
    finally:
        peer.close()
        if writer.transport is not None:
            writer.transport.abort()
        server.close()


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
@pytest.mark.parametrize("busy", [False, True], ids=["at-once", "gathered"])
def test_parts_written_past_the_high_water_mark_pause_the_writer(loop_factory, busy):
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_write_many_parts_to_a_peer_that_does_not_read(busy))
