"""Where the token lives: in this process, or in Redis, shared by every replica of an appid.

Every get_token call rotates the token for everyone on the appid, so replicas that each fetched
their own would knock each other over. Each credential set has a store of its own, keyed by its
kind's namespace and its appid. With a shared store they renew it together:

- A replica that needs a token first looks in the store. Only if the stored one will not do
  (missing, rejected, or itself due for renewal) does it take the renewal lock, look again (the
  lock's previous holder may just have renewed it), fetch, and save the new token.
- The lock has a lease: a replica that dies holding it holds it no longer than the lease. It is
  released only by its holder (redis-py's Lock checks the holder's token in a script).
- Saving publishes a message on the set's channel; every replica listens, so it learns of a
  new token within a moment. Requests never wait on Redis: each replica serves the token it
  holds.
- However many sets and tenants, a process talks to Redis through one client (TokenStores,
  SharedRedis: one bounded connection pool) and listens on one pub/sub connection
  (tokens/subscriber.py), subscribed to the channels of the stores being watched. A message
  missed while that connection was down is made up for when it is back: every store watching
  is told to look once. The only polling left is a store's whose own commands fail while the
  subscription works: it looks every POLL_INTERVAL until they work again.

The token is stored in clear: protect Redis as you protect the app_key (a password, TLS with
rediss://, a private network).

Errors: whatever goes wrong in using a shared store, a Redis that is down or one that answers
garbage (redis-py raises more than RedisError for that, e.g. AttributeError in its handshake), is
StoreUnavailable, and the caller carries on alone. A renewal lock held by another replica for
longer than its lease is RenewalBusy. An outage is logged once when it begins
(`token_store_unavailable`) and once when the store works again (`token_store_available`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
import structlog
from redis.credentials import CredentialProvider

from proxy.config.settings import Settings
from proxy.tokens.subscriber import Subscriber, Watch

POLL_INTERVAL: Final = 2.0
# The one Redis client's connections: the subscriber's, and those commands share.
POOL_CONNECTIONS: Final = 16
POOL_WAIT: Final = 2.0  # for a free connection, at most (then the store counts as down)
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

    def encode(self) -> bytes:
        """The record both shared stores keep (and _SAVE_IF_NEWER reads `issued_at` from)."""
        return orjson.dumps(
            {"value": self.value, "issued_at": self.issued_at, "lifetime": self.lifetime}
        )

    @classmethod
    def decode(cls, raw: bytes) -> StoredToken | None:
        """The token `raw` records; None if it is not a record of ours (or of an incompatible
        version): as if none were stored."""
        try:
            fields = orjson.loads(raw)
            return cls(str(fields["value"]), float(fields["issued_at"]), float(fields["lifetime"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


class StorePassword(CredentialProvider):
    """The Redis password from SOBOT_TOKEN_STORE_PASSWORD(_FILE), as redis-py asks for it on
    every new connection: `use()` (a reload) changes what new connections authenticate with;
    connections already open stay as they are (Redis checks a password only at AUTH)."""

    def __init__(self, password: str) -> None:
        self._password = password

    @classmethod
    def of(cls, settings: Settings) -> StorePassword | None:
        """The provider for `settings`' Redis: only for a password given apart from the URL (a
        URL's user or password is the URL's, which a reload does not change)."""
        if settings.token_store == "memory" or settings.token_store_password is None:
            return None
        parts = urlsplit(settings.token_store)
        if parts.username or parts.password:
            return None
        return cls(settings.token_store_password)

    def use(self, password: str) -> None:
        self._password = password

    def get_credentials(self) -> tuple[str]:
        return (self._password,)

    async def get_credentials_async(self) -> tuple[str]:
        return (self._password,)


SHARED_FILE: Final = "a file shared by the workers (no SOBOT_TOKEN_STORE)"


def describe_store(url: str, *, workers_directory: str | None = None) -> str:
    """The store's URL without its password, for logs; as TokenStores.make chooses it, so in a
    worker of several, `memory` is the workers' shared file."""
    if url == "memory":
        return url if workers_directory is None else SHARED_FILE
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class TokenStores:
    """The stores of one process, one per credential set, as `settings` name them: in memory;
    in a worker of several without Redis, the workers' shared files; or in Redis, every store
    through one client (one connection pool, POOL_CONNECTIONS at most) and one pub/sub
    connection (tokens/subscriber.py), however many sets and tenants there are. Closed at
    shutdown, after the stores."""

    def __init__(
        self,
        settings: Settings,
        *,
        log: structlog.typing.FilteringBoundLogger,
        workers_directory: str | None = None,
        on_error: Callable[[], None] = lambda: None,
        password: StorePassword | None = None,
    ) -> None:
        """`on_error` hears of every failure to use a shared store (for the metrics);
        `password`, if given, authenticates Redis connections (else settings' password, if
        any). No connection is made before a store is used."""
        self._settings = settings
        self._log = log
        self._workers_directory = workers_directory
        self._on_error = on_error
        self._redis: SharedRedis | None = None
        if settings.token_store != "memory":
            self._redis = SharedRedis(
                settings.token_store,
                password=password if password is not None else settings.token_store_password,
                log=log,
                on_error=on_error,
            )

    def make(
        self, *, namespace: str, appid: str, log: structlog.typing.FilteringBoundLogger
    ) -> TokenStore:
        """The store for the token of `appid` in a kind's `namespace`
        (Credential.store_namespace)."""
        settings = self._settings
        if self._redis is not None:
            return self._redis.store(prefix=f"{namespace}:{appid}:", lease=settings.renewal_lease)
        if self._workers_directory is not None:
            # Named by a digest: an appid may hold any character, a file name may not.
            digest = hashlib.sha256(appid.encode()).hexdigest()[:16]
            return FileTokenStore(
                self._workers_directory,
                name=f"{namespace}-{digest}",
                lease=settings.renewal_lease,
                log=log,
                on_error=self._on_error,
            )
        return MemoryTokenStore()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()


