"""Reloading a running proxy: new secrets, tenants and client keys, without a restart.

Two triggers (`Reloader.start`):
    SIGHUP          the whole configuration loaded again as at start-up (flags, environment,
                    TOML file, secret files); what a reload does not apply (the listen address,
                    routes, store, ...) is named in one `reload_needs_restart` warning
    a secret file   every WATCH_INTERVAL s the secret files (config/reload.py: watched_files)
                    are looked at; on a change their secrets are read again, the TOML file is not

Applying (`apply`), synchronously on the event loop, so a request sees the old or the new:
    tenants         server/tenants.py, set by set: a credential set whose kind, appid and
                    token upstream are unchanged keeps its token manager and token (a new
                    secret signs the next token call); one changed otherwise, or added, gets a
                    new manager (`default`'s fetches at once, a named tenant's on its next use);
                    a tenant removed: its requests now get 404
    client keys     one swap of the key table (server/access.py)
    Redis password  new connections authenticate with it (tokens/store.py: StorePassword)
    secrets         every new one registered with the logs, for good (the old ones stay too)
A retired set's manager renews no more, and serves the requests that still hold it: their
held token, and a replay's token from its successor (the set that now has its kind and appid:
a fetch of its own would rotate the successor's token), or a fetch without one. Its store is
closed once every request that was in flight when it was retired has finished, or at shutdown.

A reload that fails (a configuration problem, or anything else) changes nothing: one
`reload_failed` line per problem, and the proxy serves on. One that succeeds logs `reloaded` with
the names of what changed, never a secret, or `reload_unchanged` when nothing did. Reloads run
one at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import unquote, urlsplit

import structlog

from proxy.config.reload import FileWatch, applied, reread_secrets, restart_needed, watched_files
from proxy.config.settings import ConfigError, Settings
from proxy.logs import Secrets
from proxy.server import hangups
from proxy.server.access import AccessPolicy
from proxy.server.credentials import CredentialSet
from proxy.server.metrics import Metrics
from proxy.server.tenants import Reconfigured, Tenants
from proxy.tokens.store import StorePassword

WATCH_INTERVAL: Final = 2.0


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Every secret `settings` hold: app keys and V6 secrets, client keys, the Redis password
    (one in the store's URL both as written and percent-decoded, as redis-py sends it)."""
    in_url = urlsplit(settings.token_store).password or ""
    return (
        *(config.secret for tenant in settings.all_tenants for config in tenant.credential_sets),
        *settings.client_keys,
        in_url,
        unquote(in_url),
        settings.token_store_password or "",
    )


