"""The token lifecycle: one valid token, shared by every request, renewed before it expires.

- The token lives in a cachetools TLRUCache whose per-item expiry is the token's own lifetime on
  the monotonic clock, counted from when the fetch was sent, so an expired token is never handed
  out, even if the refresher is late.
- Single flight: all callers that need a new token at once await one shared fetch, shielded so
  that a caller that goes away does not cancel it for the others.
- A background refresher renews when the kind says (sobot/credential.py): v5 late in the token's
  life, since every get_token rotates the token for every user of the appid, so renewing early
  buys nothing and renewing often costs in-flight requests a replay: `refresh_margin` seconds
  before expiry, but never earlier than at 90% of the lifetime (0.5 s before the end of a 5 s
  token; 300 s before the end of a day). V6 at half the token's life, as the vendor advises.
- One manager per credential set, whatever its kind: this module knows tokens, not kinds.
- `replace(rejected)` serves the replay after a rejected token (v5's 900002, V6's 401): if a
  newer token is already held it is returned at once; otherwise the rejected token is dropped
  and one fetch serves everyone it failed for.
- Rejections rotate the token at most once a second: when a token not yet
  `min_rotation_interval` old is rejected, the refresh waits until it is. A token that young
  cannot have expired, so someone else rotated it or the endpoint rejects tokens in general;
  refreshing at once would rotate the token for everyone on every such request.
- After a failed fetch, callers get the failure at once until a backoff (doubling, capped) has
  passed, rather than each calling get_token again.
- A manager that `pauses_when_idle` (a named tenant's: server/tenants.py) stops renewing in the
  background once it has not been used (get, replace) for longer than its token's life: an idle
  tenant costs no token calls. Its next use starts renewing again (the held token, if still
  valid, serves at once; otherwise that use fetches one).
- `retire(successor)` (a reload replaced or removed the credential set): no more background
  renewal, but a request still holding the manager is served to its end: the held token, and
  for its replay a token from `successor` (the manager that now serves the same appid: a fetch
  here would supersede the token it holds), or without one a fetch on demand as before.
- `start_when_used()` (a named tenant's set a reload made anew): renewing starts at its first
  use, as when the tenant was first used.
- Tokens are obtained through a store (tokens/store.py): in one process it only remembers; shared in
  Redis, it lets replicas adopt the token one of them fetched, and tells them when it changes.
  If the store cannot be reached, a replica renews alone, serves on, and reconciles with the
  store when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import cachetools
import structlog

from proxy.errors import TokenUnavailable
from proxy.logs import Secrets
from proxy.tokens.source import GetTokenFailed, TokenSource
from proxy.tokens.store import (
    MemoryTokenStore,
    RenewalBusy,
    StoredToken,
    StoreUnavailable,
    TokenStore,
)

# Renew at no earlier than this fraction of a token's life, whatever the margin.
LATEST_RENEWAL_FRACTION: Final = 0.9
# With the shared store down, an early renewal is retried this often (until the token expires).
STORE_RETRY: Final = 2.0
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
        wall_clock: Callable[[], float] = time.time,
        secrets: Secrets | None = None,
        store: TokenStore | None = None,
        latest_renewal_fraction: float = LATEST_RENEWAL_FRACTION,
        check_hint: str = "check SOBOT_APPID, SOBOT_APP_KEY and the region / base URL",
        pauses_when_idle: bool = False,
    ) -> None:
        """`refresh_margin` and `latest_renewal_fraction`: when the refresher renews (see the
        module docstring); `check_hint`: what to check when the endpoint refuses the
        credentials, for the log and /readyz; `pauses_when_idle`: stop renewing when unused
        for longer than the token's life (see the module docstring)."""
        self._source = source
        self._refresh_margin = refresh_margin
        self._latest_renewal_fraction = latest_renewal_fraction
        self._check_hint = check_hint
        self._log = log
        self._backoff = backoff
        self._min_rotation_interval = min_rotation_interval
        self._clock = clock
        self._wall_clock = wall_clock
        self._store: TokenStore = store if store is not None else MemoryTokenStore()
        self._held: StoredToken | None = None  # the current token as the store knows it
        self._unsaved = False  # renewed alone while the store was down: reconcile when back
        self._renewal_postponed_until = 0.0  # an early renewal waits for the store until then
        self._watcher: asyncio.Task[None] | None = None
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
        self._first_outcome = asyncio.Event()  # the first fetch ended, either way
        self._refresher: asyncio.Task[None] | None = None
        self._pauses_when_idle = pauses_when_idle
        self._last_used = clock()
        self._paused = False  # the refresher stopped for idleness: the next use restarts it
        self._successor: TokenManager | None = None  # retired: who serves its appid now

    # -- used on every request -------------------------------------------------------------

    def seconds_left(self, token: Token) -> float:
        return token.expires_at - self._clock()

    def expires_in(self) -> float | None:
        """Seconds the valid token held now has left (None: none is held)."""
        token = self._cache.get(_KEY)
        return None if token is None else self.seconds_left(token)

    def current(self) -> Token | None:
        """The valid token held now, if any."""
        return self._cache.get(_KEY)

    @property
    def renewing(self) -> bool:
        """Whether the background refresher runs."""
        return self._refresher is not None and not self._refresher.done()

    def _used(self) -> None:
        """Note a use (a float stored: cheap), and renew again if that had stopped."""
        self._last_used = self._clock()
        if self._paused:
            self._paused = False
            if self._held is not None:  # else started for the first time (start_when_used)
                self._log.info("token_renewal_resumed")
            self.start()

    async def get(self) -> Token:
        """A valid token: the one held, or a new one from the single shared fetch."""
        if self._pauses_when_idle:
            self._used()
        token = self._cache.get(_KEY)
        if token is not None:
            return token
        if self._successor is not None:
            return await self._successor.get()
        # Whatever was held has expired: any token but that one.
        return await self._shared_fetch(stale=None if self._held is None else self._held.value)

    async def replace(self, rejected: Token) -> Token:
        """A token to replay with after Sobot rejected `rejected` (v5: 900002 / 900001; V6: 401)."""
        if self._successor is not None:
            # Retired: a fetch here would supersede the token the set's successor holds.
            return await self._successor.replace(rejected)
        if self._pauses_when_idle:
            self._used()
        current = self._cache.get(_KEY)
        if current is not None and current.value != rejected.value:
            return current  # a newer one is held already
        if current is not None and self._inflight is None:
            too_young_by = current.obtained_at + self._min_rotation_interval - self._clock()
            if too_young_by > 0:
                self._log.warning("young_token_rejected", wait_s=round(too_young_by, 3))
                await asyncio.sleep(too_young_by)
                current = self._cache.get(_KEY)
                if current is not None and current.value != rejected.value:
                    return current
        for _ in range(2):
            current = self._cache.get(_KEY)
            if current is not None and current.value == rejected.value:
                # Known rejected: never hand it out again.
                del self._cache[_KEY]
                self._changed.set()
            token = await self._shared_fetch(stale=rejected.value)
            if token.value != rejected.value:
                return token
            # The fetch under way when we joined was obtaining a token for another reason,
            # and came back with the rejected one: one more, for this reason.
        raise TokenUnavailable("Sobot keeps rejecting the token it issued; see the proxy's log")

    # -- fetching --------------------------------------------------------------------------

    async def _shared_fetch(self, *, stale: str | None) -> Token:
        """The one fetch everyone waiting shares; `stale` is the token it must replace."""
        if self._inflight is None:
            if self._last_error is not None and self._clock() < self._retry_at:
                # A new one each time: raising one instance again would grow its traceback.
                last = self._last_error
                raise TokenUnavailable(
                    last.message,
                    ret_code=last.ret_code,
                    configuration_error=last.configuration_error,
                )
            # In a context of its own: the fetch serves every request waiting, so its log lines
            # must not carry the id of the request that happened to start it.
            self._inflight = asyncio.create_task(
                self._fetch(stale), name="sobot-get-token", context=contextvars.Context()
            )
            # Waiters may all be cancelled; retrieve a failure so asyncio does not report it.
            self._inflight.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(self._inflight)

    async def _fetch(self, stale: str | None) -> Token:
        try:
            stored = await self._obtain(stale)
        except TokenUnavailable as exc:
            self._failures += 1
            self._retry_at = self._clock() + self._backoff.delay(self._failures)
            self._last_error = exc
            if exc.configuration_error:
                self._log.error(
                    "configuration_rejected",
                    ret_code=exc.ret_code,
                    detail=f"Sobot rejected the configured credentials: {self._check_hint}",
                )
            raise
        else:
            self._failures = 0
            self._retry_at = 0.0
            self._last_error = None
            return self._install(stored)
        finally:
            self._inflight = None
            self._changed.set()
            self._first_outcome.set()

    async def _obtain(self, stale: str | None) -> StoredToken:
        """A token that will do: another replica's from the store, else a new one."""
        try:
            found = await self._store.load()
            if self._will_do(found, stale):
                assert found is not None
                return found
            async with self._store.renewal_lock():
                # The lock's previous holder may have renewed it meanwhile.
                found = await self._store.load()
                if self._will_do(found, stale):
                    assert found is not None
                    return found
                fresh = await self._fetch_from_source()
                try:
                    await self._store.save(fresh)
                except StoreUnavailable as exc:
                    self._renewing_alone(exc)
                return fresh
        except RenewalBusy as exc:
            raise TokenUnavailable(str(exc)) from None
        except StoreUnavailable as exc:
            current = self._cache.get(_KEY)
            held = self._held
            if current is not None and held is not None and held.value == current.value:
                # The token held is still good (a rejected one is never held: replace() drops
                # it first), so this was an early renewal, and renewing alone now would rotate
                # it under every other replica. Keep it, and try the store again soon; only a
                # token that expires or is rejected is renewed alone.
                self._renewal_postponed_until = min(self._clock() + STORE_RETRY, current.expires_at)
                self._log.warning(
                    "token_renewal_postponed",
                    reason=str(exc),
                    detail="the token store is unavailable; the held token is still valid",
                )
                return held
            self._renewing_alone(exc)
            return await self._fetch_from_source()

    def _renewing_alone(self, exc: StoreUnavailable) -> None:
        self._unsaved = True
        self._log.warning(
            "token_renewing_alone",
            reason=str(exc),
            detail="renewing the token alone; the replicas agree on one again when it is back",
        )

    def _will_do(self, found: StoredToken | None, stale: str | None) -> bool:
        """A stored token will do if it is not the one to replace and not itself due."""
        if found is None or found.value == stale:
            return False
        return self._wall_clock() < found.expires_at - self._renewal_margin(found.lifetime)

    async def _fetch_from_source(self) -> StoredToken:
        issued_at = self._wall_clock()
        try:
            issued = await self._source.fetch()
        except GetTokenFailed as exc:
            raise TokenUnavailable(
                str(exc), ret_code=exc.ret_code, configuration_error=exc.configuration_error
            ) from None
        except Exception as exc:
            # A bug, not Sobot: log it; the backoff and the refresher carry on as for a failure.
            self._log.exception("get_token_internal_error")
            raise TokenUnavailable("the proxy failed to fetch a token; see its log") from exc
        return StoredToken(issued.value, issued_at, issued.lifetime)

    def _install(self, stored: StoredToken) -> Token:
        """Make `stored` the token every request gets, on this process's monotonic clock."""
        current = self._cache.get(_KEY)
        if current is not None and current.value == stored.value:
            return current  # already held (the watcher and a fetch may both bring it)
        self._serial += 1
        self._secrets.add(stored.value, owner=self)
        # Counted from when it was issued (the fetch was sent), so it ends before Sobot's does.
        expires_at = self._clock() + (stored.expires_at - self._wall_clock())
        token = Token(stored.value, self._serial, expires_at, stored.lifetime)
        self._cache[_KEY] = token
        self._held = stored
        self._changed.set()
        self._first_outcome.set()
        return token

    # -- the shared store ------------------------------------------------------------------

    async def _watch_store(self) -> None:
        """Adopt a token another replica stored; after an outage, agree on one again."""
        async for _ in self._store.changes():
            try:
                if self._unsaved:
                    await self._reconcile()
                    continue
                found = await self._store.load()
                if found is not None and self._is_newer(found) and self._will_do(found, None):
                    self._install(found)
                    self._log.info("token_adopted", lifetime_s=found.lifetime)
                elif found is None and self._held is not None and self._will_do(self._held, None):
                    # The store came back empty (a restart without persistence): put the token
                    # everyone holds back, so the next replica to start adopts it.
                    await self._store.save(self._held)
            except (StoreUnavailable, RenewalBusy):
                continue  # the store is down, or busy: the next change or poll tries again
            except Exception:
                self._log.exception("token_watcher_error")  # a bug: keep watching regardless

    def _is_newer(self, found: StoredToken) -> bool:
        held = self._held
        return held is None or (found.value != held.value and found.issued_at > held.issued_at)

    async def _reconcile(self) -> None:
        """Back from an outage: the newest token is the one Sobot honours; share that one.

        Under the renewal lock, so that replicas reconciling at once compare in turn.
        """
        async with self._store.renewal_lock():
            found = await self._store.load()
            held = self._held
            if held is not None and (found is None or held.issued_at > found.issued_at):
                await self._store.save(held)
            elif found is not None and self._will_do(found, None):
                self._install(found)
        self._unsaved = False
        self._log.info("token_store_reconciled")

    # -- background renewal ----------------------------------------------------------------

    def start(self) -> None:
        """Start the background refresher (it obtains the first token at once) and, with a
        shared store, the watcher that adopts tokens other replicas store."""
        self._refresher = asyncio.create_task(self._refresh_forever(), name="sobot-token-refresher")
        if self._store.shared:
            self._watcher = asyncio.create_task(self._watch_store(), name="sobot-token-watcher")

    def start_when_used(self) -> None:
        """Start the background refresher at the first use (get, replace), not now. Only for a
        manager that `pauses_when_idle`: for another, the same as start()."""
        if self._pauses_when_idle:
            self._paused = True
        else:
            self.start()

    def retire(self, successor: TokenManager | None = None) -> None:
        """Stop renewing in the background for good, unlike stop() leaving a fetch under way to
        the requests that wait for it: they, and any replay still to come, are served as ever.
        `successor`: the manager that serves the same appid from now on; a replay (and a get
        once the held token has expired) takes its token instead of fetching one here."""
        self._successor = successor
        self._pauses_when_idle = False  # so no later use starts the refresher again
        self._paused = False
        for task in (self._refresher, self._watcher):
            if task is not None:
                task.cancel()
        self._refresher = self._watcher = None

    async def stop(self) -> None:
        for task in (self._refresher, self._watcher, self._inflight):
            if task is not None:
                task.cancel()
                # A fetch under way may end in its own failure rather than the cancellation.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._refresher = self._watcher = None

    def _renewal_margin(self, lifetime: float) -> float:
        """How long before its end a token of `lifetime` seconds is due for renewal."""
        return min(self._refresh_margin, (1 - self._latest_renewal_fraction) * lifetime)

    def renewal_due_in(self) -> float:
        """Seconds until the refresher should fetch (0 or less: now)."""
        now = self._clock()
        token = self._cache.get(_KEY)
        due = now if token is None else token.expires_at - self._renewal_margin(token.lifetime)
        if self._last_error is not None:
            due = max(due, self._retry_at)
        due = max(due, self._renewal_postponed_until)
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
            if self._pauses_when_idle and self._idle():
                self._pause()
                return
            current = self._cache.get(_KEY)
            # Without a valid token, the last one held (maybe just rejected) will not do either.
            stale = current or self._held
            try:
                await self._shared_fetch(stale=None if stale is None else stale.value)
            except TokenUnavailable:
                pass  # logged where it happened; the backoff applies
            except Exception:
                # A bug must not end renewals for good: log it, and carry on after the backoff.
                self._log.exception("token_refresher_error")
                await asyncio.sleep(self._backoff.delay(max(1, self._failures)))

    def _idle(self) -> bool:
        """Unused for longer than the token's life (with none ever held: the longest backoff,
        so a tenant whose credentials fail is not retried forever for one request)."""
        held = self._held
        limit = held.lifetime if held is not None else self._backoff.cap
        return self._clock() - self._last_used > limit

    def _pause(self) -> None:
        """Stop renewing (and watching the store) until the next use."""
        self._paused = True
        self._log.info(
            "token_renewal_paused",
            idle_s=round(self._clock() - self._last_used, 1),
            detail="unused for longer than the token's life: renewed again when next used",
        )
        if self._watcher is not None:
            self._watcher.cancel()
        self._refresher = self._watcher = None

    # -- health ----------------------------------------------------------------------------

    async def first_outcome(self) -> TokenStatus:
        """The status once the first token is held or the first fetch has failed."""
        if self._cache.get(_KEY) is None:
            await self._first_outcome.wait()
        return self.status()

    def status(self) -> TokenStatus:
        token = self._cache.get(_KEY)
        error = self._last_error
        problem = None
        if error is not None:
            problem = error.message
            if error.configuration_error:
                problem = f"Sobot rejected the configuration ({error.message}): {self._check_hint}"
        elif token is None:
            problem = "no token yet: the first token call is under way"
        return TokenStatus(
            ready=token is not None,
            expires_in=None if token is None else round(self.seconds_left(token), 1),
            ret_code=None if error is None else error.ret_code,
            problem=problem,
            configuration_error=error is not None and error.configuration_error,
        )
