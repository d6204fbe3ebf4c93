"""The upstream client against real loopback servers: the fake Sobot, and raw asyncio servers that
answer byte by byte as each case needs (chunked, until close, 1xx, cut short, TLS, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
import trustme
from multidict import CIMultiDict

from proxy import upstream
from proxy.sobot.v5 import make_sign
from proxy.testing.fake_sobot import FAULT_HEADER, FakeSobot, download_sha256
from proxy.upstream import Client, Origin
from proxy.upstream import client as upstream_client
from tests.conftest import APP_KEY, APPID, blackhole

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Peer:
    """One connection to a raw server, as the server sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self) -> tuple[bytes, bytes]:
        """The next request's head and body (Content-Length or chunked)."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)\r$", head)
        if length is not None:
            return head, await self.reader.readexactly(int(length.group(1)))
        if re.search(rb"(?im)^transfer-encoding: *chunked\r$", head) is None:
            return head, b""
        body = bytearray()
        while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
            body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        await self.reader.readuntil(b"\r\n")  # the end of the (empty) trailer section
        return head, bytes(body)

    async def answer(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """A loopback server running `handler` on every connection; it keeps what it was asked."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.peers: list[Peer] = []
        self.server: asyncio.Server | None = None
        self.origin = Origin.of("http://127.0.0.1:1")

    async def start(self, tls: ssl.SSLContext | None = None) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        self.origin = Origin.of(f"{'https' if tls else 'http'}://127.0.0.1:{port}")
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = Peer(reader, writer)
        self.peers.append(peer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            await self.handler(peer)

    async def stop(self) -> None:
        for peer in self.peers:
            peer.writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    lean = Client(ssl.create_default_context(), connections=4, connect_timeout=2, read_timeout=2)
    yield lean
    await lean.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> RawServer:
        server = await RawServer(handler).start(tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def answering(*answers: bytes, close: bool = False) -> Handler:
    """A handler that answers each request on a connection with the next of `answers`."""

    async def handler(peer: Peer) -> None:
        for answer in answers:
            await peer.request()
            await peer.answer(answer)
        if close:
            peer.writer.close()
        else:
            await peer.reader.read()  # until the client closes

    return handler


async def read_all(response: upstream.Response) -> bytes:
    parts = []
    while chunk := await response.readany():
        parts.append(chunk)
    return b"".join(parts)


async def get(client: Client, origin: Origin, target: str = "/api/x", **headers: str) -> bytes:
    """One GET, its body read whole and the answer released."""
    async with asyncio.timeout(10):
        response = await client.request("GET", origin, target, CIMultiDict(headers))
        try:
            return await read_all(response)
        finally:
            response.release()


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# -- requests as they go out -------------------------------------------------------------------


async def test_the_request_line_and_headers_are_byte_exact(client, serve):
    received: list[bytes] = []

    async def handler(peer: Peer) -> None:
        head, _ = await peer.request()
        received.append(head)
        await peer.answer(OK)
        await peer.reader.read()

    server = await serve(handler)
    headers = CIMultiDict([("X-A", "1"), ("x-a", "2"), ("token", "t")])
    target = "/api/a%2Fb/%E4%B8%AD?q=%20&flag&a=1&a=1"
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, target, headers)
        response.release()
    port = server.origin.port
    assert received == [
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "X-A: 1\r\nx-a: 2\r\ntoken: t\r\n\r\n".encode()
    ]


async def test_a_host_header_given_is_kept(client, serve):
    received: list[bytes] = []

    async def handler(peer: Peer) -> None:
        received.append((await peer.request())[0])
        await peer.answer(OK)

    server = await serve(handler)
    response = await client.request("GET", server.origin, "/", CIMultiDict(Host="sobot.example"))
    response.release()
    assert received[0].count(b"Host:") == 1
    assert b"\r\nHost: sobot.example\r\n" in received[0]


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
async def test_cr_or_lf_in_a_header_is_refused_before_anything_is_sent(client, serve, value):
    server = await serve(answering(OK))
    with pytest.raises(ValueError, match="CR or LF"):
        await client.request("GET", server.origin, "/", CIMultiDict({"X-A": value}))
    assert server.connections == 0


@pytest.mark.parametrize(
    ("method", "framing"),
    [("POST", b"Content-Length: 0\r\n"), ("DELETE", b"Content-Length: 0\r\n"), ("GET", b"")],
)
async def test_a_request_without_a_body_says_so_when_its_method_could_have_one(
    client, serve, method, framing
):
    received: list[bytes] = []

    async def handler(peer: Peer) -> None:
        received.append((await peer.request())[0])
        await peer.answer(OK)

    server = await serve(handler)
    response = await client.request(method, server.origin, "/", CIMultiDict())
    response.release()
    head = received[0]
    assert head.endswith(b"\r\n" + framing + b"\r\n")
    assert b"Transfer-Encoding" not in head


async def test_a_body_of_known_length_is_sent_as_is(client, serve):
    received: list[tuple[bytes, bytes]] = []

    async def handler(peer: Peer) -> None:
        received.append(await peer.request())
        await peer.answer(OK)

    server = await serve(handler)
    data = os.urandom(300_000)
    headers = CIMultiDict({"Content-Length": str(len(data))})
    body = chunks(data[:1], data[1:100_000], b"", data[100_000:])
    async with asyncio.timeout(10):
        response = await client.request("PUT", server.origin, "/up", headers, body)
        assert await read_all(response) == b"ok"
        response.release()
    [(head, sent)] = received
    assert sent == data
    assert b"Transfer-Encoding" not in head


async def test_a_body_of_unknown_length_is_sent_chunked(client, serve):
    received: list[tuple[bytes, bytes]] = []

    async def handler(peer: Peer) -> None:
        received.append(await peer.request())
        await peer.answer(OK)

    server = await serve(handler)
    async with asyncio.timeout(10):
        response = await client.request(
            "POST", server.origin, "/up", CIMultiDict(), chunks(b"hello", b"", b" world")
        )
        response.release()
    [(head, sent)] = received
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head
    assert b"Content-Length" not in head
    assert sent == b"hello world"


@pytest.mark.parametrize("parts", [(b"short",), (b"far too long",)])
async def test_a_body_that_is_not_its_declared_length_fails_and_is_not_reused(client, serve, parts):
    server = await serve(answering(OK, OK))
    headers = CIMultiDict({"Content-Length": "8"})
    async with asyncio.timeout(10):
        with pytest.raises(upstream.SendError):
            await client.request("POST", server.origin, "/", headers, chunks(*parts))
        assert await get(client, server.origin) == b"ok"
    assert server.connections == 2


async def test_a_body_whose_source_fails_fails_the_request(client, serve):
    server = await serve(answering(OK))

    async def failing() -> AsyncIterator[bytes]:
        yield b"some"
        raise OSError("the client went away")

    async with asyncio.timeout(10):
        with pytest.raises(upstream.SendError) as caught:
            await client.request("POST", server.origin, "/", CIMultiDict(), failing())
    assert isinstance(caught.value.__cause__, OSError)
    assert client.idle(server.origin) == 0


# -- answers -----------------------------------------------------------------------------------


async def test_a_length_delimited_answer_is_read_whole_and_its_connection_reused(client, serve):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Multi: a\r\nx-multi: b\r\n\r\nhello"
    server = await serve(answering(answer, answer, answer))
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        assert response.status == 200
        assert response.content_length == 5
        assert response.headers.getall("X-Multi") == ["a", "b"]
        assert await response.read(2) == b"he"
        assert not response.at_eof()
        assert await response.read(100) == b"llo"
        assert response.at_eof()
        assert await response.read(100) == b""
        response.release()
        assert client.idle(server.origin) == 1
        assert await get(client, server.origin) == b"hello"
        assert await get(client, server.origin) == b"hello"
    assert server.connections == 1


async def test_a_chunked_answer_is_decoded(client, serve):
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    server = await serve(answering(answer, OK))
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        assert response.content_length is None
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert await read_all(response) == b"hello world"
        response.release()
        assert await get(client, server.origin) == b"ok"
    assert server.connections == 1


@pytest.mark.parametrize(
    ("limit", "expected"), [(4, b"hell"), (11, b"hello world"), (99, b"hello world")]
)
async def test_read_up_to_gathers_pieces_until_the_limit_or_the_end(client, serve, limit, expected):
    """The body's first piece comes with the head, the rest once asked for: read_up_to waits for
    more until it has `limit` bytes or the body has ended."""
    rest_wanted = asyncio.Event()

    async def in_two_pieces(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await rest_wanted.wait()
        await peer.answer(b"6\r\n world\r\n0\r\n\r\n")
        await peer.reader.read()

    server = await serve(in_two_pieces)
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        try:
            reading = asyncio.create_task(response.read_up_to(limit))
            rest_wanted.set()  # sent once the first piece has been read
            assert await reading == expected
        finally:
            response.release()


async def test_an_answer_delimited_by_the_end_of_the_connection_is_read_whole(client, serve):
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    server = await serve(answering(answer, close=True))
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        assert response.content_length is None
        assert await read_all(response) == b"until the end"
        response.release()
    assert client.idle(server.origin) == 0


@pytest.mark.parametrize(
    ("answer", "kept"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
    ],
)
async def test_a_connection_is_kept_only_when_the_answer_allows_it(client, serve, answer, kept):
    server = await serve(answering(answer, answer))
    assert await get(client, server.origin) == b"ok"
    assert client.idle(server.origin) == (1 if kept else 0)
    if kept:
        assert await get(client, server.origin) == b"ok"
        assert server.connections == 1


async def test_an_answer_released_before_its_end_closes_its_connection(client, serve):
    size = 4 * 1024 * 1024
    answer = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + b"x" * size
    server = await serve(answering(answer))
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        assert await response.readany()
        response.release()
        assert client.idle(server.origin) == 0
        assert len(await get(client, server.origin)) == size
    assert server.connections == 2


async def test_a_body_until_close_cut_by_our_own_close_is_never_whole(serve):
    lean = Client(ssl.create_default_context(), connections=2, connect_timeout=2, read_timeout=5)
    stall = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\n\r\npart")
        await stall.wait()

    try:
        server = await serve(handler)
        async with asyncio.timeout(10):
            response = await lean.request("GET", server.origin, "/", CIMultiDict())
            assert await response.readany() == b"part"
            await lean.close()  # shutting down with an answer in flight
            with pytest.raises(upstream.PayloadError):
                await response.readany()
            response.release()
    finally:
        stall.set()
        await lean.close()


async def test_interim_1xx_answers_are_skipped(client, serve):
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone"
    )
    server = await serve(answering(answer, OK))
    async with asyncio.timeout(10):
        response = await client.request("POST", server.origin, "/", CIMultiDict())
        assert response.status == 201
        assert "Link" not in response.headers
        assert response.headers["X-Final"] == "yes"
        assert await read_all(response) == b"done"
        response.release()
        assert await get(client, server.origin) == b"ok"
    assert server.connections == 1


@pytest.mark.parametrize("size", [0, 10, 5_000_000])
async def test_a_head_answer_has_no_body_but_its_length_and_the_connection_is_kept(
    client, serve, size
):
    head_answer = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode()
    server = await serve(answering(head_answer, OK))
    async with asyncio.timeout(10):
        response = await client.request("HEAD", server.origin, "/", CIMultiDict())
        assert response.content_length == size
        assert response.at_eof()
        assert await response.readany() == b""
        response.release()
        assert await get(client, server.origin) == b"ok"
    assert server.connections == 1


async def test_a_head_answer_followed_by_a_body_spoils_the_connection(client, serve):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad"
    server = await serve(answering(answer, OK))
    async with asyncio.timeout(10):
        response = await client.request("HEAD", server.origin, "/", CIMultiDict())
        assert await read_all(response) == b""
        response.release()
    assert client.idle(server.origin) == 0


@pytest.mark.parametrize("status", [204, 304])
async def test_answers_without_a_body_by_their_status_keep_the_connection(client, serve, status):
    answer = f"HTTP/1.1 {status} X\r\nETag: e\r\n\r\n".encode()
    server = await serve(answering(answer, OK))
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        assert response.status == status
        assert await read_all(response) == b""
        response.release()
        assert await get(client, server.origin) == b"ok"
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhalf!\r\n",
    ],
)
async def test_an_answer_cut_short_raises_a_payload_error(client, serve, answer):
    server = await serve(answering(answer, close=True))
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        assert await response.readany() == b"half!"  # what came, then the error
        with pytest.raises(upstream.PayloadError):
            await response.readany()
        response.release()
    assert client.idle(server.origin) == 0