class StoreUnavailable(Exception):
    """The shared store cannot be used; the caller falls back to working alone."""


class RenewalBusy(Exception):
    """Another holder of the renewal lock has not finished within the lock's lease."""


class Availability:
    """A shared store's failures: counted, turned into StoreUnavailable, and logged once per
    outage, when it begins; the first success after it is logged too. One for all the Redis
    stores of a process (one Redis: one outage, one line), one per file store."""

    def __init__(
        self, log: structlog.typing.FilteringBoundLogger, on_error: Callable[[], None]
    ) -> None:
        self._log = log
        self._on_error = on_error
        self._down = False

    def failed(self, exc: Exception) -> StoreUnavailable:
        self._on_error()
        reason = type(exc).__name__
        if not self._down:
            self._down = True
            self._log.warning("token_store_unavailable", reason=reason)
        return StoreUnavailable(reason)

    def worked(self) -> None:
        if self._down:
            self._down = False
            self._log.info("token_store_available")


class TokenStore(Protocol):
    shared: bool

    async def load(self) -> StoredToken | None: ...

    async def save(self, token: StoredToken) -> None: ...

    def renewal_lock(self) -> contextlib.AbstractAsyncContextManager[None]: ...

    def changes(self) -> AsyncIterator[None]:
        """Yields whenever the stored token may have changed (and now and then regardless).
        Never raises: a store that fails is retried until it works again."""
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


class SharedRedis:
    """The one Redis client of a process's stores, its one subscriber, and its availability."""

    def __init__(
        self,
        url: str,
        *,
        password: str | StorePassword | None,
        log: structlog.typing.FilteringBoundLogger,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        # Bounded: a burst of renewals across many tenants waits a moment for a connection
        # rather than opening one each and keeping them all. Short timeouts: the store is on
        # the renewal path, never on a request's.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_CONNECTIONS,
            timeout=POOL_WAIT,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            **(
                {"credential_provider": password}
                if isinstance(password, StorePassword)
                else {"password": password}
            ),
        )
        self.client = aioredis.Redis.from_pool(pool)
        self.availability = Availability(log, on_error)
        self.subscriber = Subscriber(self.client, on_failure=self.availability.failed)
        self.save_if_newer = self.client.register_script(_SAVE_IF_NEWER)

    def store(self, *, prefix: str, lease: float) -> RedisTokenStore:
        return RedisTokenStore(self, prefix=prefix, lease=lease)

    async def close(self) -> None:
        await self.subscriber.close()
        await self.client.aclose()


