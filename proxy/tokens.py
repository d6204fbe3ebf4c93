"""The token lifecycle: one valid token, shared by every request, renewed before it expires.

- The token lives in a cachetools TLRUCache whose per-item expiry is the token's own lifetime on
  the monotonic clock, counted from when the fetch was sent, so an expired token is never handed
  out, even if the refresher is late.
- Single flight: all callers that need a new token at once await one shared fetch, shielded so
  that a caller that goes away does not cancel it for the others.
- A background refresher renews late in the token's life: every get_token rotates the token for
  every user of the appid, so renewing early buys nothing and renewing often costs in-flight
  requests a replay. It renews `refresh_margin` seconds before expiry, but never earlier than at
  90% of the lifetime (0.5 s before the end of a 5 s token; 300 s before the end of a day).
- `replace(rejected)` serves the 900002 replay: if a newer token is already held it is returned at
  once; otherwise the rejected token is dropped and one fetch serves everyone it failed for.
- Rejections rotate the token at most once a second: when a token not yet
  `min_rotation_interval` old is rejected, the refresh waits until it is. A token that young
  cannot have expired, so someone else rotated it or the endpoint rejects tokens in general;
  refreshing at once would rotate the token for everyone on every such request.
- After a failed fetch, callers get the failure at once until a backoff (doubling, capped) has
  passed, rather than each calling get_token again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import cachetools
import structlog

from proxy import protocol
from proxy.errors import TokenUnavailable
from proxy.logs import Secrets
from proxy.protocol import IssuedToken
from proxy.token_source import TokenSource

# Renew at no earlier than this fraction of a token's life, whatever the margin.
LATEST_RENEWAL_FRACTION: Final = 0.9
_KEY: Final = "token"


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    serial: int  # increases with every token this manager obtains
    expires_at: float  # on the manager's monotonic clock
    lifetime: float

    @property
    def obtained_at(self) -> float:
        return self.expires_at - self.lifetime


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float = 1.0
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.first * 2.0 ** max(0, failures - 1))


@dataclass(frozen=True, slots=True)
class TokenStatus:
    ready: bool
    expires_in: float | None
    ret_code: str | None  # the last failed get_token's code, or the proxy's own
    problem: str | None  # why no token is held, or why the last renewal failed
    configuration_error: bool


class TokenManager:
    def __init__(
        self,
        source: TokenSource,
        *,
        refresh_margin: float,
        log: structlog.typing.FilteringBoundLogger,
        backoff: Backoff = Backoff(),
        min_rotation_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        secrets: Secrets | None = None,
    ) -> None:
        self._source = source
        self._refresh_margin = refresh_margin
        self._log = log
        self._backoff = backoff
        self._min_rotation_interval = min_rotation_interval
        self._clock = clock
        self._secrets = secrets if secrets is not None else Secrets()
        self._cache: cachetools.TLRUCache[str, Token] = cachetools.TLRUCache(
            maxsize=1, ttu=lambda _key, token, _now: token.expires_at, timer=clock
        )
        self._serial = 0
        self._inflight: asyncio.Task[Token] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: TokenUnavailable | None = None
        self._changed = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None

    # -- used on every request -------------------------------------------------------------

    def seconds_left(self, token: Token) -> float:
        return token.expires_at - self._clock()

    def current(self) -> Token | None:
        """The valid token held now, if any."""
        return self._cache.get(_KEY)

    async def get(self) -> Token:
        """A valid token: the one held, or a new one from the single shared fetch."""
        token = self._cache.get(_KEY)
        if token is not None:
            return token
        return await self._shared_fetch()

    async def replace(self, rejected: Token) -> Token:
        """A token to replay with after Sobot rejected `rejected` (900002 / 900001)."""
        current = self._cache.get(_KEY)
        if current is not None and current.serial > rejected.serial:
            return current
        if current is not None and self._inflight is None:
            too_young_by = current.obtained_at + self._min_rotation_interval - self._clock()
            if too_young_by > 0:
                self._log.warning("young_token_rejected", wait_s=round(too_young_by, 3))
                await asyncio.sleep(too_young_by)
                current = self._cache.get(_KEY)
                if current is not None and current.serial > rejected.serial:
                    return current
        if current is not None and current.serial == rejected.serial:
            # Known rejected: never hand it out again.
            del self._cache[_KEY]
            self._changed.set()
        return await self._shared_fetch()

    # -- fetching --------------------------------------------------------------------------

    async def _shared_fetch(self) -> Token:
        if self._inflight is None:
            if self._last_error is not None and self._clock() < self._retry_at:
                raise TokenUnavailable(self._last_error.message, ret_code=self._last_error.ret_code)
            self._inflight = asyncio.create_task(self._fetch(), name="sobot-get-token")
            # Waiters may all be cancelled; retrieve a failure so asyncio does not report it.
            self._inflight.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(self._inflight)

    async def _fetch(self) -> Token:
        sent_at = self._clock()
        try:
            issued = await self._fetch_from_source()
        except TokenUnavailable as exc:
            self._failures += 1
            self._retry_at = self._clock() + self._backoff.delay(self._failures)
            self._last_error = exc
            if exc.ret_code in protocol.CONFIGURATION_ERRORS:
                self._log.error(
                    "configuration_rejected",
                    ret_code=exc.ret_code,
                    detail="Sobot rejected the configured credentials: check SOBOT_APPID, "
                    "SOBOT_APP_KEY and the region / base URL",
                )
            raise
        else:
            self._serial += 1
            self._secrets.add(issued.value)
            token = Token(issued.value, self._serial, sent_at + issued.lifetime, issued.lifetime)
            self._cache[_KEY] = token
            self._failures = 0
            self._retry_at = 0.0
            self._last_error = None
            return token
        finally:
            self._inflight = None
            self._changed.set()

    async def _fetch_from_source(self) -> IssuedToken:
        try:
            return await self._source.fetch()
        except TokenUnavailable:
            raise
        except Exception as exc:
            # A bug, not Sobot: log it; the backoff and the refresher carry on as for a failure.
            self._log.exception("get_token_internal_error")
            raise TokenUnavailable("the proxy failed to fetch a token; see its log") from exc

    # -- background renewal ----------------------------------------------------------------

    def start(self) -> None:
        """Start the background refresher; it fetches the first token at once."""
        self._refresher = asyncio.create_task(self._refresh_forever(), name="sobot-token-refresher")

    async def stop(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresher = None

    def renewal_due_in(self) -> float:
        """Seconds until the refresher should fetch (0 or less: now)."""
        now = self._clock()
        token = self._cache.get(_KEY)
        if token is None:
            due = now
        else:
            margin = min(self._refresh_margin, (1 - LATEST_RENEWAL_FRACTION) * token.lifetime)
            due = token.expires_at - margin
        if self._last_error is not None:
            due = max(due, self._retry_at)
        return due - now

    async def _refresh_forever(self) -> None:
        while True:
            self._changed.clear()
            delay = self.renewal_due_in()
            if delay > 0:
                # Woken early by any change: a new token, a failure, an invalidation.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), delay)
                continue
            with contextlib.suppress(TokenUnavailable):  # logged by the source; backoff applies
                await self._shared_fetch()

    # -- health ----------------------------------------------------------------------------

    def status(self) -> TokenStatus:
        token = self._cache.get(_KEY)
        error = self._last_error
        problem = None
        if error is not None:
            problem = error.message
            if error.ret_code in protocol.CONFIGURATION_ERRORS:
                problem = (
                    f"Sobot rejected the configuration ({error.message}): check SOBOT_APPID, "
                    "SOBOT_APP_KEY and the region / base URL"
                )
        elif token is None:
            problem = "no token yet: the first get_token is under way"
        return TokenStatus(
            ready=token is not None,
            expires_in=None if token is None else round(self.seconds_left(token), 1),
            ret_code=None if error is None else error.ret_code,
            problem=problem,
            configuration_error=error is not None
            and error.ret_code in protocol.CONFIGURATION_ERRORS,
        )