async def test_no_answer_at_all_is_a_server_disconnect_and_never_a_resend(client, serve):
    requests = 0

    async def handler(peer: Peer) -> None:
        nonlocal requests
        await peer.request()
        requests += 1
        if requests == 1:
            await peer.answer(OK)  # a kept-alive connection to reuse...
            await peer.request()
            requests += 1
        peer.writer.close()  # ...that dies under the next request

    server = await serve(handler)
    assert await get(client, server.origin) == b"ok"
    async with asyncio.timeout(10):
        with pytest.raises(upstream.ServerDisconnected):
            await client.request("GET", server.origin, "/", CIMultiDict())
    assert (requests, server.connections) == (2, 1)  # sent once, never again


async def test_a_malformed_answer_is_a_protocol_error(client, serve):
    server = await serve(answering(b"HTTP/1.1 abc\r\n\r\n", close=True))
    async with asyncio.timeout(10):
        with pytest.raises(upstream.ProtocolError):
            await client.request("GET", server.origin, "/", CIMultiDict())


async def test_an_endless_answer_head_is_a_protocol_error(client, serve):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        while True:
            await peer.answer(b"a" * 65536)

    server = await serve(handler)
    async with asyncio.timeout(10):
        with pytest.raises(upstream.ProtocolError, match="head is over"):
            await client.request("GET", server.origin, "/", CIMultiDict())