class RedisTokenStore:
    shared = True

    def __init__(self, redis: SharedRedis, *, prefix: str, lease: float) -> None:
        self._shared = redis
        self._redis = redis.client
        self._health = redis.availability
        # v5: "sobot-proxy:<appid>:", the keys of every release before credential kinds; V6:
        # "sobot-proxy-v6:<appid>:", which no v5 key can be, whatever its appid.
        self._token_key = prefix + "token"
        self._lock_key = prefix + "renewal-lock"
        self._channel = prefix + "new-token"
        self._lease = lease
        self._failing = False  # this store's last command failed
        self._watches: set[Watch] = set()

    def _failed(self, exc: Exception) -> StoreUnavailable:
        if not self._failing:
            self._failing = True
            for watch in self._watches:  # to wait POLL_INTERVAL from now on
                watch.set()
        return self._health.failed(exc)

    def _worked(self) -> None:
        self._failing = False
        self._health.worked()

    async def load(self) -> StoredToken | None:
        try:
            raw = await self._redis.get(self._token_key)
        except Exception as exc:  # not only RedisError: see the module docstring
            raise self._failed(exc) from exc
        self._worked()
        if not isinstance(raw, bytes):  # None; or anything else from a peer that is not Redis
            return None
        return StoredToken.decode(raw)

    async def save(self, token: StoredToken) -> None:
        """Store `token` unless a newer one is stored already, and tell the others.

        Newer wins: a holder whose lease ran out mid-fetch must not put back an older token
        over the one its successor stored. One script, so the check, the write and the message
        are a single step.
        """
        # With what is left of its life, so Redis never hands out a dead token.
        left_ms = int((token.expires_at - time.time()) * 1000)
        if left_ms <= 0:
            return
        try:
            await self._shared.save_if_newer(
                keys=[self._token_key, self._channel],
                args=[token.encode(), repr(token.issued_at), left_ms],
            )
        except Exception as exc:
            raise self._failed(exc) from exc
        self._worked()

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
        except Exception as exc:
            raise self._failed(exc) from exc
        self._worked()
        if not acquired:
            raise RenewalBusy("another replica is renewing the token and has not finished")
        try:
            yield
        finally:
            # Not ours any more if the lease ran out meanwhile (nothing to release then), or
            # the store failed meanwhile: the lease ends the lock either way.
            with contextlib.suppress(Exception):
                await lock.release()

    async def changes(self) -> AsyncIterator[None]:
        """Yields when a message arrives on the store's channel, and when the process's
        subscription to it is (re)confirmed (a message may have been missed meanwhile).
        While this store's own commands fail but the subscription works (a timeout, a busy
        pool, a new password only new connections need), it yields every POLL_INTERVAL too:
        nothing else would tell it the store works again."""
        subscriber = self._shared.subscriber
        watch = subscriber.watch(self._channel)
        self._watches.add(watch)
        try:
            while True:
                poll = POLL_INTERVAL if self._failing and subscriber.connected else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll):
                        await watch.wait()
                watch.clear()
                yield
        finally:
            # However the watcher ends (cancelled, retired, paused): no subscription left.
            self._watches.discard(watch)
            subscriber.unwatch(self._channel, watch)

    async def close(self) -> None:
        """Nothing of its own to close: the client and the subscriber are the process's."""


class FileTokenStore:
    """Worker processes of one proxy on one host: a file for the token, an flock for renewal.

    The lock needs no lease: the kernel releases an flock when its holder dies. Changes are
    noticed by watching the file's modification time, a cheap local stat.
    """

    shared = True
    WATCH_INTERVAL: Final = 0.25

    def __init__(
        self,
        directory: str,
        *,
        name: str,
        lease: float,
        log: structlog.typing.FilteringBoundLogger,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._health = Availability(log, on_error)
        self._token_path = os.path.join(directory, f"{name}.token.json")
        self._lock_path = os.path.join(directory, f"{name}.renewal.lock")
        self._lease = lease

    async def load(self) -> StoredToken | None:
        try:
            # A few dozen bytes from a local file, on the renewal path only: not worth a thread.
            with open(self._token_path, "rb") as file:  # noqa: ASYNC230
                raw = file.read()
        except FileNotFoundError:
            self._health.worked()
            return None
        except OSError as exc:
            raise self._health.failed(exc) from exc
        self._health.worked()
        return StoredToken.decode(raw)

    async def save(self, token: StoredToken) -> None:
        partial = f"{self._token_path}.{os.getpid()}"
        try:
            # Written whole, then renamed into place: a reader sees the old token or the new.
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(token.encode())
            os.replace(partial, self._token_path)
        except OSError as exc:
            raise self._health.failed(exc) from exc
        self._health.worked()

    @contextlib.asynccontextmanager
    async def renewal_lock(self) -> AsyncIterator[None]:
        try:
            descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._health.failed(exc) from exc
        try:
            deadline = asyncio.get_running_loop().time() + self._lease + 5
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise RenewalBusy(
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
            except OSError as exc:
                self._health.failed(exc)
                stamp = None
            if stamp != seen or quiet >= POLL_INTERVAL:
                seen, quiet = stamp, 0.0
                yield
            await asyncio.sleep(self.WATCH_INTERVAL)
            quiet += self.WATCH_INTERVAL

    async def close(self) -> None:
        pass
