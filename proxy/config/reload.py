"""Reloading: the secrets read again from their files, what a new configuration changes, and
which files to watch.

    reread_secrets   the same Settings with every secret that came from a file read again
    restart_needed   the settings that differ and that a reload does not apply
    applied          the old Settings with everything a reload applies taken from the new,
                     refused if the routes it keeps name a set no tenant has any more
    watched_files    the secret files whose change starts a reload
    FileWatch        tells which of them changed since it last looked

A reload applies the tenants (added, removed, changed: appid, secrets, kind, upstream, the
authorization scheme, sets added and removed), the client keys and their tenants, and the Redis
password. The top-level appid, app_key and region / base URL are the tenant `default`, so they
are applied too: `Settings.base_url` is the default tenant's main upstream, and besides that
tenant (and the named tenants that have no upstream of their own, which the loader gave it) it
is read only for log lines (`listening`, the start-up summary) and by `check`, which reads the
file afresh. Everything else is fixed at start-up (sockets, routes, pools, the store, limits)
and needs a restart. One exception among the client keys: turning them on or off changes how
every request is authenticated (whether `Authorization` is taken, what `X-Sobot-Tenant` may
do), so going from no client keys to some, or back, needs a restart (named `client_keys`).

The server calls these (proxy/server); this module only reads files and compares values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final, NamedTuple

from proxy.config.routes import NO_CREDENTIALS, CredentialSettings
from proxy.config.secret_files import ReadText, read_secret, read_secret_lines, read_text
from proxy.config.settings import ConfigError, Settings, short_password
from proxy.config.tenants import ClientKeys, bind_client_keys
from proxy.config.toml_routes import key_path, known_sets, unknown_set
from proxy.config.values import in_clear

# The Settings fields a reload takes from the new configuration; every other field that
# differs is named by restart_needed. The *_file fields say where a secret came from.
APPLIED: Final = frozenset(
    {
        "appid",
        "app_key",
        "app_key_file",
        "base_url",
        "credentials",
        "tenants",
        "client_keys",
        "client_key_tenants",
        "client_keys_file",
        "token_store_password",
        "token_store_password_file",
    }
)
_CLIENT_KEY_FIELDS: Final = ("client_keys", "client_key_tenants", "client_keys_file")


def reread_secrets(settings: Settings, *, read: ReadText = read_text) -> Settings:
    """`settings` with every secret that came from a file read again from that file: each
    credential set's app_key_file (of every tenant, `default` too), the client keys file (the
    keys and the tenant each is bound to) and the Redis password file. Secrets given as values
    stay as they are.

    Raises ConfigError, one line per problem naming the setting and the file (never what is
    in it), when a file cannot be read or what it holds is not valid; nothing is half-read."""
    problems: list[str] = []

    def reread(setting: str, file: str | None, current: str) -> str:
        if file is None:
            return current
        try:
            return read_secret(Path(file), file, read)
        except ValueError as exc:
            problems.append(f"{setting}: {exc}")
            return current

    def reread_sets(
        under: tuple[str, ...], configs: tuple[CredentialSettings, ...]
    ) -> tuple[CredentialSettings, ...]:
        return tuple(
            dataclasses.replace(
                config,
                secret=reread(
                    f"{key_path(*under, 'credentials', config.name)}.app_key_file",
                    config.secret_file,
                    config.secret,
                ),
            )
            for config in configs
        )

    app_key = reread("app_key_file", settings.app_key_file, settings.app_key)
    credentials = reread_sets((), settings.credentials)
    tenants = tuple(
        dataclasses.replace(
            tenant,
            app_key=reread(
                f"{key_path('tenants', tenant.name)}.app_key_file",
                tenant.app_key_file,
                tenant.app_key,
            ),
            credentials=reread_sets(("tenants", tenant.name), tenant.credentials),
        )
        for tenant in settings.tenants
    )
    password = settings.token_store_password
    if settings.token_store_password_file is not None:
        password = reread(
            "token_store_password_file", settings.token_store_password_file, password or ""
        )
        short = short_password("token_store_password_file", password)
        if short is not None:
            problems.append(short)
    client_keys = ClientKeys(settings.client_keys, settings.client_key_tenants)
    if settings.client_keys_file is not None:
        client_keys = _reread_client_keys(settings, settings.client_keys_file, read, problems)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(
        settings,
        app_key=app_key,
        credentials=credentials,
        tenants=tenants,
        token_store_password=password,
        client_keys=client_keys.keys,
        client_key_tenants=client_keys.named_tenants,
    )


def _reread_client_keys(
    settings: Settings, file: str, read: ReadText, problems: list[str]
) -> ClientKeys:
    """The client keys `file` read again, each key with its tenant; a problem is added to
    `problems` (and what comes back is then not used)."""
    try:
        lines = read_secret_lines(Path(file), file, read)
    except ValueError as exc:
        problems.append(f"client_keys_file: {exc}")
        return ClientKeys()
    return bind_client_keys(
        lines,
        file=file,
        label="client_keys_file",
        tenant_names=tuple(tenant.name for tenant in settings.all_tenants),
        problems=problems,
    )


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The names (as in the README and the TOML file: `port`, `routes`, `token_store`, ...)
    of the settings that differ between `old` and `new` and that a reload does not apply, in
    the order Settings declares them, `client_keys` (turned on or off) last. Empty: `new`
    can be applied whole."""
    names = [
        field.name
        for field in dataclasses.fields(Settings)
        if field.name not in APPLIED and getattr(old, field.name) != getattr(new, field.name)
    ]
    if _client_keys_switched(old, new):
        names.append("client_keys")
    return names


