"""STAND-IN for the reload-config branch's module (same signatures); deleted at its merge.

Only what the server side needs to run: app_key files read again, the settings a reload does
not apply, and a poller of the secret files.
"""

from __future__ import annotations

import dataclasses
import os

from proxy.config.routes import CredentialSettings
from proxy.config.settings import ConfigError, Settings
from proxy.config.tenants import TenantSettings

_APPLIED = (
    "appid",
    "app_key",
    "app_key_file",
    "base_url",
    "credentials",
    "tenants",
    "client_keys",
    "client_key_tenants",
    "token_store_password",
)


def _read(path: str, problems: list[str]) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            value = file.read().strip()
    except OSError as exc:
        problems.append(f"{path}: cannot be read ({exc.strerror})")
        return ""
    if not value:
        problems.append(f"{path}: is empty")
    return value


def _set(config: CredentialSettings, problems: list[str]) -> CredentialSettings:
    if config.secret_file is None:
        return config
    return dataclasses.replace(config, secret=_read(config.secret_file, problems))


def _tenant(config: TenantSettings, problems: list[str]) -> TenantSettings:
    app_key = config.app_key
    if config.app_key_file is not None:
        app_key = _read(config.app_key_file, problems)
    return dataclasses.replace(
        config,
        app_key=app_key,
        credentials=tuple(_set(each, problems) for each in config.credentials),
    )


def reread_secrets(settings: Settings) -> Settings:
    problems: list[str] = []
    app_key = settings.app_key
    if settings.app_key_file is not None:
        app_key = _read(settings.app_key_file, problems)
    new = dataclasses.replace(
        settings,
        app_key=app_key,
        credentials=tuple(_set(each, problems) for each in settings.credentials),
        tenants=tuple(_tenant(each, problems) for each in settings.tenants),
    )
    if problems:
        raise ConfigError(problems)
    return new


def restart_needed(old: Settings, new: Settings) -> list[str]:
    return [
        field.name
        for field in dataclasses.fields(Settings)
        if field.name not in _APPLIED and getattr(old, field.name) != getattr(new, field.name)
    ]


def applied(old: Settings, new: Settings) -> Settings:
    return dataclasses.replace(old, **{name: getattr(new, name) for name in _APPLIED})


def watched_files(settings: Settings) -> tuple[str, ...]:
    return tuple(
        dict.fromkeys(
            config.secret_file
            for tenant in settings.all_tenants
            for config in tenant.credential_sets
            if config.secret_file is not None
        )
    )


class FileWatch:
    def __init__(self, paths: tuple[str, ...]) -> None:
        self._paths = paths
        self._seen = self._look()

    def _look(self) -> tuple[object, ...]:
        seen: list[object] = []
        for path in self._paths:
            try:
                info = os.stat(path)
                seen.append((os.path.realpath(path), info.st_ino, info.st_mtime_ns, info.st_size))
            except OSError:
                seen.append(None)
        return tuple(seen)

    def changed(self) -> bool:
        now = self._look()
        changed, self._seen = now != self._seen, now
        return changed
