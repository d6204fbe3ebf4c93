"""`sobot-proxy check`: what a configuration will do, and with `--online`, whether it works.

Offline, one line per setting: its name, the value the proxy would use, and where that value
came from (flag, environment, config file or default; a lower layer it overrides is named too).
Secrets are never shown: a secret is only "set", with the file it was read from; a password in
a Redis URL is masked.

Then the tenants, the route table and the credential sets. Online (prove.py), every set of
every tenant is proven, each at its tenant's upstream.

Exit status: 0 valid (and, online, proven); 1 the credentials or the token were refused, or
Sobot or the token store cannot be reached; 2 a configuration or usage problem.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from proxy.config.settings import MIB, OPTIONS, REGIONS, Origin, Provenance, Settings, is_loopback
from proxy.errors import BadRequest
from proxy.server.paths import split_target
from proxy.sobot.credential import spelled_as
from proxy.sobot.kinds import TOKEN_PATHS

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
PRECEDENCE: Final = "flag > env > config file > default"
MASK: Final = "***"
# The most of a probe's answer read: enough for any return code, bounded whatever comes.
PROBE_READ_LIMIT: Final = MIB
_VALUE_WIDTH: Final = 34


# --- offline: what will be used, and where it came from ---------------------------------------


def describe(settings: Settings, provenance: Provenance) -> list[str]:
    """One line per setting: name, the value that will be used, and where it came from."""
    rows = _rows(settings, provenance)
    name_width = max(len(name) for name, _, _ in rows)
    return [
        f"  {name:<{name_width}}  {value:<{_VALUE_WIDTH}}  {where}" for name, value, where in rows
    ]


def _where(origin: Origin, *, via: str = "") -> str:
    where = f"{origin} ({via})" if via else str(origin)
    if origin.shadowed:
        where += f" (overrides {', '.join(origin.shadowed)})"
    return where


def warnings(settings: Settings, provenance: Provenance) -> list[str]:
    """Settings that are allowed but probably not meant, one line each."""
    found = []
    if (
        settings.allow_unauthenticated
        and not settings.client_keys
        and not is_loopback(settings.host)
    ):
        found.append(
            f"listening on {settings.host} without client keys: anyone who reaches this address "
            "acts as your Sobot company"
        )
    if urlsplit(settings.token_store).password and settings.token_store_password:
        found.append(
            "the token store URL carries a password, so the one set by "
            f"{provenance.origins['token_store_password']} is not used"
        )
    if provenance.region and provenance.origins["base_url"] != provenance.origins["region"]:
        found.append(
            f"the region ({provenance.origins['region']}) is not used: the base URL "
            f"({provenance.origins['base_url']}) overrides it"
        )
    return found


def _rows(settings: Settings, provenance: Provenance) -> list[tuple[str, str, str]]:
    """(name, value as shown, where it came from) for the file, every option and every secret;
    each secret next to the option it serves."""
    origins = provenance.origins
    rows = [("config", provenance.config_file or "none", _where(origins["config"]))]
    for option in OPTIONS:
        name = option.name
        if name == "allow_unauthenticated":
            keys = "client_keys"
            rows.append((keys, _client_keys(settings, provenance), _where(origins[keys])))
        if name == "region":
            rows.append((name, _region(provenance), _where(origins[name])))
        elif name == "base_url" and provenance.region and origins[name] == origins["region"]:
            rows.append((name, settings.base_url, _where(origins[name], via="the region's URL")))
        else:
            rows.append((name, _format(name, getattr(settings, name)), _where(origins[name])))
        if name == "appid":
            rows.append(("app_key", _secret(origins["app_key"]), _where(origins["app_key"])))
        if name == "token_store":
            password = "token_store_password"
            if urlsplit(settings.token_store).password:
                rows.append((password, "in the URL (masked)", _where(origins[name])))
            else:
                rows.append((password, _secret(origins[password]), _where(origins[password])))
    return rows


_EMPTY_MEANS: Final = {
    "temp_dir": f"{tempfile.gettempdir()} (the system's)",
    "ca_bundle": "the system's CAs",
    "allow_paths": "every path a route serves",
    "forward_prefixes": "none: only [[routes]] are forwarded",
    "allow_methods": "every method",
}


def _format(name: str, value: object) -> str:
    if name == "token_store":
        return mask_store_url(str(value))
    if name in ("max_body", "spool_limit") and isinstance(value, int):
        return _size(value)
    if value is None or value == ():
        return _EMPTY_MEANS.get(name, "not set")
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g} s"
    return str(value)


def _size(size: int) -> str:
    for unit, factor in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit} ({size} bytes)"
    return f"{size} bytes"


def _region(provenance: Provenance) -> str:
    if provenance.region is None:
        return "not set"
    used = provenance.origins["base_url"] == provenance.origins["region"]
    url = REGIONS[provenance.region]
    return f"{provenance.region} ({url})" if used else f"{provenance.region} (not used)"


def _secret(origin: Origin) -> str:
    if origin.layer == "default":
        return "not set"
    return f"set (read from {origin.file})" if origin.file else "set"


def _client_keys(settings: Settings, provenance: Provenance) -> str:
    if not settings.client_keys:
        return "none: no inbound authentication"
    origin = provenance.origins["client_keys"]
    count = len(settings.client_keys)
    keys = f"{count} key{'s' if count > 1 else ''} set"
    return f"{keys} (read from {origin.file})" if origin.file else keys


def mask_store_url(url: str) -> str:
    """The token store URL with its password, if any, replaced by ***: in the user part, or
    as redis-py also takes it, a `password` parameter of the query."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:{MASK}@{host}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        masked = [(k, MASK if k.lower() == "password" else v) for k, v in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)


