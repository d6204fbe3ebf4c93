"""Shared fixtures: a real fake Sobot and real proxies on loopback sockets, and captured logs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.config.settings import Settings
from proxy.logs import Secrets, configure_logging
from proxy.server.app import TENANTS, make_app
from proxy.testing.fake_sobot import FakeSobot
from proxy.tokens.manager import Backoff, TokenManager

APPID = "test-appid"
APP_KEY = "test-app-key-0123456789abcdef"


class CapturedLogs:
    """What the proxy logged, read back from the real JSON renderer's output."""

    def __init__(self) -> None:
        self.stream = io.BytesIO()
        self.secrets = Secrets()

    @property
    def raw(self) -> bytes:
        return self.stream.getvalue()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = [orjson.loads(line) for line in self.raw.splitlines() if line]
        return [line for line in lines if name is None or line["event"] == name]


@pytest.fixture(autouse=True)
def logs() -> CapturedLogs:
    captured = CapturedLogs()
    captured.secrets = configure_logging("debug", "json", captured.stream, Secrets([APP_KEY]))
    return captured


@pytest.fixture
async def fake() -> AsyncIterator[FakeSobot]:
    sobot = FakeSobot(APPID, APP_KEY)
    await sobot.start()
    yield sobot
    await sobot.stop()


@pytest.fixture
def settings(fake: FakeSobot) -> Settings:
    return Settings(appid=APPID, app_key=APP_KEY, base_url=fake.url)


ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_proxy(aiohttp_client: Any, settings: Settings, logs: CapturedLogs) -> ProxyFactory:
    """Start a proxy on a loopback socket: `await make_proxy(base_url=..., backoff=...)`."""

    async def start(*, backoff: Backoff | None = None, **changes: Any) -> TestClient[Any, Any]:
        app = make_app(
            dataclasses.replace(settings, **changes), secrets=logs.secrets, backoff=backoff
        )
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return start


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> TestClient[Any, Any]:
    return await make_proxy()


async def send_raw(client: TestClient[Any, Any], request: bytes) -> bytes:
    """Send bytes as they are (no client library re-encoding) and read one answer.

    The answer ends after Content-Length bytes of body, or at the end of the connection.
    """
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)\r$", head)
            if length is None:
                return head + await reader.read()
            return head + await reader.readexactly(int(length.group(1)))
    finally:
        writer.close()


def exact_url(client: TestClient[Any, Any], target: str) -> URL:
    """The proxy's URL for `target`, sent exactly as written."""
    return URL(f"http://{client.host}:{client.port}{target}", encoded=True)


def tokens_of(client: TestClient[Any, Any], credentials: str = "default") -> TokenManager:
    """The token manager of a credential set of the proxy `client` serves."""
    return client.app[TENANTS].default.sets.named(credentials).tokens


class RedisServer:
    """A real redis-server on a free loopback port, in a temporary directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: `bash scripts/test` installs it")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:  # ready when it answers PING
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not start within 10 s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path))
    server.start()
    yield server
    server.stop()


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 15.0) -> None:
    """Poll an outside view (as a readiness probe would) until it holds, within `within` s."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 -- other parties' state is polled, no event
            await asyncio.sleep(0.02)


@contextlib.contextmanager
def blackhole(port: int = 0) -> Iterator[int]:
    """A loopback port where connecting hangs: a listener whose backlog is full, so the kernel
    drops further SYNs. Yields the port."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(0)
        port = listener.getsockname()[1]
        with contextlib.ExitStack() as fillers:
            for _ in range(3):
                filler = fillers.enter_context(socket.socket())
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            yield port


class LyingPeer:
    """Something that is not Redis on the Redis port: it answers every line it receives with
    the same bytes, and counts the connections made to it."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await reader.readline():
                writer.write(self.answer)
                await writer.drain()
        except ConnectionError:
            pass  # the client gave up on us: what it should do
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def lying_peer(answer: bytes) -> AsyncIterator[LyingPeer]:
    peer = LyingPeer(answer)
    server = await asyncio.start_server(peer.serve, "127.0.0.1", 0)
    peer.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    try:
        yield peer
    finally:
        server.close()