async def test_an_idle_connection_closed_by_the_peer_is_dropped_for_a_fresh_one(client, serve):
    server = await serve(answering(OK, close=True))
    assert await get(client, server.origin) == b"ok"
    async with asyncio.timeout(10):
        while client.idle(server.origin):  # noqa: ASYNC110 -- the pool has no event for this
            await asyncio.sleep(0.01)
        assert await get(client, server.origin) == b"ok"
    assert server.connections == 2


async def test_bytes_on_an_idle_connection_spoil_it(client, serve):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.answer(OK + b"HTTP/1.1 200 OK\r\n")  # an answer to nothing
        await peer.request()
        await peer.answer(OK)

    server = await serve(handler)
    assert await get(client, server.origin) == b"ok"
    assert client.idle(server.origin) == 0
    assert await get(client, server.origin) == b"ok"
    assert server.connections == 2


async def test_idle_connections_past_the_limit_are_closed(serve):
    lean = Client(ssl.create_default_context(), connections=2, connect_timeout=2, read_timeout=2)
    try:
        server = await serve(answering(OK, OK))
        async with asyncio.timeout(10):
            responses = [
                await lean.request("GET", server.origin, "/", CIMultiDict()) for _ in range(3)
            ]
            for response in responses:
                await read_all(response)
                response.release()
        assert lean.idle(server.origin) == 2
    finally:
        await lean.close()