def probe_path(value: str) -> str:
    """argparse type of --probe-path: a GET target that is no token request."""
    try:
        path, _query = split_target(value)
    except BadRequest as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc.message}") from None
    if any(spelled_as(path, token_path) for token_path in TOKEN_PATHS):
        raise argparse.ArgumentTypeError(
            f"{value!r} is a token request, which would rotate the token: name a read-only API"
        )
    return value


def describe_routes(settings: Settings) -> list[str]:
    """The route table, longest prefix first, and the credential sets, one line each."""
    rows = [
        (
            route.prefix,
            route.upstream(settings.base_url),
            route.credentials or "none (nothing injected)",
        )
        for route in settings.route_table
    ]
    width = max((len(prefix) for prefix, _, _ in rows), default=0)
    lines = ["routes (longest prefix first):"]
    lines += [f"  {prefix:<{width}}  -> {url}  credentials: {name}" for prefix, url, name in rows]
    lines.append("credential sets:")
    name_width = max(len(config.name) for config in settings.credential_sets)
    for config in settings.credential_sets:
        token_from = config.base_url or settings.base_url
        lines.append(
            f"  {config.name:<{name_width}}  kind {config.kind}, appid {config.appid}, secret "
            f"set, token from {token_from}"
        )
    return lines


def describe_tenants(settings: Settings) -> list[str]:
    """The tenants, `default` first, one line each: appid, main upstream, credential sets and
    how many client keys are bound to it. Never a secret."""
    bound = [tenant for _, tenant in settings.client_key_bindings]
    tenants = settings.all_tenants
    width = max(len(tenant.name) for tenant in tenants)
    lines = ["tenants:"]
    for tenant in tenants:
        keys = bound.count(tenant.name)
        lines.append(
            f"  {tenant.name:<{width}}  appid {tenant.appid}, upstream {tenant.base_url}, "
            f"credential sets: {', '.join(config.name for config in tenant.credential_sets)}; "
            f"{keys} client key{'' if keys == 1 else 's'}"
        )
    return lines
