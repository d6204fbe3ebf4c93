"""What every client connection is held to, whatever it sends or fails to read.

    ClientConnection     the socket's protocol, in front of aiohttp's: every callback passes
                         through it, so it sees each byte that arrives and each pause on the
                         way out
    ├── head deadline    a request's head (request line and headers) must have arrived within
                         `header_timeout` of the connection opening (its first request) or of
                         the request's first byte (any later one); otherwise the connection is
                         closed without an answer: there is no request to answer yet (nginx's
                         client_header_timeout does the same)
    ├── send watchdog    while bytes wait in the socket's buffer for the client to take them,
                         it must take some within `send_timeout` (the read timeout, as nginx's
                         send_timeout); otherwise the connection is aborted
    └── counting         open connections for /metrics, and a warning near the descriptor limit

Where a head begins and ends is found by httptools (llhttp, which aiohttp's own parser is built
on) fed the same bytes: it calls on_message_begin at a request's first byte and
on_headers_complete at the end of its head, whatever came before it on the connection (bodies,
pipelined requests). An idle kept-alive connection is aiohttp's keep-alive timeout's business
(`keepalive_timeout`, given to it by server.make_runner).

Cheap on the hot path: one timer per connection, armed when it opens and re-armed lazily (a
request only moves the deadline), and the send watchdog's timer only while a client is behind:
when the socket's buffer passes its high-water mark (the writer pauses), or when the connection
closes with bytes still unsent (a closing transport waits for its buffer to drain, for ever if
nobody watches it), so no answer, however small, waits unwatched. The high-water mark stays
the event loop's own: uvloop buffers every write until the end of its loop pass, so a mark of 0
would pause and resume the writer (and aiohttp's drain) for every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import resource
import socket
import struct
import termios
from collections.abc import Callable
from typing import Final

import httptools
import structlog

from proxy.coalesce import CoalescedTransport, WriteCoalescer
from proxy.server.metrics import Metrics
from proxy.server.occurrences import Occurrences

# The send watchdog looks this many times per timeout, so a stalled client is cut within about
# a quarter of the timeout after it has taken nothing for a whole one.
SEND_CHECKS: Final = 4
# Warn when this share of the descriptor limit is in use.
CROWDED_SHARE: Final = 0.9
STALLED_READER: Final = "the client stopped reading the answer"


def raise_open_files_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit, as nginx's
    worker_rlimit_nofile or Go's runtime do: each client connection takes a descriptor, and a
    soft limit of 1024 is reached long before memory or CPU. Returns the limit now in force."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _open_descriptors() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class ClientConnections:
    """The client connections of one process: their timeouts, their count and their warnings."""

    def __init__(
        self,
        *,
        header_timeout: float,
        send_timeout: float,
        log: structlog.typing.FilteringBoundLogger,
        keepalive_timeout: float = 75.0,
        metrics: Metrics | None = None,
        open_files_limit: int | None = None,
    ) -> None:
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        # Applied by aiohttp's request handler (server.make_runner): idle between requests.
        self.keepalive_timeout = keepalive_timeout
        self.open = 0
        self._metrics = metrics
        self._warnings = Occurrences(log)
        self._open_files_limit = open_files_limit
        # Descriptors in use are counted (one listing of /proc/self/fd) only when this many
        # connections are open: then the next count is set for when half the room left could
        # be gone. A few listings over a connection count's life, not one per connection.
        self._count_descriptors_at: int | None = 1 if open_files_limit else None

    def factory(
        self, protocol_factory: Callable[[], asyncio.Protocol], coalescer: WriteCoalescer
    ) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for a listening socket: aiohttp's, behind a ClientConnection."""
        return lambda: ClientConnection(protocol_factory(), coalescer, self)

    def opened(self) -> None:
        self.open += 1
        if self._metrics is not None:
            self._metrics.client_connections.inc()
        if self._count_descriptors_at is not None and self.open >= self._count_descriptors_at:
            self._count_descriptors()

    def _count_descriptors(self) -> None:
        limit, in_use = self._open_files_limit, _open_descriptors()
        if limit is None or in_use is None:
            self._count_descriptors_at = None  # no /proc: no warning
            return
        room = int(CROWDED_SHARE * limit) - in_use  # descriptors before the warning
        if room > 0:
            self._count_descriptors_at = self.open + max(room // 2, 1)
            return
        self._count_descriptors_at = self.open + 1 + limit // 100  # crowded: count less often
        # At the limit the event loop (libuv) accepts each new connection and closes it at
        # once: callers, health probes included, see a reset until descriptors free up.
        self._warnings.warn(
            "open_files_nearly_exhausted",
            "open_files",
            open_files=in_use,
            open_files_limit=limit,
            client_connections=self.open,
            detail="at the limit new connections are closed as soon as they are accepted; "
            "raise the hard limit (ulimit -n, systemd LimitNOFILE, the container's nofile)",
        )

    def closed(self) -> None:
        self.open -= 1
        if self._metrics is not None:
            self._metrics.client_connections.dec()

    def timed_out(self, kind: str, **details: object) -> None:
        """A connection closed by a timeout: counted, and logged (rate-limited, occurrences.py)."""
        if self._metrics is not None:
            self._metrics.client_timeouts.labels(kind).inc()
        event = "client_send_timeout" if kind == "send" else "client_header_timeout"
        self._warnings.warn(event, kind, **details)


class ClientConnection(asyncio.Protocol):
    """One client connection's socket protocol (see the module's docstring)."""

    __slots__ = (
        "_closing_seen",
        "_coalescer",
        "_connections",
        "_head_deadline",
        "_head_started",
        "_head_timer",
        "_heads",
        "_loop",
        "_parser",
        "_paused",
        "_progress_at",
        "_protocol",
        "_send_timer",
        "_sent_mark",
        "_transport",
        "_wrapped",
    )

    def __init__(
        self, protocol: asyncio.Protocol, coalescer: WriteCoalescer, connections: ClientConnections
    ) -> None:
        self._protocol = protocol
        self._coalescer = coalescer
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._wrapped: CoalescedTransport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._head_deadline: float | None = None
        self._head_started = False
        self._heads = 0  # request heads received whole
        self._head_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._closing_seen = False
        self._send_timer: asyncio.TimerHandle | None = None
        self._sent_mark = 0
        self._progress_at = 0.0

    @property
    def unsent(self) -> int:
        """Bytes written for the client that wait in this process (the kernel has not taken)."""
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    # -- the socket's callbacks, passed on to aiohttp's protocol ----------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        socket_transport: asyncio.Transport = transport  # type: ignore[assignment]
        self._transport = socket_transport
        self._wrapped = CoalescedTransport(
            socket_transport, self._coalescer, on_close=self._closing
        )
        self._connections.opened()
        self._head_deadline = self._loop.time() + self._connections.header_timeout
        self._head_timer = self._loop.call_at(self._head_deadline, self._check_head)
        self._protocol.connection_made(self._wrapped)

    def data_received(self, data: bytes) -> None:
        if self._parser is not None:
            self._find_heads(data)
        self._protocol.data_received(data)

    def eof_received(self) -> bool | None:
        # A client may send its request and then half-close; its answer must still reach it,
        # so what is gathered goes before the transport closes itself.
        if self._transport is not None:
            self._coalescer.flush(self._transport)
        return self._protocol.eof_received()

    def pause_writing(self) -> None:
        self._start_watching()
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        # The watchdog's timer lapses by itself; but a closing connection's last bytes must
        # still go within the timeout, however the writer pauses and resumes meanwhile.
        if not self._closing_seen:
            self._paused = False
        self._protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = None
        self._parser = None
        if self._transport is not None:
            self._coalescer.discard(self._transport)
            self._transport = None
            self._connections.closed()
        self._protocol.connection_lost(exc)

    # -- request heads (httptools' callbacks) -----------------------------------------------

    def _find_heads(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # No route takes an upgrade: aiohttp answers it as a plain request and reads on
            # after it, and so do we, with a fresh parser.
            self._parser = httptools.HttpRequestParser(self)
            rest = data[upgrade.args[0] :]
            if rest:
                self._find_heads(rest)
        except httptools.HttpParserError:
            # aiohttp's parser refuses these bytes too: it answers 400 and closes. A deadline
            # already running keeps running, so if the two ever disagree, this fails closed.
            self._parser = None

    def on_message_begin(self) -> None:
        self._head_started = True
        if self._head_deadline is None:  # a later request: its head is timed from now
            self._head_deadline = self._loop.time() + self._connections.header_timeout
            if self._head_timer is None:
                self._head_timer = self._loop.call_at(self._head_deadline, self._check_head)

    def on_headers_complete(self) -> None:
        self._head_deadline = None
        self._head_started = False
        self._heads += 1

    def _check_head(self) -> None:
        self._head_timer = None
        deadline, transport = self._head_deadline, self._transport
        if deadline is None or transport is None or transport.is_closing():
            return
        if self._loop.time() < deadline:  # moved on by a later request: look again then
            self._head_timer = self._loop.call_at(deadline, self._check_head)
            return
        if not transport.is_reading():
            # aiohttp stopped reading (requests queued behind a slow answer): the rest of the
            # head waits in the kernel for us, not for the client. Its time starts again.
            self._head_deadline = self._loop.time() + self._connections.header_timeout
            self._head_timer = self._loop.call_at(self._head_deadline, self._check_head)
            return
        self._head_deadline = None
        kind = "header_partial" if self._head_started else "header_nothing"
        self._connections.timed_out(
            kind,
            received="part of a request head" if self._head_started else "nothing",
            request_on_connection=self._heads + 1,
            client=_client_address(transport),
            timeout_s=self._connections.header_timeout,
        )
        # Through the wrapper: a tail of an earlier answer still unsent is then watched too.
        (self._wrapped or transport).close()

    # -- the send watchdog ------------------------------------------------------------------

    def _start_watching(self) -> None:
        """Bytes wait for the client: from now on it must take some within the timeout."""
        self._paused = True
        if self._send_timer is None:
            self._sent_mark = self._sent()
            self._progress_at = self._loop.time()
            self._watch_sending()

    def _closing(self) -> None:
        """The connection closes (or half-closes) once the client has taken what is unsent,
        however little: the client must take it in time, as if the writer had paused."""
        self._closing_seen = True
        if self.unsent:
            self._start_watching()

    def _sent(self) -> int:
        """Bytes the client has taken so far: written, less what waits in the transport's
        buffer and in the kernel's (unsent or unacknowledged). Gathered bytes are sent on
        first, so they count. The kernel's share makes progress visible as the client reads,
        not only when the kernel's buffer has room enough to wake the writer."""
        transport, wrapped = self._transport, self._wrapped
        if transport is None or wrapped is None:
            return 0
        self._coalescer.flush(transport)
        waiting = transport.get_write_buffer_size() + _kernel_unsent(transport)
        return wrapped.written - waiting

    def _watch_sending(self) -> None:
        self._send_timer = self._loop.call_later(
            self._connections.send_timeout / SEND_CHECKS, self._check_sending
        )

    def _check_sending(self) -> None:
        self._send_timer = None
        transport, wrapped = self._transport, self._wrapped
        if not self._paused or transport is None or wrapped is None:
            return
        sent, now = self._sent(), self._loop.time()
        if sent != self._sent_mark:
            self._sent_mark, self._progress_at = sent, now
        elif now - self._progress_at >= self._connections.send_timeout:
            wrapped.cut_because = STALLED_READER
            self._connections.timed_out(
                "send",
                waiting_bytes=transport.get_write_buffer_size(),
                client=_client_address(transport),
                timeout_s=self._connections.send_timeout,
            )
            _reset(transport)
            wrapped.abort()
            return
        self._watch_sending()


def _kernel_unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's kernel send queue not yet acknowledged by the peer (Linux's
    SIOCOUTQ); 0 where that cannot be asked."""
    sock = transport.get_extra_info("socket")
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
    except (AttributeError, OSError):
        return 0
    return int(struct.unpack("i", queued)[0])


def _reset(transport: asyncio.BaseTransport) -> None:
    """Make closing the socket send a reset: a FIN would wait in the kernel behind the bytes
    the client does not take (for minutes, holding them), and the client would never see it."""
    sock = transport.get_extra_info("socket")
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _client_address(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None