async def test_connections_idle_too_long_are_not_reused(client, serve, monkeypatch):
    monkeypatch.setattr(upstream_client, "KEEPALIVE", 0.05)
    server = await serve(answering(OK, OK))
    assert await get(client, server.origin) == b"ok"
    await asyncio.sleep(0.1)  # the passing of time is the point here
    assert await get(client, server.origin) == b"ok"
    assert server.connections == 2


async def test_reading_pauses_while_the_reader_is_behind(client, serve):
    size = 16 * 1024 * 1024
    data = os.urandom(size)
    behind = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        peer.writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + data)
        # The client reads nothing: once the kernel's buffers are full, the rest waits here.
        while peer.writer.transport.get_write_buffer_size() < size // 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        behind.set()
        await peer.writer.drain()

    server = await serve(handler)
    async with asyncio.timeout(20):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        await behind.wait()
        assert response._buffered <= 2 * upstream.HIGH_WATER + 256 * 1024
        body = await read_all(response)
        response.release()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


# -- timeouts and connecting -------------------------------------------------------------------


async def test_no_answer_within_the_read_timeout_is_a_read_timeout(serve):
    lean = Client(ssl.create_default_context(), connections=2, connect_timeout=2, read_timeout=0.2)
    stall = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await stall.wait()

    try:
        server = await serve(handler)
        async with asyncio.timeout(10):
            with pytest.raises(upstream.ReadTimeout):
                await lean.request("GET", server.origin, "/", CIMultiDict())
        assert lean.idle(server.origin) == 0
    finally:
        stall.set()
        await lean.close()


