"""Tenants: many Sobot companies through one proxy, each with its own credentials.

    tenant   one Sobot company: an appid and app_key (its `default` set, kind v5), its main
             upstream, and named credential sets; the route table is shared by all of them

The top-level appid, app_key and region / base URL (and their environment variables) are the
tenant named `default`, with the top-level `[credentials.NAME]` sets. The TOML file adds
named tenants:

    [tenants.NAME]                  appid, app_key or app_key_file, region or base_url
                                    (default: the top-level main upstream)
    [tenants.NAME.credentials.SET]  the keys and rules of a top-level [credentials.SET]; its
                                    upstream / region default: the tenant's main upstream

A route's credential set must be one that some tenant has; a tenant without it is refused
that route when it is asked for (the server's business, not the loader's). A set's name has one
kind in every tenant that has it.

Client keys are bound to tenants: a client keys file's line is `<key> <tenant>`, or `<key>`
alone for `default`; every key given as a value (an environment variable, a TOML list) is
`default`'s. Every mistake is one problem line; a secret is never part of one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from proxy.config import values
from proxy.config.routes import (
    DEFAULT_CREDENTIALS,
    CredentialSettings,
    RouteSettings,
)
from proxy.config.secret_files import is_content
from proxy.config.toml_routes import (
    NAME,
    TABLES,
    AppidRegister,
    Reader,
    credential_sets,
    key_path,
    known_sets,
    parse_routes,
    required,
    secret,
    unknown_keys,
    upstream,
)
from proxy.logs import MIN_SECRET_LENGTH

DEFAULT_TENANT: Final = "default"
ALL_TABLES: Final = TABLES | {"tenants"}
TENANT_KEYS: Final = ("appid", "app_key", "app_key_file", "region", "base_url", "credentials")
# A problem lists the tenants there are if there are no more than this (a line, not a page).
NAMES_LISTED: Final = 10


@dataclass(frozen=True, slots=True)
class TenantSettings:
    """One tenant. `base_url`: its main upstream (the top-level one unless it names its own);
    a set of `credentials` whose `base_url` is None fetches its token there."""

    name: str
    appid: str
    app_key: str = field(repr=False)
    base_url: str
    credentials: tuple[CredentialSettings, ...] = ()  # its named sets, besides `default`
    # The file the app_key was read from (None: given as a value), for a reload to read again.
    # Where the key came from, not what the tenant is: left out of ==.
    app_key_file: str | None = field(default=None, compare=False)

    @property
    def credential_sets(self) -> tuple[CredentialSettings, ...]:
        """Every set of the tenant: `default` (its appid and app_key) first."""
        default = CredentialSettings(
            DEFAULT_CREDENTIALS, "v5", self.appid, self.app_key, secret_file=self.app_key_file
        )
        return (default, *self.credentials)


@dataclass(frozen=True, slots=True)
class Tables:
    """What the TOML file's tables add: the top level's named sets, the named tenants, the
    routes, and every tenant name declared (one with a mistake in it too, so a client key
    bound to it is not a second problem)."""

    credentials: tuple[CredentialSettings, ...] = ()
    tenants: tuple[TenantSettings, ...] = ()
    routes: tuple[RouteSettings, ...] = ()
    tenant_names: tuple[str, ...] = (DEFAULT_TENANT,)


def parse_tables(
    toml_values: Mapping[str, Any],
    *,
    file_label: str,
    read_text: Callable[[Path], str],
    default_appid: str | None,
    default_appid_source: str,
    main_base_url: str | None,
    allow_insecure_upstream: bool,
    problems: list[str],
) -> Tables:
    """The sets, tenants and routes of a TOML file's top-level values, every problem added to
    `problems`. `default_appid` and `main_base_url` are the top level's (None if missing or
    bad, which is a problem of its own); `default_appid_source` names where the appid was given
    (SOBOT_APPID, --appid or the file), for a message about a repeat of it."""
    reader = Reader(file_label, read_text, allow_insecure_upstream, problems)
    appids = AppidRegister(reader, default_appid, default_appid_source)
    credentials, declared = credential_sets(reader, toml_values.get("credentials", {}), appids)
    given_tenants = toml_values.get("tenants", {})
    if not isinstance(given_tenants, dict):
        reader.problem("tenants", "must be tables of tenants ([tenants.NAME])")
        given_tenants = {}
    tenants: list[TenantSettings] = []
    sets_of_tenants: list[str] = []
    for name, table in given_tenants.items():
        tenant, tenant_sets = _tenant(reader, name, table, appids, main_base_url)
        sets_of_tenants += tenant_sets
        if tenant is not None:
            tenants.append(tenant)
    _one_kind_per_name(reader, credentials, tenants)
    # A route may name a set only some tenants have: the others are refused it per request.
    known = known_sets((*declared, *sets_of_tenants))
    routes = parse_routes(reader, toml_values, known)
    names = (DEFAULT_TENANT, *(name for name in given_tenants if _valid_name(name)))
    return Tables(credentials, tuple(tenants), routes, names)


def _one_kind_per_name(
    reader: Reader, top_level: tuple[CredentialSettings, ...], tenants: list[TenantSettings]
) -> None:
    """A set's name means one kind in every tenant: a route naming it answers in that kind's
    shape whichever tenant asks."""
    first: dict[str, tuple[str, str]] = {}  # name -> (kind, where)
    places = [(("credentials",), config) for config in top_level] + [
        (("tenants", tenant.name, "credentials"), config)
        for tenant in tenants
        for config in tenant.credentials
    ]
    for under, config in places:
        where = key_path(*under, config.name)
        kind, first_where = first.setdefault(config.name, (config.kind, where))
        if kind != config.kind:
            reader.problem(
                f"{where}.kind",
                f"{config.kind!r}, but {first_where} is {kind!r}: a credential set's name has "
                "one kind in every tenant",
            )


def _valid_name(name: str) -> bool:
    return bool(NAME.fullmatch(name)) and name.lower() != DEFAULT_TENANT


def _tenant(
    reader: Reader, name: str, table: Any, appids: AppidRegister, main_base_url: str | None
) -> tuple[TenantSettings | None, tuple[str, ...]]:
    """One tenant, or None with its problems reported; and the names of its sets."""
    where = key_path("tenants", name)
    if not NAME.fullmatch(name):
        reader.problem(where, "a tenant's name is letters, digits, _ and - only")
        return None, ()
    # Compared without case: a tenant "Default" beside `default` would only confuse.
    if name.lower() == DEFAULT_TENANT:
        reader.problem(
            where,
            f"the name {name!r} is reserved (the tenant of the top-level appid and app_key): "
            "choose another",
        )
        return None, ()
    if not isinstance(table, dict):
        reader.problem(where, f"must be a table ([{where}] with appid, app_key_file, ...)")
        return None, ()
    unknown_keys(reader, where, table, TENANT_KEYS)
    problems_before = len(reader.problems)
    appid = required(reader, where, table, "appid", values.text)
    given_secret = secret(reader, where, table, missing="set app_key or app_key_file")
    base_url = upstream(reader, where, table, url_key="base_url")
    # Before its sets: a v5 set of the tenant's own appid is the set's mistake.
    appids.add(where, "v5", table.get("appid"), tenant=True)
    sets, declared = credential_sets(
        reader,
        table.get("credentials", {}),
        appids,
        under=("tenants", name),
        default_means="the tenant's own appid and app_key",
    )
    if given_secret is None or len(reader.problems) > problems_before:
        return None, declared
    # Without a main upstream of the top level's there is a problem already: never built.
    main = base_url or main_base_url or ""
    return TenantSettings(name, appid, given_secret.value, main, sets, given_secret.file), declared


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """Client keys and the tenant each is bound to, in the same order."""

    keys: tuple[str, ...] = field(default=(), repr=False)
    tenants: tuple[str, ...] = ()

    @property
    def named_tenants(self) -> tuple[str, ...]:
        """The tenants as Settings.client_key_tenants keeps them: empty when every key is
        `default`'s."""
        return self.tenants if set(self.tenants) - {DEFAULT_TENANT} else ()


