"""Client connections are bounded whatever the client does (connections.py): a request head must
arrive within the header timeout, a client must keep taking its answer, the descriptor limit
is survived, and an answer's body does not outlive its writing. Over real sockets, mostly
against real proxy processes.

On loopback the kernel takes a 1 MiB answer whole; clients that should stall get a small
receive buffer and a network-sized segment (TCP_MAXSEG 1460), set before connecting, so the
answer really waits in the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import resource
import select
import socket
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

from proxy.coalesce import WriteCoalescer
from proxy.config.settings import Settings
from proxy.logs import get_logger
from proxy.server.app import CONNECTIONS, make_app
from proxy.server.connections import ClientConnection, ClientConnections
from proxy.server.exact_head import WRITE_PIECE
from proxy.server.occurrences import Occurrences
from proxy.testing.fake_sobot import FAULT_HEADER, FakeSobot
from tests.conftest import CapturedLogs, eventually
from tests.processes import (
    HTTP_TIMEOUT,
    OPENER,
    Stack,
    http_get,
    open_fds,
    rss_bytes,
    stack,
)
from tests.sites import start_site

MIB = 1024 * 1024
HEADER_TIMEOUT = 1.0
READ_TIMEOUT = 1.0
# Every wait for the proxy to act on a timeout is bounded by this many timeouts.
BOUND = 8


# --- clients ------------------------------------------------------------------------------------


async def connect(port: int, *, small_window: bool = False) -> socket.socket:
    """A non-blocking client socket connected to the proxy; with `small_window`, one that holds
    little of what it is sent and is sent it in network-sized segments."""
    sock = socket.socket()
    sock.setblocking(False)
    if small_window:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def answer(sock: socket.socket) -> tuple[int, bytes]:
    """Read one answer (status, body) from `sock`; the body is Content-Length long."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(sock, 65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
    assert length is not None, head
    while len(body) < int(length.group(1)):
        chunk = await loop.sock_recv(sock, 65536)
        assert chunk, "closed mid-answer"
        body += chunk
    return int(head.split(b" ", 2)[1]), body


async def closed_by_peer(sock: socket.socket) -> None:
    """Return once the proxy has closed (FIN) or reset (RST) the connection, without reading
    anything it sent: the socket reports a hang-up or an error."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)  # hang-ups and errors are always reported
    while not await asyncio.to_thread(poller.poll, 100):
        pass


def metrics_page(base: str) -> str:
    with OPENER.open(f"{base}/metrics", timeout=HTTP_TIMEOUT) as page:
        return str(page.read().decode())


def metric(page: str, name: str) -> float:
    match = re.search(rf"(?m)^{re.escape(name)} (\S+)$", page)
    assert match is not None, f"{name} not in the metrics"
    return float(match.group(1))


async def metric_of(base: str, name: str) -> float:
    return metric(await asyncio.to_thread(metrics_page, base), name)


CONNECTIONS_GAUGE = "sobot_proxy_client_connections"


def timeouts(kind: str) -> str:
    return f'sobot_proxy_client_timeouts_total{{kind="{kind}"}}'


def script(running: Stack, body: dict[str, Any], times: int) -> None:
    """The fake's next `times` /api/ answers are `body`, as JSON."""
    request = urllib.request.Request(
        f"{running.fake_url}/_fake/script?times={times}", data=json.dumps(body).encode()
    )
    with OPENER.open(request, timeout=HTTP_TIMEOUT) as response:
        assert response.status == 200


def port_of(running: Stack) -> int:
    return int(running.proxy_url.rsplit(":", 1)[1])


# --- item 2: the request head -------------------------------------------------------------------


