"""Fetching a new token from Sobot's get_token: signing, one HTTP exchange, parsing the answer.

Fetching is kept apart from caching (manager.py) so the manager can be tested against any source
and a shared store can sit between the two.

get_token goes through the proxy's own upstream client (proxy.upstream), on a pool of its own, so a
pool full of slow forwarded requests never holds up a renewal:

- It is never sent twice. Every get_token rotates the token, so a call that fails on a kept-alive
  connection (it may have reached Sobot) fails; the manager's backoff and refresher try again.
- Timeouts as the README defines them: the connect timeout for connecting, the read timeout for
  each wait for bytes (for the answer's head as a whole, then for each read of the body), and the
  whole call at most connect + read timeout, which the renewal lock's lease counts on
  (Settings.renewal_lease).
- The sign travels in the query string: no log line or error message carries the target.

Errors: GetTokenFailed, with get_token's own code when it answered one. The token manager turns
it into what the server answers (errors.TokenUnavailable).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Final, Protocol
from urllib.parse import urlencode, urlsplit

import structlog
from multidict import CIMultiDict

from proxy import __version__, upstream
from proxy.config.settings import Settings
from proxy.logs import Secrets
from proxy.sobot import v5
from proxy.sobot.credential import IssuedToken, MalformedAnswer

# Connections kept for get_token: one call at a time (the manager's single flight), and one
# spare for `check --online`'s probe or an overlap with a connection being closed.
TOKEN_CONNECTIONS: Final = 2
# A get_token answer is a few hundred bytes; anything much larger is not one.
MAX_ANSWER: Final = 64 * 1024


class GetTokenFailed(Exception):
    """No token came; `ret_code` is get_token's own code when it answered one."""

    def __init__(self, message: str, *, ret_code: str | None = None) -> None:
        super().__init__(message)
        self.ret_code = ret_code


class TokenSource(Protocol):
    async def fetch(self) -> IssuedToken:
        """Obtain a new token; raise GetTokenFailed (with get_token's code when it gave one)."""
        ...


def token_client(settings: Settings, tls: ssl.SSLContext) -> upstream.Client:
    """The upstream client get_token (and `check --online`) uses: a small pool of its own."""
    return upstream.Client(
        tls,
        connections=TOKEN_CONNECTIONS,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.upstream_timeout,
    )


def token_source(
    settings: Settings,
    client: upstream.Client,
    *,
    log: structlog.typing.FilteringBoundLogger,
    secrets: Secrets,
    on_result: Callable[[str], None] = lambda _result: None,
) -> SobotTokenSource:
    """The token source `settings` describe, calling get_token through `client`."""
    return SobotTokenSource(
        client,
        base_url=settings.base_url,
        appid=settings.appid,
        app_key=settings.app_key,
        deadline=settings.connect_timeout + settings.upstream_timeout,
        log=log,
        secrets=secrets,
        on_result=on_result,
    )


class SobotTokenSource:
    """Calls `GET {base}/api/get_token?appid&create_time&sign` on the configured upstream."""

    def __init__(
        self,
        client: upstream.Client,
        *,
        base_url: str,
        appid: str,
        app_key: str,
        deadline: float,
        log: structlog.typing.FilteringBoundLogger,
        secrets: Secrets,
        on_result: Callable[[str], None] = lambda _result: None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`deadline` bounds a whole call (the client's own timeouts bound each wait in it);
        `on_result` hears each call's result: ok, refused, unreachable or malformed."""
        self._client = client
        self._origin = upstream.Origin.of(base_url)
        self._path = urlsplit(base_url).path + v5.GET_TOKEN_PATH
        self._headers = CIMultiDict({"Accept": "*/*", "User-Agent": f"sobot-proxy/{__version__}"})
        self._appid = appid
        self._app_key = app_key
        self._deadline = deadline
        self._log = log
        self._wall_clock = wall_clock
        self._secrets = secrets
        self._on_result = on_result

    async def fetch(self) -> IssuedToken:
        create_time = str(int(self._wall_clock()))
        sign = v5.make_sign(self._appid, create_time, self._app_key)
        self._secrets.add(sign)
        query = urlencode({"appid": self._appid, "create_time": create_time, "sign": sign})
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._deadline):
                status, body = await self._exchange(f"{self._path}?{query}")
        except (TimeoutError, upstream.ClientError) as exc:
            # The client's messages never carry the target (and with it the sign).
            reason = _reason(exc, self._deadline)
            self._log_call(started, error=str(exc) if str(exc) else reason)
            self._on_result("unreachable")
            raise GetTokenFailed(f"could not reach Sobot's get_token ({reason})") from None
        try:
            if len(body) > MAX_ANSWER:
                raise MalformedAnswer(f"the answer is over {MAX_ANSWER} bytes")
            ret_code, ret_msg, token = v5.parse_token_answer(body)
        except MalformedAnswer as exc:
            self._log_call(started, http_status=status, error=str(exc))
            self._on_result("malformed")
            raise GetTokenFailed(
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
            raise GetTokenFailed(
                f"Sobot's get_token answered {v5.describe(ret_code)}"
                + (f": {ret_msg}" if ret_msg else ""),
                ret_code=ret_code,
            )
        return token

    async def _exchange(self, target: str) -> tuple[int, bytes]:
        """Send get_token; its status and up to MAX_ANSWER + 1 bytes of its answer."""
        response = await self._client.request("GET", self._origin, target, self._headers)
        try:
            return response.status, await response.read_up_to(MAX_ANSWER + 1)
        finally:
            response.release()

    def _log_call(self, started: float, **fields: object) -> None:
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        if "error" in fields or fields.get("ret_code") != v5.OK:
            self._log.warning("get_token", duration_ms=duration_ms, **fields)
        else:
            self._log.info("get_token", duration_ms=duration_ms, **fields)


def _reason(exc: BaseException, deadline: float) -> str:
    """Why the exchange failed, in short, for the answer (the log has the whole message)."""
    if isinstance(exc, upstream.ClientError):
        # Fixed phrases: the host, port and the system's reason for a connect error, the read
        # timeout's length; never the target.
        return str(exc)
    return f"no whole answer within {deadline:g} s"