async def test_a_body_that_stalls_midway_is_a_read_timeout(serve):
    lean = Client(ssl.create_default_context(), connections=2, connect_timeout=2, read_timeout=0.2)
    stall = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!")
        await stall.wait()

    try:
        server = await serve(handler)
        async with asyncio.timeout(10):
            response = await lean.request("GET", server.origin, "/", CIMultiDict())
            started = time.monotonic()
            assert await response.readany() == b"half!"
            with pytest.raises(upstream.ReadTimeout):
                await response.readany()
            assert time.monotonic() - started >= 0.15
            response.release()
    finally:
        stall.set()
        await lean.close()


async def test_the_read_timeout_waits_until_the_body_is_sent(serve):
    """A slow upload is the caller's deadline's business, not the read timeout's."""
    lean = Client(ssl.create_default_context(), connections=2, connect_timeout=2, read_timeout=0.2)

    async def slow() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 10
            await asyncio.sleep(0.1)  # a slow client: 0.4 s in all

    try:
        server = await serve(answering(OK))
        async with asyncio.timeout(10):
            response = await lean.request("POST", server.origin, "/", CIMultiDict(), slow())
            assert await read_all(response) == b"ok"
            response.release()
    finally:
        await lean.close()


async def test_a_refused_connection_is_a_connect_error_with_host_and_port(client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with asyncio.timeout(10):
        with pytest.raises(upstream.ConnectError) as caught:
            await client.request("GET", Origin.of(f"http://127.0.0.1:{port}"), "/", CIMultiDict())
    assert (caught.value.host, caught.value.port) == ("127.0.0.1", port)


async def test_a_connection_that_never_completes_is_a_connect_timeout():
    lean = Client(ssl.create_default_context(), connections=2, connect_timeout=0.2, read_timeout=5)
    try:
        with blackhole() as port:
            async with asyncio.timeout(10):
                with pytest.raises(upstream.ConnectTimeout):
                    await lean.request(
                        "GET", Origin.of(f"http://127.0.0.1:{port}"), "/", CIMultiDict()
                    )
    finally:
        await lean.close()


def test_origins_carry_the_host_header_without_a_default_port():
    assert Origin.of("https://sg.sobot.io").authority == "sg.sobot.io"
    assert Origin.of("https://sg.sobot.io:443/prefix").port == 443
    assert Origin.of("https://sg.sobot.io:8443").authority == "sg.sobot.io:8443"
    assert Origin.of("http://[::1]:8080").authority == "[::1]:8080"
    with pytest.raises(ValueError, match="not an http"):
        Origin.of("ftp://example.com")


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def tls_server(serve, ca: trustme.CA) -> RawServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return await serve(answering(OK, OK), tls=context)


async def test_tls_is_verified_against_the_given_cas_and_kept_alive(serve, ca):
    server = await tls_server(serve, ca)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    lean = Client(trusting, connections=2, connect_timeout=2, read_timeout=2)
    try:
        assert server.origin.tls
        assert await get(lean, server.origin) == b"ok"
        assert await get(lean, server.origin) == b"ok"
        assert server.connections == 1
    finally:
        await lean.close()


async def test_a_certificate_nobody_vouches_for_is_a_connect_error(client, serve, ca):
    server = await tls_server(serve, ca)
    async with asyncio.timeout(10):
        with pytest.raises(upstream.ConnectError) as caught:
            await client.request("GET", server.origin, "/", CIMultiDict())
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)


# -- against the fake Sobot ----------------------------------------------------------------------


@pytest.fixture
async def sobot(fake: FakeSobot, client: Client) -> tuple[Origin, str]:
    """The fake's origin and a valid token for it."""
    origin = Origin.of(fake.url)
    created = str(int(time.time()))
    query = f"appid={APPID}&create_time={created}&sign={make_sign(APPID, created, APP_KEY)}"
    answer = orjson.loads(await get(client, origin, f"/api/get_token?{query}"))
    return origin, answer["item"]["token"]