class Reloader:
    def __init__(
        self,
        settings: Settings,
        *,
        tenants: Tenants,
        access: AccessPolicy,
        store_password: StorePassword | None,
        secrets: Secrets,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
        settled: Callable[[], Awaitable[None]],
    ) -> None:
        """`settled`: returns once the requests in flight when it was called have finished."""
        self.settings = settings  # as running now
        self._tenants = tenants
        self._access = access
        self._store_password = store_password
        self._secrets = secrets
        self._metrics = metrics
        self._log = log
        self._settled = settled
        self._lock = asyncio.Lock()  # one reload at a time
        self._retired: list[CredentialSet] = []  # their stores not closed yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._files = FileWatch(watched_files(settings))
        self._signal_installed = False

    # -- triggers --------------------------------------------------------------------------

    def start(self, load: Callable[[], Settings], *, interval: float = WATCH_INTERVAL) -> None:
        """Reload on SIGHUP with `load` (the configuration as start-up loaded it), and whenever
        a secret file changes."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: self._hangup(load))
        self._signal_installed = True
        if hangups.take_noted():  # one came while starting: what was read may be the old
            self._hangup(load)
        self._spawn(self._watch_files(interval))

    def _hangup(self, load: Callable[[], Settings]) -> None:
        # With --workers, each worker's own line (the supervisor passes SIGHUP on to each).
        self._log.info("reload_requested", pid=os.getpid())
        self._spawn(self.reload(load))

    async def _watch_files(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                # A few stat() calls: cheap enough for the event loop.
                if self._files.changed():
                    await self.reread()
            except Exception:
                # Whatever it was, the files are watched on: a silent end would leave every
                # later change unnoticed.
                self._log.exception("reload_failed", cause="files", problem="internal error")

    def _spawn(self, work: Awaitable[object]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """At shutdown: no more reloads; the retired sets' managers stopped, stores closed."""
        if self._signal_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            # That restored the default action, which ends the process: a SIGHUP while the
            # rest shuts down must not cut its cleanup short.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self._signal_installed = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        retired, self._retired = self._retired, []
        await _close(retired)

    # -- reloading -------------------------------------------------------------------------

    async def reload(self, load: Callable[[], Settings]) -> bool:
        """SIGHUP: the whole configuration again; whether it was applied."""
        async with self._lock:
            try:
                loaded = load()
                restart = restart_needed(self.settings, loaded)
                new = applied(self.settings, loaded)
            except ConfigError as exc:
                self._failed("signal", exc.problems)
                return False
            except Exception:
                self._log.exception("reload_failed", cause="signal", problem="internal error")
                return False
            return self.apply(new, cause="signal", restart=restart)

    async def reread(self) -> bool:
        """A secret file changed: every secret file read again (not the TOML file)."""
        async with self._lock:
            try:
                new = reread_secrets(self.settings)
            except ConfigError as exc:
                self._failed("files", exc.problems)
                return False
            except Exception:
                self._log.exception("reload_failed", cause="files", problem="internal error")
                return False
            return self.apply(new, cause="files", restart=[])

    def _failed(self, cause: str, problems: list[str]) -> None:
        for problem in problems:
            self._log.error("reload_failed", cause=cause, problem=problem)

    def apply(self, new: Settings, *, cause: str, restart: list[str]) -> bool:
        """Serve `new` (the running settings with what a reload applies changed) from now on;
        whether it was applied (an error changes nothing, and is logged)."""
        old = self.settings
        new, kept = self._applicable(old, new)
        restart = [*restart, *kept]
        if restart:
            self._log.warning(
                "reload_needs_restart",
                settings=restart,
                detail="these differ from the running configuration and are not applied: "
                "restart the proxy for them",
            )
        self._secrets.add_lasting(secrets_of(new))  # at once: the scrubber is rebuilt once
        try:
            changes = self._tenants.reconfigure(new.all_tenants)
        except Exception:
            self._log.exception("reload_failed", cause=cause, problem="internal error")
            return False
        keys_changed = old.client_key_bindings != new.client_key_bindings
        if keys_changed:
            self._access.use(new.client_key_bindings)
        password_changed = old.token_store_password != new.token_store_password
        if password_changed and self._store_password is not None:
            assert new.token_store_password is not None  # else kept as it was
            self._store_password.use(new.token_store_password)
        self.settings = new
        self._files.watch(watched_files(new))
        self._retire(old, new, changes)
        if not (changes.changed or keys_changed or password_changed):
            # A file rewritten with the same content (an extra newline), a SIGHUP after no edit.
            self._log.info("reload_unchanged", cause=cause)
            return True
        self._log.info(
            "reloaded",
            cause=cause,
            tenants_added=list(changes.added),
            tenants_removed=list(changes.removed),
            sets_added=list(changes.sets_added),
            sets_removed=list(changes.sets_removed),
            sets_rebuilt=list(changes.sets_rebuilt),
            keys_changed=list(changes.rekeyed),
            upstreams_changed=list(changes.upstreams_changed),
            client_keys_changed=keys_changed,
            store_password_changed=password_changed,
        )
        return True

    def _applicable(self, old: Settings, new: Settings) -> tuple[Settings, list[str]]:
        """`new` less what cannot change while running (kept as it is), and its name. (Client
        keys turned on or off are kept by `applied`, and named by `restart_needed`.)"""
        if old.token_store_password != new.token_store_password and (
            self._store_password is None or new.token_store_password is None
        ):
            # Only a password kept apart from the URL, there before and after, is swapped.
            new = dataclasses.replace(new, token_store_password=old.token_store_password)
            return new, ["token_store_password"]
        return new, []

    def _retire(self, old: Settings, new: Settings, changes: Reconfigured) -> None:
        """Retire the sets `changes` replaced or removed (a replay on one is handed to its
        successor), and drop the metrics' series of the sets and tenants now gone."""
        for retired in changes.retired:
            retired.managed.tokens.retire(retired.successor)
            self._metrics.unwatch_token(
                retired.tenant, retired.managed.name, retired.managed.tokens.expires_in
            )
        after = {tenant.name: tenant for tenant in new.all_tenants}
        for tenant in old.all_tenants:
            sets = {config.name for config in tenant.credential_sets}
            now = after.get(tenant.name)
            if now is not None:
                sets -= {config.name for config in now.credential_sets}
            if sets or now is None:
                self._metrics.forget(tenant.name, tuple(sorted(sets)), requests=now is None)
        retired_sets = [retired.managed for retired in changes.retired]
        if retired_sets:
            self._retired += retired_sets
            self._spawn(self._close_when_settled(retired_sets))

    async def _close_when_settled(self, retired: list[CredentialSet]) -> None:
        await self._settled()
        closing = {id(each) for each in retired}
        self._retired = [each for each in self._retired if id(each) not in closing]
        await _close(retired)


async def _close(retired: list[CredentialSet]) -> None:
    for managed in retired:
        await managed.tokens.stop()
        await managed.store.close()
