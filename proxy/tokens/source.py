"""Fetching a new token from a credential set's token endpoint: one HTTP exchange, parsed.

Every kind's token call (v5's get_token, V6's /tokens/company) goes through here: the kind
(sobot/credential.py) builds the request and parses the answer; this module sends it. Fetching is
kept apart from caching (manager.py) so the manager can be tested against any source and a
shared store can sit between the two.

Token calls go through the proxy's own upstream client (proxy.upstream), on a pool of their own,
so a pool full of slow forwarded requests never holds up a renewal:

- A call is never sent twice. Every token call may rotate the token, so a call that fails on a
  kept-alive connection (it may have reached Sobot) fails; the manager's backoff and refresher
  try again.
- Timeouts as the README defines them: the connect timeout for connecting, the read timeout for
  each wait for bytes (for the answer's head as a whole, then for each read of the body), and the
  whole call at most connect + read timeout, which the renewal lock's lease counts on
  (Settings.renewal_lease).
- The sign is registered as a secret, and no log line or error message carries the target or
  the body.

Errors: GetTokenFailed, with the endpoint's own code when it answered one. The token manager
turns it into what the server answers (errors.TokenUnavailable).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Final, Protocol
from urllib.parse import urlsplit

import structlog
from multidict import CIMultiDict

from proxy import __version__, upstream
from proxy.config.settings import Settings
from proxy.logs import Secrets
from proxy.sobot.credential import (
    Credential,
    IssuedToken,
    MalformedAnswer,
    TokenRefused,
    TokenRequest,
)

# Connections kept for get_token: one call at a time (the manager's single flight), and one
# spare for `check --online`'s probe or an overlap with a connection being closed.
TOKEN_CONNECTIONS: Final = 2
# A get_token answer is a few hundred bytes; anything much larger is not one.
MAX_ANSWER: Final = 64 * 1024
_HEADERS: Final = (("Accept", "*/*"), ("User-Agent", f"sobot-proxy/{__version__}"))


class GetTokenFailed(Exception):
    """No token came; `ret_code` is get_token's own code when it answered one."""

    def __init__(
        self, message: str, *, ret_code: str | None = None, configuration_error: bool = False
    ) -> None:
        super().__init__(message)
        self.ret_code = ret_code
        self.configuration_error = configuration_error  # no retry can fix it


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
    credential: Credential,
    base_url: str,
    settings: Settings,
    client: upstream.Client,
    *,
    log: structlog.typing.FilteringBoundLogger,
    secrets: Secrets,
    on_result: Callable[[str], None] = lambda _result: None,
) -> CredentialTokenSource:
    """The token source of `credential`, whose endpoint is at `base_url`, called through
    `client` within the timeouts of `settings`."""
    return CredentialTokenSource(
        client,
        credential,
        base_url=base_url,
        deadline=settings.connect_timeout + settings.upstream_timeout,
        log=log,
        secrets=secrets,
        on_result=on_result,
    )


class CredentialTokenSource:
    """Calls `credential`'s token endpoint on `base_url` (its path prefix kept)."""

    def __init__(
        self,
        client: upstream.Client,
        credential: Credential,
        *,
        base_url: str,
        deadline: float,
        log: structlog.typing.FilteringBoundLogger,
        secrets: Secrets,
        on_result: Callable[[str], None] = lambda _result: None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`deadline` bounds a whole call (the client's own timeouts bound each wait in it);
        `on_result` hears each call's result: ok, refused, unreachable or malformed."""
        self._client = client
        self._credential = credential
        self._origin = upstream.Origin.of(base_url)
        self._base_path = urlsplit(base_url).path
        self._deadline = deadline
        self._log = log
        self._wall_clock = wall_clock
        self._secrets = secrets
        self._on_result = on_result
        # As messages name the endpoint: "Sobot's get_token", "Sobot's tokens/company".
        self._what = f"Sobot's {credential.token_path.removeprefix('/api/').lstrip('/')}"

    def use(self, credential: Credential) -> None:
        """Sign the next calls with `credential` (a reload changed the set's secret; its kind,
        appid and endpoint are the same). A call under way finishes with the one it began with."""
        self._credential = credential

    async def fetch(self) -> IssuedToken:
        now = self._wall_clock()
        call = self._credential.token_request(now)
        for secret in call.secrets:
            self._secrets.add(secret, owner=self)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._deadline):
                status, body = await self._exchange(call)
        except (TimeoutError, upstream.ClientError) as exc:
            # The client's messages never carry the target (and with it the sign).
            reason = _reason(exc, self._deadline)
            self._log_call(started, error=str(exc) if str(exc) else reason)
            self._on_result("unreachable")
            raise GetTokenFailed(f"could not reach {self._what} ({reason})") from None
        try:
            if len(body) > MAX_ANSWER:
                raise MalformedAnswer(f"the answer is over {MAX_ANSWER} bytes")
            token = self._credential.parse_token_answer(status, body, now)
        except MalformedAnswer as exc:
            self._log_call(started, http_status=status, error=str(exc))
            self._on_result("malformed")
            raise GetTokenFailed(
                f"{self._what} gave a malformed answer (HTTP {status}: {exc})"
            ) from None
        except TokenRefused as exc:
            self._log_call(started, http_status=status, ret_code=exc.code)
            self._on_result("refused")
            raise GetTokenFailed(
                f"{self._what} answered {self._credential.describe(exc.code)}"
                + (f": {exc.message}" if exc.message else ""),
                ret_code=exc.code,
                configuration_error=exc.configuration_error,
            ) from None
        self._log_call(started, http_status=status, lifetime_s=round(token.lifetime, 3))
        self._on_result("ok")
        return token

    async def _exchange(self, call: TokenRequest) -> tuple[int, bytes]:
        """Send the token call; its status and up to MAX_ANSWER + 1 bytes of its answer."""
        headers = CIMultiDict(_HEADERS)
        headers.update(call.headers)  # the call's own replace the defaults (Accept)
        body = None
        if call.body is not None:
            headers["Content-Length"] = str(len(call.body))
            body = _once(call.body)
        target = self._base_path + call.path
        response = await self._client.request(call.method, self._origin, target, headers, body)
        try:
            return response.status, await response.read_up_to(MAX_ANSWER + 1)
        finally:
            response.release()

    def _log_call(self, started: float, **fields: object) -> None:
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        fields = {"kind": self._credential.kind, **fields}
        if "error" in fields or "ret_code" in fields:
            self._log.warning("get_token", duration_ms=duration_ms, **fields)
        else:
            self._log.info("get_token", duration_ms=duration_ms, **fields)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _reason(exc: BaseException, deadline: float) -> str:
    """Why the exchange failed, in short, for the answer (the log has the whole message)."""
    if isinstance(exc, upstream.ClientError):
        # Fixed phrases: the host, port and the system's reason for a connect error, the read
        # timeout's length; never the target.
        return str(exc)
    return f"no whole answer within {deadline:g} s"
