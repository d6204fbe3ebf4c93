"""Fetching a new token from Sobot's get_token: signing, one HTTP call, parsing the answer.

Fetching is kept apart from caching (tokens.py) so the manager can be tested against any source
and a shared store can later sit between the two.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import aiohttp
import structlog

from proxy import protocol
from proxy.errors import TokenUnavailable
from proxy.logs import Secrets
from proxy.protocol import IssuedToken


class TokenSource(Protocol):
    async def fetch(self) -> IssuedToken:
        """Obtain a new token; raise TokenUnavailable (with get_token's code when it gave one)."""
        ...


class SobotTokenSource:
    """Calls `GET {base}/api/get_token?appid&create_time&sign` on the configured upstream."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        appid: str,
        app_key: str,
        timeout: float,
        log: structlog.typing.FilteringBoundLogger,
        secrets: Secrets,
        on_result: Callable[[str], None] = lambda _result: None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`on_result` hears each call's result: ok, refused, unreachable or malformed."""
        self._session = session
        self._url = base_url + protocol.GET_TOKEN_PATH
        self._appid = appid
        self._app_key = app_key
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._log = log
        self._wall_clock = wall_clock
        self._secrets = secrets
        self._on_result = on_result

    async def fetch(self) -> IssuedToken:
        create_time = str(int(self._wall_clock()))
        sign = protocol.make_sign(self._appid, create_time, self._app_key)
        self._secrets.add(sign)
        params = {"appid": self._appid, "create_time": create_time, "sign": sign}
        started = time.perf_counter()
        try:
            async with self._session.get(
                self._url, params=params, timeout=self._timeout, allow_redirects=False
            ) as response:
                body = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            # The exception text is not logged as is: aiohttp puts the request URL, with its
            # sign, into some messages.
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
            self._log_call(started, error=reason)
            self._on_result("unreachable")
            raise TokenUnavailable(f"could not reach Sobot's get_token ({reason})") from None
        try:
            ret_code, ret_msg, token = protocol.parse_token_answer(body)
        except protocol.MalformedAnswer as exc:
            self._log_call(started, http_status=status, error=str(exc))
            self._on_result("malformed")
            raise TokenUnavailable(
                f"Sobot's get_token gave a malformed answer (HTTP {status}: {exc})"
            ) from None
        self._log_call(
            started,
            http_status=status,
            ret_code=ret_code,
            lifetime_s=token.lifetime if token else None,
        )
        self._on_result("refused" if token is None else "ok")
        if token is None:
            raise TokenUnavailable(
                f"Sobot's get_token answered {protocol.describe(ret_code)}"
                + (f": {ret_msg}" if ret_msg else ""),
                ret_code=ret_code,
            )
        return token

    def _log_call(self, started: float, **fields: object) -> None:
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        if "error" in fields or fields.get("ret_code") != protocol.OK:
            self._log.warning("get_token", duration_ms=duration_ms, **fields)
        else:
            self._log.info("get_token", duration_ms=duration_ms, **fields)
