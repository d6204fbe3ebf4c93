"""A lean HTTP/1.1 client for the upstream path: pooled keep-alive connections, httptools' parser.

aiohttp's ClientSession was about half of the proxy's CPU per forwarded request. Forwarding needs
much less of it: a few origins, bodies passed through as they are (never decompressed, never
re-encoded), no cookies, no redirects, no automatic headers. This is that much, on llhttp (through
httptools) over the event loop's own transports.

    client = Client(tls, connections=100, connect_timeout=5, read_timeout=30)
    response = await client.request("POST", Origin.of(url), "/api/x?a=1", headers, body)
    response.status, response.headers, response.content_length
    await response.read(n) / await response.read_up_to(n) / await response.readany()
    response.release()            # back to the pool if read whole and kept alive, else closed

- A request is never sent twice: a kept-alive connection that turns out dead fails the request
  (ServerDisconnected), where aiohttp's client would resend an idempotent one. Only the
  forwarder's replay after a rejected token may send a request again (a token call is never
  resent).
- Idle connections are reused last-in first-out, and closed after KEEPALIVE seconds idle (aiohttp's
  default): a connection the server is about to time out is the likeliest to die under a request.
- The read timeout bounds every wait for bytes once the request is sent, as aiohttp's sock_read
  does. While the body is still going out, the caller's own deadline is in charge.

Errors: see errors.py.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.coalesce import WriteCoalescer
from proxy.upstream.errors import (
    ClientError,
    ConnectError,
    ConnectTimeout,
    PayloadError,
    ProtocolError,
    ReadTimeout,
    SendError,
    ServerDisconnected,
)

# The server side of aiohttp buffers 64 KiB per read as well: reading pauses once twice this is
# buffered and not yet read, and resumes once less than this is.
HIGH_WATER: Final = 64 * 1024
# An answer's head (status line, headers, any 1xx before it) may be at most this long, so that an
# upstream cannot fill memory with one endless header (aiohttp limits lines and header counts).
MAX_HEAD: Final = 256 * 1024
# Idle connections older than this are closed rather than reused (aiohttp's keepalive_timeout).
KEEPALIVE: Final = 15.0
# Methods whose requests carry no body unless they say so (aiohttp's GET_METHODS): others get an
# explicit `Content-Length: 0`, as RFC 9110 section 8.6 asks of a user agent.
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_NO_BODY_STATUSES: Final = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: the pool key, and the Host header they carry."""

    scheme: str
    host: str
    port: int
    authority: str  # host[:port], the port only when not the scheme's default

    @classmethod
    def of(cls, url: str) -> Origin:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host or parsed.port is None:
            raise ValueError(f"{url!r} is not an http(s) URL with a host")
        return cls(parsed.scheme, parsed.host, parsed.port, parsed.host_port_subcomponent or "")

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


class Client:
    """Keep-alive connections to upstreams, a pool per origin.

    The pool never holds more than `connections` idle connections; how many are in use at once
    is the caller's to bound (the forwarder's slots), and new ones are made as needed.
    """

    def __init__(
        self,
        tls: ssl.SSLContext,
        *,
        connections: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._tls = tls
        self._limit = connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pools: dict[Origin, _Pool] = {}

    def idle(self, origin: Origin) -> int:
        """Idle connections kept for `origin`."""
        pool = self._pools.get(origin)
        return 0 if pool is None else len(pool.idle)

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        await asyncio.sleep(0)  # the transports' connection_lost callbacks run

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None = None,
    ) -> Response:
        """Send a request and return its answer once the headers are in.

        `target` goes out exactly as given (path and query, already encoded). With a body, a
        Content-Length header means it is sent as is (and must be exactly that long); without
        one it is sent chunked.
        """
        if body is None:
            length = None
            framing = "" if method in _NO_BODY_METHODS else "Content-Length: 0\r\n"
        else:
            declared = headers.get("Content-Length")
            length = None if declared is None else int(declared)
            framing = "" if declared is not None else "Transfer-Encoding: chunked\r\n"
        head = _head(method, target, origin, headers, framing)
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(self._limit)
        conn = pool.take() or await self._connect(origin, pool)
        response = Response(conn, head_only=method == "HEAD")
        conn.begin(response)
        try:
            if body is None:
                conn.write(head)
                conn.sent()
            else:
                response._writer = asyncio.create_task(_send(conn, response, head, body, length))
            await response._wait_for_headers()
        except BaseException:
            response.release()
            raise
        return response

    async def _connect(self, origin: Origin, pool: _Pool) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(pool, self._read_timeout),
                    origin.host,
                    origin.port,
                    # Verified against the configured CAs, for the URL's own host name.
                    ssl=self._tls if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {origin.authority} in time") from None
        except OSError as exc:  # refused, unreachable, name unknown, TLS (ssl.SSLError)
            raise ConnectError(
                origin.host, origin.port, _connect_failure(exc), errno=exc.errno
            ) from exc
        return conn