async def test_slowloris_connections_are_closed_within_about_the_header_timeout(tmp_path):
    with stack(tmp_path, SOBOT_HEADER_TIMEOUT=str(HEADER_TIMEOUT)) as running:
        port = port_of(running)
        silent = await connect(port)
        half = await connect(port)
        await send(half, b"GET /api/echo HTTP/1.1\r\nHost: proxy\r\nX-Half: ")
        later = await connect(port)  # kept alive after one request, then half of another
        await send(later, b"GET /api/echo HTTP/1.1\r\nHost: proxy\r\n\r\n")
        assert (await answer(later))[0] == 200
        await send(later, b"GET /api/ec")
        dribbler = await connect(port)

        async def dribble() -> None:
            with contextlib.suppress(OSError):
                for byte in b"GET /api/echo HTTP/1.1\r\nHost: proxy\r\nX-Slow: yes\r\n\r\n":
                    await send(dribbler, bytes([byte]))
                    await asyncio.sleep(HEADER_TIMEOUT / 5)

        dribbling = asyncio.create_task(dribble())
        slowloris = (silent, half, later, dribbler)
        try:
            async with asyncio.timeout(BOUND * HEADER_TIMEOUT):
                await asyncio.gather(*(closed_by_peer(sock) for sock in slowloris))
            assert not dribbling.done()  # closed before its head was done
        finally:
            dribbling.cancel()
            for sock in slowloris:
                sock.close()
        page = await asyncio.to_thread(metrics_page, running.proxy_url)
        assert metric(page, timeouts("header_nothing")) == 1
        assert metric(page, timeouts("header_partial")) == 3
        assert metric(page, timeouts("send")) == 0
        # Logged once per kind (a flood writes one line per kind a minute, server/occurrences.py).
        logged = running.proxy_events("client_header_timeout")
        assert sorted((e["kind"], e["received"]) for e in logged) == [
            ("header_nothing", "nothing"),
            ("header_partial", "part of a request head"),
        ]
        assert all(e["level"] == "warning" and e["client"] == "127.0.0.1" for e in logged)


async def test_a_well_behaved_kept_alive_client_is_not_affected(tmp_path):
    """Idle between requests for longer than the header timeout (the keep-alive timeout's
    business, not the head's), and a head sent in two parts: one connection serves them all."""
    with stack(tmp_path, SOBOT_HEADER_TIMEOUT=str(HEADER_TIMEOUT)) as running:
        client = await connect(port_of(running))
        try:
            for pause in (0, 1.5 * HEADER_TIMEOUT, 1.5 * HEADER_TIMEOUT):
                await asyncio.sleep(pause)  # idle on purpose: the passing time is the point
                await send(client, b"GET /api/echo HTTP/1.1\r\nHost: proxy\r\n")
                await asyncio.sleep(HEADER_TIMEOUT / 2)
                await send(client, b"X-Part: two\r\n\r\n")
                status, body = await answer(client)
                assert status == 200, body
        finally:
            client.close()
        assert running.proxy_events("client_header_timeout") == []


async def test_a_pipelining_client_is_not_cut_while_the_proxy_stops_reading(tmp_path):
    """With 32 requests queued, aiohttp stops reading the socket: a head cut in two by a read
    then waits on the proxy, not the client, and its time does not run meanwhile."""
    count, padding = 100, "p" * 3000  # heads of ~3 KB: reads end in the middle of one
    request = (
        f"GET /api/echo HTTP/1.1\r\nHost: proxy\r\n{FAULT_HEADER}: delay=0.05\r\n"
        f"X-Padding: {padding}\r\n\r\n"
    ).encode()
    with stack(tmp_path, SOBOT_HEADER_TIMEOUT=str(HEADER_TIMEOUT)) as running:
        client = await connect(port_of(running))
        try:
            await send(client, request * count)  # 32 queued take 1.6 s: over the timeout
            async with asyncio.timeout(BOUND * count * 0.05):
                for _ in range(count):
                    assert (await answer(client))[0] == 200
        finally:
            client.close()
        assert running.proxy_events("client_header_timeout") == []


async def test_open_client_connections_are_a_gauge_that_returns_to_its_base(tmp_path):
    with stack(tmp_path, SOBOT_HEADER_TIMEOUT=str(HEADER_TIMEOUT)) as running:
        base = await metric_of(running.proxy_url, CONNECTIONS_GAUGE)
        assert base == 1  # the scrape's own connection
        silent = [await connect(port_of(running)) for _ in range(5)]
        try:

            async def counted(value: float) -> bool:
                return await metric_of(running.proxy_url, CONNECTIONS_GAUGE) == value

            await eventually(lambda: counted(base + 5), within=BOUND * HEADER_TIMEOUT)
            await eventually(lambda: counted(base), within=BOUND * HEADER_TIMEOUT)
        finally:
            for sock in silent:
                sock.close()


def _limit_open_files(soft: int, hard: int) -> Any:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def healthz_answers(base: str) -> bool:
    try:
        return http_get(f"{base}/healthz")[0] == 200
    except (OSError, http.client.HTTPException):
        return False  # reset or closed at once: the descriptors are exhausted