def bind_client_keys(
    given: tuple[str, ...],
    *,
    file: str | None,
    label: str,
    tenant_names: tuple[str, ...],
    problems: list[str],
) -> ClientKeys:
    """Client keys given as values (each `default`'s), or the lines of the client keys file
    `file` (named by `label`): `<key> <tenant>`, or `<key>` alone for `default`; blank lines
    and lines starting with # are skipped.

    A problem names the line by its number, never its words: a mistaken line may hold two
    keys, so even the tenant it names is not repeated. A key shorter than MIN_SECRET_LENGTH is
    a problem: the logs' scrubber leaves such short values alone (they would mangle ordinary
    text), so it could show in a line."""
    if file is None:
        short = sum(len(key) < MIN_SECRET_LENGTH for key in given)
        if short:
            problems.append(f"{label}: {_too_short(short, len(given))}")
        return ClientKeys(given, (DEFAULT_TENANT,) * len(given))
    keys: list[str] = []
    tenants: list[str] = []
    first_line: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(given, start=1):
        if not is_content(line):
            continue
        words = line.split()
        where = f"{label}: {file} line {number}"
        if len(words) > 2:
            problems.append(
                f"{where}: {len(words)} words; a line is a key, or a key and a tenant's name"
            )
            continue
        key, tenant = words[0], words[1] if len(words) == 2 else DEFAULT_TENANT
        if len(key) < MIN_SECRET_LENGTH:
            problems.append(f"{where}: {_too_short(1, 1)}")
            continue
        if tenant not in tenant_names:
            known = (
                f"tenants: {', '.join(tenant_names)}"
                if len(tenant_names) <= NAMES_LISTED
                else f"{len(tenant_names)} tenants are configured"
            )
            problems.append(
                f"{where}: names a tenant that is not configured ({known}; names are "
                "case-sensitive)"
            )
            continue
        earlier = first_line.setdefault(key, (number, tenant))
        if earlier[1] != tenant:
            problems.append(f"{where}: the same key as line {earlier[0]}, bound to another tenant")
            continue
        keys.append(key)
        tenants.append(tenant)
    return ClientKeys(tuple(keys), tuple(tenants))


def _too_short(short: int, of: int) -> str:
    keys = (
        "its key is" if of == 1 else "its keys are" if short == of else f"{short} of its keys are"
    )
    return (
        f"{keys} shorter than {MIN_SECRET_LENGTH} characters, too short for the logs to hide; "
        "use long random keys (openssl rand -hex 32)"
    )
