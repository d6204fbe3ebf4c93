"""Where the token lives: in this process, or in Redis, shared by every replica of an appid.

Every get_token call rotates the token for everyone on the appid, so replicas that each fetched
their own would knock each other over. With a shared store they renew it together:

- A replica that needs a token first looks in the store. Only if the stored one will not do
  (missing, rejected, or itself due for renewal) does it take the renewal lock, look again (the
  lock's previous holder may just have renewed it), fetch, and save the new token.
- The lock has a lease: a replica that dies holding it holds it no longer than the lease. It is
  released only by its holder (redis-py's Lock checks the holder's token in a script).
- Saving publishes a message on a channel; every replica listens, and also looks every
  POLL_INTERVAL seconds in case a message was missed (a reconnect), so it learns of a new token
  within a moment. Requests never wait on Redis: each replica serves the token it holds.

The token is stored in clear: protect Redis as you protect the app_key (a password, TLS with
rediss://, a private network).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from proxy.errors import TokenUnavailable
from proxy.settings import Settings

POLL_INTERVAL: Final = 2.0
# KEYS: the token, the channel. ARGV: the record, its issued_at, milliseconds left.
_SAVE_IF_NEWER: Final = """
local stored = redis.call('GET', KEYS[1])
if stored then
  local ok, fields = pcall(cjson.decode, stored)
  if ok and tonumber(fields['issued_at']) and tonumber(fields['issued_at']) >= tonumber(ARGV[2])
  then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('PUBLISH', KEYS[2], 'renewed')
return 1
"""
RECONNECT_DELAY: Final = 0.5
MAX_RECONNECT_DELAY: Final = 8.0


@dataclass(frozen=True, slots=True)
class StoredToken:
    value: str
    issued_at: float  # wall clock (time.time()): replicas compare it across machines
    lifetime: float

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.lifetime

    def __repr__(self) -> str:  # the value is a credential
        return f"StoredToken(issued_at={self.issued_at}, lifetime={self.lifetime})"


SHARED_FILE: Final = "a file shared by the workers (no SOBOT_TOKEN_STORE)"


def describe_store(url: str, *, workers_directory: str | None = None) -> str:
    """The store's URL without its password, for logs; as make_store chooses it, so in a
    worker of several, `memory` is the workers' shared file."""
    if url == "memory":
        return url if workers_directory is None else SHARED_FILE
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def make_store(
    settings: Settings,
    *,
    log: structlog.typing.FilteringBoundLogger,
    workers_directory: str | None = None,
    on_error: Callable[[], None] = lambda: None,
) -> TokenStore:
    """The store `settings` name; for `memory` in a worker of several, the workers' shared
    file. `on_error` hears of every failure to use a shared store (for the metrics)."""
    if settings.token_store == "memory":
        if workers_directory is not None:
            return FileTokenStore(
                workers_directory, lease=settings.renewal_lease, on_error=on_error
            )
        return MemoryTokenStore()
    return RedisTokenStore(
        settings.token_store,
        appid=settings.appid,
        password=settings.token_store_password,
        lease=settings.renewal_lease,
        log=log,
        on_error=on_error,
    )


class StoreUnavailable(Exception):
    """The shared store cannot be reached; the caller falls back to working alone."""


class _Failures:
    """A shared store's failures: counted, and turned into StoreUnavailable."""

    def __init__(self, on_error: Callable[[], None]) -> None:
        self._on_error = on_error

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        self._on_error()
        return StoreUnavailable(type(exc).__name__)


class TokenStore(Protocol):
    shared: bool

    async def load(self) -> StoredToken | None: ...

    async def save(self, token: StoredToken) -> None: ...

    def renewal_lock(self) -> contextlib.AbstractAsyncContextManager[None]: ...

    def changes(self) -> AsyncIterator[None]:
        """Yields whenever the stored token may have changed (and now and then regardless)."""
        ...

    async def close(self) -> None: ...


class MemoryTokenStore:
    """One process: the token manager's own single flight is all the coordination needed."""

    shared = False

    def __init__(self) -> None:
        self._token: StoredToken | None = None

    async def load(self) -> StoredToken | None:
        return self._token

    async def save(self, token: StoredToken) -> None:
        self._token = token

    @contextlib.asynccontextmanager
    async def renewal_lock(self) -> AsyncIterator[None]:
        yield

    async def changes(self) -> AsyncIterator[None]:
        await asyncio.Event().wait()  # nobody else changes it
        yield  # pragma: no cover

    async def close(self) -> None:
        pass