async def test_at_the_descriptor_limit_probes_are_refused_until_the_header_timeout_frees_it(
    tmp_path,
):
    limit = 64
    with stack(
        tmp_path,
        preexec_fn=_limit_open_files(limit, limit),
        SOBOT_HEADER_TIMEOUT=str(2 * HEADER_TIMEOUT),
    ) as running:
        assert running.proxy_events("listening")[0]["open_files_limit"] == limit
        pid = running.proxy.process.pid
        idle = [await connect(port_of(running)) for _ in range(limit)]  # more than it can hold
        try:
            await eventually(
                lambda: asyncio.to_thread(lambda: open_fds(pid) >= limit - 1),
                within=BOUND * HEADER_TIMEOUT,
            )
            assert not await asyncio.to_thread(healthz_answers, running.proxy_url)
            # Awaited: the line may still be on its way through the pipe.
            warning = await asyncio.to_thread(
                running.proxy.wait_for_event, "open_files_nearly_exhausted"
            )
            assert warning["open_files_limit"] == limit
            # The header timeout closes the silent connections: the proxy serves again.
            await eventually(
                lambda: asyncio.to_thread(lambda: open_fds(pid) < limit // 2),
                within=BOUND * 2 * HEADER_TIMEOUT,
            )
            assert await asyncio.to_thread(healthz_answers, running.proxy_url)
        finally:
            for sock in idle:
                sock.close()


async def test_at_the_descriptor_limit_a_request_gets_503_that_names_the_limit(tmp_path):
    """Clients hold every descriptor (idle and kept alive): the proxy cannot open a connection to
    Sobot. Its own limit, not Sobot's failure: 503, saying so, and 200 once they are gone."""
    limit = 64
    with stack(tmp_path, preexec_fn=_limit_open_files(limit, limit)) as running:
        pid = running.proxy.process.pid
        caller = await connect(port_of(running))  # before the rest: it has its descriptor
        idle: list[socket.socket] = []
        try:
            while await asyncio.to_thread(open_fds, pid) < limit and len(idle) < 2 * limit:
                sock = await connect(port_of(running))
                idle.append(sock)
                with contextlib.suppress(OSError, AssertionError):  # refused: the limit
                    await send(sock, b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
                    await answer(sock)
            await send(caller, b"GET /api/echo HTTP/1.1\r\nHost: proxy\r\n\r\n")
            status, body = await answer(caller)
            assert status == 503, body
            assert json.loads(body)["ret_code"] == "980503"
            assert "file descriptors" in json.loads(body)["ret_msg"]
        finally:
            for sock in idle:
                sock.close()
        await eventually(lambda: asyncio.to_thread(lambda: open_fds(pid) < limit // 2))
        await send(caller, b"GET /api/echo HTTP/1.1\r\nHost: proxy\r\n\r\n")
        assert (await answer(caller))[0] == 200
        caller.close()


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one_at_start_up(tmp_path):
    with stack(tmp_path, preexec_fn=_limit_open_files(64, 256)) as running:
        assert running.proxy_events("listening")[0]["open_files_limit"] == 256
        with open(f"/proc/{running.proxy.process.pid}/limits") as limits:
            [line] = [line for line in limits if line.startswith("Max open files")]
        assert line.split()[3:5] == ["256", "256"]


# --- item 1: clients that stop reading ---------------------------------------------------------


def _big_json(size: int) -> dict[str, Any]:
    return {"ret_code": "000000", "ret_msg": "success", "item": {"data": "x" * size}}


async def test_clients_that_stop_reading_a_small_answer_are_cut_and_let_go(tmp_path):
    """A JSON answer read whole for inspection (under 1 MiB), then never read by its clients."""
    stalled_count = 8
    with stack(tmp_path, SOBOT_UPSTREAM_TIMEOUT=str(READ_TIMEOUT)) as running:
        script(running, _big_json(1000 * 1000), times=stalled_count)
        stalled = [await connect(port_of(running), small_window=True) for _ in range(stalled_count)]
        try:
            for sock in stalled:
                await send(sock, b"GET /api/big HTTP/1.1\r\nHost: proxy\r\n\r\n")
            async with asyncio.timeout(BOUND * READ_TIMEOUT + 5):
                await asyncio.gather(*(closed_by_peer(sock) for sock in stalled))
        finally:
            for sock in stalled:
                sock.close()

        def logged() -> list[dict[str, Any]]:
            return [e for e in running.proxy_events("request") if e["path"] == "/api/big"]

        await eventually(lambda: asyncio.to_thread(lambda: len(logged()) == stalled_count))
        assert {e.get("error") for e in logged()} == {"the client stopped reading the answer"}
        page = await asyncio.to_thread(metrics_page, running.proxy_url)
        assert metric(page, timeouts("send")) == stalled_count
        assert metric(page, CONNECTIONS_GAUGE) == 1  # the scrape's own: the rest are gone
        [logged_once] = running.proxy_events("client_send_timeout")
        assert logged_once["kind"] == "send"
        assert logged_once["waiting_bytes"] > 0


async def test_a_client_that_stops_reading_holds_no_connection_to_sobot(tmp_path):
    """An answer read whole is written once Sobot's connection and slot are free again: with one
    connection to Sobot and no queue, a client that stops reading a 1 MB answer must not make
    the next request wait (503)."""
    with stack(
        tmp_path, SOBOT_UPSTREAM_CONNECTIONS="1", SOBOT_MAX_QUEUE="0", SOBOT_UPSTREAM_TIMEOUT="30"
    ) as running:
        script(running, _big_json(1000 * 1000), times=1)
        stalled = await connect(port_of(running), small_window=True)
        try:
            await send(stalled, b"GET /api/big HTTP/1.1\r\nHost: proxy\r\n\r\n")

            async def answered() -> bool:
                stats = await asyncio.to_thread(running.fake_stats)
                return stats["api_calls"] == 1 and stats["open_requests"] == 0

            await eventually(answered)

            async def served() -> bool:
                # 503 while the proxy still reads Sobot's answer; then 200, long before the
                # send watchdog (30 s) would free a slot the stalled client held.
                status, _ = await asyncio.to_thread(http_get, f"{running.proxy_url}/api/echo")
                return bool(status == 200)

            await eventually(served, within=10)
        finally:
            stalled.close()


async def test_a_closing_connection_whose_last_bytes_are_never_read_is_cut(tmp_path):
    """`Connection: close`: the answer's tail, however small, waits in the proxy until the
    client takes it, and a transport waits for that before it closes. Sizes around what the
    kernel takes, so some tails are small: each must be watched (the watchdog is armed when the
    connection closes with bytes unsent)."""
    sizes = range(60_000, 400_000, 20_000)
    with stack(tmp_path, SOBOT_UPSTREAM_TIMEOUT=str(READ_TIMEOUT)) as running:
        for size in sizes:
            script(running, _big_json(size), times=1)
        stalled = [await connect(port_of(running), small_window=True) for _ in sizes]
        try:
            for sock in stalled:
                await send(
                    sock, b"GET /api/big HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
                )

            # Every connection let go by the proxy (an answer the kernel took whole leaves
            # with the socket; the rest are cut): only the scrape's own is left.
            async def only_the_scrape() -> bool:
                return await metric_of(running.proxy_url, CONNECTIONS_GAUGE) == 1

            await eventually(only_the_scrape, within=BOUND * READ_TIMEOUT + 5)
        finally:
            for sock in stalled:
                sock.close()


async def test_a_client_that_reads_none_of_many_pipelined_local_answers_is_cut(tmp_path):
    """Whatever path an answer takes: here the proxy's own 404s, each small, never read."""
    with stack(tmp_path, SOBOT_UPSTREAM_TIMEOUT=str(READ_TIMEOUT)) as running:
        client = await connect(port_of(running), small_window=True)
        pipelined = b"GET /not-the-api HTTP/1.1\r\nHost: proxy\r\n\r\n" * 20000
        sending = asyncio.create_task(send(client, pipelined))
        try:
            async with asyncio.timeout(BOUND * READ_TIMEOUT + 5):
                await closed_by_peer(client)
        finally:
            sending.cancel()
            client.close()
        await eventually(
            lambda: asyncio.to_thread(
                lambda: metric(metrics_page(running.proxy_url), timeouts("send")) == 1
            )
        )


async def test_a_slow_reader_that_keeps_reading_is_never_cut(tmp_path):
    """The read timeout bounds each wait for progress, not the whole answer."""
    size = 200 * 1000
    with stack(tmp_path, SOBOT_UPSTREAM_TIMEOUT=str(READ_TIMEOUT)) as running:
        script(running, _big_json(size), times=1)
        client = await connect(port_of(running), small_window=True)
        loop = asyncio.get_running_loop()
        received = b""
        try:
            await send(client, b"GET /api/big HTTP/1.1\r\nHost: proxy\r\n\r\n")
            async with asyncio.timeout(60):
                while len(received) < size:
                    await asyncio.sleep(READ_TIMEOUT / 4)  # a slow reader, on purpose
                    chunk = await loop.sock_recv(client, 32 * 1024)
                    assert chunk, "cut while it was reading"
                    received += chunk
        finally:
            client.close()
        assert running.proxy_events("client_send_timeout") == []


async def test_a_kept_alive_client_does_not_keep_its_last_answer_in_memory(tmp_path):
    """aiohttp keeps a kept-alive connection's last answer until its next request: clients
    that read a 1 MiB answer and then sit idle must not pin a MiB each."""
    idle_count = 40
    with stack(tmp_path) as running:
        pid = running.proxy.process.pid
        script(running, _big_json(1000 * 1000), times=idle_count + 2)
        idle: list[socket.socket] = []
        try:
            for _ in range(2):  # warm up: the code path and its buffers, once
                sock = await connect(port_of(running))
                await send(sock, b"GET /api/big HTTP/1.1\r\nHost: proxy\r\n\r\n")
                assert (await answer(sock))[0] == 200
                sock.close()
            baseline = rss_bytes(pid)
            for _ in range(idle_count):  # one after the other: one answer alive at a time
                sock = await connect(port_of(running))
                idle.append(sock)
                await send(sock, b"GET /api/big HTTP/1.1\r\nHost: proxy\r\n\r\n")
                status, body = await answer(sock)
                assert status == 200
                assert len(body) > 1000 * 1000
            growth = rss_bytes(pid) - baseline
        finally:
            for sock in idle:
                sock.close()
        print(f"\n{idle_count} idle clients after a 1 MiB answer: +{growth / MIB:.1f} MiB")
        assert growth < idle_count * MIB / 4


# --- in process: a streamed answer nobody reads -------------------------------------------------


@contextlib.asynccontextmanager
async def site_proxy(settings: Settings, logs: CapturedLogs) -> AsyncIterator[int]:
    """The proxy app behind its real listening site (server/connections.py included); its port."""
    app = make_app(settings, secrets=logs.secrets)
    runner, _, port = await start_site(app, connections=app[CONNECTIONS])
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_a_client_that_stops_reading_a_download_frees_its_connection_to_sobot(
    settings: Settings, fake: FakeSobot, logs: CapturedLogs
):
    """A streamed download nobody reads must not hold a connection to Sobot for ever."""
    settings = Settings(**{**_fields(settings), "upstream_timeout": 0.5})
    async with site_proxy(settings, logs) as port:
        client = await connect(port, small_window=True)
        try:
            await send(
                client,
                f"GET /api/file HTTP/1.1\r\nHost: p\r\n{FAULT_HEADER}: download={64 << 20}\r\n"
                "\r\n".encode(),
            )
            async with asyncio.timeout(20):
                while fake.stats.open_requests == 0:  # noqa: ASYNC110 -- the fake has no event
                    await asyncio.sleep(0.01)
                await fake.wait_until_idle()  # the proxy gave up on us and let Sobot go
                await closed_by_peer(client)
        finally:
            client.close()
    [line] = [e for e in logs.events("request") if e["path"] == "/api/file"]
    assert line["error"] == "the client stopped reading the answer"
    assert [e["kind"] for e in logs.events("client_send_timeout")] == ["send"]


class _Recorded(ClientConnections):
    """Client connections as the proxy makes them, each kept for the test to look at."""

    def __init__(self) -> None:
        super().__init__(header_timeout=10, send_timeout=30, log=get_logger())
        self.made: list[ClientConnection] = []

    def factory(
        self, protocol_factory: Callable[[], asyncio.Protocol], coalescer: WriteCoalescer
    ) -> Callable[[], asyncio.Protocol]:
        make = super().factory(protocol_factory, coalescer)

        def recorded() -> asyncio.Protocol:
            connection = make()
            assert isinstance(connection, ClientConnection)
            self.made.append(connection)
            return connection

        return recorded


async def test_a_client_that_stops_reading_a_large_answer_is_sent_it_a_piece_at_a_time(
    settings: Settings, fake: FakeSobot, logs: CapturedLogs
):
    """An answer read whole (1 MB of JSON) goes to the socket a piece at a time, each once the
    last have gone: a stalled client holds the body and a piece or two, not a second copy of
    the body's unsent rest in the socket's buffer (exact_head.WRITE_PIECE)."""
    fake.script(_big_json(1000 * 1000))
    connections = _Recorded()
    app = make_app(settings, secrets=logs.secrets)
    runner, _, port = await start_site(app, connections=connections)
    client = await connect(port, small_window=True)
    try:
        await send(client, b"GET /api/big HTTP/1.1\r\nHost: p\r\n\r\n")
        [connection] = connections.made

        async def writing() -> bool:
            return connection.unsent > 0

        async with asyncio.timeout(10):
            await fake.wait_until_idle()
            await eventually(writing, within=10)
        # aiohttp waits for the socket to drain once over 64 KiB are written since it last did.
        assert connection.unsent <= 2 * WRITE_PIECE
    finally:
        client.close()
        await runner.cleanup()


def _fields(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in Settings.__dataclass_fields__}


# --- the rate-limited warnings ---------------------------------------------------------------


async def test_a_flood_of_one_kind_is_logged_once_then_counted(logs: CapturedLogs):
    occurrences = Occurrences(get_logger(), interval=0.05)
    for _ in range(3):
        occurrences.warn("client_header_timeout", "header_nothing", client="127.0.0.1")
    occurrences.warn("client_header_timeout", "header_partial", client="127.0.0.1")
    lines = logs.events("client_header_timeout")
    assert [(e["kind"], e.get("repeated")) for e in lines] == [
        ("header_nothing", None),
        ("header_partial", None),
    ]

    async def summed() -> bool:
        return len(logs.events("client_header_timeout")) == 3

    await eventually(summed, within=5)
    summary = logs.events("client_header_timeout")[2]
    assert (summary["kind"], summary["repeated"], summary["interval_s"]) == (
        "header_nothing",
        2,
        0.05,
    )
    # A quiet interval with nothing in it ends the silence: the next one is logged at once.
    await asyncio.sleep(0.2)  # two intervals pass, on purpose
    occurrences.warn("client_header_timeout", "header_nothing", client="127.0.0.2")
    assert logs.events("client_header_timeout")[-1]["client"] == "127.0.0.2"


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(tmp_path):
    """aiohttp's own keep-alive timeout is an hour: the proxy's is a setting (75 s by default)."""
    with stack(tmp_path, SOBOT_KEEPALIVE_TIMEOUT="1") as running:
        client = await connect(port_of(running))
        try:
            await send(client, b"GET /api/echo HTTP/1.1\r\nHost: proxy\r\n\r\n")
            status, body = await answer(client)
            assert status == 200, body
            async with asyncio.timeout(BOUND):
                await closed_by_peer(client)  # idle, and kept alive: closed by the proxy
            assert await asyncio.get_running_loop().sock_recv(client, 1) == b""  # a clean FIN
        finally:
            client.close()
        assert running.proxy_events("client_header_timeout") == []


# --- the send watchdog, in process on the stdlib loop -----------------------------------------


class _Writer(asyncio.Protocol):
    """What aiohttp is to a ClientConnection, reduced to what the watchdog sees."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.made = asyncio.Event()
        self.paused = asyncio.Event()
        self.resumed = asyncio.Event()
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.made.set()

    def pause_writing(self) -> None:
        self.paused.set()

    def resume_writing(self) -> None:
        self.resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def test_a_connection_closed_while_paused_is_watched_until_its_last_byte(logs):
    """The writer pauses, the connection is closed, the client reads until the writer resumes
    (the stdlib loop resumes below a low-water mark, with bytes still unsent) and then stops:
    those last bytes are watched too, and the connection is cut."""
    connections = ClientConnections(header_timeout=100, send_timeout=0.3, log=get_logger())
    cut = 0
    for size in range(512 * 1024, 1536 * 1024, 256 * 1024):
        writer = _Writer()

        def made(writer: _Writer = writer) -> asyncio.Protocol:
            return writer

        factory = connections.factory(made, WriteCoalescer(lambda: False))
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        client = await connect(server.sockets[0].getsockname()[1], small_window=True)
        try:
            async with asyncio.timeout(10):
                await writer.made.wait()
                assert writer.transport is not None
                writer.transport.write(b"x" * size)  # the stdlib loop pauses at once, if it does
                if not writer.paused.is_set():
                    continue  # the kernel took it all: nothing to watch
                writer.transport.close()
                while not writer.resumed.is_set() and not writer.lost.is_set():
                    with contextlib.suppress(BlockingIOError):
                        client.recv(3000)
                    await asyncio.sleep(0.001)  # a reader that reads slowly, on purpose
                await writer.lost.wait()  # the client reads no more: only the cut ends it
            cut += 1
        finally:
            client.close()
            server.close()
    assert cut >= 3
    assert connections.open == 0
