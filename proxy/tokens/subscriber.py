"""One pub/sub connection for every Redis token store of a process.

Each credential set's store publishes on a channel of its own when it saves a token. Rather
than one subscribing connection per store (a thousand tenants, a thousand sockets), the process
subscribes once, on one connection taken from the stores' one client, to the channels of the
stores being watched, and hands each message to that channel's watchers:

    watch(channel) -> Watch     subscribe if nobody watched `channel` yet; the Watch is set
                                when a message arrives on it, and whenever the subscription is
                                (re)confirmed, so nothing published while it was down is missed
    unwatch(channel, watch)     the last watcher gone, the channel is unsubscribed

Only the subscriber's task touches the connection (redis-py's PubSub is not made to be used by
two tasks at once): it applies new (un)subscriptions between reads, which wait at most
FOLLOW_INTERVAL for a message. A reconnect, redis-py's own inside a read or ours after an error,
subscribes to every channel again, and Redis confirms each one: that confirmation tells each
watcher to look, which is how a message lost while disconnected is made up for. A connection
that went silent (a NAT or load balancer that forgot it, a half-open socket) is found by a PING
after HEARTBEAT seconds of silence: no answer within HEARTBEAT_TIMEOUT, and it is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis

# How long a new subscription may wait for the read under way to end: a local wait on the
# socket, no traffic.
FOLLOW_INTERVAL: Final = 0.25
HEARTBEAT: Final = 30.0
HEARTBEAT_TIMEOUT: Final = 5.0
RECONNECT_DELAY: Final = 0.5
MAX_RECONNECT_DELAY: Final = 8.0


class SubscriberSilent(Exception):
    """The subscriber's connection did not answer a PING: it is replaced."""


class Watch(asyncio.Event):
    """Set when its channel has news, or may have had some while the subscription was down."""


class Subscriber:
    def __init__(self, redis: aioredis.Redis, *, on_failure: Callable[[Exception], object]) -> None:
        """`redis`: the client whose pool lends the one connection; `on_failure` hears of every
        error of that connection (it is retried, with a growing delay, until it works)."""
        self._redis = redis
        self._on_failure = on_failure
        self._watches: dict[str, set[Watch]] = {}
        self._confirmed: set[str] = set()  # subscribed on the connection as it is now
        self._followed = asyncio.Event()  # the channels watched changed
        self._task: asyncio.Task[None] | None = None
        self._delay = RECONNECT_DELAY  # before the next reconnect

    @property
    def connected(self) -> bool:
        """Whether a subscription is confirmed on a working connection."""
        return bool(self._confirmed)

    def watch(self, channel: str) -> Watch:
        watch = Watch()
        self._watches.setdefault(channel, set()).add(watch)
        if channel in self._confirmed:
            watch.set()  # already subscribed: look now
        self._followed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="sobot-token-store-subscriber")
        return watch

    def unwatch(self, channel: str, watch: Watch) -> None:
        watches = self._watches.get(channel)
        if watches is None:
            return
        watches.discard(watch)
        if not watches:
            del self._watches[channel]
            self._followed.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await self._follow(pubsub)
            except Exception as exc:  # not only RedisError: see tokens/store.py
                self._confirmed.clear()
                self._on_failure(exc)
                await asyncio.sleep(self._delay)
                self._delay = min(self._delay * 2, MAX_RECONNECT_DELAY)
            finally:
                # Gives the connection back (closed): a new one subscribes afresh.
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _follow(self, pubsub: aioredis.client.PubSub) -> None:
        """Subscribed to the channels watched, hand out their messages, until an error."""
        requested: set[str] = set()
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        pinged = False
        while True:
            self._followed.clear()
            wanted = set(self._watches)
            if wanted - requested:
                await pubsub.subscribe(*(wanted - requested))
            if requested - wanted:
                await pubsub.unsubscribe(*(requested - wanted))
                self._confirmed -= requested - wanted
            requested = wanted
            if not requested:
                await self._followed.wait()  # nothing to listen to
                last_heard = loop.time()
                continue
            message = await pubsub.get_message(timeout=FOLLOW_INTERVAL)
            if message is not None:
                last_heard, pinged = loop.time(), False
                self._handle(message)
            elif pinged and loop.time() - last_heard > HEARTBEAT + HEARTBEAT_TIMEOUT:
                raise SubscriberSilent("no answer to a PING")
            elif not pinged and loop.time() - last_heard > HEARTBEAT:
                await pubsub.ping()  # answered as a message, "pong"
                pinged = True

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind not in ("message", "subscribe", "unsubscribe"):
            return  # a pong
        raw = message["channel"]
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        if kind == "unsubscribe":
            self._confirmed.discard(channel)
            return
        if kind == "subscribe":
            self._confirmed.add(channel)
            self._delay = RECONNECT_DELAY  # a connection that works
        for watch in self._watches.get(channel, ()):
            watch.set()
