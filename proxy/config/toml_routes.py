"""The TOML file's `[credentials.NAME]` sets and `[[routes]]`, parsed and checked.

    [credentials.NAME]   kind ("v5" or "v6"), appid, app_key or app_key_file (for v6 the
                         app_secret), upstream or region (default: the main upstream),
                         authorization_scheme (v6 only; default "Bearer", "" for the bare token)
    [[routes]]           prefix, upstream or region (default: the main upstream), credentials
                         (a set's name, "default" or "none"; default "default")

Every mistake is one problem line naming the file and the key's path in it, such as
`sobot-proxy.toml: credentials.callcenter.kind: ...` or `sobot-proxy.toml: routes[2].prefix: ...`
(routes are counted from 1, as they appear in the file). A secret is never part of a message.

These are the building blocks; tenants.py reads the tables with them, a tenant's sets too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

from proxy.config import values
from proxy.config.routes import (
    DEFAULT_AUTHORIZATION_SCHEME,
    DEFAULT_CREDENTIALS,
    NO_CREDENTIALS,
    CredentialSettings,
    RouteSettings,
)
from proxy.config.secret_files import read_secret
from proxy.sobot.kinds import KINDS

TABLES: Final = frozenset({"credentials", "routes"})
CREDENTIAL_KEYS: Final = (
    "kind",
    "appid",
    "app_key",
    "app_key_file",
    "upstream",
    "region",
    "authorization_scheme",
)
ROUTE_KEYS: Final = ("prefix", "upstream", "region", "credentials")
NAME: Final = re.compile(r"[A-Za-z0-9_-]+")
# Compared without case: a set named "None" beside the route value "none" would only confuse.
_RESERVED: Final = {
    DEFAULT_CREDENTIALS: "the set of SOBOT_APPID and SOBOT_APP_KEY",
    NO_CREDENTIALS: "a route that injects no credential",
}
# RFC 9110 section 11.1: an auth-scheme is a token.
_SCHEME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PLAIN_HTTP_REFUSED: Final = (
    "is plain http and not on this host: the token would cross the network in clear; use "
    "https, or set SOBOT_ALLOW_INSECURE_UPSTREAM=1 (--allow-insecure-upstream)"
)


@dataclass(frozen=True, slots=True)
class Reader:
    """What parsing needs besides the tables: how to name a key, read a file, and report."""

    file_label: str  # the TOML file as it was named
    read_text: Callable[[Path], str]
    allow_insecure_upstream: bool
    problems: list[str]

    def problem(self, key_path: str, message: str) -> None:
        self.problems.append(f"{self.file_label}: {key_path}: {message}")

    def parsed(self, key_path: str, parse: Callable[[Any], Any], value: Any) -> Any:
        """`parse(value)`, or None with the problem reported."""
        try:
            return parse(value)
        except ValueError as exc:
            self.problem(key_path, str(exc))
            return None


def credential_sets(
    reader: Reader,
    given_sets: Any,
    appids: AppidRegister,
    *,
    under: tuple[str, ...] = (),
    default_means: str = "the set of SOBOT_APPID and SOBOT_APP_KEY",
) -> tuple[tuple[CredentialSettings, ...], tuple[str, ...]]:
    """The `[credentials.NAME]` sets under the key path `under` (a tenant's, or the top
    level's), and the names declared there: a set with a mistake in it is still declared, so
    a route naming it is not a second problem."""
    where = key_path(*under, "credentials")
    if not isinstance(given_sets, dict):
        reader.problem(where, f"must be tables of credential sets ([{where}.NAME])")
        return (), ()
    credentials = tuple(
        credential
        for name, table in given_sets.items()
        if (credential := credential_set(reader, name, table, under, default_means)) is not None
    )
    for name, table in given_sets.items():
        if isinstance(table, dict):
            appids.add(key_path(*under, "credentials", name), table.get("kind"), table.get("appid"))
    return credentials, tuple(name for name in given_sets if _valid_name(name))


def known_sets(names: Iterable[str]) -> tuple[str, ...]:
    """What a route's `credentials` may name when the tenants' sets are called `names`: one of
    them, `default` or `none`."""
    return (DEFAULT_CREDENTIALS, NO_CREDENTIALS, *dict.fromkeys(names))


def unknown_set(given: object, known: tuple[str, ...]) -> str | None:
    """Why a route's `credentials` value `given` names none of the `known` sets (None: it
    names one). At start-up and for the routes a reload keeps (config/reload.py)."""
    if isinstance(given, str) and given in known:
        return None
    return f"{given!r} is not a credential set (known: {', '.join(known)})"


def parse_routes(
    reader: Reader, toml_values: Mapping[str, Any], known: tuple[str, ...]
) -> tuple[RouteSettings, ...]:
    """The `[[routes]]`, each naming one of the `known` credential sets."""
    given_routes = toml_values.get("routes", [])
    if not isinstance(given_routes, list):
        reader.problem("routes", "must be an array of tables ([[routes]])")
        given_routes = []
    routes: list[RouteSettings] = []
    # On the prefixes as given, so a route with another mistake is compared too.
    first_with_prefix: dict[str, str] = {}
    for number, table in enumerate(given_routes, start=1):
        prefix = table.get("prefix") if isinstance(table, dict) else None
        if not isinstance(prefix, str):
            continue
        if prefix.strip() in first_with_prefix:
            reader.problem(
                f"routes[{number}].prefix",
                f"{prefix.strip()!r} is also the prefix of {first_with_prefix[prefix.strip()]}",
            )
        else:
            first_with_prefix[prefix.strip()] = f"routes[{number}]"
    for number, table in enumerate(given_routes, start=1):
        route = _route(reader, f"routes[{number}]", table, known)
        if route is not None and first_with_prefix.get(route.prefix) == f"routes[{number}]":
            routes.append(route)
    return tuple(routes)


def key_path(*parts: str) -> str:
    """A dotted key path, with a part quoted as TOML would need it ("a b")."""
    return ".".join(part if NAME.fullmatch(part) else json.dumps(part) for part in parts)


def unknown_keys(
    reader: Reader, where: str, table: Mapping[str, Any], known: tuple[str, ...]
) -> None:
    for key in table:
        if key not in known:
            reader.problem(f"{where}.{key_path(key)}", f"unknown key (known: {', '.join(known)})")


def _valid_name(name: str) -> bool:
    return bool(NAME.fullmatch(name)) and name.lower() not in _RESERVED


def credential_set(
    reader: Reader,
    name: str,
    table: Any,
    under: tuple[str, ...] = (),
    default_means: str = "the set of SOBOT_APPID and SOBOT_APP_KEY",
) -> CredentialSettings | None:
    """One `[credentials.NAME]` set under the key path `under`; `default_means` says what the
    reserved name `default` already stands for there."""
    where = key_path(*under, "credentials", name)
    if not NAME.fullmatch(name):
        reader.problem(where, "a credential set's name is letters, digits, _ and - only")
        return None
    if name.lower() in _RESERVED:
        means = default_means if name.lower() == DEFAULT_CREDENTIALS else _RESERVED[name.lower()]
        reader.problem(where, f"the name {name!r} is reserved ({means}): choose another")
        return None
    if not isinstance(table, dict):
        reader.problem(where, f"must be a table ([{where}] with kind, appid, ...)")
        return None
    unknown_keys(reader, where, table, CREDENTIAL_KEYS)
    problems_before = len(reader.problems)
    kind = required(reader, where, table, "kind", values.choice(tuple(KINDS)))
    appid = required(reader, where, table, "appid", values.text)
    given_secret = secret(reader, where, table)
    base_url = upstream(reader, where, table)
    scheme = DEFAULT_AUTHORIZATION_SCHEME
    if "authorization_scheme" in table:
        scheme = reader.parsed(
            f"{where}.authorization_scheme", _authorization_scheme, table["authorization_scheme"]
        )
        if kind is not None and kind != "v6":
            reader.problem(
                f"{where}.authorization_scheme",
                "only a v6 set takes it (a v5 token goes in the `token` header)",
            )
    if given_secret is None or len(reader.problems) > problems_before:
        return None
    return CredentialSettings(
        name, kind, appid, given_secret.value, base_url, scheme, secret_file=given_secret.file
    )


def _route(
    reader: Reader, where: str, table: Any, known_credentials: tuple[str, ...]
) -> RouteSettings | None:
    if not isinstance(table, dict):
        reader.problem(where, "must be a table ([[routes]] with a prefix)")
        return None
    unknown_keys(reader, where, table, ROUTE_KEYS)
    problems_before = len(reader.problems)
    prefix = required(reader, where, table, "prefix", values.path_prefix)
    base_url = upstream(reader, where, table)
    credentials: str | None = DEFAULT_CREDENTIALS
    if "credentials" in table:
        given = table["credentials"]
        problem = unknown_set(given, known_credentials)
        if problem is not None:
            reader.problem(f"{where}.credentials", problem)
        credentials = None if given == NO_CREDENTIALS else given
    if len(reader.problems) > problems_before:
        return None
    return RouteSettings(prefix, base_url, credentials)


def required(
    reader: Reader, where: str, table: Mapping[str, Any], key: str, parse: Callable[[Any], Any]
) -> Any:
    if key not in table:
        reader.problem(f"{where}.{key}", "is required")
        return None
    return reader.parsed(f"{where}.{key}", parse, table[key])


def upstream(
    reader: Reader, where: str, table: Mapping[str, Any], url_key: str = "upstream"
) -> str | None:
    """The base URL of `region` or `url_key` (`upstream`; a tenant's is `base_url`); None for
    the main upstream (or a problem)."""
    if url_key in table and "region" in table:
        reader.problem(where, f"set only one of {url_key} and region")
        return None
    if "region" in table:
        region = reader.parsed(f"{where}.region", values.region, table["region"])
        return None if region is None else values.REGIONS[region]
    if url_key not in table:
        return None
    url: str | None = reader.parsed(f"{where}.{url_key}", values.base_url, table[url_key])
    if url is not None and values.in_clear(url) and not reader.allow_insecure_upstream:
        reader.problem(f"{where}.{url_key}", f"{url} {_PLAIN_HTTP_REFUSED}")
    return url


class Secret(NamedTuple):
    """A secret, and the file it was read from (None: given as a value), for a reload."""

    value: str
    file: str | None


def secret(
    reader: Reader,
    where: str,
    table: Mapping[str, Any],
    missing: str = "set app_key or app_key_file (for v6: the app_secret)",
) -> Secret | None:
    """The secret of `app_key`, or read from `app_key_file` (beside the TOML file when
    relative), stripped. Never part of a message: only the key and the file's name are."""
    if "app_key" in table and "app_key_file" in table:
        reader.problem(where, "set only one of app_key and app_key_file")
        return None
    if "app_key" in table:
        value: str | None = reader.parsed(f"{where}.app_key", values.text, table["app_key"])
        return None if value is None else Secret(value, None)
    if "app_key_file" not in table:
        reader.problem(where, missing)
        return None
    file_name = reader.parsed(f"{where}.app_key_file", values.text, table["app_key_file"])
    if file_name is None:
        return None
    # A relative file named in a TOML file is found beside that file.
    path = Path(reader.file_label).parent / file_name
    try:
        return Secret(read_secret(path, file_name, reader.read_text), str(path))
    except ValueError as exc:
        reader.problem(f"{where}.app_key_file", str(exc))
        return None


def _authorization_scheme(value: Any) -> str:
    if not isinstance(value, str) or (value and not _SCHEME.fullmatch(value)):
        raise ValueError(
            f'{value!r} is not an authorization scheme (a word such as Bearer, or "" to send '
            "the bare token)"
        )
    return value


class AppidRegister:
    """Every (kind, appid) seen, to refuse a repeat: two sets of one kind and appid would each
    rotate the other's token, and a client's own token request (which names only the appid)
    could not tell them apart. The same holds across tenants: each tenant's main appid is a v5
    set.

    Fed the values as given, so a set with another mistake is compared too: every problem shows
    in one run."""

    def __init__(self, reader: Reader, default_appid: str | None, default_source: str) -> None:
        """`default_source`: where the default set's appid was given ("SOBOT_APPID",
        "--appid", "the file's top-level appid"), for a message to name."""
        self._reader = reader
        self._first: dict[tuple[str, str], str] = {}
        if default_appid is not None:
            self._first["v5", default_appid] = f"the default set ({default_source})"

    def add(self, where: str, kind: Any, appid: Any, *, tenant: bool = False) -> None:
        """`where`: the set's key path; `tenant`: it is a tenant's main appid (kind v5)."""
        if not (isinstance(kind, str) and isinstance(appid, str) and appid.strip()):
            return
        key = (kind.strip().lower(), appid.strip())
        first = self._first.setdefault(key, where)
        if first == where:
            return
        why = (
            "a client's own get_token could not tell the two apart"
            if tenant
            else "two sets of one appid would rotate each other's token"
        )
        self._reader.problem(f"{where}.appid", f"the same {key[0]} appid as {first}: {why}")