def _connect_failure(exc: OSError) -> str:
    """Why connecting failed, in the system's words: "Connection refused", "Too many open
    files", a TLS verification failure; never more than the host and port already say."""
    if isinstance(exc, ssl.SSLError):  # its errno is OpenSSL's, not the system's
        return str(exc.reason or exc)
    if exc.errno is not None and exc.errno > 0:  # (a name lookup's are negative)
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


def _head(
    method: str, target: str, origin: Origin, headers: CIMultiDict[str], framing: str
) -> bytes:
    if "Transfer-Encoding" in headers:
        raise ValueError("Transfer-Encoding is the client's to set")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    if "Host" not in headers:
        lines.append(f"Host: {origin.authority}\r\n")
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if framing:
        lines.append(framing)
    lines.append("\r\n")
    text = "".join(lines)
    # Each line brings exactly one CR LF: any other CR or LF would let a value start a header
    # of its own (request smuggling), so it is refused, as aiohttp refuses it.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError("CR or LF in the request line or a header")
    # surrogateescape: bytes the server decoded that way go out as they came.
    return text.encode("utf-8", "surrogateescape")


async def _send(
    conn: _Connection,
    response: Response,
    head: bytes,
    body: AsyncIterator[bytes],
    length: int | None,
) -> None:
    """Send the head and the body, as a task beside the wait for the answer (which may come
    before the body is sent: a server may answer early). Cancelled when the answer is released."""
    chunked = length is None
    pending: bytes | None = head  # the head goes out with the first chunk
    size = 0
    try:
        async for chunk in body:
            if not chunk:
                continue
            size += len(chunk)
            if length is not None and size > length:
                raise SendError(f"the body is longer than its Content-Length ({length})")
            parts = [chunk] if not chunked else [b"%x\r\n" % len(chunk), chunk, b"\r\n"]
            if pending is not None:
                parts.insert(0, pending)
                pending = None
            conn.write_parts(parts)
            await conn.drain()
        if length is not None and size != length:
            raise SendError(f"the body ended at {size} of its {length} bytes")
        tail = b"0\r\n\r\n" if chunked else b""
        conn.write(tail if pending is None else pending + tail)
        conn.sent()
    except asyncio.CancelledError:
        raise  # released: release() closes the connection
    except Exception as exc:  # the body's source failed, or the connection did
        error = SendError(f"the request could not be sent ({type(exc).__name__})")
        error.__cause__ = exc
        response._fail(error)
        conn.abort()