async def test_requests_sent_together_arrive_whole_and_in_order(client, sobot):
    """Many exchanges at once, so their requests are gathered to the end of the loop's pass
    (coalesce.py): every head and body, of known length or chunked, small or past the gathering
    limit, reaches Sobot whole and belongs to its own request."""
    origin, token = sobot

    async def exchange(n: int) -> None:
        body = os.urandom(n * 7919 % (3 * 64 * 1024))
        headers = CIMultiDict({"token": token})
        if n % 3 == 0:
            source = None
        elif n % 3 == 1:
            headers["Content-Length"] = str(len(body))
            source = chunks(body)
        else:  # chunked, in parts
            source = chunks(*(body[i : i + 10_000] for i in range(0, len(body), 10_000)))
        response = await client.request(
            "GET" if source is None else "POST", origin, f"/api/echo?n={n}", headers, source
        )
        echoed = orjson.loads(await read_all(response))["item"]
        response.release()
        assert echoed["query"] == f"n={n}"
        if source is not None:
            assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()

    async with asyncio.timeout(30):
        await asyncio.gather(*(exchange(n) for n in range(40)))


@pytest.mark.parametrize("kind", ["download", "slow-download"])
async def test_downloads_from_the_fake_are_byte_exact(client, sobot, kind):
    origin, token = sobot
    size = 8 * 1024 * 1024 + 3
    headers = CIMultiDict({"token": token, FAULT_HEADER: f"{kind}={size}"})
    async with asyncio.timeout(30):
        response = await client.request("GET", origin, "/api/file", headers)
        digest, got = hashlib.sha256(), 0
        while chunk := await response.readany():
            digest.update(chunk)
            got += len(chunk)
        response.release()
    assert (digest.hexdigest(), got) == (download_sha256(size), size)
    assert response.content_length == (size if kind == "download" else None)
    assert client.idle(origin) == 1


@pytest.mark.parametrize("kind", ["truncate", "reset"])
async def test_answers_the_fake_cuts_short_raise_payload_errors(client, sobot, kind):
    origin, token = sobot
    headers = CIMultiDict({"token": token, FAULT_HEADER: kind})
    async with asyncio.timeout(10):
        response = await client.request("GET", origin, "/api/file", headers)
        assert response.content_length == 2048
        with pytest.raises(upstream.PayloadError):
            await read_all(response)
        response.release()


async def test_an_early_answer_is_read_while_the_body_still_goes_out(client, sobot, fake):
    origin, token = sobot
    headers = CIMultiDict({"token": token, FAULT_HEADER: "early"})

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(128):
            yield os.urandom(64 * 1024)

    async with asyncio.timeout(20):
        response = await client.request("POST", origin, "/api/upload", headers, upload())
        answer = orjson.loads(await read_all(response))
        response.release()  # the rest of the upload is not wanted: the connection goes
    assert answer["item"]["body_size"] == 0
    assert client.idle(origin) == 0
    assert fake.received[-1].method == "POST"


async def test_a_second_answer_in_the_same_read_is_not_taken_for_the_first(client, serve):
    """Nothing was asked for it: the first answer stands, and the connection is spoilt."""
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Answer: first\r\n\r\nabc"
    second = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nX-Answer: second\r\n\r\nwxyz"
    server = await serve(answering(first + second))
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        assert (response.status, response.headers["X-Answer"]) == (200, "first")
        assert await read_all(response) == b"abc"
        response.release()
    assert client.idle(server.origin) == 0


async def test_the_head_limit_counts_the_head_not_the_body_read_with_it(client, serve, monkeypatch):
    monkeypatch.setattr(upstream_client, "MAX_HEAD", 1024)
    body = b"x" * 65536

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 500)
        await asyncio.sleep(0.05)  # the head arrives in two reads; the second brings the body
        await peer.answer(b"\r\nContent-Length: 65536\r\n\r\n" + body)
        await peer.reader.read()

    server = await serve(handler)
    async with asyncio.timeout(10):
        response = await client.request("GET", server.origin, "/", CIMultiDict())
        assert await read_all(response) == body
        response.release()


async def test_interim_answers_that_trickle_do_not_hold_a_request_past_the_read_timeout(serve):
    """Each 1xx is a byte in time, but the answer's head as a whole is due within the read
    timeout, as the forwarder's own deadline once made sure."""
    lean = Client(ssl.create_default_context(), connections=2, connect_timeout=2, read_timeout=0.3)

    async def handler(peer: Peer) -> None:
        await peer.request()
        while True:
            await peer.answer(b"HTTP/1.1 102 Processing\r\n\r\n")
            await asyncio.sleep(0.05)  # an upstream that keeps saying it is still working

    server = await serve(handler)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(upstream.ReadTimeout, match="no answer within"):
                await lean.request("GET", server.origin, "/", CIMultiDict())
    finally:
        await lean.close()
