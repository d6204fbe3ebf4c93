"""Running the real `sobot-proxy` command in a subprocess, with every wait bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.sobot import v5, v6

START_TIMEOUT = 10.0  # for the command to start listening
EXIT_TIMEOUT = 10.0  # for the command to exit, by itself or after SIGTERM
HTTP_TIMEOUT = 5.0
# What a process needs to run; nothing else, and never a SOBOT_* variable, leaks in.
KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "SYSTEMROOT", "PYTHONPATH")
# A fake Sobot token (uuid4().hex) or a sign (md5 hex) would show as 32 hex digits.
HEX32 = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
# No proxy from the environment between the tests and 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def command_env(**variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name in KEPT_ENV}
    env = {name: value for name, value in env.items() if not name.startswith("SOBOT_")}
    return {**env, **variables}


def run_command(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=EXIT_TIMEOUT,
        check=False,
    )


def http_get(url: str) -> tuple[int, Any]:
    """GET `url`: the status and the JSON body."""
    try:
        with OPENER.open(url, timeout=HTTP_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Running:
    """A started command whose stdout and stderr are drained by threads, line by line."""

    def __init__(
        self,
        *args: str,
        cwd: Path,
        env: dict[str, str],
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            # Its own process group: close() can end it with every process it started.
            start_new_session=True,
            preexec_fn=preexec_fn,  # e.g. resource limits for the child alone
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._fresh: queue.Queue[str | None] = queue.Queue()
        self._drains = [
            threading.Thread(target=self._drain, args=(self.process.stdout, self.stdout, True)),
            threading.Thread(target=self._drain, args=(self.process.stderr, self.stderr, False)),
        ]
        for drain in self._drains:
            drain.start()

    def _drain(self, stream: Any, lines: list[str], announce: bool) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if announce:
                self._fresh.put(line)
        if announce:
            self._fresh.put(None)

    def wait_for_line(self, matches: Callable[[str], bool], timeout: float = START_TIMEOUT) -> str:
        """The next stdout line that matches; fails after `timeout` or if stdout ends first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._fresh.get(timeout=max(remaining, 0))
            except queue.Empty:
                pytest.fail(f"no matching line within {timeout} s; stdout: {self.stdout}")
            if line is None:
                pytest.fail(f"stdout ended first; stdout: {self.stdout}; stderr: {self.stderr}")
            if matches(line):
                return line

    def wait_for_event(self, name: str) -> dict[str, Any]:
        line = self.wait_for_line(lambda line: (json_object(line) or {}).get("event") == name)
        event = json_object(line)
        assert event is not None
        return event

    def terminate(self) -> int:
        """Send SIGTERM and return the exit status, once the process and its output ended."""
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=EXIT_TIMEOUT)
        self._join()
        return status

    @property
    def output(self) -> str:
        return "\n".join([*self.stdout, *self.stderr])

    def _join(self) -> None:
        for drain in self._drains:
            drain.join(timeout=EXIT_TIMEOUT)
            assert not drain.is_alive()

    def close(self) -> None:
        try:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # workers it started included
            self.process.wait(timeout=EXIT_TIMEOUT)
            self._join()
        finally:
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()