class _Pool:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.idle: deque[_Connection] = deque()  # the most recently used last
        self.open: set[_Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        # Requests leave together at the end of the loop's pass while others are in flight.
        self.coalescer = WriteCoalescer(self.busy)

    def busy(self) -> bool:
        """More than one exchange in progress (connections open and not idle)."""
        return len(self.open) - len(self.idle) > 1

    def take(self) -> _Connection | None:
        """The most recently used idle connection that is still fresh, if any."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:  # closed just now, and not yet forgotten
                continue
            if asyncio.get_running_loop().time() - conn.idle_since < KEEPALIVE:
                return conn
            conn.close()  # too old, and so is every one below it
            self.sweep()
        return None

    def put(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        if len(self.idle) >= self.limit:
            conn.close()
            return
        self.idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(KEEPALIVE, self.sweep)

    def sweep(self) -> None:
        """Close connections idle for KEEPALIVE or longer; they are at the bottom."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if not self.idle:
            return
        loop = asyncio.get_running_loop()
        expired = loop.time() - KEEPALIVE
        while self.idle and self.idle[0].idle_since <= expired:
            self.idle.popleft().close()
        if self.idle:
            self._sweep = loop.call_at(self.idle[0].idle_since + KEEPALIVE, self.sweep)

    def forget(self, conn: _Connection) -> None:
        """`conn` is closed: it is no longer open, nor idle if it was."""
        self.open.discard(conn)
        if conn.idle_since >= 0 and conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.idle.clear()
        for conn in list(self.open):
            conn.abort()


class _Connection(asyncio.Protocol):
    """One connection: writes with flow control, and reads fed to the current answer's parser."""

    def __init__(self, pool: _Pool, read_timeout: float) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._response: Response | None = None
        self.closed = False
        self.idle_since = -1.0  # loop time it went idle; -1 while in use
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        # The read timeout is one timer per period, not one per read: data_received only notes
        # the time, and the timer, when it fires, checks whether bytes came meanwhile.
        self._read_timeout = read_timeout
        self._reading = False  # the request is sent and its answer not yet whole
        self._last_read = 0.0
        self._head_due = 0.0  # the answer's head, as a whole, is due by then
        self._timer: asyncio.TimerHandle | None = None

    # -- the transport's callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._pool.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        by_peer = not self.closed  # else we closed it: abort() and close() say so at once
        self.closed = True
        self._stop_timer()
        self._pool.forget(self)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._response is not None:
            self._response._connection_lost(exc, by_peer=by_peer)

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:
            # An idle connection has nothing to say: whatever this is, the connection is spoilt.
            self.abort()
            return
        if self._reading:
            self._last_read = self._loop.time()
        elif not self._read_paused:
            # The answer began before the request was all sent (an early answer): from its
            # first bytes on, the read timeout applies, as with aiohttp.
            self._reading = True
            self._start_timer()
            self._head_due = self._last_read + self._read_timeout
        response._feed(data)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the client and the answer --

    def begin(self, response: Response) -> None:
        self._response = response
        self.idle_since = -1.0

    def write(self, data: bytes) -> None:
        if self.closed or self._transport is None:
            raise ServerDisconnected("the connection closed before the request was sent")
        self._pool.coalescer.write(self._transport, data)

    def write_parts(self, parts: list[bytes]) -> None:
        if self.closed or self._transport is None:
            raise ServerDisconnected("the connection closed before the request was sent")
        self._pool.coalescer.write_parts(self._transport, parts)

    async def drain(self) -> None:
        if not self._write_paused:
            return
        self._drain_waiter = self._loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None
        if self.closed:
            raise ServerDisconnected("the connection closed while the request was sent")

    def sent(self) -> None:
        """The request is out: from now on, every wait for bytes has the read timeout."""
        if self._response is not None and not self._response._complete:
            self._reading = True
            self._start_timer()
            if not self._response._has_headers:
                self._head_due = self._last_read + self._read_timeout

    def pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()
            self._stop_timer()  # the reader is behind, not the upstream

    def resume_reading(self) -> None:
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
            if self._reading:
                self._start_timer()

    def answered(self) -> None:
        """The answer is whole: no more bytes are awaited (the timer lapses when it fires, or
        serves the next exchange: cheaper than a new timer for each)."""
        self._reading = False

    def finish(self, reusable: bool) -> None:
        """The exchange is over: keep the connection for the next one, or close it."""
        self._response = None
        self._reading = False
        if not reusable or self.closed:
            self._stop_timer()
            self.abort()
            return
        self.resume_reading()
        self._pool.put(self)

    def close(self) -> None:
        """Close politely (with TLS, a close_notify): for healthy connections."""
        self.closed = True  # at once: connection_lost comes on a later turn of the loop
        if self._transport is not None:
            self._pool.coalescer.flush(self._transport)
            self._transport.close()

    def abort(self) -> None:
        """Close at once, whatever is still buffered: for connections in an unknown state."""
        self.closed = True
        if self._transport is not None:
            self._pool.coalescer.discard(self._transport)
            self._transport.abort()

    # -- the read timeout --

    def _start_timer(self) -> None:
        self._last_read = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if not self._reading or self._read_paused:
            return
        due = self._last_read + self._read_timeout
        response = self._response
        waiting_for_head = response is not None and not response._has_headers
        if waiting_for_head:
            # The head as a whole, not only each wait for it: bytes that trickle (1xx answers,
            # a byte at a time) must not hold a request past the read timeout.
            due = min(due, self._head_due)
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        if response is not None:
            what = "no answer within" if waiting_for_head else "no bytes for"
            response._fail(ReadTimeout(f"{what} {self._read_timeout} s"))
        self.abort()


class Response:
    """An answer: its status and headers, and its body to read as it comes.

    Also the parser's callback object: llhttp calls the on_* methods from inside _feed.
    """

    status: int
    headers: CIMultiDictProxy[str]
    content_length: int | None

    def __init__(self, conn: _Connection, *, head_only: bool) -> None:
        self._conn = conn
        self._head_only = head_only
        self._parser = httptools.HttpResponseParser(self)
        self._raw_headers: list[tuple[str, str]] = []
        self._has_headers = False
        self._head_size = 0
        self._interim = False  # a 1xx answer is being parsed: skipped, the real one follows
        self._until_eof = False  # the body ends when the connection does
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._error: ClientError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._released = False

    # -- reading --

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes of the body, waiting for some; b"" at its end."""
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()
        first = chunks.popleft()
        if len(first) >= n:
            if len(first) > n:
                chunks.appendleft(first[n:])
                first = first[:n]
            self._consumed(len(first))
            return first
        parts, size = [first], len(first)
        while chunks and size < n:
            chunk = chunks.popleft()
            if size + len(chunk) > n:
                chunks.appendleft(chunk[n - size :])
                chunk = chunk[: n - size]
            parts.append(chunk)
            size += len(chunk)
        self._consumed(size)
        return b"".join(parts)

    async def read_up_to(self, n: int) -> bytes:
        """The whole body if it is shorter than `n` bytes, else its first `n`: reads until either
        (ask for one more than a limit to tell whether a body is over it)."""
        first = await self.read(n)
        if len(first) == n or not first or self.at_eof():
            return first  # nearly always: a small answer comes in one piece
        parts, size = [first], len(first)
        while size < n:
            chunk = await self.read(n - size)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    async def readany(self) -> bytes:
        """The next bytes of the body as they came, waiting for some; b"" at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self._consumed(len(chunk))
        return chunk

    def at_eof(self) -> bool:
        return self._complete and not self._chunks

    def release(self) -> None:
        """Done with this answer: its connection goes back to the pool only if the exchange
        ended cleanly (request sent, answer read whole, keep-alive allowed); else it is closed."""
        if self._released:
            return
        self._released = True
        writer = self._writer
        sent = writer is None or (writer.done() and not writer.cancelled())
        if writer is not None and not writer.done():
            writer.cancel()  # the rest of the body is not wanted: the connection cannot be reused
        reusable = sent and self._complete and self._keep_alive and self._error is None
        self._chunks.clear()
        self._conn.finish(reusable)

    # -- waiting --

    async def _wait_for_headers(self) -> None:
        while not self._has_headers:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def _wait(self) -> None:
        self._waiter = self._conn._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _consumed(self, size: int) -> None:
        self._buffered -= size
        if self._buffered < HIGH_WATER:
            self._conn.resume_reading()

    def _fail(self, error: ClientError) -> None:
        """The exchange failed; an answer already read whole is kept."""
        if self._error is None and not self._complete:
            self._error = error
            self._wake()

    # -- from the connection --

    def _feed(self, data: bytes) -> None:
        if self._complete or self._error is not None:
            # More after the whole answer: a server that does not follow the protocol.
            self._keep_alive = False
            return
        try:
            self._parser.feed_data(data)
            if not self._has_headers and not self._complete:
                # Counted once the bytes are parsed and the head is still not whole, so a read
                # that ends the head and brings body bytes along is not held against it.
                self._head_size += len(data)
                if self._head_size > MAX_HEAD:
                    self._fail(ProtocolError(f"the answer's head is over {MAX_HEAD} bytes"))
                    self._conn.abort()
        except httptools.HttpParserCallbackError:
            # A callback stopped the parser: after the headers of a HEAD answer (llhttp cannot
            # be told through httptools that it has no body), or at a second answer. The answer
            # is whole; any bytes after it were the server's mistake, and spoil the connection.
            if self._complete:
                if self._head_only and not data.endswith(b"\r\n\r\n"):
                    self._keep_alive = False
                return
            self._fail(ProtocolError("the answer is not valid HTTP/1.1"))
            self._conn.abort()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._complete:  # bytes after the answer
                self._keep_alive = False
                return
            self._fail(ProtocolError(f"the answer is not valid HTTP/1.1 ({exc})"))
            self._conn.abort()

    def _connection_lost(self, exc: Exception | None, *, by_peer: bool) -> None:
        if self._complete:
            return
        if not self._has_headers:
            self._fail(ServerDisconnected("the connection closed before an answer came"))
        elif self._until_eof and exc is None and by_peer:
            # The body is delimited by the end of the connection: the server's clean close.
            self._message_done(keep_alive=False)
        else:
            self._fail(PayloadError("the answer broke off before its end"))

    def _message_done(self, *, keep_alive: bool) -> None:
        self._complete = True
        self._keep_alive = keep_alive
        self._conn.answered()
        self._wake()

    # -- the parser's callbacks --

    def on_message_begin(self) -> None:
        if self._complete:
            # Another answer after this one's end, in the same read: nothing asked for it.
            # Stop before it can overwrite this one; it spoils the connection.
            self._keep_alive = False
            raise _StopParsing
        self._raw_headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them, so that they go out again as they came.
        self._raw_headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # 1xx: an interim answer (RFC 9110 section 15.2), skipped. 101 would switch
            # protocols, which this client never asks for; llhttp raises HttpParserUpgrade.
            self._interim = True
            return
        self.status = status
        headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        self.headers = headers
        declared = headers.get("Content-Length")
        # llhttp has checked it is a number (and the only one).
        self.content_length = int(declared) if declared is not None else None
        if not (self._head_only or status in _NO_BODY_STATUSES or declared is not None):
            coding = headers.get("Transfer-Encoding", "")
            # RFC 9112 section 6.3: without a length or a final chunked coding, the body of an
            # answer lasts until the connection closes.
            self._until_eof = coding.rpartition(",")[2].strip().lower() != "chunked"
        self._has_headers = True
        self._wake()
        if self._head_only:
            self._message_done(keep_alive=self._parser.should_keep_alive())
            raise _StopParsing  # stops llhttp, which would wait for a body (see _feed)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > 2 * HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        # HTTP/1.1 without `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`, and a
        # body that did not need the end of the connection.
        self._message_done(keep_alive=self._parser.should_keep_alive())


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing: the answer is whole."""
