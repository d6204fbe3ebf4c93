"""A TCP relay that makes loopback look like a network: every byte arrives `delay` late.

    python -m bench.relay --port P --target-port T [--delay 0.010]

listens on 127.0.0.1:P, prints `listening P` once it accepts connections, and relays until
SIGTERM. Each chunk is delivered `delay` seconds after it arrived, in order, in each direction,
so a round trip costs twice that. The kernel completes the TCP handshake with this relay
locally, so the relay holds a new connection's first bytes for one round trip before
connecting onwards: the handshake pays the round trip it would pay on a network. Delay, not
bandwidth: chunks pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((loop.time() + delay, b""))  # end of stream, delivered late too
        await delivering
    finally:
        delivering.cancel()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target_port: int,
    delay: float,
) -> None:
    upstream_writer: asyncio.StreamWriter | None = None
    try:
        await asyncio.sleep(2 * delay)  # the TCP handshake's round trip (SYN, SYN-ACK)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        async with asyncio.TaskGroup() as directions:
            directions.create_task(_pump(client_reader, upstream_writer, delay))
            directions.create_task(_pump(upstream_reader, client_writer, delay))
    except* (ConnectionError, OSError):
        pass  # either side went away: the other is closed below
    finally:
        for writer in (client_writer, upstream_writer):
            if writer is not None:
                writer.close()


async def main(port: int, target_port: int, delay: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _relay(r, w, target_port, delay), "127.0.0.1", port
    )
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0: a free one")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.010, help="one way, in seconds")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.port, args.target_port, args.delay))
    sys.exit(0)