class RedisTokenStore(_Failures):
    shared = True

    def __init__(
        self,
        url: str,
        *,
        appid: str,
        password: str | None,
        lease: float,
        log: structlog.typing.FilteringBoundLogger,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(on_error)
        # Short socket timeouts: the store is on the renewal path, never on a request's.
        self._redis = aioredis.Redis.from_url(
            url, password=password, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        prefix = f"sobot-proxy:{appid}:"
        self._token_key = prefix + "token"
        self._lock_key = prefix + "renewal-lock"
        self._channel = prefix + "new-token"
        self._lease = lease
        self._log = log
        self._save_if_newer = self._redis.register_script(_SAVE_IF_NEWER)

    async def load(self) -> StoredToken | None:
        try:
            raw = await self._redis.get(self._token_key)
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from exc
        if raw is None:
            return None
        try:
            fields = orjson.loads(raw)
            return StoredToken(
                str(fields["value"]), float(fields["issued_at"]), float(fields["lifetime"])
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # not ours, or from an incompatible version: as if there were none

    async def save(self, token: StoredToken) -> None:
        """Store `token` unless a newer one is stored already, and tell the others.

        Newer wins: a holder whose lease ran out mid-fetch must not put back an older token
        over the one its successor stored. One script, so the check, the write and the message
        are a single step.
        """
        record = {"value": token.value, "issued_at": token.issued_at, "lifetime": token.lifetime}
        # With what is left of its life, so Redis never hands out a dead token.
        left_ms = int((token.expires_at - time.time()) * 1000)
        if left_ms <= 0:
            return
        try:
            await self._save_if_newer(
                keys=[self._token_key, self._channel],
                args=[orjson.dumps(record), repr(token.issued_at), left_ms],
            )
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from exc

    @contextlib.asynccontextmanager
    async def renewal_lock(self) -> AsyncIterator[None]:
        lock = self._redis.lock(
            self._lock_key,
            timeout=self._lease,
            # Long enough to outlast a holder that died: its lease then runs out.
            blocking_timeout=self._lease + 5,
        )
        try:
            acquired = await lock.acquire()
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from exc
        if not acquired:
            raise TokenUnavailable("another replica is renewing the token and has not finished")
        try:
            yield
        finally:
            # Not ours any more if the lease ran out meanwhile: nothing to release then.
            with contextlib.suppress(redis.exceptions.RedisError):
                await lock.release()

    async def changes(self) -> AsyncIterator[None]:
        down = False
        delay = RECONNECT_DELAY
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    if down:
                        self._log.info("token_store_available")
                    down, delay = False, RECONNECT_DELAY
                    yield  # (re)connected: look now
                    while True:
                        # Bounded on our side too: a reconnect inside redis-py must not keep
                        # the poll from happening.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(POLL_INTERVAL):
                                await pubsub.get_message(
                                    ignore_subscribe_messages=True, timeout=POLL_INTERVAL
                                )
                        yield  # a message, or a poll's worth of time
            except redis.exceptions.RedisError as exc:
                self._on_error()
                if not down:  # once when it goes, once when it is back: not every retry
                    self._log.warning("token_store_unavailable", reason=type(exc).__name__)
                down = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY)

    async def close(self) -> None:
        await self._redis.aclose()


class FileTokenStore(_Failures):
    """Worker processes of one proxy on one host: a file for the token, an flock for renewal.

    The lock needs no lease: the kernel releases an flock when its holder dies. Changes are
    noticed by watching the file's modification time, a cheap local stat.
    """

    shared = True
    WATCH_INTERVAL: Final = 0.25

    def __init__(
        self, directory: str, *, lease: float, on_error: Callable[[], None] = lambda: None
    ) -> None:
        super().__init__(on_error)
        self._token_path = os.path.join(directory, "token.json")
        self._lock_path = os.path.join(directory, "renewal.lock")
        self._lease = lease

    async def load(self) -> StoredToken | None:
        try:
            # A few dozen bytes from a local file, on the renewal path only: not worth a thread.
            with open(self._token_path, "rb") as file:  # noqa: ASYNC230
                fields = orjson.loads(file.read())
            return StoredToken(
                str(fields["value"]), float(fields["issued_at"]), float(fields["lifetime"])
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._unavailable(exc) from exc
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    async def save(self, token: StoredToken) -> None:
        record = {"value": token.value, "issued_at": token.issued_at, "lifetime": token.lifetime}
        partial = f"{self._token_path}.{os.getpid()}"
        try:
            # Written whole, then renamed into place: a reader sees the old token or the new.
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(orjson.dumps(record))
            os.replace(partial, self._token_path)
        except OSError as exc:
            raise self._unavailable(exc) from exc

    @contextlib.asynccontextmanager
    async def renewal_lock(self) -> AsyncIterator[None]:
        try:
            descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._unavailable(exc) from exc
        try:
            deadline = asyncio.get_running_loop().time() + self._lease + 5
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise TokenUnavailable(
                            "another worker is renewing the token and has not finished"
                        ) from None
                    await asyncio.sleep(0.02)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    async def changes(self) -> AsyncIterator[None]:
        seen = None
        quiet = 0.0
        while True:
            try:
                stamp: int | None = os.stat(self._token_path).st_mtime_ns
            except FileNotFoundError:
                stamp = None
            if stamp != seen or quiet >= POLL_INTERVAL:
                seen, quiet = stamp, 0.0
                yield
            await asyncio.sleep(self.WATCH_INTERVAL)
            quiet += self.WATCH_INTERVAL

    async def close(self) -> None:
        pass
