"""Shared fixtures: a real fake Sobot and real proxies on loopback sockets, and captured logs."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.app import TOKENS, make_app
from proxy.fake_sobot import FakeSobot
from proxy.logs import Secrets, configure_logging
from proxy.settings import Settings
from proxy.tokens import Backoff, TokenManager

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


def tokens_of(client: TestClient[Any, Any]) -> TokenManager:
    return client.app[TOKENS]