@contextmanager
def running(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[Running]:
    command = Running(
        *args, cwd=cwd, env=command_env() if env is None else env, preexec_fn=preexec_fn
    )
    try:
        yield command
    finally:
        command.close()


def wait_until_ready(base: str) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        status, body = http_get(f"{base}/readyz")
        if status == 200:
            return body
        assert status == 503, body
        if time.monotonic() > deadline:
            pytest.fail(f"/readyz still {status} after {START_TIMEOUT} s: {body}")
        time.sleep(0.05)


# --- a fake Sobot and a proxy, each in its own process ------------------------------------

STACK_APPID = "stack-appid"
STACK_APP_KEY = "stack-app-key-0123456789"
# The call centre's V6 credentials (the `callcenter` set of routes_config()); the same appid as
# the v5 set's by default, so a test also shows the two kinds never share a stored token.
STACK_V6_APPID = STACK_APPID
STACK_V6_SECRET = "stack-v6-secret-0123456789"
V6_ROUTE = "/callservice/"


@dataclass
class Stack:
    fake: Running
    proxy: Running
    fake_url: str
    proxy_url: str

    def control(self, name: str, **query: str) -> None:
        """POST one of the fake's /_fake/ controls."""
        url = f"{self.fake_url}/_fake/{name}?{urllib.parse.urlencode(query)}"
        request = urllib.request.Request(url, method="POST")
        with OPENER.open(request, timeout=HTTP_TIMEOUT) as response:
            assert response.status == 200

    def fake_stats(self) -> dict[str, int]:
        status, stats = http_get(f"{self.fake_url}/_fake/stats")
        assert status == 200
        return dict(stats)

    def proxy_events(self, name: str) -> list[dict[str, Any]]:
        events = (json_object(line) for line in list(self.proxy.stdout))
        return [event for event in events if event is not None and event.get("event") == name]


@contextmanager
def fake_sobot(
    cwd: Path, *, token_lifetime: float = 86400.0, v6_token_lifetime: float | None = None
) -> Iterator[tuple[Running, str]]:
    """A fake Sobot process for the stack's credentials, and its URL; with `v6_token_lifetime`,
    serving the V6 call centre too (STACK_V6_APPID, STACK_V6_SECRET)."""
    v6 = (
        ()
        if v6_token_lifetime is None
        else (
            "--v6-appid",
            STACK_V6_APPID,
            "--v6-secret",
            STACK_V6_SECRET,
            "--v6-token-lifetime",
            str(v6_token_lifetime),
        )
    )
    with running(
        "fake-sobot",
        "--port",
        "0",
        "--appid",
        STACK_APPID,
        "--app-key",
        STACK_APP_KEY,
        "--token-lifetime",
        str(token_lifetime),
        *v6,
        cwd=cwd,
    ) as fake:
        yield fake, f"http://127.0.0.1:{fake.wait_for_event('listening')['port']}"


def routes_config(
    directory: Path,
    *,
    v6_appid: str = STACK_V6_APPID,
    v6_secret: str = STACK_V6_SECRET,
    more: str = "",
) -> Path:
    """A TOML file beside its secret's file: the `callcenter` V6 set on the V6_ROUTE prefix,
    and `more` TOML after it. Its path, for `--config`."""
    (directory / "v6.secret").write_text(v6_secret + "\n")
    config = directory / "routes.toml"
    config.write_text(
        f"""[credentials.callcenter]
kind = "v6"
appid = "{v6_appid}"
app_key_file = "v6.secret"

[[routes]]
prefix = "{V6_ROUTE}"
credentials = "callcenter"
{more}"""
    )
    return config


def proxy_env(fake_url: str, **settings: str) -> dict[str, str]:
    """The environment of a proxy process in front of the fake at `fake_url`."""
    return command_env(
        SOBOT_APPID=STACK_APPID,
        SOBOT_APP_KEY=STACK_APP_KEY,
        SOBOT_BASE_URL=fake_url,
        SOBOT_PROXY_PORT="0",
        **settings,
    )


@contextmanager
def stack(
    cwd: Path, preexec_fn: Callable[[], None] | None = None, **proxy_settings: str
) -> Iterator[Stack]:
    """A fake Sobot process and a proxy process in front of it, ready (a token is held);
    `preexec_fn` runs in the proxy's process before it starts (to set its limits)."""
    with fake_sobot(cwd) as (fake, fake_url):
        env = proxy_env(fake_url, **proxy_settings)
        with running("serve", cwd=cwd, env=env, preexec_fn=preexec_fn) as proxy:
            proxy_url = f"http://127.0.0.1:{proxy.wait_for_event('listening')['port']}"
            wait_until_ready(proxy_url)
            yield Stack(fake, proxy, fake_url, proxy_url)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class PeakRss:
    """Samples a process's resident memory every 10 ms in a thread, keeping the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- steady load and outside views of running proxies, for the multi-process tests ---------


async def steady_load(
    session: aiohttp.ClientSession,
    urls: list[str],
    *,
    per_url: int,
    stop: asyncio.Event,
    outcomes: Counter[str],
    path: str = "/api/ws/5/ticket/save",
) -> None:
    """`per_url` clients per proxy, each POSTing in a loop until `stop`; outcomes are counted
    as "<status> <ret_code>" (a V6 answer's `code` in its place), or "connection failed"."""

    async def client(url: str) -> None:
        while not stop.is_set():
            try:
                async with session.post(f"{url}{path}", data=b"{}") as answer:
                    body = await answer.json(content_type=None)
                    code = body.get("ret_code", body.get("code"))
                    outcomes[f"{answer.status} {code}"] += 1
            except aiohttp.ClientError:
                outcomes["connection failed"] += 1

    await asyncio.gather(*(client(url) for url in urls for _ in range(per_url)))


async def fake_stats_of(session: aiohttp.ClientSession, fake_url: str) -> dict[str, int]:
    async with session.get(f"{fake_url}/_fake/stats") as answer:
        assert answer.status == 200
        return dict(await answer.json())


async def token_served_by(session: aiohttp.ClientSession, url: str) -> str | None:
    """The token a proxy hands a client that signs its own get_token correctly."""
    create_time = str(int(time.time()))
    sign = v5.make_sign(STACK_APPID, create_time, STACK_APP_KEY)
    query = {"appid": STACK_APPID, "create_time": create_time, "sign": sign}
    async with session.get(f"{url}/api/get_token", params=query) as answer:
        body = await answer.json(content_type=None)
    item = body.get("item") or {}
    return item.get("token") if body.get("ret_code") == v5.OK else None


async def v6_token_served_by(session: aiohttp.ClientSession, url: str) -> str | None:
    """The JWT a proxy hands a client that signs its own /tokens/company correctly."""
    current_time = str(int(time.time() * 1000))
    body = {
        "responseType": "token",
        "appId": STACK_V6_APPID,
        "currentTime": current_time,
        "sign": v6.make_sign(STACK_V6_APPID, current_time, STACK_V6_SECRET),
    }
    async with session.post(f"{url}/tokens/company", json=body) as answer:
        granted = await answer.json(content_type=None)
    token = granted.get("access_token") if answer.status == 200 else None
    return token if isinstance(token, str) else None


async def is_ready(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/readyz") as answer:
        return answer.status == 200