def applied(old: Settings, new: Settings) -> Settings:
    """`old` with everything a reload applies taken from `new`: equal to `new` when
    restart_needed(old, new) is empty. Client keys turned on or off keep the old ones.

    Raises ConfigError when what would run does not hold together as start-up requires: the
    routes (kept) name a credential set that no tenant (new) has any more, or an upstream is
    plain http off this host while the running allow_insecure_upstream (kept) is off."""
    taken = {name: getattr(new, name) for name in APPLIED}
    if _client_keys_switched(old, new):
        for name in _CLIENT_KEY_FIELDS:
            del taken[name]
    running = dataclasses.replace(old, **taken)
    problems = _kept_routes_problems(running) + _insecure_upstreams(running)
    if problems:
        raise ConfigError(problems)
    return running


def _kept_routes_problems(settings: Settings) -> list[str]:
    """The routes (kept as they run) that name a set none of the tenants has, checked as the
    loader checks the file's routes (toml_routes.unknown_set)."""
    known = known_sets(
        config.name for tenant in settings.all_tenants for config in tenant.credentials
    )
    problems = []
    for route in settings.routes:
        given = NO_CREDENTIALS if route.credentials is None else route.credentials
        problem = unknown_set(given, known)
        if problem is not None:
            problems.append(
                f"routes (prefix {route.prefix!r}).credentials: {problem}; the routes stay as "
                "they are until a restart, so their sets must stay too"
            )
    return problems


def _insecure_upstreams(settings: Settings) -> list[str]:
    """The tenants' and sets' plain-http upstreams off this host, when the running process does
    not allow them: allow_insecure_upstream needs a restart, so a reload that turns it on must
    not bring in what only it would admit."""
    if settings.allow_insecure_upstream:
        return []
    problems = []
    for tenant in settings.all_tenants:
        for config in tenant.credential_sets:
            url = config.base_url or tenant.base_url
            if in_clear(url):
                problems.append(
                    f"{tenant.name}/{config.name}: the upstream {url} is plain http and not on "
                    "this host, and allow_insecure_upstream is off in the running proxy (it "
                    "changes only at a restart)"
                )
    return problems


def _client_keys_switched(old: Settings, new: Settings) -> bool:
    return bool(old.client_keys) != bool(new.client_keys)


def watched_files(settings: Settings) -> tuple[str, ...]:
    """Every secret file, as configured (a symlink is watched as the path it is), each once,
    in a stable order: the tenants' sets (`default` first), the client keys file, the Redis
    password file."""
    files = (
        *(
            config.secret_file
            for tenant in settings.all_tenants
            for config in tenant.credential_sets
        ),
        settings.client_keys_file,
        settings.token_store_password_file,
    )
    return tuple(dict.fromkeys(file for file in files if file is not None))


# A file whose mtime is this recent may be written again within the same timestamp tick (coarse
# kernel clocks, 1 s or 2 s on some filesystems) without its signature changing: its content is
# read again at the next look rather than trusted (as git treats a "racily clean" file).
RACY_NS: Final = 2_000_000_000


class _Look(NamedTuple):
    """What a look at one file saw; all None when it could not be read."""

    signature: tuple[int, int, int, int, int] | None
    digest: bytes | None
    racy: bool  # its signature alone cannot be trusted next time


_UNREADABLE: Final = _Look(None, None, False)


class FileWatch:
    """Tells which of some files changed content since it last looked: rewritten in place,
    replaced by a rename, or reached through a symlink that now points elsewhere (Kubernetes
    mounts a Secret's key as `key -> ..data/key`, `..data -> ..2026_12_07_...`, and updates
    it by re-pointing `..data` to a new directory). A file that can no longer be read is a
    change too (the reload that follows fails with one clear line); one touched without a
    change of content is not.

    Each look is a stat of the file as reached through its symlinks (device, inode, size,
    mtime, ctime); only when that differs is the file read and its digest compared. It is
    synchronous and cheap: made to be called every few seconds.

    Hand-written, not an inotify-based library (watchfiles, watchdog): a watch on the file
    follows the symlink to the old directory and does not see `..data` re-pointed unless the
    mount's directory is watched and its events filtered by name, which is the well-known way
    such watchers miss Kubernetes updates; inotify does not see changes made on another host
    of a network filesystem either; and they bring a thread and a dependency. A stat per file
    every few seconds works on every filesystem and is a few lines.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        self._seen: dict[str, _Look] = {}
        self.watch(paths)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self._seen)

    def watch(self, paths: Iterable[str]) -> None:
        """Watch `paths` from now on: those watched already keep what was seen of them (a
        change not yet reported stays to be reported), the others are looked at now."""
        self._seen = {path: self._seen.get(path) or _look(path) for path in paths}

    def changed(self) -> tuple[str, ...]:
        """The paths whose content changed (or that became unreadable) since the last call,
        each reported once per change."""
        changed = []
        for path, seen in self._seen.items():
            signature = _signature(path)
            if signature is not None and signature == seen.signature and not seen.racy:
                continue
            now = _look(path, signature)
            self._seen[path] = now
            if now.digest != seen.digest:
                changed.append(path)
        return tuple(changed)


def _signature(path: str) -> tuple[int, int, int, int, int] | None:
    try:
        stat = os.stat(path)  # through the symlinks, to the file itself
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _look(path: str, signature: tuple[int, int, int, int, int] | None = None) -> _Look:
    signature = signature or _signature(path)
    if signature is None:
        return _UNREADABLE
    try:
        with open(path, "rb") as file:
            digest = hashlib.sha256(file.read()).digest()
    except OSError:
        return _UNREADABLE
    return _Look(signature, digest, racy=time.time_ns() - signature[3] < RACY_NS)
